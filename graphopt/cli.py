"""The `graphopt` command line. Each verb is a thin layer over the Python API.

Bad input exits with code 2 and one line, `error: <what is wrong and how to fix it>`; `--debug`
shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

from graphopt.errors import GraphoptError

OPSETS = (18, 23)     # torch's ONNX exporter writes opsets 18..23 (it turns a lower one into 18)


class _Parser(argparse.ArgumentParser):
    """argparse with graphopt's error format: exit 2 and one line naming the fix."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _opset(text: str) -> int:
    value = _positive_int(text)
    if not OPSETS[0] <= value <= OPSETS[1]:
        raise argparse.ArgumentTypeError(f"opset {value} is not supported: choose {OPSETS[0]}.."
                                         f"{OPSETS[1]} (the range torch's ONNX exporter writes)")
    return value


def _add_model_args(p):
    p.add_argument("model", help="diffusers model folder, .pt2/.pt archive from torch.export.save, "
                                 "or a shipped name (tiny-wan, tiny:<family>)")
    p.add_argument("--frames", type=_positive_int,
                   help="latent frames of the example input, >= 1 (default: the family's)")
    p.add_argument("--height", type=_positive_int, help="latent height, >= 1 (default: the family's)")
    p.add_argument("--width", type=_positive_int, help="latent width, >= 1 (default: the family's)")
    p.add_argument("--batch", type=_positive_int,
                   help="batch size of one step, >= 1 (2 with CFG in one batch; default 1)")
    p.add_argument("--meta", action="store_true",
                   help="build the architecture on the meta device: structure and cost, no weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading files that can run code when loaded: pickles, and .pt2 "
                        "graphs that graphopt cannot check")


def _add_overwrite_arg(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder even if it holds files graphopt did not write "
                        "(never an input, a folder holding one, the current folder or home)")


def _check_output(args, *inputs):
    """Fail on a bad -o in a second, before anything loads (graphopt.io.check_output_dir)."""
    from graphopt.io import check_output_dir

    check_output_dir(args.output, protect=inputs, overwrite=args.overwrite)


def _capture_from_args(args):
    import dataclasses

    import torch

    from graphopt import families
    from graphopt.capture import capture, load_model

    model = load_model(args.model, trust_pickle=args.trust_pickle, meta=args.meta)
    spec = None
    overrides = {k: getattr(args, k) for k in ("frames", "height", "width", "batch")
                 if getattr(args, k) is not None}
    if overrides and not isinstance(model, torch.nn.Module):
        flags = ", ".join(f"--{k}" for k in overrides)
        raise GraphoptError(f"{flags}: '{args.model}' is an exported program, whose input shapes "
                            f"were fixed when it was exported; export it again at that size, or "
                            f"give the diffusers model folder")
    if isinstance(model, torch.nn.Module) and getattr(args, "calibration", None) is not None:
        # Example inputs at the calibration data's sizes (what is given explicitly wins).
        from graphopt.calibration import data_folder_sizes
        overrides = {**data_folder_sizes(args.calibration,
                                         families.family_for(model).latent_layout), **overrides}
    if overrides:
        spec = dataclasses.replace(families.family_for(model).default_spec, **overrides)
    graph = capture(model, spec=spec, trust_pickle=args.trust_pickle)
    if getattr(args, "calibration", None) is not None:
        graph.calibration_data = args.calibration    # what every calibrating analysis runs on
    # The recipe names the model it came from (`graphopt distill` finds its teacher there).
    path = Path(args.model)
    graph.source = graph.recipe.model["source"] = str(path.resolve()) if path.exists() else args.model
    return graph


def cmd_inspect(args) -> int:
    from rich.console import Console

    from graphopt.describe import describe, render

    folder = Path(args.model)
    if (folder / "recipe.json").is_file() and not args.meta:
        from graphopt.serialize import load

        graph = load(folder)             # a compressed folder: the model its recipe made
    else:
        graph = _capture_from_args(args)
    info = describe(graph)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info, Console())
    return 0


