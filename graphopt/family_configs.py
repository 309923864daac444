"""The configs of the family table (graphopt.families): a tiny one per family, for tests and the
shipped `tiny:<family>` models, and the published full-size architectures.

Keys a config leaves out take the diffusers class's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from graphopt.layout import InputSpec

WAN_TINY = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 24,
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}

HUNYUAN_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": 24,
    "pooled_projection_dim": 20,
    "rope_axes_dim": [4, 6, 6],
}

LTX_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "num_layers": 2,
    "caption_channels": 24,
}

MOCHI_TINY = {
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "pooled_projection_dim": 20,
    "in_channels": 4,
    "text_embed_dim": 24,  # the text pool always uses 8 heads: a multiple of 8
    "time_embed_dim": 16,
}

LATTE_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 24,
    "video_length": 3,
}

DIT_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}

PIXART_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 12,  # the size conditioning splits the width in three: 4*12 = 48
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "cross_attention_dim": 48,
    "sample_size": 8,
    "patch_size": 2,
    "caption_channels": 24,
    "use_additional_conditions": True,
}

COGVIDEOX_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 24,
    "num_layers": 2,
    "sample_width": 12,
    "sample_height": 8,
    "sample_frames": 9,  # (3 latent frames - 1) * temporal_compression_ratio 4 + 1
    "patch_size": 2,
    "max_text_seq_length": 7,
}

# Full-size architectures, from the published diffusers configs (transformer/config.json of
# Wan-AI/Wan2.1-T2V-14B-Diffusers, hunyuanvideo-community/HunyuanVideo and genmo/mochi-1-preview,
# whose values are MochiTransformer3DModel's defaults), with the latent each is run at (Wan: 81
# frames 480p; HunyuanVideo: 129 frames 720p; Mochi: 163 frames 480x848, VAE ratios 6 and 8). For meta-device
# work: capture, structural passes and cost without the weights (`build_model(name, PUBLISHED[name][0], "meta")`).
PUBLISHED: Mapping[str, tuple[dict[str, Any], InputSpec]] = MappingProxyType({
    "wan2.1-t2v-14b": ({
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
        "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
        "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
    }, InputSpec(batch=1, frames=21, height=60, width=104, text_len=512)),
    "hunyuan-video-13b": ({
        "_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
        "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20,
        "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
        "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
        "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
        "rope_axes_dim": [16, 56, 56],
    }, InputSpec(batch=1, frames=33, height=90, width=160, text_len=256)),
    "mochi-1-10b": ({
        "_class_name": "MochiTransformer3DModel", "patch_size": 2, "num_attention_heads": 24,
        "attention_head_dim": 128, "num_layers": 48, "pooled_projection_dim": 1536,
        "in_channels": 12, "out_channels": None, "qk_norm": "rms_norm", "text_embed_dim": 4096,
        "time_embed_dim": 256, "activation_fn": "swiglu", "max_sequence_length": 256,
    }, InputSpec(batch=1, frames=28, height=60, width=106, text_len=256)),
})
