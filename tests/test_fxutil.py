"""The graph cutters agree on what crosses a boundary: `graphopt.outline` (a block into a conditional
branch) and `exporters/segments.py` (the graph into ONNX segments) recompute the same nodes where
they are used, from one rule (`graphopt.fxutil.recomputed_where_used`)."""
import torch

from graphopt import rel_error
from graphopt.fxutil import MAY_RETURN_INPUT, recomputed_where_used
from graphopt.outline import operands, outline, replace_outputs


class _Block(torch.nn.Module):
    """A stream `x` through a linear, reading its side input `t` as `t[...]` (aten.alias), as
    `t.to(t.dtype)` (aten.to.dtype, which returns `t` itself) and as `t`."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, run):
        return (self.lin(x) * t[...] + t.to(t.dtype) + t + x,)


def test_outline_recomputes_what_segments_recompute():
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), torch.tensor(True))
    gm = torch.export.export(_Block(), inputs, strict=False).module()
    nodes = {n.name: n for n in gm.graph.nodes}
    members = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.linear.default, torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor)]
    reads = {a for m in members for a in m.all_input_nodes} - set(members)
    aliases = {n for n in reads if n.op == "call_function" and n.target in MAY_RETURN_INPUT}
    assert {n.target for n in aliases} == {torch.ops.aten.alias.default, torch.ops.aten.to.dtype}
    ops, recomputed, _ = operands(gm, members, [nodes["x"]], "block")
    # The side input crosses once; its alias and its no-op cast are recomputed inside the branch,
    # exactly the nodes the segment cutter recomputes (outline passed the alias as an operand).
    assert set(recomputed) == {n for n in reads if recomputed_where_used(n)} == aliases
    assert [o.name for o in ops if o.op != "get_attr"] == ["x", "t"]
    with torch.no_grad():
        expected = gm(*inputs)[0]
        out = outline(gm, members, [(nodes["x"], members[-1])], nodes["run"], "blk", "block")
        replace_outputs(gm.graph, members, [members[-1]], out)
        gm.recompile()
        assert rel_error(gm(*inputs)[0], expected) < 1e-6
        skipped = gm(inputs[0], inputs[1], torch.tensor(False))[0]
        assert rel_error(skipped, inputs[0]) < 1e-6
        program = torch.export.export(gm, inputs, strict=False)
        assert rel_error(program.module()(*inputs)[0], expected) < 1e-6
