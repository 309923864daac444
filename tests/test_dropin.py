"""The compressed model in a real diffusers WanPipeline: PyTorch module and onnxruntime runtime.

A WanPipeline from tiny parts (the tiny Wan transformer, a tiny AutoencoderKLWan, the flow-match
Euler scheduler; no text encoder: prompt embeddings are passed directly) generates a few steps
with classifier-free guidance. `pipe.transformer` is replaced by the pruned and routed model,
first as PyTorch (`GraphTransformer`), then as the single-file ONNX export in onnxruntime; both
must give the same video.
"""
import pytest
import torch

from graphopt import capture, compress, rel_error
from graphopt.dropin import GraphTransformer
from graphopt.families import build_model


diffusers = pytest.importorskip("diffusers")
STEPS = 3


@pytest.fixture(scope="module")
def compressed():
    graph = capture(build_model("wan"))
    compress(graph, ["prune", "route"], {"prune": {"ratio": 0.25}, "route": {"budget": 0.6}})
    return graph


def _pipeline(transformer_config):
    z = transformer_config["in_channels"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLWan(base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True],
                                         latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, graph):
    """A few guided steps at the latent shape the graph was captured for; video (B, F, C, H, W)."""
    _, _, frames, height, width = graph.example_inputs["hidden_states"].shape
    scale_t, scale_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    gen = torch.Generator().manual_seed(0)
    text = graph.example_inputs["encoder_hidden_states"].shape
    prompt, negative = torch.randn(text, generator=gen), torch.randn(text, generator=gen)
    out = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative,
               num_frames=(frames - 1) * scale_t + 1, height=height * scale_s, width=width * scale_s,
               num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
               generator=torch.Generator().manual_seed(1))
    return out.frames, (frames - 1) * scale_t + 1, height * scale_s, width * scale_s


def test_compressed_module_and_onnxruntime_replace_the_transformer(compressed, tmp_path):
    pytest.importorskip("onnxruntime")
    from graphopt.exporters.onnx import export_onnx, load_onnx

    pipe = _pipeline(compressed.config)
    pipe.transformer = GraphTransformer(compressed)
    video, frames, height, width = _generate(pipe, compressed)
    assert video.shape == (1, frames, 3, height, width)
    records = pipe.transformer.records
    assert [r.context for r in records] == ["cond", "uncond"] * STEPS
    assert all(r.skipped for r in records)          # the router skips blocks at budget 0.6

    pipe.transformer = load_onnx(export_onnx(compressed, tmp_path / "onnx", layout="single"))
    video_ort, *_ = _generate(pipe, compressed)
    assert rel_error(video_ort, video) < 1e-4
    assert [r.executed for r in pipe.transformer.records] == [r.executed for r in records]
