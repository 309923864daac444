"""Capture and inspect the full-size Wan2.1-14B architecture on the meta device.

Prints wall time and peak memory (RSS) of capture + structure discovery + cost model, at the
81-frame 480p latent shape (16 x 21 x 60 x 104), with no weights in memory.

    python tools/bench_meta_capture.py
"""
import resource
import time

import torch

from graphopt import capture
from graphopt.cost import model_cost
from graphopt.describe import human
from graphopt.families import InputSpec, build_model

WAN_14B = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
    "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}


def main():
    t0 = time.perf_counter()
    model = build_model("wan", WAN_14B, device="meta")
    spec = InputSpec(batch=1, frames=21, height=60, width=104, text_len=512, device="meta")
    graph = capture(model, spec=spec)
    cost = model_cost(graph)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    heads = {a.heads for a in graph.attentions.values()}
    print(f"| model | params | blocks | heads | tokens (f x h x w) | FLOPs/step | time | peak RSS |")
    print(f"|---|---|---|---|---|---|---|---|")
    print(f"| Wan2.1-14B (meta) | {human(cost.params)} | {len(graph.blocks)} | {sorted(heads)} | "
          f"{'x'.join(map(str, graph.token_layout))} | {human(cost.flops)} | {seconds:.1f} s | "
          f"{peak_gb:.2f} GB |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
