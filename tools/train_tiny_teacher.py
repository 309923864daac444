"""Train the tiny video teacher: diffusers' WanTransformer3DModel on procedural moving-shape clips.

Rectified flow matching in pixel space (no VAE), the convention of diffusers'
FlowMatchEulerDiscreteScheduler:

    x_s = (1 - s)·x0 + s·noise,   target = noise - x0,   timestep = 1000·s,
    loss = mean((model(x_s, 1000·s, cond) - target)^2),

with s drawn logit-normal (sigmoid of N(0, 1), as in SD3), then shifted towards noise by
`--timestep-shift` (SD3's resolution shift s -> k·s / (1 + (k-1)·s)), and the condition zeroed for a
`--cfg-dropout` fraction of the batch (the unconditional branch of classifier-free guidance).
The shipped weights are an exponential moving average of the trained ones.

Why the shift: a clip's 8 frames repeat the same objects, so at a given noise level the objects'
places are far easier to read than in one image of the same size; where they go (the motion) is
decided at high noise, which unshifted logit-normal sampling rarely visits (s > 0.8 in 8% of
draws; with k = 3, 36%). Trained unshifted for 4.7k steps, the teacher drew objects that jump,
split and stand still (motion smoothness 0.41, direction 0.41); see the README's teacher section.

Output directory (written atomically, file by file, at every checkpoint and at the end):
config.json + diffusion_pytorch_model.safetensors (`graphopt.tiny.load_teacher_folder(dir)` loads them;
so does `WanTransformer3DModel.from_pretrained(dir)` where `accelerate` is installed), generator.json (the
data's GeneratorConfig) and training.json (arguments, loss, timing).

    # CPU baseline, 2 threads, fitted into 29 minutes:
    python tools/train_tiny_teacher.py --minutes 29 --out /tmp/tiny_wan
    # the shipped weights: one H100, 18 minutes of training planned, split over commands of at most
    # 10 minutes (run the same command again: it resumes from --resume until the planned steps are done;
    # the shipped run stopped after two, at step 19352 of 21446, see the README):
    python tools/train_tiny_teacher.py --device cuda --batch-size 256 --steps 100000 --minutes 18 \
        --stop-after 8 --workers 12 --warmup 500 --ema-decay 0.9995 --checkpoint-every 500 \
        --resume .train/resume.pt --out graphopt/assets/tiny_wan --compile

`--resume FILE` keeps the optimizer, the raw weights, the step and the planned step count; the EMA
weights are the ones in --out. Resumed training draws the same batches and noise as an unbroken run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from tqdm import tqdm

from graphopt.tiny import load_teacher_folder
from graphopt.tiny.data import GeneratorConfig, embed_tokens, generate

REPO = Path(__file__).resolve().parent.parent
PLAN_AFTER = 30  # with --minutes, the step count is fixed after this many steps


def build_model(args: argparse.Namespace, data: GeneratorConfig) -> WanTransformer3DModel:
    dim = args.heads * args.head_dim
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=3,
        out_channels=3,
        text_dim=data.text_dim,
        freq_dim=args.freq_dim,
        ffn_dim=args.ffn_mult * dim,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


class ClipStream(torch.utils.data.IterableDataset):
    """(x0, condition) CPU tensors for steps start, start+1, ...; step k's clips come from seed·1000003 + k.

    With DataLoader workers, worker w makes steps w, w+n, w+2n, ... and the loader hands them back in
    step order, so the stream is the same for any number of workers.
    """

    def __init__(self, data: GeneratorConfig, batch_size: int, seed: int, steps: int, start: int = 0):
        self.data, self.batch_size, self.seed, self.steps, self.start = data, batch_size, seed, steps, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + first, self.steps, stride):
            clips = generate(self.data, self.batch_size, seed=self.seed * 1_000_003 + step)
            yield torch.from_numpy(clips.videos), embed_tokens(self.data, clips.tokens)


def noised(x0: torch.Tensor, cond: torch.Tensor, args: argparse.Namespace, step: int):
    """(x_s, timestep, encoder_hidden_states, target) with s, noise and the CFG drop drawn from (seed, step)."""
    device = x0.device
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
    batch = x0.shape[0]
    keep = (torch.rand(batch, generator=gen, device=device) >= args.cfg_dropout).float()
    s = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
    s = args.timestep_shift * s / (1 + (args.timestep_shift - 1) * s)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    sb = s[:, None, None, None, None]
    return (1 - sb) * x0 + sb * noise, 1000 * s, cond * keep[:, None, None], noise - x0


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomically(model: WanTransformer3DModel, data: GeneratorConfig, record: dict, out: Path) -> None:
    """Write into a temp folder beside `out`, then os.replace file by file: a reader never sees a partial file."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        data.save(tmp / "generator.json")
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        for item in tmp.iterdir():
            item.chmod(0o644)  # tempfile makes owner-only files; package data must be readable by all
            os.replace(item, out / item.name)


