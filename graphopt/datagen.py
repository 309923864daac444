"""`graphopt data`: the folder calibration and distillation read, made from a diffusers pipeline
and a list of prompts.

    graphopt data PIPELINE_DIR --prompts prompts.txt -o data/ --sample-steps 30
    graphopt data PIPELINE_DIR --prompts prompts.txt -o data/ --videos clips/

Every prompt (one per line of the prompts file; blank lines are skipped) goes through the
pipeline's own tokenizer and text encoder (`encode_prompt`; Wan: UMT5), and so does the negative
prompt (`--negative-prompt`, default empty: what the pipeline uses for classifier-free guidance).
The clean latent of each item is one of:

- `--sample-steps N`: the teacher's own sample for the prompt, drawn by the pipeline (its
  transformer and scheduler, N steps, `--guidance` scale) from N(0, I) noise seeded by the item's
  seed (a CPU generator, so any device draws the same noise): self-distillation data. The states
  the run passed through are kept too, as trajectories (what a reuse router trains on).
- `--videos DIR`: the VAE latent of a real clip (AutoencoderKLWan encode, the posterior's mode,
  normalised with the VAE's latents_mean / latents_std as the pipeline does). The clips, sorted by
  name, pair with the prompts in order; each is a `.safetensors` file holding one tensor `video`,
  (frames, 3, height, width) with values in [0, 1] (float) or 0-255 (uint8).

Layout of OUT (the one `graphopt.distill` `[data] folder` and `calibration_inputs(data=OUT)`
read; nothing is pickled):

    00000.safetensors ...   latents (C, F, H, W): the transformer's latent input, batch dim left out
                            encoder_hidden_states (L, D), negative_encoder_hidden_states (L, D)
    trajectories/00000.safetensors ...   (--sample-steps) latents (N+1, C, F, H, W): the state
                            before each step and the final sample; timesteps (N,): the
                            transformer's timestep at each step
    manifest.json           the settings, the shapes and dtype, and per item its prompt,
                            negative prompt, seed (and clip)

Resumable: the items are written to `.OUT.partial/` next to OUT (marked as graphopt's), each one
under a temporary name then renamed, so an item there is complete; a rerun of the same command
keeps them (after checking each file's size against its header) and makes only the rest. A run
with other settings, prompts or pipeline files starts over. OUT appears, whole, when the last item
is written (graphopt.io.replace_dir); a rerun that finds OUT made by the same command leaves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graphopt.errors import GraphoptError
from graphopt.io import (atomic_write_text, check_output_dir, mark_dir, read_marker, replace_dir,
                         save_safetensors)

MANIFEST = "manifest.json"
JOURNAL = "journal.json"
TRAJECTORIES = "trajectories"
WRITTEN_BY = "graphopt data"
SUPPORTED_PIPELINES = ("WanPipeline",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class DataSettings:
    """What decides the items' contents (a resumed run must have the same)."""

    sample_steps: int | None = None
    videos: str | None = None
    negative_prompt: str = ""
    guidance: float = 5.0
    num_frames: int = 81            # pixel frames, height and width of a sample (--sample-steps)
    height: int = 480
    width: int = 832
    max_sequence_length: int = 512
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if (self.sample_steps is None) == (self.videos is None):
            raise GraphoptError("graphopt data needs the latents' source: pass --sample-steps N "
                                "(the teacher's own samples) or --videos DIR (real clips), one "
                                "of the two")
        if self.sample_steps is not None and (not isinstance(self.sample_steps, int)
                                              or self.sample_steps < 1):
            raise GraphoptError(f"--sample-steps must be an integer >= 1, got "
                                f"{self.sample_steps!r}")
        for name in ("num_frames", "height", "width", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GraphoptError(f"--{name.replace('_', '-')} must be an integer >= 1, got "
                                    f"{value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise GraphoptError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if not self.guidance >= 1.0:
            raise GraphoptError(f"--guidance must be >= 1 (1: no classifier-free guidance), got "
                                f"{self.guidance!r}")
        if self.dtype not in DTYPES:
            raise GraphoptError(f"--dtype {self.dtype!r} unknown; choose one of {sorted(DTYPES)}")
        # One name per dtype, so that bf16 and bfloat16 resume each other's runs.
        object.__setattr__(self, "dtype", str(DTYPES[self.dtype]).removeprefix("torch."))


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphoptError(f"prompts file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GraphoptError(f"cannot read prompts file '{path}': {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GraphoptError(f"prompts file '{path}' holds no prompt: write one prompt per line")
    return prompts


def make_data(pipeline_dir, prompts: list[str], out, settings: DataSettings, *,
              device: str = "cpu", trust_pickle: bool = False, overwrite: bool = False,
              progress: Callable[[int, Path], None] | None = None, console=None) -> Path:
    """Write the data folder `out` for `prompts` from the diffusers pipeline in `pipeline_dir`
    (see the module docstring). `progress(index, path)` is called after each item is written."""
    from tqdm.auto import tqdm

    if not prompts:
        raise GraphoptError("graphopt data needs at least one prompt")
    pipeline_dir = Path(pipeline_dir)
    protect = [pipeline_dir, settings.videos]
    target = check_output_dir(out, protect=protect, overwrite=overwrite)
    class_name = _pipeline_class(pipeline_dir)
    if settings.sample_steps is not None:
        _check_sample_size(pipeline_dir, settings)
    clips = _clips(Path(settings.videos), len(prompts)) if settings.videos else None
    fingerprint = _fingerprint(pipeline_dir, prompts, settings, clips)
    if _manifest(target).get("fingerprint") == fingerprint:
        if console is not None:
            console.print(f"{out}/ is up to date ({len(prompts)} items)")
        return Path(out)
    work = target.parent / f".{target.name}.partial"
    names = _item_names(len(prompts))
    done = _resume(work, fingerprint, names, settings, console)
    todo = [i for i in range(len(prompts)) if i not in done]
    if todo:
        pipe = _load_pipeline(pipeline_dir, class_name, settings, device, trust_pickle)
        with tqdm(total=len(prompts), initial=len(done), unit="item", desc="graphopt data",
                  disable=None) as bar:
            for i in todo:
                tensors, trajectory = _item(pipe, prompts[i], settings, settings.seed + i,
                                            None if clips is None else clips[i], device)
                if trajectory is not None:
                    save_safetensors(trajectory, work / TRAJECTORIES / names[i])
                save_safetensors(tensors, work / names[i])
                bar.update()
                if progress is not None:
                    progress(i, work / names[i])
    _finish(work, target, prompts, names, settings, clips, fingerprint, class_name,
            protect=protect, overwrite=overwrite)
    if console is not None:
        console.print(f"wrote {out}/ ({len(prompts)} items, {MANIFEST})")
    return Path(out)


def _pipeline_class(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise GraphoptError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json); "
                            f"give the folder that holds model_index.json, transformer/, vae/, ...")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise GraphoptError(f"'{index}' is not a diffusers model index (a JSON object)") from None
    if name not in SUPPORTED_PIPELINES:
        raise GraphoptError(f"graphopt data supports {', '.join(SUPPORTED_PIPELINES)}; "
                            f"'{folder}' holds a {name!r}")
    return name


def _load_pipeline(folder: Path, class_name: str, settings: DataSettings, device: str,
                   trust_pickle: bool):
    import diffusers

    try:
        import transformers  # noqa: F401  (the pipeline's text encoder and tokenizer)
    except ImportError:
        raise GraphoptError("graphopt data needs transformers for the pipeline's text encoder: "
                            "pip install 'graphopt[data]'") from None
    if not trust_pickle:
        pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                         if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickled:
            raise GraphoptError(f"'{folder}' holds pickled weights ({pickled[0]}); loading them "
                                f"can run code: convert them to safetensors, or pass "
                                f"--trust-pickle")
    dtype = DTYPES[settings.dtype]
    # The VAE stays in float32, as Wan's own examples keep it (its bf16 latents drift).
    torch_dtype = {"default": dtype, "vae": torch.float32}
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            folder, torch_dtype=torch_dtype, use_safetensors=None if trust_pickle else True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise GraphoptError(f"cannot load the pipeline in '{folder}': "
                            f"{str(e).strip().splitlines()[0]}") from None
    try:
        pipe.to(device)
    except (RuntimeError, AssertionError) as e:
        raise GraphoptError(f"cannot use --device {device}: "
                            f"{str(e).strip().splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _item(pipe, prompt: str, settings: DataSettings, seed: int, clip: Path | None, device: str):
    """One item's tensors (batch dim left out, in the stored dtype) and its trajectory or None."""
    dtype = DTYPES[settings.dtype]
    text, negative = pipe.encode_prompt(prompt, negative_prompt=settings.negative_prompt,
                                        do_classifier_free_guidance=True,
                                        max_sequence_length=settings.max_sequence_length,
                                        device=torch.device(device))
    trajectory = None
    if clip is not None:
        latents = _encode_clip(pipe, clip, device)
    else:
        latents, states, timesteps = _sample(pipe, text, negative, settings, seed, device)
        trajectory = {"latents": states.to(dtype), "timesteps": timesteps}
    tensors = {"latents": latents[0], "encoder_hidden_states": text[0],
               "negative_encoder_hidden_states": negative[0]}
    return {k: v.to("cpu", dtype) for k, v in tensors.items()}, trajectory


def _check_sample_size(folder: Path, settings: DataSettings) -> None:
    """The pipeline would round a size it cannot patchify; the data must be what was asked.
    Checked from the configs, before the weights load (WanPipeline's defaults where unset)."""
    vae = _read_json(folder / "vae" / "config.json")
    transformer = _read_json(folder / "transformer" / "config.json")
    t, s = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
    _, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    if ((settings.num_frames - 1) % t or settings.height % (s * patch_h)
            or settings.width % (s * patch_w)):
        raise GraphoptError(f"a {settings.num_frames}-frame {settings.height}x{settings.width} "
                            f"sample does not fit this pipeline: --num-frames must be {t}k + 1, "
                            f"--height a multiple of {s * patch_h}, --width of {s * patch_w}")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise GraphoptError(f"the pipeline lacks '{path}'") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphoptError(f"cannot read '{path}': {e}") from None
    if not isinstance(value, dict):
        raise GraphoptError(f"'{path}' is not a JSON object")
    return value


def _sample(pipe, text, negative, settings: DataSettings, seed: int, device: str):
    """The pipeline's own sampling run from seeded noise: the final latents (1, C, F, H, W), the
    states before each step and the final one (N+1, C, F, H, W), the timesteps (N,)."""
    config = pipe.transformer.config
    frames = (settings.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    height = settings.height // pipe.vae_scale_factor_spatial
    width = settings.width // pipe.vae_scale_factor_spatial
    noise = torch.randn((1, config.in_channels, frames, height, width),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    states = [noise.float().cpu()]

    def keep(_pipe, _step, _t, tensors):
        states.append(tensors["latents"].float().cpu())
        return {}

    try:
        final = pipe(prompt_embeds=text, negative_prompt_embeds=negative, latents=noise,
                     num_frames=settings.num_frames, height=settings.height, width=settings.width,
                     num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance,
                     output_type="latent", return_dict=False, callback_on_step_end=keep,
                     callback_on_step_end_tensor_inputs=["latents"])[0]
    except ValueError as e:     # the pipeline's own checks of sizes and inputs
        raise GraphoptError(f"the pipeline refused the sampling settings: "
                            f"{str(e).strip().splitlines()[0]}") from None
    return final, torch.cat(states), pipe.scheduler.timesteps.detach().float().cpu()


def _encode_clip(pipe, path: Path, device: str) -> torch.Tensor:
    """A clip's normalised VAE latent (1, C, F, H, W)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise GraphoptError(f"cannot read clip '{path}': {e}") from None
    video = stored.get("video")
    if video is None or video.dim() != 4 or video.shape[1] != 3:
        raise GraphoptError(f"clip '{path}' must hold one tensor `video` of shape (frames, 3, "
                            f"height, width), found "
                            f"{ {k: tuple(v.shape) for k, v in stored.items()} }")
    frames, _, height, width = video.shape
    t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    if (frames - 1) % t or height % s or width % s:
        raise GraphoptError(f"clip '{path}' is {frames} frames of {height}x{width}: the VAE needs "
                            f"frames = {t}k + 1 and height, width multiples of {s}")
    video = video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
    pixels = (video * 2 - 1).permute(1, 0, 2, 3)[None].to(device, pipe.vae.dtype)
    vae = pipe.vae
    z = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
    return (z - mean) / std


def _clips(folder: Path, count: int) -> list[Path]:
    if not folder.is_dir():
        raise GraphoptError(f"--videos '{folder}' is not a folder of clips")
    clips = sorted(folder.glob("*.safetensors"))
    if len(clips) != count:
        raise GraphoptError(f"--videos '{folder}' holds {len(clips)} clips (*.safetensors) for "
                            f"{count} prompts: give one clip per prompt (paired in name order)")
    return clips


def _item_names(count: int) -> list[str]:
    width = max(5, len(str(count - 1)))
    return [f"{i:0{width}d}.safetensors" for i in range(count)]


def _fingerprint(pipeline_dir: Path, prompts: list[str], settings: DataSettings,
                 clips: list[Path] | None) -> str:
    # The pipeline's files by name, size and time: other weights make other items.
    files = sorted((str(f.relative_to(pipeline_dir)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in pipeline_dir.rglob("*") if f.is_file())
    record = {"pipeline": str(pipeline_dir.resolve()), "files": files,
              "prompts": prompts, "settings": asdict(settings),
              "clips": None if clips is None else [(c.name, c.stat().st_size) for c in clips]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) and read_marker(folder) is not None else {}


def _resume(work: Path, fingerprint: str, names: list[str], settings: DataSettings,
            console) -> set[int]:
    """Indices of the items a killed run of the same command finished; a fresh folder else."""
    if os.path.lexists(work):
        try:
            state = json.loads((work / JOURNAL).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            state = {}
        if work.is_symlink() or not work.is_dir() or read_marker(work) is None:
            raise GraphoptError(f"'{work}' is in the way: graphopt data assembles its output "
                                f"there, and did not make this one; move it away")
        if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
            for tmp in [*work.glob(".*.tmp"), *work.glob(f"{TRAJECTORIES}/.*.tmp")]:
                tmp.unlink()
            done = {i for i, name in enumerate(names) if _complete(work / name) and (
                settings.sample_steps is None or _complete(work / TRAJECTORIES / name))}
            if done and console is not None:
                console.print(f"resuming: {len(done)} of {len(names)} items already written")
            mark_dir(work, WRITTEN_BY)     # now this process's
            return done
        if console is not None:
            console.print(f"starting over: '{work}' holds a run with other settings or prompts")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mark_dir(work, WRITTEN_BY)
    atomic_write_text(work / JOURNAL, json.dumps({"fingerprint": fingerprint}))
    return set()


def _complete(path: Path) -> bool:
    """Whether `path` is a whole safetensors file: its size is the one its header declares."""
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return False


def _finish(work: Path, target: Path, prompts, names, settings: DataSettings, clips,
            fingerprint: str, class_name: str, *, protect, overwrite: bool) -> None:
    from safetensors import safe_open

    with safe_open(str(work / names[0]), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    items = []
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        item = {"file": name, "prompt": prompt, "negative_prompt": settings.negative_prompt,
                "seed": settings.seed + i}
        if clips is not None:
            item["video"] = clips[i].name
        if settings.sample_steps is not None:
            item["trajectory"] = f"{TRAJECTORIES}/{name}"
        items.append(item)
    manifest = {"written_by": WRITTEN_BY, "fingerprint": fingerprint, "pipeline": class_name,
                "source": "samples" if settings.sample_steps is not None else "videos",
                "settings": asdict(settings), "dtype": settings.dtype,
                "shapes": shapes, "items": items}
    if settings.sample_steps is not None:
        manifest["trajectory_shapes"] = {"latents": [settings.sample_steps + 1, *shapes["latents"]],
                                         "timesteps": [settings.sample_steps]}
    atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (work / JOURNAL).unlink()
    replace_dir(work, target, protect=protect, overwrite=overwrite)
