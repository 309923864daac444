"""`graphopt data` on a tiny Wan pipeline built offline from configs (UMT5 encoder, a `tokenizers`
WordLevel tokenizer, AutoencoderKLWan, WanTransformer3DModel, UniPC), saved with save_pretrained
and loaded by the verb with from_pretrained: its folder feeds `compress --calibration` and
`distill`, a killed run resumes, bf16 is written where asked."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from graphopt.cli import main

PROMPTS = ["a cat runs on the field", "a dog jumps slowly", "the red ball"]
SIZES = ["--num-frames", "5", "--height", "32", "--width", "32", "--max-sequence-length", "8"]
STEPS = 2


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a cat dog runs jumps on the red blue ball field in slowly fast".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(vocab), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=16))
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               attn_scales=[], temperal_downsample=[False, True, True],
                               latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=scheduler, transformer=transformer.eval())
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-wan-pipeline"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return path


@pytest.fixture(scope="module")
def samples(pipeline_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "samples"
    assert main(["data", str(pipeline_dir), "--prompts", str(prompts_file), "-o", str(out),
                 "--sample-steps", str(STEPS), *SIZES]) == 0
    return out


def _settings():
    from graphopt.datagen import DataSettings

    return DataSettings(sample_steps=STEPS, num_frames=5, height=32, width=32, max_sequence_length=8)


def test_samples_folder_layout_and_manifest(samples, pipeline_dir):
    from diffusers import WanPipeline

    manifest = json.loads((samples / "manifest.json").read_text())
    assert [i["prompt"] for i in manifest["items"]] == PROMPTS
    assert [i["seed"] for i in manifest["items"]] == [0, 1, 2]
    assert manifest["dtype"] == "float32" and manifest["source"] == "samples"
    assert manifest["shapes"] == {"latents": [4, 2, 4, 4], "encoder_hidden_states": [8, 24],
                                  "negative_encoder_hidden_states": [8, 24]}
    files = sorted(p.name for p in samples.glob("*.safetensors"))
    assert files == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    assert sorted(p.name for p in samples.iterdir()) == [".graphopt", *files, "manifest.json",
                                                         "trajectories"]

    # The stored text states are the pipeline's own encode_prompt; the trajectory starts at the
    # item's seeded noise and ends at the stored sample, and replaying the pipeline from that
    # noise gives the same sample.
    pipe = WanPipeline.from_pretrained(pipeline_dir)
    item = load_file(str(samples / "00001.safetensors"))
    trajectory = load_file(str(samples / "trajectories" / "00001.safetensors"))
    with torch.no_grad():
        text, negative = pipe.encode_prompt(PROMPTS[1], max_sequence_length=8, device="cpu")
        assert torch.equal(item["encoder_hidden_states"], text[0])
        assert torch.equal(item["negative_encoder_hidden_states"], negative[0])
        noise = torch.randn((1, 4, 2, 4, 4), generator=torch.Generator().manual_seed(1))
        assert trajectory["latents"].shape == (STEPS + 1, 4, 2, 4, 4)
        assert torch.equal(trajectory["latents"][0], noise[0])
        assert torch.equal(trajectory["latents"][-1], item["latents"])
        assert trajectory["timesteps"].shape == (STEPS,) and trajectory["timesteps"][0] > 900
        again = pipe(prompt_embeds=text, negative_prompt_embeds=negative, latents=noise,
                     num_frames=5, height=32, width=32, num_inference_steps=STEPS,
                     output_type="latent", return_dict=False)[0]
    assert relative_error(item["latents"], again[0]) < 1e-6
    assert relative_error(trajectory["latents"][1], trajectory["latents"][0]) > 1e-3


def test_compress_calibrates_on_the_folder(samples, pipeline_dir, tmp_path, capsys):
    from graphopt.calibration import calibration_inputs
    from graphopt.capture import capture, load_model
    from graphopt.layout import InputSpec

    # The folder's items, at each timestep, as batch rows of their own (text and negative text).
    graph = capture(load_model(pipeline_dir / "transformer"),
                    spec=InputSpec(frames=2, height=4, width=4, text_len=8))
    graph.calibration_data = str(samples)
    inputs = calibration_inputs(graph, timesteps=2)
    assert len(inputs) == 2 * 3 * 2
    item = load_file(str(samples / "00002.safetensors"))
    last, before = inputs[5], inputs[4]         # item 2 at the first timestep: negative, text
    assert torch.equal(last["encoder_hidden_states"][0], item["negative_encoder_hidden_states"])
    assert torch.equal(before["encoder_hidden_states"][0], item["encoder_hidden_states"])
    assert torch.equal(last["hidden_states"], before["hidden_states"])
    s = float(last["timestep"][0]) / 1000
    noise = (last["hidden_states"][0] - (1 - s) * item["latents"]) / s      # x_t = (1-s)·x0 + s·ε
    assert abs(noise.std().item() - 1) < 0.25 and abs(noise.mean().item()) < 0.25

    # The prune pass ranks heads on graph.calibration_data: a bad item there stops it.
    from graphopt.errors import GraphoptError
    from graphopt.passes.prune import Prune

    bad = tmp_path / "bad-data"
    bad.mkdir()
    save_file({"latents": torch.randn(4, 2, 4, 6)}, str(bad / "0.safetensors"))
    graph.calibration_data = str(bad)
    with pytest.raises(GraphoptError, match=r"captured for \(4, 2, 4, 4\)"):
        Prune(ratio=0.5, criterion="sensitivity").decide(graph)

    out = tmp_path / "pruned"
    assert main(["compress", str(pipeline_dir / "transformer"), "--passes", "prune",
                 "--prune-ratio", "0.5", "--prune-criterion", "sensitivity",
                 "--calibration", str(samples), "-o", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    spec = recipe["model"]["input_spec"]
    assert (spec["frames"], spec["height"], spec["width"], spec["text_len"]) == (2, 4, 4, 8)

    config = tmp_path / "distill.toml"
    config.write_text(f'[run]\noutput_dir = "{tmp_path / "ckpt"}"\nprogress = false\n'
                      f'[data]\nfolder = "{samples}"\n[stage1]\nsteps = 2\n[stage2]\nsteps = 0\n'
                      f'[loss]\nmca_weight = 0.0\n[optim.student]\nlr = 1e-3\n')
    distilled = tmp_path / "distilled"
    assert main(["distill", str(out), "--config", str(config), "-o", str(distilled)]) == 0
    report = json.loads((distilled / "distill.json").read_text())
    assert report["report"]["steps"] == 2 and report["config"]["data"]["folder"] == str(samples)

    assert main(["compress", str(pipeline_dir / "transformer"), "--passes", "prune",
                 "--calibration", str(samples / "manifest.json"), "-o", str(tmp_path / "x")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_killed_run_resumes_without_redoing_items(samples, pipeline_dir, tmp_path):
    from graphopt.datagen import make_data

    out = tmp_path / "resumed"
    made = []

    def killed_after_two(index, path):
        made.append(index)
        if len(made) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_data(pipeline_dir, PROMPTS, out, _settings(), progress=killed_after_two)
    work = tmp_path / ".resumed.partial"
    assert not out.exists() and made == [0, 1]
    assert sorted(p.name for p in work.glob("*.safetensors")) == ["00000.safetensors",
                                                                  "00001.safetensors"]
    # A file cut short (a crash while the disk wrote it) is found and made again.
    path = work / "00001.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    first = (work / "00000.safetensors").stat().st_mtime_ns
    stray = work / "trajectories" / ".00002.safetensors.0123456789ab.tmp"    # killed mid-write
    stray.write_bytes(b"half")

    made.clear()
    make_data(pipeline_dir, PROMPTS, out, _settings(), progress=lambda i, p: made.append(i))
    assert made == [1, 2]
    assert (out / "00000.safetensors").stat().st_mtime_ns == first
    assert not work.exists() and not list(out.rglob("*.tmp"))
    for name in ["manifest.json", *(f"{d}0000{i}.safetensors" for d in ("", "trajectories/")
                                    for i in range(3))]:
        assert (out / name).read_bytes() == (samples / name).read_bytes(), name

    # Done: the same command again leaves the folder alone; other settings start over.
    made.clear()
    make_data(pipeline_dir, PROMPTS, out, _settings(), progress=lambda i, p: made.append(i))
    assert made == [] and (out / "00000.safetensors").stat().st_mtime_ns == first


def test_videos_in_bf16(pipeline_dir, prompts_file, tmp_path):
    from diffusers import WanPipeline

    clips = tmp_path / "clips"
    clips.mkdir()
    generator = torch.Generator().manual_seed(3)
    for name in ("a", "b", "c"):
        video = torch.randint(0, 256, (5, 3, 32, 32), generator=generator, dtype=torch.uint8)
        save_file({"video": video}, str(clips / f"{name}.safetensors"))
    out = tmp_path / "real"
    assert main(["data", str(pipeline_dir), "--prompts", str(prompts_file), "-o", str(out),
                 "--videos", str(clips), "--dtype", "bf16", "--max-sequence-length", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["source"] == "videos"
    assert [i["video"] for i in manifest["items"]] == ["a.safetensors", "b.safetensors",
                                                       "c.safetensors"]
    assert not (out / "trajectories").exists()
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path

    # The latent is the VAE's, normalised as the pipeline un-normalises it before decoding.
    pipe = WanPipeline.from_pretrained(pipeline_dir)
    video = load_file(str(clips / "b.safetensors"))["video"].float() / 255
    with torch.no_grad():
        z = pipe.vae.encode((video * 2 - 1).permute(1, 0, 2, 3)[None]).latent_dist.mode()[0]
    mean = torch.tensor(pipe.vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(-1, 1, 1, 1)
    stored = load_file(str(out / "00001.safetensors"))["latents"]
    assert stored.shape == (4, 2, 4, 4)
    assert relative_error(stored.float(), (z - mean) / std) < 1e-2


def test_bad_input_is_one_line_and_exit_2(pipeline_dir, prompts_file, tmp_path, capsys):
    def fails(*argv, match):
        assert main(["data", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err

    fails(tmp_path, "--prompts", prompts_file, "-o", tmp_path / "o", "--sample-steps", 1,
          match="no model_index.json")
    fails(pipeline_dir, "--prompts", prompts_file, "-o", tmp_path / "o", match="--sample-steps N")
    fails(pipeline_dir, "--prompts", prompts_file, "-o", tmp_path / "o", "--sample-steps", 1,
          "--videos", tmp_path, match="one of the two")
    fails(pipeline_dir, "--prompts", prompts_file, "-o", tmp_path / "o", "--sample-steps", 1,
          "--height", 40, match="--height a multiple of 16")
    pickled = tmp_path / "pickled-pipeline"
    shutil.copytree(pipeline_dir, pickled)
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    fails(pickled, "--prompts", prompts_file, "-o", tmp_path / "o", "--sample-steps", 1,
          match="pickled weights")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fails(pipeline_dir, "--prompts", empty, "-o", tmp_path / "o", "--sample-steps", 1,
          match="holds no prompt")
    fails(pipeline_dir, "--prompts", prompts_file, "-o", tmp_path / "o", "--videos", tmp_path,
          match="holds 0 clips")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    fails(pipeline_dir, "--prompts", prompts_file, "-o", foreign, "--sample-steps", 1,
          match="did not write")
    assert (foreign / "notes.txt").read_text() == "keep me"
    fails(pipeline_dir, "--prompts", prompts_file, "-o", pipeline_dir, "--sample-steps", 1,
          match="is the input")
    assert os.path.exists(pipeline_dir / "model_index.json")