def save_state(path: Path, model: WanTransformer3DModel, optimizer: torch.optim.Optimizer, record: dict) -> None:
    """The raw weights, the optimizer and the record (step, planned steps), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "record": record}, tmp)
    os.replace(tmp, path)


def resume(args: argparse.Namespace, model, ema, optimizer, record: dict) -> tuple[int, float, float]:
    """Load --resume and the EMA weights in --out; returns (next step, loss average, seconds trained so far)."""
    state = torch.load(args.resume, map_location="cpu", weights_only=True)
    saved = state["record"]
    ema_folder = json.loads((args.out / "training.json").read_text()) if (args.out / "training.json").exists() else {}
    if ema_folder.get("steps_done") != saved["steps_done"]:
        raise SystemExit(f"--resume {args.resume} is at step {saved['steps_done']} but {args.out}/training.json at "
                         f"{ema_folder.get('steps_done')}: resume with the --out folder written with it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(load_teacher_folder(args.out)[0].state_dict())
    if "steps_planned" in saved:
        args.steps = record["steps_planned"] = saved["steps_planned"]
    print(f"resumed from {args.resume} at step {saved['steps_done']}", flush=True)
    return saved["steps_done"], saved["loss_ema"], saved["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "graphopt" / "assets" / "tiny_wan")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="data-generation processes (0: in the main loop)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--timestep-shift", type=float, default=3.0,
                        help="shift the logit-normal noise levels towards noise (1: no shift); see above")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=24)
    parser.add_argument("--ffn-mult", type=int, default=3)
    parser.add_argument("--freq-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget: after the first steps, --steps is cut to what the measured speed fits in it")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="minutes: checkpoint and stop this run after them (continue with --resume)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="training-state file: resumed from when it exists, written at every checkpoint")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: on for cuda)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if not 0.0 <= args.cfg_dropout < 1.0:
        parser.error(f"--cfg-dropout {args.cfg_dropout}: use a fraction in [0, 1)")
    if args.timestep_shift <= 0:
        parser.error(f"--timestep-shift {args.timestep_shift}: use a positive factor (1: no shift)")

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = GeneratorConfig()
    model = build_model(args, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16

    record = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "num_parameters": num_params, "torch": str(torch.__version__)}
    first_step, loss_avg, seconds_before = 0, None, 0.0
    if args.resume is not None and args.resume.exists():
        first_step, loss_avg, seconds_before = resume(args, model, ema, optimizer, record)
    print(f"{num_params / 1e6:.2f} M parameters, steps {first_step}..{args.steps} of {args.batch_size} clips "
          f"on {device}{' (bf16 autocast)' if bf16 else ''}", flush=True)
    forward = torch.compile(model) if args.compile else model  # `model` keeps the plain state-dict names
    start = mark = time.perf_counter()       # `mark`: the clock at step PLAN_AFTER/3, set below
    stream = torch.utils.data.DataLoader(ClipStream(data, args.batch_size, args.seed, args.steps, first_step),
                                         batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda")
    bar = tqdm(stream, total=args.steps, initial=first_step, desc="train", dynamic_ncols=True, mininterval=2.0)
    for step, (x0, cond) in enumerate(bar, start=first_step):
        if step == args.steps:
            break
        if args.minutes is not None and step == first_step + PLAN_AFTER and "steps_planned" not in record:
            # Speed over steps PLAN_AFTER/3 .. PLAN_AFTER (past the first, slow ones); the cosine schedule
            # then ends exactly at the cut.
            rate = (PLAN_AFTER - PLAN_AFTER // 3) / (time.perf_counter() - mark)
            fits = step + int(0.97 * rate * (60 * args.minutes - (time.perf_counter() - start)))
            if fits < args.steps:
                print(f"\n{rate:.2f} it/s: {fits} steps fit in {args.minutes:g} min (asked {args.steps})", flush=True)
                args.steps = fits
                bar.total = fits
                record["steps_planned"] = fits
        if step == first_step + PLAN_AFTER // 3:
            mark = time.perf_counter()
        x_s, timestep, cond, target = noised(x0.to(device, non_blocking=True), cond.to(device), args, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = forward(hidden_states=x_s, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        optimizer.step()
        # EMA with the usual warm start: early on the average follows the weights closely.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)

        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{learning_rate(args, step):.1e}")
        elapsed = time.perf_counter() - start
        stopping = args.stop_after is not None and elapsed > 60 * args.stop_after
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps or stopping:
            record.update(steps_done=step + 1, loss_ema=loss_avg, seconds=round(seconds_before + elapsed, 1),
                          steps_per_second=round((step + 1 - first_step) / elapsed, 3))
            save_atomically(ema, data, record, args.out)
            if args.resume is not None:
                save_state(args.resume, model, optimizer, record)
        if stopping:
            print(f"\nstopped after {args.stop_after:g} min at step {step + 1} of {args.steps}: "
                  f"run again with --resume {args.resume} to continue", flush=True)
            break
    bar.close()
    print(f"done: {record['steps_done']} steps in {record['seconds']} s "
          f"({record['steps_per_second']} it/s), loss {loss_avg:.4f}; saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
