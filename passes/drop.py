"""drop: remove whole blocks (static depth pruning, VDMini).

Guarantee: the result computes exactly what the original computes with the same blocks skipped
(`skip_blocks`: every stream output of a dropped block replaced by its paired stream input), which
is what the model's diffusers class built with fewer layers and the kept blocks' weights computes
(tests/test_drop.py checks this per family, with the blocks each config can leave out). The
dropped blocks' nodes, the side computations only they used, and their weights are gone, so FLOPs
and parameters fall by the blocks' share in `cost.model_cost` (more where earlier work fed only the
dropped blocks: HunyuanVideo's last double block's text stream when every single block goes).

Which blocks: `hierarchical` (VDMini; default) removes only among the shallow
⌊(1 − protect_deep)·n⌋ blocks, lowest block importance first, keeping the deep blocks that carry
motion; `importance` removes the globally lowest-importance blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from graphopt.blocks import bypass_blocks, refuse_routed, skip_blocks
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, register, rel_error
from graphopt.passes.block_importance import POLICIES, n_shallow, rank_blocks


@dataclass
class DropOptions:
    policy: str = "hierarchical"
    blocks: int | None = None          # how many blocks to remove, or
    fraction: float | None = None      # which fraction of them (0.25 when neither is given)
    protect_deep: float = 0.5          # hierarchical: the deepest fraction never removed
    # Which blocks to remove (indices into graph.blocks), given (e.g. ranked on a GPU elsewhere):
    # no block importance is computed, so this is how a meta-device graph (no weights) is dropped.
    removed: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise GraphoptError(f"drop policy '{self.policy}' unknown; choose one of {POLICIES}")
        if self.removed is not None:
            if self.blocks is not None or self.fraction is not None:
                raise GraphoptError("give drop either the `removed` blocks or how many to remove "
                                    "(`blocks` / `fraction`), not both")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.removed):
                raise GraphoptError(f"drop removed must be block indices, got {self.removed!r}")
            self.removed = tuple(sorted(set(self.removed)))
        if self.blocks is not None and self.fraction is not None:
            raise GraphoptError("give drop either `blocks` (a count) or `fraction`, not both")
        if self.blocks is None and self.fraction is None and self.removed is None:
            self.fraction = 0.25
        if self.blocks is not None and (not isinstance(self.blocks, int) or self.blocks < 0):
            raise GraphoptError(f"drop blocks must be a count >= 0, got {self.blocks!r}")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise GraphoptError(f"drop fraction must be in [0, 1), got {self.fraction}")
        if not 0.0 <= self.protect_deep < 1.0:
            raise GraphoptError(f"drop protect_deep must be in [0, 1), got {self.protect_deep}")


@register
class Drop(Pass):
    name = "drop"
    Options = DropOptions

    def decide(self, graph) -> dict:
        o = self.options
        n = len(graph.blocks)
        if o.removed is not None:
            bad = [i for i in o.removed if not 0 <= i < n]
            if bad or len(o.removed) == n:
                raise GraphoptError(f"drop removed {list(o.removed)}: the model has blocks 0..{n - 1} "
                                    f"and must keep at least one")
            return {"removed": list(o.removed), "names": [graph.blocks[i].name for i in o.removed],
                    "n_blocks": n}
        count = o.blocks if o.blocks is not None else int(round(o.fraction * n))
        limit = n_shallow(n, o.protect_deep) if o.policy == "hierarchical" else n - 1
        if count > limit:
            where = (f"the {limit} shallow blocks (protect_deep={o.protect_deep} keeps the rest)"
                     if o.policy == "hierarchical" else f"{n} blocks while keeping one")
            raise GraphoptError(f"cannot drop {count} blocks from {where}: ask for fewer, or "
                                f"lower protect_deep")
        removed = []
        if count and graph.is_meta:
            raise GraphoptError("ranking blocks needs weights (block importance runs the model), "
                                "and this graph is on the meta device: give the drop option "
                                "removed=[block indices], or replay a recipe computed where the "
                                "weights are")
        if count:
            scores = graph.analysis("block-importance").scores()
            removed = sorted(rank_blocks(scores, o.policy, o.protect_deep)[n - count:])
        return {"removed": removed, "names": [graph.blocks[i].name for i in removed],
                "n_blocks": n}

    def apply(self, graph, decisions: dict) -> None:
        n = decisions["n_blocks"]
        removed = list(decisions["removed"])
        names = [graph.blocks[i].name for i in removed if i < len(graph.blocks)]
        if len(graph.blocks) != n or names != list(decisions["names"]):
            raise GraphoptError(f"recipe drops blocks {decisions['names']} of a {n}-block model; "
                                f"this model has {len(graph.blocks)} blocks "
                                f"({', '.join(b.name for b in graph.blocks[:4])}, ...): the recipe "
                                f"was made for another architecture or config")
        drop_blocks(graph, removed)

    def summarize(self, graph, decisions) -> dict:
        return {"blocks_removed": len(decisions["removed"])}

    def describe(self, decisions: dict) -> list[str]:
        names = ", ".join(f"`{n}`" for n in decisions["names"]) or "none"
        return [f"- removed {len(decisions['removed'])} of {decisions['n_blocks']} blocks: {names}"]

    def ensures(self, before, after, inputs) -> float:
        """Erasing the bypassed blocks and the code only they used changed nothing: the reference
        bypasses the same blocks in `before` and erases nothing. (That bypassing equals the smaller
        diffusers model needs the model's class; tests/test_drop.py checks it.)"""
        removed = after.recipe.steps[-1]["decisions"]["removed"]
        return rel_error(after.gm(**inputs)[0], skip_blocks(before, removed)(**inputs)[0])


def drop_blocks(graph, indices) -> None:
    """Remove blocks `indices`: rewire their stream outputs' users to the stream inputs, erase."""
    refuse_routed(graph)
    indices = sorted(set(indices))
    if len(indices) == len(graph.blocks):
        raise GraphoptError("dropping every block leaves no transformer; keep at least one")
    nodes = bypass_blocks(graph, graph.gm.graph, indices)
    for i in indices:
        for node in reversed([nodes[m] for m in graph.blocks[i].nodes]):
            graph.gm.graph.erase_node(node)
    # Side computations only the dropped blocks read (their own rotary tables, masks) die too;
    # submodules (the capture's input guards) are never removed.
    graph.gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op in ("placeholder", "output", "call_module") or n.is_impure())
    graph.gm.delete_all_unused_submodules()     # the dropped blocks' weights
    graph.refresh()
