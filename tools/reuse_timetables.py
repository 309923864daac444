"""Every whole-step reuse timetable of the shipped teacher at a given count of reused steps, scored on
calibration conditions: what a search over the steps could find, and how the search's error measures
agree with the benchmark's flicker. A timetable reuses every block at the steps it names (MagCache's
shape: it skips all blocks or none); step 0 always computes.

    python tools/reuse_timetables.py --reuse 5                  # all C(9, 5) timetables, 4 calibration conditions
    python tools/reuse_timetables.py --score 2-3-5-7-9 3-4-6-7-9  # these on the 16 held-out conditions
    python tools/reuse_timetables.py --skip forecast ...          # skipped steps forecast the residual

Calibration columns: MSE of the final clips vs the teacher's (the search's default objective), the mean
per-clip MSE in dB (what the benchmark's PSNR column averages), and mini-VBench's temporal flicker.
Held-out rows: the benchmark's metrics (bench_quality's conditions, noise and sampling).
"""
import argparse
import itertools

import torch

from graphopt.compress import compress
from graphopt.distill.reuse_schedule import _fraction, _Run, set_reuse_schedule
from graphopt.eval import aggregate_score, evaluate_clips, palette_labels, temporal_flicker
from graphopt.reuse import reset_cache
from graphopt.tiny import embed_tokens, generate
from graphopt.tiny.testbed import CALIBRATION_SEED, capture_teacher, eval_conditions, sample_clips

STEPS = 10


def timetable(reused: set[int], blocks: int) -> torch.Tensor:
    return torch.tensor([[s not in reused] * blocks for s in range(STEPS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", type=int, default=5, help="reused steps per timetable (of steps 1-9)")
    parser.add_argument("--top", type=int, default=10, help="timetables printed per ordering")
    parser.add_argument("--score", nargs="*", default=[], help="timetables (reused steps, e.g. 2-3-5-7-9) to score "
                                                                "on the held-out conditions instead")
    parser.add_argument("--skip", default="reuse", choices=("reuse", "forecast"),
                        help="what a reused step gives back: the cached residual, or it extrapolated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    teacher, config = capture_teacher()
    routed = teacher.copy()
    compress(routed, ["route"], {"route": {"mode": "schedule", "skip": args.skip, "select": "sign", "budget": 1.0,
                                           "timestep_bins": 1000, "ranking": list(range(len(teacher.blocks)))}})
    n = len(teacher.blocks)
    if args.score:
        held_out = eval_conditions(config, 16)
        sampling = {"steps": STEPS, "guidance": 4.0, "seed": 0}
        reference = sample_clips(teacher, config, held_out, **sampling)
        base = evaluate_clips(config, reference, held_out, reference=reference)
        for name in args.score:
            graph = routed.copy()
            computes = timetable({int(s) for s in name.split("-")}, n)
            set_reuse_schedule(graph, computes, steps=STEPS)
            scores = evaluate_clips(config, sample_clips(graph, config, held_out, **sampling), held_out,
                                    reference=reference)
            print(f"reuse {name}: FLOPs {_fraction(graph.gm.router, computes):.3f} aggregate "
                  f"{aggregate_score(scores, base):.3f} " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return
    data = generate(config, 4, seed=CALIBRATION_SEED)
    cond = embed_tokens(config, data.tokens)
    noise = torch.randn((cond.shape[0], *data.videos.shape[1:]), generator=torch.Generator().manual_seed(0))
    teacher_run, run = _Run(teacher, cond, STEPS, 4.0, 1.0), _Run(routed, cond, STEPS, 4.0, 1.0)
    reference = noise
    for s in range(STEPS):
        reference = teacher_run.step(reference, s)
    reference = reference.clamp(-1, 1)
    router, rows = routed.gm.router, []
    for reused in itertools.combinations(range(1, STEPS), args.reuse):
        reset_cache(routed)
        computes, x = timetable(set(reused), n), noise
        for s in range(STEPS):
            router.force_gates = computes[s]
            x = run.step(x, s)
        x = x.clamp(-1, 1)
        per_clip = (x - reference).square().flatten(1).mean(1)
        flicker = temporal_flicker(x.numpy(), palette_labels(config, x.numpy())).mean()
        rows.append((float(per_clip.mean()), float((10 * per_clip.log10()).mean()), float(flicker), reused))
    print(f"{len(rows)} timetables, FLOPs {_fraction(router, timetable(set(rows[0][3]), n)):.3f}")
    for title, key in (("by MSE", 0), ("by mean per-clip dB", 1), ("by flicker", 2)):
        print(title)
        for mse, db, flicker, reused in sorted(rows, key=lambda r: -r[key] if key == 2 else r[key])[:args.top]:
            print(f"  reuse {'-'.join(map(str, reused))}: MSE {mse:.4f}  {db:.1f} dB  flicker {flicker:.4f}")


if __name__ == "__main__":
    main()
