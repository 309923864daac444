"""The `graphopt` command line. Each verb is a thin layer over the Python API.

Bad input exits with code 2 and one line, `error: <what is wrong and how to fix it>`; `--debug`
shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from graphopt.errors import GraphoptError


def _add_model_args(p):
    p.add_argument("model", help="diffusers model folder, .pt2 archive, or a shipped name (tiny-wan)")
    p.add_argument("--frames", type=int, help="latent frames of the example input")
    p.add_argument("--height", type=int, help="latent height")
    p.add_argument("--width", type=int, help="latent width")
    p.add_argument("--batch", type=int, help="batch size of one step (2 with CFG in one batch)")
    p.add_argument("--meta", action="store_true",
                   help="build the architecture on the meta device: structure and cost, no weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading files that unpickle Python objects (can run code)")


def _capture_from_args(args):
    import dataclasses

    import torch

    from graphopt import families
    from graphopt.capture import capture, load_model

    model = load_model(args.model, trust_pickle=args.trust_pickle, meta=args.meta)
    spec = None
    if isinstance(model, torch.nn.Module):
        overrides = {k: getattr(args, k) for k in ("frames", "height", "width", "batch")
                     if getattr(args, k) is not None}
        if overrides:
            spec = dataclasses.replace(families.family_for(model).default_spec, **overrides)
    return capture(model, spec=spec, trust_pickle=args.trust_pickle)


def cmd_inspect(args) -> int:
    from rich.console import Console

    from graphopt.describe import describe, render

    graph = _capture_from_args(args)
    info = describe(graph)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info, Console())
    return 0


def cmd_compress(args) -> int:
    from rich.console import Console

    from graphopt.compress import compress

    graph = _capture_from_args(args)
    options = {}
    for spec in args.option or []:
        key, _, value = spec.partition("=")
        pass_name, _, opt = key.partition(".")
        if not opt:
            raise GraphoptError(f"option '{spec}' must look like PASS.OPTION=VALUE, "
                                f"e.g. prune.ratio=0.3")
        options.setdefault(pass_name, {})[opt] = _parse_value(value)
    for name, attr, key in (("prune", "prune_ratio", "ratio"), ("prune", "prune_criterion", "criterion"),
                            ("drop", "drop_fraction", "fraction"), ("route", "route_budget", "budget")):
        if getattr(args, attr) is not None:
            options.setdefault(name, {})[key] = getattr(args, attr)
    passes = [p for p in args.passes.split(",") if p]
    compress(graph, passes, options, out=args.output, verify=args.verify, console=Console())
    return 0


def _parse_value(text: str):
    """JSON where it parses (numbers, booleans, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="blocks, attentions, heads and cost per step of a model")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compress", help="run passes (prune, drop, route) and write the result")
    _add_model_args(p)
    p.add_argument("--passes", required=True, help="comma-separated, e.g. prune,route")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--prune-ratio", type=float)
    p.add_argument("--prune-criterion", choices=("magnitude", "sensitivity", "role-aware"))
    p.add_argument("--drop-fraction", type=float)
    p.add_argument("--route-budget", type=float)
    p.add_argument("--option", action="append", metavar="PASS.KEY=VALUE",
                   help="any pass option, e.g. prune.min_heads=2 (repeatable)")
    p.add_argument("--verify", action="store_true",
                   help="check each pass's equivalence promise on the example batch")
    p.set_defaults(func=cmd_compress)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraphoptError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
