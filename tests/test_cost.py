"""The cost model against torch's own FLOP counter, and its per-head predictions."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from graphopt.cost import model_cost


@pytest.mark.parametrize("family", ["wan", "hunyuan-video", "ltx-video", "latte", "pixart"])
def test_flops_match_flop_counter(family, tiny_graphs):
    g = tiny_graphs(family)
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into matmuls, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        g(**g.example_inputs)
    assert model_cost(g).flops == counter.get_total_flops()


def test_params_and_blocks_add_up(tiny_graphs):
    g = tiny_graphs("wan")
    c = model_cost(g)
    assert c.params == sum(p.numel() for p in g.gm.parameters())
    assert sum(c.block_flops()) + c.outside_blocks_flops == c.flops
    assert all(b["params"] > 0 for b in c.blocks)


@pytest.mark.parametrize("family", ["wan", "hunyuan-video", "latte"])
def test_flops_match_flop_counter_after_head_and_channel_pruning(family, tiny_graphs):
    from graphopt import ffnflow
    from graphopt.passes.prune import prune_channels, prune_heads

    g = tiny_graphs(family).copy()
    prune_heads(g, {a.name: [0, 2] for a in g.attentions.values()
                    if a.block is not None and a.prunable})
    prune_channels(g, {n: list(range(1, f.hidden, 2)) for n, f in ffnflow.find(g).items()})
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        g(**g.example_inputs)
    cost = model_cost(g)
    assert cost.flops == counter.get_total_flops()
    assert all(f.hidden * f.flops_per_channel == f.flops for f in cost.ffns.values())
