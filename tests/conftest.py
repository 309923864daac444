import pytest
import torch

from graphopt import capture
from graphopt.families import build_model

PRUNE_FAMILIES = ["wan", "hunyuan-video", "ltx-video", "latte"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """torch on one thread for the whole suite: tiny models on a busy 2-core machine run up to
    ~10x slower with two (OpenMP workers wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_graphs():
    """Captured tiny models, one per family, built once per test session (copy before editing)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = capture(build_model(family))
        return cache[family]

    return get


# Float inputs that are no activations: a mask (HunyuanVideo's is float, 1 = attend) and the
# guidance scale keep the example's values; N(0, 1) would feed the model what it never sees.
KEPT_INPUTS = ("encoder_attention_mask", "attention_mask", "guidance")


def random_inputs(graph, seed=1):
    """Fresh N(0, 1) latent and conditioning states of the graph's shapes (never zeros); the
    timestep, masks and guidance as in the example inputs."""
    g = torch.Generator().manual_seed(seed)
    kept = {graph.timestep_input, *KEPT_INPUTS}
    out = {}
    for k, v in graph.example_inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in kept:
            out[k] = torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v
    return out
