"""Train the tiny video teacher: diffusers' WanTransformer3DModel on procedural moving-shape clips.

Rectified flow matching in pixel space (no VAE), the convention of diffusers'
FlowMatchEulerDiscreteScheduler:

    x_s = (1 - s)·x0 + s·noise,   target = noise - x0,   timestep = 1000·s,
    loss = mean((model(x_s, 1000·s, cond) - target)^2),

with s drawn logit-normal (sigmoid of N(0, 1), as in SD3) and the condition zeroed for a
`--cfg-dropout` fraction of the batch (the unconditional branch of classifier-free guidance).
The shipped weights are an exponential moving average of the trained ones.

Output directory (written atomically, file by file, at every checkpoint and at the end):
config.json + diffusion_pytorch_model.safetensors (`graphopt.tiny.load_teacher_folder(dir)` loads them;
so does `WanTransformer3DModel.from_pretrained(dir)` where `accelerate` is installed), generator.json (the
data's GeneratorConfig) and training.json (arguments, loss, timing).

    # CPU baseline, 2 threads, fitted into 29 minutes:
    python tools/train_tiny_teacher.py --minutes 29 --out /tmp/tiny_wan
    # the shipped weights (one H100, about 6 minutes):
    python tools/train_tiny_teacher.py --device cuda --batch-size 128 --steps 60000 --minutes 6 --workers 8 \
        --warmup 500 --ema-decay 0.9995 --checkpoint-every 1000 --out graphopt/assets/tiny_wan
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

    def __init__(self, data: GeneratorConfig, batch_size: int, seed: int, steps: int):
        self.data, self.batch_size, self.seed, self.steps = data, batch_size, seed, steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(first, self.steps, stride):
            clips = generate(self.data, self.batch_size, seed=self.seed * 1_000_003 + step)
            yield torch.from_numpy(clips.videos), embed_tokens(self.data, clips.tokens)


def noised(x0: torch.Tensor, cond: torch.Tensor, args: argparse.Namespace, step: int):
    """(x_s, timestep, encoder_hidden_states, target) with s, noise and the CFG drop drawn from (seed, step)."""
    device = x0.device
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
    batch = x0.shape[0]
    keep = (torch.rand(batch, generator=gen, device=device) >= args.cfg_dropout).float()
    s = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
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
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=24)
    parser.add_argument("--ffn-mult", type=int, default=3)
    parser.add_argument("--freq-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget: after the first steps, --steps is cut to what the measured speed fits in it")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if not 0.0 <= args.cfg_dropout < 1.0:
        parser.error(f"--cfg-dropout {args.cfg_dropout}: use a fraction in [0, 1)")

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = GeneratorConfig()
    model = build_model(args, data).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(f"{num_params / 1e6:.2f} M parameters, {args.steps} steps of {args.batch_size} clips on {device}", flush=True)

    record = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "num_parameters": num_params, "torch": torch.__version__}
    loss_avg = None
    start = time.perf_counter()
    stream = torch.utils.data.DataLoader(ClipStream(data, args.batch_size, args.seed, args.steps), batch_size=None,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    bar = tqdm(stream, total=args.steps, desc="train", dynamic_ncols=True, mininterval=2.0)
    for step, (x0, cond) in enumerate(bar):
        if step == args.steps:
            break
        if args.minutes is not None and step == PLAN_AFTER:
            # Speed over steps PLAN_AFTER/3 .. PLAN_AFTER (past the first, slow ones); the cosine schedule
            # then ends exactly at the cut.
            rate = (PLAN_AFTER - PLAN_AFTER // 3) / (time.perf_counter() - mark)
            fits = PLAN_AFTER + int(0.97 * rate * (60 * args.minutes - (time.perf_counter() - start)))
            if fits < args.steps:
                print(f"\n{rate:.2f} it/s: {fits} steps fit in {args.minutes:g} min (asked {args.steps})", flush=True)
                args.steps = fits
                bar.total = fits
                record["steps_planned"] = fits
        if step == PLAN_AFTER // 3:
            mark = time.perf_counter()
        x_s, timestep, cond, target = noised(x0.to(device, non_blocking=True), cond.to(device), args, step)
        pred = model(hidden_states=x_s, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
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
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            record.update(steps_done=step + 1, loss_ema=loss_avg, seconds=round(elapsed, 1),
                          steps_per_second=round((step + 1) / elapsed, 3))
            save_atomically(ema, data, record, args.out)
    bar.close()
    print(f"done: {record['steps_done']} steps in {record['seconds']} s "
          f"({record['steps_per_second']} it/s), loss {loss_avg:.4f}; saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
