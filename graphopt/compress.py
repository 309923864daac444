"""compress(): run named passes on a graph, then write model, recipe and report to a folder."""
from __future__ import annotations

import json

from graphopt.cost import model_cost
from graphopt.describe import human
from graphopt.pass_manager import PassManager, get_transform


def compress(graph, passes: list[str], options: dict[str, dict], *, out=None, verify=False,
             console=None, overwrite=False, protect=()):
    """Run `passes` (names) with `options[name]` on `graph` in place; save to `out` if given
    (checked before the passes run: see graphopt.save for `overwrite` and `protect`)."""
    unknown = set(options) - set(passes)
    if unknown:
        from graphopt.errors import GraphoptError
        raise GraphoptError(f"options given for pass(es) {sorted(unknown)} that are not in "
                            f"--passes {','.join(passes)}")
    classes = [get_transform(name) for name in passes]    # an analysis is refused, with why
    protect = [graph.source, *protect]
    if out is not None:
        from graphopt.io import check_output_dir

        check_output_dir(out, protect=protect, overwrite=overwrite)
    instances = [cls(**options.get(name, {})) for cls, name in zip(classes, passes)]
    before = model_cost(graph)

    def progress(result):
        if console is not None:
            extra = ", ".join(f"{k}={v}" for k, v in result.summary.items()
                              if not k.startswith(("before_", "after_")))
            check = result.check() and f", {result.check()}"
            console.print(f"[green]✓[/] {result.name} in {result.seconds:.2f}s {extra}{check}")

    results = PassManager(instances, verify=verify, progress=progress).run(graph)
    after = model_cost(graph)
    report = {
        "passes": [{"name": r.name, "seconds": r.seconds, "summary": r.summary,
                    "verified_error": r.verified_error, "not_verified": r.not_verified}
                   for r in results],
        "before": {"flops_per_step": before.flops, "params": before.params},
        "after": {"flops_per_step": after.flops, "params": after.params},
    }
    if console is not None:
        console.print(f"FLOPs/step {human(before.flops)} → {human(after.flops)} "
                      f"({after.flops / before.flops:.3f}x), params {human(before.params)} → "
                      f"{human(after.params)} ({after.params / before.params:.3f}x)")
    if out is not None:
        from graphopt.serialize import save

        markdown = _report_markdown(graph, instances, results, before, after)
        out = save(graph, out, extra_files={"report.json": json.dumps(report, indent=2, default=str),
                                            "report.md": markdown, **_plots(graph)},
                   overwrite=overwrite, protect=protect)
        if console is not None:
            console.print(f"wrote {out}/ (model.safetensors, recipe.json, report.json, report.md)")
    return report


def _report_markdown(graph, instances, results, before, after) -> str:
    """What a person reads: cost before/after, what each pass removed, the analyses behind it."""
    lines = ["# graphopt compress report", "",
             "| | before | after | ratio |", "|---|---|---|---|",
             f"| FLOPs per step | {human(before.flops)} | {human(after.flops)} | "
             f"{after.flops / before.flops:.3f} |",
             f"| parameters | {human(before.params)} | {human(after.params)} | "
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