def cmd_compress(args) -> int:
    from rich.console import Console

    from graphopt.compress import check_request, compress

    if args.output is None:
        args.output = _default_output(args.model, args.overwrite)
    if args.calibration is not None and not Path(args.calibration).is_dir():
        raise GraphoptError(f"--calibration '{args.calibration}' is not a folder: give one written "
                            f"by `graphopt data`")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    options = {}
    for spec in args.option or []:
        key, sep, value = spec.partition("=")
        pass_name, _, opt = key.partition(".")
        if not (sep and pass_name and opt):
            raise GraphoptError(f"option '{spec}' must look like PASS.OPTION=VALUE, "
                                f"e.g. prune.ratio=0.3")
        options.setdefault(pass_name, {})[opt] = _parse_value(value)
    for name, attr, key in (("prune", "prune_ratio", "ratio"), ("prune", "prune_criterion", "criterion"),
                            ("drop", "drop_fraction", "fraction"), ("route", "route_budget", "budget")):
        if getattr(args, attr) is not None:
            options.setdefault(name, {})[key] = getattr(args, attr)
    check_request(passes, options)      # bad passes or options fail before the capture
    _check_output(args, *(p for p in (args.model, args.calibration) if p is not None))
    graph = _capture_from_args(args)
    compress(graph, passes, options, out=args.output, verify=args.verify, console=Console(),
             overwrite=args.overwrite,
             protect=[p for p in (args.model, args.calibration) if p is not None])
    return 0


def _default_output(model: str, overwrite: bool) -> str:
    """`NAME-compressed` in the current folder, NAME the model's file or folder name; an existing
    one is kept unless --overwrite (even one graphopt wrote: the user never named it)."""
    stem = Path(model.rstrip("/\\")).stem if Path(model).exists() else model
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "model"
    out = Path(f"{name}-compressed")
    if out.exists() and not overwrite:
        raise GraphoptError(f"the default output folder '{out}' exists: pass -o DIR for another "
                            f"folder, or --overwrite to replace it")
    return str(out)


def cmd_apply(args) -> int:
    from rich.console import Console

    from graphopt.apply import apply_recipe

    apply_recipe(args.recipe, args.weights, args.output, overwrite=args.overwrite,
                 console=Console(stderr=True))
    return 0


def cmd_distill(args) -> int:
    from rich.console import Console

    from graphopt.distill.run import distill_folder

    distill_folder(args.compressed, args.config, args.output, teacher=args.teacher,
                   teacher_dtype=args.teacher_dtype, checkpoints=args.checkpoints,
                   trust_pickle=args.trust_pickle, overwrite=args.overwrite,
                   console=Console(stderr=True))
    return 0


def cmd_bench(args) -> int:
    import torch
    from rich.console import Console

    from graphopt.bench import DEFAULT_BACKENDS, bench, check_options, load_pair, plot, render
    from graphopt.io import check_output_file

    device = _check_device(args.device)
    if args.plot:
        check_output_file(args.plot, protect=[args.compressed, args.original])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = tuple(b for b in (args.backends or ",".join(DEFAULT_BACKENDS)).split(",") if b)
    check_options(backends, args.steps, args.repeats, args.warmup)
    original, compressed = load_pair(args.compressed, args.original, device=device,
                                     trust_pickle=args.trust_pickle)
    result = bench(original, compressed, backends=backends, steps=args.steps,
                   repeats=args.repeats, warmup=args.warmup, explicit=args.backends is not None)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result, Console())
    return 0


