"""The reuse-schedule search under given options (a JSON dict of reuse_schedule_search keywords, plus
"targets", "fit_clips"), its points scored on the 16 held-out conditions bench_quality scores on (same
noise, 10 steps, CFG 4), without the cache rows: how README compares search designs.

    python tools/reuse_schedule_variants.py '{"max_reuse": 2, "targets": [0.5]}' NAME   # writes out/exp_NAME.pt

The FLOPs fraction printed is the router's count of the schedule (fixed share + blocks run), which
FlopCounterMode's count matched to 3 decimals on bench_quality's reuse rows (0.501, 0.351, 0.201).
"""
import json, sys, time
from pathlib import Path
import torch
from graphopt.compress import compress
from graphopt.distill.reuse_schedule import reuse_schedule_search, set_reuse_schedule
from graphopt.eval import evaluate_clips, aggregate_score
from graphopt.tiny import embed_tokens, generate
from graphopt.tiny.testbed import CALIBRATION_SEED, capture_teacher, eval_conditions, sample_clips

torch.set_num_threads(1)
kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
targets = kw.pop("targets", [0.5, 0.35, 0.25])
evaluate = kw.pop("evaluate", True)
teacher, config = capture_teacher()
routed = teacher.copy()
compress(routed, ["route"], {"route": {"mode": "schedule", "skip": "reuse", "select": "sign", "budget": 1.0,
                                       "timestep_bins": 1000, "ranking": list(range(len(teacher.blocks)))}})
data = generate(config, kw.pop("fit_clips", 4), seed=CALIBRATION_SEED)
cond = embed_tokens(config, data.tokens)
t0, c0 = time.perf_counter(), time.process_time()
found = reuse_schedule_search(routed, teacher, cond, video_shape=data.videos.shape[1:], targets=targets,
                              steps=10, progress=True, **kw)
print(f"search {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s cpu, "
      f"{found['model_calls']} calls; path:",
      " ".join(f"{p['fraction']:.3f}" for p in found["path"]), flush=True)
for t, p in zip(targets, found["points"]):
    print(f"@{t}: frac {p['fraction']:.4f} err {p['error']:.3g}",
          ["".join("1" if b else "." for b in row) for row in p["computes"].tolist()], flush=True)
Path("out").mkdir(exist_ok=True)
run_name = sys.argv[2] if len(sys.argv) > 2 else "run"
torch.save({"targets": targets, "points": found["points"], "path": found["path"]}, f"out/exp_{run_name}.pt")
if not evaluate:
    sys.exit()
ev = eval_conditions(config, 16)
s = {"steps": 10, "guidance": 4.0, "seed": 0}
ref = sample_clips(teacher, config, ev, **s)
ts = evaluate_clips(config, ref, ev, reference=ref)
for t, p in zip(targets, found["points"]):
    g = routed.copy()
    set_reuse_schedule(g, p["computes"], steps=10)
    clips = sample_clips(g, config, ev, **s)
    sc = evaluate_clips(config, clips, ev, reference=ref)
    print(f"@{t}: frac {p['fraction']:.4f} agg {aggregate_score(sc, ts):.3f} "
          + " ".join(f"{k[:6]} {v:.4f}" for k, v in sc.items()), flush=True)
