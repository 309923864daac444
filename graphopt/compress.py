"""compress(): run named passes on a graph, then write model, recipe and report to a folder."""
from __future__ import annotations

import json
import math

import torch

from graphopt.cost import model_cost
from graphopt.describe import human
from graphopt.errors import GraphoptError
from graphopt.pass_manager import PassManager, available, get_transform


def check_request(passes: list[str], options: dict[str, dict]) -> list:
    """The pass objects for `passes` with `options[name]`, or a GraphoptError naming what is wrong:
    no pass, an unknown one, options of a pass not run, an option of the wrong type or value."""
    from graphopt.recipe import check_options

    if not passes:
        raise GraphoptError("no pass to run: give --passes, e.g. --passes prune,route (passes: "
                            f"{', '.join(available())})")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise GraphoptError("options must map a pass name to a dict of its options")
    unknown = set(options) - set(passes)
    if unknown:
        raise GraphoptError(f"options given for pass(es) {sorted(unknown)} that are not in "
                            f"--passes {','.join(passes)}")
    instances = []
    for name in passes:
        cls = get_transform(name)    # an analysis is refused, with why
        check_options(cls, options.get(name, {}), f"pass '{name}'")
        instances.append(cls(**options.get(name, {})))
    return instances


def compress(graph, passes: list[str], options: dict[str, dict], *, out=None, verify=False,
             console=None, overwrite=False, protect=()):
    """Run `passes` (names) with `options[name]` on `graph` in place; save to `out` if given
    (checked before the passes run: see graphopt.save for `overwrite` and `protect`)."""
    instances = check_request(passes, options)
    protect = [graph.source, *protect]
    if out is not None:
        from graphopt.io import check_output_dir

        check_output_dir(out, protect=protect, overwrite=overwrite)
    before = model_cost(graph)

    def progress(result):
        if console is not None:
            extra = ", ".join(f"{k}={v}" for k, v in result.summary.items()
                              if not k.startswith(("before_", "after_")))
            check = result.check() and f", {result.check()}"
            console.print(f"[green]✓[/] {result.name} in {result.seconds:.2f}s {extra}{check}")

    results = []
    for instance in instances:      # one at a time: a route budget is checked on the graph it routes
        if instance.name == "route":
            _check_route_budget(graph, instance.options)
        results += PassManager([instance], verify=verify, progress=progress).run(graph)
    after = model_cost(graph)
    executed = _executed_flops(graph)
    report = {
        "passes": [{"name": r.name, "seconds": r.seconds, "summary": r.summary,
                    "verified_error": r.verified_error, "not_verified": r.not_verified}
                   for r in results],
        "before": {"flops_per_step": before.flops, "params": before.params},
        "after": {"flops_per_step": after.flops, "params": after.params},
    }
    if executed is not None:
        # A routed graph holds every block; what a step costs is what its router runs.
        report["after"]["executed_flops_per_step"] = executed
    if console is not None:
        flops = after.flops if executed is None else executed
        what = "" if executed is None else " executed by the router"
        console.print(f"FLOPs/step {human(before.flops)} → {human(flops)}{what} "
                      f"({flops / before.flops:.3f}x), params {human(before.params)} → "
                      f"{human(after.params)} ({after.params / before.params:.3f}x)")
    if out is not None:
        from graphopt.serialize import save

        markdown = _report_markdown(graph, instances, results, before, after, executed)
        out = save(graph, out, extra_files={"report.json": json.dumps(report, indent=2, default=str),
                                            "report.md": markdown, **_plots(graph)},
                   overwrite=overwrite, protect=protect)
        if console is not None:
            console.print(f"wrote {out}/ (model.safetensors, recipe.json, report.json, report.md)")
    return report


def _check_route_budget(graph, options) -> None:
    """Refuse a route budget under which the router could run no block (it would pay for the
    router and skip everything), naming the lowest budget that runs one."""
    cost = model_cost(graph)
    n = len(cost.blocks)
    routable = [j for j in (options.blocks if options.blocks is not None else range(n)) if 0 <= j < n]
    if not routable or cost.flops <= 0:
        return                       # the pass reports unknown blocks itself
    block_flops = [cost.blocks[j]["flops"] for j in routable]
    lowest = (cost.flops - sum(block_flops) + min(block_flops)) / cost.flops
    if options.budget + 1e-6 < lowest:
        raise GraphoptError(f"route budget {options.budget:g} fits no block: what always runs plus "
                            f"the cheapest routable block is {lowest:.3f} of the FLOPs per step; "
                            f"give --route-budget {math.ceil(lowest * 1000) / 1000:g} or more")


def _executed_flops(graph) -> int | None:
    """FLOPs the router of a routed graph executes on the example inputs (None: not routed)."""
    router = getattr(graph.gm, "router", None)
    if router is None:
        return None
    from graphopt import reuse

    with router.recording(), torch.no_grad():
        graph.gm(**graph.example_inputs)
        executed = router.step_flops()[-1]["executed_flops"]
    reuse.reset_cache(graph)         # that call was no step of the user's sampling run
    return executed


def _report_markdown(graph, instances, results, before, after, executed=None) -> str:
    """What a person reads: cost before/after, what each pass removed, the analyses behind it."""
    lines = ["# graphopt compress report", "",
             "| | before | after | ratio |", "|---|---|---|---|",
             f"| FLOPs per step | {human(before.flops)} | {human(after.flops)} | "
             f"{after.flops / before.flops:.3f} |"]
    if executed is not None:
        lines.append(f"| FLOPs the router executes per step | {human(before.flops)} | "
                     f"{human(executed)} | {executed / before.flops:.3f} |")
    lines += [f"| parameters | {human(before.params)} | {human(after.params)} | "
              f"{after.params / before.params:.3f} |", ""]
    for p, r in zip(instances, results):
        check = r.check() and f", {r.check()}"
        lines += [f"## {r.name} ({r.seconds:.1f} s{check})", "", *p.describe(r.decisions), ""]
    for name, result in graph.reports.items():
        to_markdown = getattr(result, "to_markdown", None)
        lines += [f"## {name}", ""]
        if callable(getattr(result, "plot", None)):
            lines += [f"![{name}]({name}.png)", ""]
        if callable(to_markdown):
            lines += [to_markdown(), ""]
    return "\n".join(lines)


def _plots(graph) -> dict:
    """Analyses that know how to draw themselves (head roles, block importance) add a PNG:
    file name -> the function that writes it (report.md links each)."""
    return {f"{name}.png": result.plot for name, result in graph.reports.items()
            if callable(getattr(result, "plot", None))}
