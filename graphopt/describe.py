"""What `graphopt inspect` shows: the structure and cost of a DiTGraph, as a dict and as tables."""
from __future__ import annotations

from graphopt.cost import model_cost


def describe(graph) -> dict:
    cost = model_cost(graph)
    attentions = []
    for a in graph.attentions.values():
        ac = cost.attentions.get(a.name)
        attentions.append({
            "name": a.name, "block": a.block, "kind": a.kind, "heads": a.heads,
            "head_dim": a.head_dim, "q_tokens": a.q_tokens, "kv_tokens": a.kv_tokens,
            "prunable": a.prunable, "why_not": a.why_not,
            "flops_per_head": ac.flops_per_head if ac else None,
            "params_per_head": ac.params_per_head if ac else None,
        })
    by_name = {b.name: b for b in graph.blocks}
    blocks = []
    for c in cost.blocks:
        b = by_name.get(c["name"])       # None for a routed block (it lives in a cond branch)
        blocks.append({
            "index": c["index"], "name": c["name"], "routed": c["routed"],
            "streams": len(b.stream_out) if b else None,
            "attentions": [f"{graph.attentions[n].kind}:{graph.attentions[n].heads}x"
                           f"{graph.attentions[n].head_dim}" for n in b.attentions] if b else [],
            "ffn_hidden": [graph.ffns[f].hidden for f in b.ffns] if b else [],
            "flops": c["flops"], "params": c["params"], "bytes": c["bytes"],
        })
    spec = graph.spec
    return {
        "source": graph.source,
        "class_name": graph.recipe.model.get("class_name"),
        "family": graph.family.name if graph.family is not None else None,
        "meta": graph.is_meta,
        "input_spec": graph.recipe.model.get("input_spec"),
        "token_layout": list(graph.token_layout) if graph.token_layout else None,
        "timestep_embedding": graph.timestep_embedding,
        "blocks": blocks,
        "attentions": attentions,
        "totals": {"blocks": len(graph.blocks), "flops_per_step": cost.flops,
                   "flops_outside_blocks": cost.outside_blocks_flops,
                   "params": cost.params, "param_bytes": cost.param_bytes,
                   "batch": spec.batch if spec is not None else None},
        "recipe_steps": [s["pass"] for s in graph.recipe.steps],
        # What each step changed, in the words of its pass (a compressed model).
        "recipe": [line for s in graph.recipe.steps for line in _described(s)],
    }


def _described(step: dict) -> list[str]:
    from graphopt.pass_manager import get_pass

    return get_pass(step["pass"])().describe(step["decisions"])


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def render(info: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{info['class_name'] or info['source']}: {info['totals']['blocks']} blocks"
                    + (" (meta: no weights)" if info["meta"] else ""))
    for col in ("#", "block", "streams", "attention kind:heads x head_dim", "FFN hidden",
                "FLOPs/step", "params"):
        t.add_column(col, justify="right" if col in ("#", "FLOPs/step", "params") else "left")
    for b in info["blocks"]:
        t.add_row(str(b["index"]), b["name"] + (" (routed)" if b["routed"] else ""),
                  str(b["streams"] or "-"), ", ".join(b["attentions"]) or "-",
                  ", ".join(map(str, b["ffn_hidden"])) or "-", human(b["flops"]),
                  human(b["params"]))
    console.print(t)
    tot = info["totals"]
    layout = info["token_layout"]
    console.print(
        f"per step: [bold]{human(tot['flops_per_step'])}FLOPs[/] "
        f"({human(tot['flops_outside_blocks'])} outside blocks), "
        f"params {human(tot['params'])} ({human(tot['param_bytes'])}B), batch {tot['batch']}; "
        f"video tokens {'x'.join(map(str, layout)) if layout else 'unknown'} (frames x h x w); "
        f"timestep embedding at node '{info['timestep_embedding']}'")
    for line in info.get("recipe", []):
        console.print(line.removeprefix("- "), markup=False)
    blocked = [a for a in info["attentions"] if not a["prunable"]]
    for a in blocked:
        console.print(f"[yellow]not prunable[/]: {a['name']}: {a['why_not']}")
