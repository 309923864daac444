"""The pass manager runs transforms only; analyses are asked for, never run as a step."""
import io

import pytest
import torch

from graphopt import GraphoptError, PassManager, capture, compress, get_pass
from graphopt.families import build_model
from graphopt.pass_manager import Analysis, Pass, available, get_transform
from graphopt.passes.drop import Drop
from graphopt.recipe import Recipe

ANALYSES = ["head-roles", "head-importance", "block-importance"]
TRANSFORMS = ["prune", "drop", "route", "cache"]


def test_every_builtin_is_one_kind():
    assert sorted(available()) == sorted(ANALYSES + TRANSFORMS)
    for name in ANALYSES:
        assert issubclass(get_pass(name), Analysis) and not issubclass(get_pass(name), Pass)
    for name in TRANSFORMS:
        assert get_transform(name) is get_pass(name) and issubclass(get_pass(name), Pass)


@pytest.mark.parametrize("name", ANALYSES)
def test_compress_refuses_an_analysis_and_says_how_to_run_it(name, tiny_graphs, tmp_path):
    g = tiny_graphs("wan").copy()
    before = [n.name for n in g.gm.graph.nodes]
    with pytest.raises(GraphoptError, match=rf"'{name}' is an analysis.*graph\.analysis\('{name}'"):
        compress(g, ["drop", name], {"drop": {"removed": [0]}}, out=tmp_path / "out")
    assert [n.name for n in g.gm.graph.nodes] == before and not g.recipe.steps
    assert not (tmp_path / "out").exists()
    with pytest.raises(GraphoptError, match="is an analysis"):
        PassManager([get_pass(name)()])


@pytest.mark.parametrize("name", ANALYSES)
def test_a_recipe_refuses_an_analysis_step(name, tiny_graphs, tmp_path):
    g = tiny_graphs("wan").copy()
    step = {"pass": name, "options": {}, "decisions": {}}
    g.recipe.steps.append(step)
    g.recipe.save(tmp_path / "recipe.json")
    one_line = (rf"^recipe '[^']*' step 0: '{name}' is an analysis \(it returns a result and changes "
                rf"nothing\), not a transform[^\n]*$")
    with pytest.raises(GraphoptError, match=one_line):
        Recipe.load(tmp_path / "recipe.json")
    before = [n.name for n in g.gm.graph.nodes]
    replayed = rf"^recipe step 0: '{name}' is an analysis[^\n]*not a transform: [^\n]*prune"
    with pytest.raises(GraphoptError, match=replayed):
        Recipe(model=g.recipe.model, steps=[step]).replay(g.copy())
    assert [n.name for n in g.gm.graph.nodes] == before


@pytest.mark.parametrize("name", TRANSFORMS)
def test_graph_analysis_refuses_a_transform(name, tiny_graphs):
    g = tiny_graphs("wan").copy()
    nodes = [n.name for n in g.gm.graph.nodes]
    with pytest.raises(GraphoptError, match=rf"^'{name}' is a transform \(it changes the graph\), not an "
                                            rf"analysis[^\n]*the analyses are block-importance, head-importance, "
                                            rf"head-roles$"):
        g.analysis(name)
    assert [n.name for n in g.gm.graph.nodes] == nodes and not g.recipe.steps and not g.reports


def test_analysis_changes_nothing(tiny_graphs):
    g = tiny_graphs("wan").copy()
    nodes, weights = [n.name for n in g.gm.graph.nodes], dict(g.gm.state_dict())
    result = g.analysis("block-importance", timesteps=(500.0,))
    assert g.reports["block-importance"] is result and len(result.scores()) == len(g.blocks)
    assert [n.name for n in g.gm.graph.nodes] == nodes and not g.recipe.steps
    assert all(torch.equal(v, weights[k]) for k, v in g.gm.state_dict().items())


class _Fails(Pass):
    name = "fails"

    def __init__(self, error):
        super().__init__()
        self.error = error

    def decide(self, graph):
        raise self.error


def test_an_error_inside_a_pass_names_it_and_the_passes_before_it():
    g = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match=r"^pass 'fails' \(no pass ran before it\): bad input$"):
        PassManager([_Fails(GraphoptError("bad input"))]).run(g)
    with pytest.raises(GraphoptError, match=r"^pass 'fails' \(after drop\): bad input$"):
        PassManager([Drop(removed=[0]), _Fails(GraphoptError("bad input"))]).run(g.copy())
    with pytest.raises(KeyError) as bug:         # a bug keeps its type and traceback
        PassManager([Drop(removed=[0]), _Fails(KeyError("x"))]).run(g.copy())
    assert bug.value.__notes__ == ["pass 'fails' (after drop)"]
    # A transform's own analysis error (block importance cannot run on meta) names the transform.
    with pytest.raises(GraphoptError, match=r"^pass 'drop' \(after drop\): ranking blocks needs weights"):
        PassManager([Drop(removed=[]), Drop(blocks=1, policy="importance")]).run(g.copy())


def test_verify_on_a_meta_graph_says_not_verified():
    from rich.console import Console

    g = capture(build_model("wan", device="meta"))
    text = io.StringIO()
    report = compress(g, ["drop"], {"drop": {"removed": [0]}}, verify=True,
                      console=Console(file=text, width=200))
    assert "drop" in text.getvalue() and "not verified (meta)" in text.getvalue()
    assert report["passes"][0]["not_verified"] == "meta"
    assert report["passes"][0]["verified_error"] is None
    [result] = PassManager([Drop(removed=[0])]).run(capture(build_model("wan", device="meta")))
    assert result.check() == ""                  # not asked for: nothing to say
