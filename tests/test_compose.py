"""Reuse composes with static compression in one recipe: prune + drop + route(skip="reuse"), and
prune + drop + cache. The recipe replays onto a fresh capture, streams onto the checkpoint
(`graphopt apply`), loads back (`graphopt.load`) and inspects; every path equals the in-memory
compressed model over a whole sampling run in which blocks really are skipped."""
import pytest
import torch

from graphopt import GraphoptError, capture, load, rel_error
from graphopt.apply import apply_recipe
from graphopt.cli import main
from graphopt.dropin import GraphTransformer
from graphopt.families import build_model
from graphopt.pass_manager import PassManager, get_pass
from graphopt.recipe import Recipe

COMPOSITIONS = {
    "route-reuse": [("route", {"ranking": [2, 0, 1], "budget": 0.7, "skip": "reuse"})],
    "cache": [("cache", {"method": "first-block", "threshold": 0.1})],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    model = build_model("wan", dict(build_model("wan").config, num_layers=4))
    model.save_pretrained(tmp / "ckpt", max_shard_size="60KB")
    return tmp, model


def _run(model, graph, steps=6):
    """A sampling-like run; the outputs of every step and the StepRecords of a GraphTransformer."""
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=gen) if k != graph.timestep_input else v
              for k, v in graph.example_inputs.items() if isinstance(v, torch.Tensor)}
    x, outs = inputs[graph.latent_input], []
    with torch.no_grad():
        for t in torch.linspace(999.0, 50.0, steps):
            out = model(**{**inputs, graph.latent_input: x,
                           graph.timestep_input: torch.full((1,), float(t))}, return_dict=False)[0]
            outs.append(out)
            x = x - 0.02 * out
    return outs


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_reuse_composes_with_prune_and_drop(name, checkpoint, tmp_path, capsys):
    tmp, model = checkpoint
    heads = {a.name: [0, 2, 3] for a in capture(model).attentions.values()
             if a.prunable and a.block is not None}
    passes = [get_pass("prune")(heads=heads), get_pass("drop")(removed=[1])]
    passes += [get_pass(p)(**o) for p, o in COMPOSITIONS[name]]
    graph = capture(model)
    PassManager(passes).run(graph)
    graph.recipe.save(tmp_path / "recipe.json")
    reference = GraphTransformer(graph)
    expected = _run(reference, graph)
    executed = [r.executed for r in reference.records]
    assert len(set(executed)) > 1                       # some steps reuse, the first computes all

    replayed = capture(model)
    Recipe.load(tmp_path / "recipe.json").replay(replayed)
    apply_recipe(tmp_path / "recipe.json", tmp / "ckpt", tmp_path / "applied")
    for other in (replayed, load(tmp_path / "applied")):
        for a, b in zip(_run(other, graph), expected):
            assert rel_error(a, b) < 1e-6

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "applied")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert ("its cached residual" if name == "route-reuse" else "FirstBlockCache") in shown
    assert "dropped" in shown or "removed" in shown


def test_route_and_cache_in_one_graph_are_refused(checkpoint):
    _, model = checkpoint
    graph = capture(model)
    PassManager([get_pass("route")(ranking=[3, 2, 1, 0], budget=0.7, skip="reuse")]).run(graph)
    with pytest.raises(GraphoptError, match="already has conditional blocks"):
        PassManager([get_pass("cache")(method="first-block")]).run(graph)