def _check_device(text: str) -> str:
    """`text` if it names a device this machine has (cpu, cuda, cuda:N); else a GraphoptError."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GraphoptError(f"--device {text!r} is unknown: give cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GraphoptError(f"--device {text}: this machine has no usable CUDA device (torch "
                                f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise GraphoptError(f"--device {text}: this machine has CUDA devices 0..{count - 1}")
    return text


def _graph_for_export(args):
    """A folder written by `graphopt compress` or `graphopt apply` is loaded (recipe + weights, one
    file or sharded); anything else captured."""
    from graphopt.serialize import RECIPE, WEIGHTS, WEIGHTS_INDEX, load

    folder = Path(args.model)
    if (folder / RECIPE).is_file() and any((folder / n).is_file() for n in (WEIGHTS, WEIGHTS_INDEX)):
        return load(folder)
    return _capture_from_args(args)


def cmd_export(args) -> int:
    from graphopt.exporters.onnx import export_onnx
    from graphopt.io import atomic_dir

    _check_output(args, args.model)
    graph = _graph_for_export(args)
    narrow = sorted({str(p.dtype).removeprefix("torch.") for p in graph.gm.parameters()
                     if p.is_floating_point() and p.dtype.itemsize < 4})
    if narrow and args.format != "aoti":
        print(f"note: {'/'.join(narrow)} weights exported in float32 (exact; onnxruntime's CPU "
              f"kernels have no bfloat16; TensorRT picks its precision at build time)")
    out, protect = Path(args.output), [args.model]
    if args.format in ("onnx", "onnx-segmented"):
        layout = "single" if args.format == "onnx" else "segmented"
        path = export_onnx(graph, out, layout=layout, opset=args.opset, overwrite=args.overwrite,
                           protect=protect)
        print(f"wrote {path}")
        return 0
    if args.format == "aoti":
        from graphopt.exporters.aoti import export_aoti

        with atomic_dir(out, protect=protect, overwrite=args.overwrite,
                        what="graphopt export --format aoti") as tmp:
            export_aoti(graph, tmp / "model.pt2")
        print(f"wrote {out / 'model.pt2'}")
        return 0
    # trt: the segmented layout (TensorRT's primary path), checked, then engines where TensorRT
    # imports; the folder appears with its engines (or, failing the check, the ONNX to look at).
    from graphopt.exporters import tensorrt
    from graphopt.exporters.trt_check import check_segmented

    missing, builds = None, []
    with atomic_dir(out, protect=protect, overwrite=args.overwrite,
                    what="graphopt export --format trt") as tmp:
        manifest = export_onnx(graph, tmp, layout="segmented", opset=args.opset, protect=protect)
        reports = check_segmented(manifest)
        for report in reports:
            if report.findings:
                print(report.render())
        bad = [r.source for r in reports if not r.ok]
        if not bad:
            try:
                tensorrt.import_tensorrt()
            except GraphoptError as e:
                missing = e
            else:
                builds = tensorrt.build_engines(manifest, tmp / "engines",
                                                tensorrt.BuildOptions(precision=args.precision))
    manifest = out / manifest.name
    if bad:
        raise GraphoptError(f"the ONNX in {args.output} breaks TensorRT's documented limits in {bad} (listed "
                            "above); no engines built")
    print(f"wrote {manifest}; static TensorRT check (the ONNX read against TensorRT's documented limits, "
          f"without TensorRT): no errors in {len(reports)} segments")
    if missing is not None:
        # Exit 0: the ONNX is written and checked; engines are built where TensorRT runs.
        print(f"no engine built: {missing}. Then build the engines with "
              f"graphopt.exporters.tensorrt.build_engines('{manifest}', '{out / 'engines'}')")
        return 0
    for b in builds:
        print(f"built {out / 'engines' / b.engine_path.name} ({b.precision}) in {b.seconds:.1f}s")
    return 0


def cmd_data(args) -> int:
    from rich.console import Console

    from graphopt.datagen import DataSettings, make_data, read_prompts

    settings = DataSettings(sample_steps=args.sample_steps, videos=args.videos,
                            negative_prompt=args.negative_prompt, guidance=args.guidance,
                            num_frames=args.num_frames, height=args.height, width=args.width,
                            max_sequence_length=args.max_sequence_length, seed=args.seed,
                            dtype=args.dtype)
    _check_output(args, args.pipeline, args.prompts, args.videos)
    make_data(args.pipeline, read_prompts(args.prompts), args.output, settings, device=args.device,
              trust_pickle=args.trust_pickle, overwrite=args.overwrite,
              console=Console(stderr=True))
    return 0


def _add_data_parser(verb) -> None:
    p = verb("data", help="calibration and distillation data from a diffusers pipeline "
                                    "and prompts: text states, and the teacher's samples or "
                                    "real clips' latents (resumable)")
    p.add_argument("pipeline", help="diffusers pipeline folder (model_index.json; WanPipeline)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("-o", "--output", required=True,
                   help="output folder; rerun the same command to resume an interrupted run")
    _add_overwrite_arg(p)
    p.add_argument("--sample-steps", type=_positive_int, metavar="N",
                   help="latents: the teacher's own samples, N >= 1 denoising steps (their "
                        "trajectories are kept too); give this or --videos (default neither: an "
                        "error)")
    p.add_argument("--videos", metavar="DIR",
                   help="latents: VAE latents of real clips, one *.safetensors `video` tensor "
                        "(frames, 3, H, W) per prompt, paired in name order (default none)")
    p.add_argument("--negative-prompt", default="", help="the CFG pass's prompt (default empty)")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="CFG scale of the samples (default 5.0)")
    p.add_argument("--num-frames", type=_positive_int, default=81,
                   help="pixel frames of a sample, >= 1 (default 81)")
    p.add_argument("--height", type=_positive_int, default=480,
                   help="pixel height of a sample, >= 1 (default 480)")
    p.add_argument("--width", type=_positive_int, default=832,
                   help="pixel width of a sample, >= 1 (default 832)")
    p.add_argument("--max-sequence-length", type=_positive_int, default=512,
                   help="text tokens, >= 1 (default 512)")
    p.add_argument("--seed", type=int, default=0,
                   help="item i's noise is seeded by SEED + i (default 0)")
    p.add_argument("--dtype", default="float32",
                   choices=("float32", "bf16", "bfloat16", "fp16", "float16"),
                   help="dtype of the stored tensors (and of the text encoder and transformer; "
                        "default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pipeline whose weights are pickles (can run code when loaded)")
    p.set_defaults(func=cmd_data)


def cmd_demo(args) -> int:
    from graphopt.demo import run_demo

    run_demo(args.output, quick=args.quick, threads=args.threads, overwrite=args.overwrite)
    return 0


def _parse_value(text: str):
    """JSON where it parses (numbers, booleans, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback and every library warning")
    # --debug also after the verb (`graphopt compress ... --debug`); SUPPRESS keeps a --debug given
    # before the verb when none follows it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback and every library warning")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def verb(name: str, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    p = verb("inspect", help="blocks, attentions, heads and cost per step of a model")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (default: tables)")
    p.set_defaults(func=cmd_inspect)

    p = verb("compress", help="run passes (prune, drop, route) and write the result")
    _add_model_args(p)
    p.add_argument("--passes", required=True,
                   help="passes to run in order, comma-separated, at least one: prune (attention "
                        "heads), drop (whole blocks), route (a router picks blocks per step), e.g. "
                        "prune,route")
    p.add_argument("-o", "--output",
                   help="output folder (default: MODEL-compressed in the current folder, never "
                        "replaced without --overwrite)")
    _add_overwrite_arg(p)
    p.add_argument("--prune-ratio", type=float, metavar="R",
                   help="prune: fraction of attention heads removed, in [0, 1) (default 0.3)")
    p.add_argument("--prune-criterion", choices=("magnitude", "sensitivity", "role-aware"),
                   help="prune: how heads are ranked: weight magnitude, output sensitivity, or "
                        "role-aware (keeps temporal heads; default)")
    p.add_argument("--drop-fraction", type=float, metavar="F",
                   help="drop: fraction of the blocks removed, in [0, 1) (default 0.25)")
    p.add_argument("--route-budget", type=float, metavar="B",
                   help="route: FLOPs fraction executed per step, in (0, 1] (default 0.5); at least "
                        "what runs outside the blocks plus the cheapest block")
    p.add_argument("--option", action="append", metavar="PASS.KEY=VALUE",
                   help="any pass option, value as JSON or a plain string, e.g. prune.min_heads=2 "
                        "(repeatable; default none)")
    p.add_argument("--verify", action="store_true",
                   help="check each pass's equivalence promise on the example batch (default off)")
    p.add_argument("--calibration", metavar="DIR",
                   help="data folder (`graphopt data`) the calibrating analyses run on, noised at "
                        "their timesteps; the model is captured at its latent and text sizes "
                        "(default: random inputs)")
    p.set_defaults(func=cmd_compress)

    p = verb("apply", help="stream a recipe onto a sharded safetensors checkpoint "
                                     "(never the whole model in memory; resumable)")
    p.add_argument("recipe", help="recipe.json (from `graphopt compress`, or written by hand)")
    p.add_argument("--weights", required=True,
                   help="diffusers model folder: config.json + *.safetensors (+ index)")
    p.add_argument("-o", "--output", required=True,
                   help="output folder; rerun the same command to resume an interrupted run")
    _add_overwrite_arg(p)
    p.set_defaults(func=cmd_apply)

    p = verb("distill", help="recover a compressed model's quality: progressive "
                                       "distillation (PARE) with ICD + MCA losses (VDMini)")
    p.add_argument("compressed", help="folder written by `graphopt compress`")
    p.add_argument("--config", required=True,
                   help="distillation TOML, e.g. graphopt/assets/distill_tiny.toml")
    p.add_argument("--teacher", help="the uncompressed model (default: the recipe's source)")
    p.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16"),
                   help="run the frozen teacher in this precision (default: the dtype its weights have)")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (same layout as `graphopt compress` output)")
    _add_overwrite_arg(p)
    p.add_argument("--checkpoints",
                   help="checkpoint folder (default: [run] output_dir, else OUTPUT.checkpoints); "
                        "rerun the same command to resume")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a teacher whose files can run code (pickles, unchecked .pt2)")
    p.set_defaults(func=cmd_distill)

    p = verb("bench", help="original vs compressed in one process: FLOPs and latency "
                                     "per step, speedup and efficiency, per backend")
    p.add_argument("compressed", help="folder written by `graphopt compress`")
    p.add_argument("--original", help="the uncompressed model (default: the recipe's source if "
                                      "it resolves, else its architecture with random weights)")
    p.add_argument("--backends", help="comma-separated from torch,onnxruntime,aoti (default: "
                                      "torch, and onnxruntime where installed)")
    p.add_argument("--steps", type=_positive_int, default=4,
                   help="denoising steps per timed run, >= 1 (default 4)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="timed runs, >= 1; the median is reported (default 5)")
    p.add_argument("--warmup", type=_count, default=1, help="untimed runs first, >= 0 (default 1)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads, >= 1 (default: torch's, one per core)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N, a device this machine has (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw latency per backend to this PNG file (default: no plot)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading an original whose files can run code (pickles, unchecked .pt2)")
    p.set_defaults(func=cmd_bench)

    p = verb("export", help="write ONNX (single file or segmented) or TensorRT engines")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (required)")
    _add_overwrite_arg(p)
    p.add_argument("--format", required=True, choices=("onnx", "onnx-segmented", "trt", "aoti"),
                   help="onnx: one file, routed blocks as If; onnx-segmented: prologue/blocks/epilogue "
                        "+ manifest.json; trt: the segmented ONNX, TensorRT-checked, then engines; "
                        "aoti: an AOTInductor package, OUT/model.pt2 (graphopt.exporters.aoti.load_aoti)")
    p.add_argument("--opset", type=_opset,
                   help=f"ONNX opset, {OPSETS[0]}..{OPSETS[1]} (default 20: from 23 the exporter "
                        f"writes a fused Attention op TensorRT cannot build inside an If)")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"),
                   help="TensorRT engine precision (--format trt; default fp16)")
    p.set_defaults(func=cmd_export)

    _add_data_parser(verb)

    p = verb("demo", help="the whole toolchain on the shipped teacher (tiny-wan): inspect, "
                                    "compress, distill, export ONNX, bench, score; writes a report folder")
    p.add_argument("-o", "--output", default="graphopt-demo", help="report folder (default graphopt-demo)")
    _add_overwrite_arg(p)
    p.add_argument("--quick", action="store_true",
                   help="every stage with few steps and clips (CI; default: the full demo)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads, >= 1 (default: torch's, one per core)")
    p.set_defaults(func=cmd_demo)
    return parser


@contextlib.contextmanager
def quiet_libraries():
    """Keep torch's and diffusers' deprecation notices and log chatter away from CLI users (they
    cannot act on them) while the block runs; graphopt's own warnings still show."""
    loggers = [logging.getLogger(n) for n in ("torch", "diffusers", "transformers", "onnxscript",
                                              "onnx_ir")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=r"(torch|diffusers|transformers|onnx|onnxscript|"
                                                 r"onnxruntime|onnx_ir|safetensors)(\.|$)")
        # Added last, so matched first: graphopt's own warnings show.
        warnings.filterwarnings("default", category=UserWarning, module=r"graphopt(\.|$)")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:       # a bad option (its one line is printed) or --help
        return e.code if isinstance(e.code, int) else 2
    try:
        with contextlib.nullcontext() if args.debug else quiet_libraries():
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
