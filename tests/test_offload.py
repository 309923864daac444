"""Block-offloaded calibration equals the resident one, with one block's weights on the device at
a time (also through autograd), and calibration samples stream from their file."""
import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file

from graphopt import capture
from graphopt.calibration import BlockOffload, CalibrationFile, calibration_inputs
from graphopt.families import build_model
from graphopt.passes.head_roles import HeadRolesOptions, head_roles
from graphopt.passes.importance import head_importance
from graphopt.passes.prune import mask_heads


@pytest.fixture(scope="module")
def graph():
    return capture(build_model("wan", dict(build_model("wan").config, num_layers=3)))


def test_offloaded_head_roles_and_importance_equal_resident(graph):
    resident = head_roles(graph, HeadRolesOptions(timesteps=2))
    offloaded = head_roles(graph, HeadRolesOptions(timesteps=2, offload="cpu"))
    for name, r in resident.attentions.items():
        assert torch.equal(r.temporal_score, offloaded.attentions[name].temporal_score)
        assert r.roles == offloaded.attentions[name].roles
    inputs = calibration_inputs(graph, timesteps=2)
    a = head_importance(graph, "role-aware", inputs=inputs)
    b = head_importance(graph, "role-aware", inputs=inputs, offload="cpu")
    assert all(torch.allclose(a[n], b[n], rtol=1e-12, atol=0) for n in a)


def test_one_block_on_the_device_at_a_time_through_backward(graph, monkeypatch):
    names = [n for n in graph.flows if graph.attentions[n].block is not None]
    masked = mask_heads(graph, {n: torch.ones(graph.attentions[n].heads) for n in names})
    masks = [masked.get_buffer(f"graphopt_head_mask_{i}") for i in range(len(names))]
    for p in masked.parameters():        # as head_sensitivity: gradients for the masks only
        p.requires_grad_(False)
    for m in masks:
        m.requires_grad_(True)
    x = graph.example_inputs
    reference = torch.autograd.grad(masked(**x)[0].square().sum(), masks)

    offload = BlockOffload(graph, "cpu")
    made, fetch = [], BlockOffload.fetch

    def recording(self, target, value):
        copy = fetch(self, target, value)
        if self._block(target) is not None:
            made.append((self._block(target), weakref.ref(copy)))
        return copy

    monkeypatch.setattr(BlockOffload, "fetch", recording)
    out = offload.run(masked, x)[0].square().sum()
    gc.collect()
    # Autograd keeps references, not device copies: only the last block's copies are alive.
    assert {block for block, ref in made if ref() is not None} == {graph.blocks[-1].name}
    assert offload.most_blocks_at_once == 1 and len({b for b, _ in made}) == len(graph.blocks)
    grads = torch.autograd.grad(out, masks)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-12) for a, b in zip(grads, reference))


def test_calibration_samples_stream_from_their_file(graph, tmp_path):
    x = graph.example_inputs
    latents = torch.randn((3,) + tuple(x["hidden_states"].shape[1:]))
    timesteps = torch.tensor([900.0, 500.0, 100.0])
    save_file({"hidden_states": latents, "timestep": timesteps}, str(tmp_path / "c.safetensors"))
    inputs = calibration_inputs(graph, data=tmp_path / "c.safetensors")
    assert isinstance(inputs, CalibrationFile) and len(inputs) == 3
    assert torch.equal(inputs[1]["hidden_states"], latents[1:2])
    assert float(inputs[-1]["timestep"]) == 100.0
    roles = head_roles(graph, HeadRolesOptions(data=str(tmp_path / "c.safetensors"),
                                               offload="cpu"))
    assert roles.inputs == 3 and roles.timesteps == [900.0, 500.0, 100.0]
