"""What the CPU benchmarks share: a small-but-not-tiny Wan (timing: graphopt.bench.interleaved_latency).

Small enough for 2 CPU cores, large enough that matmuls (not Python overhead) dominate a step:
8 blocks, width 256, latent 16 × 4 × 16 × 16 (256 video tokens).
"""
from graphopt.layout import InputSpec

WAN_SMALL = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 4,
    "attention_head_dim": 64, "in_channels": 16, "out_channels": 16, "text_dim": 256,
    "freq_dim": 256, "ffn_dim": 1024, "num_layers": 8, "rope_max_seq_len": 1024,
}
SPEC = InputSpec(batch=1, frames=4, height=16, width=16, text_len=32)
