"""Calibration: the inputs analyses run the model on, and a runner that hands each attention's
q, k, v to a statistic while the model runs.

Inputs (`calibration_inputs`) are either synthesized or read from a safetensors file:

- synthesized: the graph's example inputs with, for each of `samples` fresh seeded draws, the
  video latent and every 3-D floating conditioning-sequence input (text states, shape
  (batch, tokens, width)) replaced by N(0, 1) noise, at each calibration timestep. `timesteps=n`
  draws one timestep uniformly in each of n equal bins of [50, 950] (stratified, seeded), so the
  calibration covers the whole denoising trajectory; a tuple gives them explicitly. Masks, pooled
  vectors, guidance and other inputs keep their example values.
- a file (`data=path.safetensors`, never a pickle): one tensor per model input, named as the
  model's forward kwargs, holding N calibration samples stacked along the batch dim:
  shape (N·B, *rest) where (B, *rest) is the captured input's shape. The latent and the timestep
  are required; inputs the file leaves out keep their example values. Samples are read from the
  file one at a time, when used (`CalibrationFile`).
- a data folder (`data=folder`, what `graphopt data` writes, also `[data] folder` of distillation):
  *.safetensors items holding a clean latent `latents` (the latent input without its batch dim)
  and text states `encoder_hidden_states` (+ `negative_encoder_hidden_states`, the CFG pass's).
  Every item is used, at each calibration timestep t (drawn as for synthesized inputs), noised
  as flow matching does: x_t = (1 − s)·x0 + s·ε, s = t / 1000, ε seeded by (seed, item, t). Each
  text state of an item is a batch row of its own with the same x_t (the teacher runs both CFG
  passes), B rows to an input for a model captured at batch B. Items are read when used
  (`CalibrationFolder`).

`graph.calibration_data`, where set (`graphopt compress --calibration`), is the `data` of every
analysis that calibrates without being given one.

`run_attentions` runs the graph node by node (`torch.fx.Interpreter`, which frees every value
after its last use) and calls a statistic at each chosen `scaled_dot_product_attention` node with
its q, k, v and options; the statistic keeps only what it reduces them to, and the run stops
after the last chosen attention. So memory stays that of one forward pass plus the statistics,
whatever the number of layers.

Block offloading (`BlockOffload`, the `offload=DEVICE` option of head-roles and head-importance):
the weights stay where the graph holds them (CPU memory) and the run happens on DEVICE with one
block's weights there at a time: each weight is copied over when the graph reads it, and a block's
copies are freed when the run reads the next block's weights. Weights autograd saves for a
backward pass are saved as references and copied again when the backward pass needs them. So the
device holds one block, the weights outside the blocks (embeddings, output head) and the
activations: what a 14B model needs to be calibrated on one GPU whose memory is smaller than its
28 GB of bf16 weights (measured here on CPU only: `tests/test_offload.py` checks that the results
equal the resident run's and that one block is on the device at a time).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from graphopt.errors import GraphoptError

TIMESTEP_RANGE = (50.0, 950.0)


def require_weights(graph, what: str) -> None:
    """Refuse to calibrate a graph captured without weights (meta device)."""
    if graph.is_meta:
        raise GraphoptError(
            f"calibration needs weights: {what} runs the model on calibration inputs, but this "
            f"graph was captured on the meta device (no weights). Pass a recipe computed elsewhere "
            f"(with weights, on another machine), or load weights (capture the model with its "
            f"weights, or graphopt.load a saved model)")


def check_calibration(timesteps, samples: int) -> None:
    """Validate calibration options (for the Options dataclasses of passes that calibrate)."""
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, tuple)):
        raise GraphoptError(f"calibration timesteps must be a count (int) or a tuple of timesteps, "
                            f"got {timesteps!r}")
    if isinstance(timesteps, int) and timesteps < 1:
        raise GraphoptError(f"calibration needs at least 1 timestep, got {timesteps}")
    if isinstance(timesteps, tuple) and not timesteps:
        raise GraphoptError("calibration timesteps tuple is empty: give at least one timestep")
    if not isinstance(samples, int) or samples < 1:
        raise GraphoptError(f"calibration samples must be an int >= 1, got {samples!r}")


def calibration_timesteps(count: int, seed: int = 0) -> list[float]:
    """One uniform draw in each of `count` equal bins of [50, 950], in descending order."""
    low, high = TIMESTEP_RANGE
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    width = (high - low) / count
    return sorted((low + width * (i + float(u[i])) for i in range(count)), reverse=True)


def calibration_inputs(graph, *, timesteps: int | Sequence[float] = 4, samples: int = 1,
                       seed: int = 0, data: str | Path | None = None) -> Sequence[dict]:
    """Model inputs (forward kwargs) to calibrate on; see the module docstring.

    `timesteps` × `samples` synthesized inputs, or, with `data`, the file's samples (then
    `timesteps`, `samples` and `seed` are not used) or the folder's items at `timesteps`.
    """
    latent_name, t_name = _input_names(graph)
    data = data if data is not None else getattr(graph, "calibration_data", None)
    if data is not None and not Path(data).is_dir():
        return _load_calibration_file(graph, Path(data), latent_name, t_name)
    check_calibration(timesteps if isinstance(timesteps, int) else tuple(timesteps), samples)
    ts = calibration_timesteps(timesteps, seed) if isinstance(timesteps, int) else list(timesteps)
    if data is not None:
        return CalibrationFolder(graph, Path(data), latent_name, t_name, ts, seed)
    example = graph.example_inputs
    states = [k for k in _text_inputs(graph)
              if isinstance(example.get(k), torch.Tensor) and example[k].is_floating_point()
              and example[k].dim() == 3]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        fresh = {k: _normal_like(example[k], generator) for k in [latent_name, *states]}
        for t in ts:
            out.append({**example, **fresh, t_name: torch.full_like(example[t_name], t)})
    return out


def _input_names(graph) -> tuple[str, str]:
    latent, timestep = graph.latent_input, graph.timestep_input
    for name in (latent, timestep):
        if not isinstance(graph.example_inputs.get(name), torch.Tensor):
            raise GraphoptError(f"calibration needs the tensor input '{name}' in the model's "
                                f"example inputs (it has {sorted(graph.example_inputs)}); capture "
                                f"the model from a supported family, or give calibration data")
    return latent, timestep


def _text_inputs(graph) -> tuple[str, ...]:
    if graph.family is not None:
        return graph.family.text_inputs
    return tuple(k for k in graph.example_inputs if k.startswith("encoder_hidden_states"))


def _normal_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=generator).to(device=t.device, dtype=t.dtype)


def _load_calibration_file(graph, path: Path, latent_name: str, t_name: str) -> "CalibrationFile":
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise GraphoptError(f"calibration data '{path}' must be a .safetensors file (one tensor "
                            f"per model input); other formats can run code when loaded")
    if not path.exists():
        raise GraphoptError(f"calibration data '{path}' not found")
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise GraphoptError(f"cannot read calibration data '{path}': {e}") from None
    example = graph.example_inputs
    missing = [k for k in (latent_name, t_name) if k not in shapes]
    if missing:
        raise GraphoptError(f"calibration data '{path}' lacks {missing}; it must hold the latent "
                            f"'{latent_name}' and the timestep '{t_name}' "
                            f"(it has {sorted(shapes)})")
    unknown = sorted(set(shapes) - {k for k, v in example.items() if isinstance(v, torch.Tensor)})
    if unknown:
        raise GraphoptError(f"calibration data '{path}' has tensors {unknown} that are not tensor "
                            f"inputs of the model (those are {sorted(example)})")
    counts = {}
    for k, shape in shapes.items():
        ref = example[k]
        batch = ref.shape[0] if ref.dim() else 1
        if ref.dim() == 0 or shape[1:] != tuple(ref.shape[1:]) or shape[0] % batch:
            rest = ", ".join(map(str, ref.shape[1:]))
            raise GraphoptError(
                f"calibration data '{k}' has shape {shape}; the model takes "
                f"{tuple(ref.shape)}, so it must be (N*{batch}, {rest}) for N samples")
        counts[k] = shape[0] // batch
    if len(set(counts.values())) != 1:
        raise GraphoptError(f"calibration data tensors hold different sample counts {counts}; "
                            f"every tensor must stack the same N samples")
    n = next(iter(counts.values()))
    if n == 0:
        raise GraphoptError(f"calibration data '{path}' holds no samples")
    return CalibrationFile(path, example, sorted(shapes), n)


class CalibrationFile(Sequence):
    """The samples of a calibration file, each read from disk when it is used (a slice of every
    tensor), so a long calibration set is never in memory whole."""

    def __init__(self, path: Path, example: dict, names: list[str], n: int):
        self.path, self.example, self.names, self.n = path, example, names, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        item = dict(self.example)
        with safe_open(str(self.path), "pt") as f:
            for k in self.names:
                ref = self.example[k]
                b = ref.shape[0]
                item[k] = f.get_slice(k)[i * b:(i + 1) * b].to(device=ref.device, dtype=ref.dtype)
        return item


TEXT_KEYS = ("encoder_hidden_states", "negative_encoder_hidden_states")


def data_folder_items(folder: Path) -> list[tuple[Path, dict[str, tuple[int, ...]]]]:
    """The items of a data folder and the shape of each tensor they hold."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GraphoptError(f"calibration data folder '{folder}' has no *.safetensors items; "
                            f"write one with `graphopt data`")
    items = []
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                items.append((path, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}))
        except (SafetensorError, OSError) as e:
            raise GraphoptError(f"cannot read calibration item '{path}': {e}") from None
    return items


def data_folder_sizes(folder, latent_layout: str) -> dict[str, int]:
    """InputSpec sizes (frames, height, width, text_len) that fit the items of a data folder, for
    a family whose latent input has axes `latent_layout` ("BCFHW", "BFCHW", "BCHW")."""
    path, shapes = data_folder_items(Path(folder))[0]
    latent = shapes.get("latents")
    axes = latent_layout.removeprefix("B")
    if latent is None or len(latent) != len(axes) or "N" in axes:
        raise GraphoptError(f"calibration item '{path}' holds no `latents` of axes {axes} (found "
                            f"{shapes}); graphopt data writes them for the pipeline's transformer")
    sizes = {"frames": latent[axes.index("F")] if "F" in axes else 1,
             "height": latent[axes.index("H")], "width": latent[axes.index("W")]}
    if "encoder_hidden_states" in shapes:
        sizes["text_len"] = shapes["encoder_hidden_states"][0]
    return sizes


class CalibrationFolder(Sequence):
    """The inputs made from a data folder's items (see the module docstring), each built when it
    is used, so a long calibration set is never in memory whole."""

    def __init__(self, graph, folder: Path, latent_name: str, t_name: str, timesteps: list[float],
                 seed: int):
        example = graph.example_inputs
        self.example, self.latent_name, self.t_name = example, latent_name, t_name
        self.timesteps, self.seed = timesteps, seed
        self.batch = example[latent_name].shape[0]
        self.paths, self.rows = [], []           # rows: (item index, text key or None)
        for path, shapes in data_folder_items(folder):
            self._check(path, shapes, "latents", latent_name)
            keys = [k for k in TEXT_KEYS if k in shapes]
            for key in keys:
                self._check(path, shapes, key, "encoder_hidden_states")
            self.rows += [(len(self.paths), key) for key in keys or [None]]
            self.paths.append(path)
        self.per_timestep = -(-len(self.rows) // self.batch)

    def _check(self, path: Path, shapes: dict, key: str, input_name: str) -> None:
        ref = self.example.get(input_name)
        if not isinstance(ref, torch.Tensor):
            raise GraphoptError(f"calibration item '{path}' holds `{key}`, but the model has no "
                                f"tensor input '{input_name}' (it has {sorted(self.example)})")
        if shapes[key] != tuple(ref.shape[1:]):
            raise GraphoptError(
                f"calibration item '{path}' has `{key}` of shape {shapes[key]}, but the model was "
                f"captured for {tuple(ref.shape[1:])} (batch dim left out): capture it at the "
                f"data's sizes (`graphopt compress --calibration` does), or write the data at the "
                f"model's")

    def __len__(self) -> int:
        return len(self.timesteps) * self.per_timestep

    def __getitem__(self, i: int) -> dict:
        from safetensors.torch import load_file

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        k, chunk = divmod(i % len(self), self.per_timestep)
        t = self.timesteps[k]
        rows = [self.rows[(chunk * self.batch + r) % len(self.rows)] for r in range(self.batch)]
        loaded = {j: load_file(str(self.paths[j])) for j, _ in rows}
        s = t / 1000.0
        latents, texts = [], []
        for j, key in rows:
            x0 = loaded[j]["latents"].float()
            # One draw per (item, timestep): an item's CFG rows share their x_t.
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + j * len(self.timesteps) + k))
            latents.append((1 - s) * x0 + s * noise)
            if key is not None:
                texts.append(loaded[j][key])
        item = dict(self.example)
        ref = self.example[self.latent_name]
        item[self.latent_name] = torch.stack(latents).to(device=ref.device, dtype=ref.dtype)
        if texts:
            ref = self.example["encoder_hidden_states"]
            item["encoder_hidden_states"] = torch.stack(texts).to(device=ref.device, dtype=ref.dtype)
        item[self.t_name] = torch.full_like(self.example[self.t_name], t)
        return item


@dataclass
class SdpaCall:
    """The operands of one scaled_dot_product_attention call (q, k, v are (rows, heads, L, d))."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool

    def logits(self, query_index: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Attention logits (float32) of the chosen queries over all keys: (rows, h, n_q, L_k).

        Exactly what the attention adds before its softmax: q·k scaled (1/sqrt(d) by default),
        with the attention mask (boolean: keep where True; float: added) and causality applied.
        """
        q = self.q[:, heads].index_select(2, query_index).float()
        k = self.k
        if self.enable_gqa and k.shape[1] != self.q.shape[1]:
            k = k.repeat_interleave(self.q.shape[1] // k.shape[1], dim=1)
        k = k[:, heads].float()
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-1, -2)) * scale
        if self.attn_mask is not None:
            mask = self.attn_mask
            if mask.dim() >= 2 and mask.shape[-2] != 1:
                mask = mask.index_select(-2, query_index.to(mask.device))
            if mask.dim() == 4 and mask.shape[1] != 1:
                mask = mask[:, heads]
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.float()
        if self.is_causal:
            keys = torch.arange(k.shape[2], device=logits.device)
            logits = logits.masked_fill(keys[None, :] > query_index[:, None].to(logits.device),
                                        float("-inf"))
        return logits


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _sdpa_call(args, kwargs) -> SdpaCall:
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    q = bound["query"]
    if q.dim() != 4:
        raise GraphoptError(f"calibration expects attention q/k/v of shape (batch, heads, tokens, "
                            f"dim), got q of shape {tuple(q.shape)}")
    return SdpaCall(q, bound["key"], bound["value"], bound.get("attn_mask"),
                    bool(bound.get("is_causal", False)), bound.get("scale"),
                    bool(bound.get("enable_gqa", False)))


class _StopRun(Exception):
    """Raised after the last attention of interest: the rest of the model is not needed."""


class BlockOffload:
    """Run on `device` with one block's weights there at a time (module docstring)."""

    def __init__(self, graph, device):
        self.device = torch.device(device)
        self.blocks = {b.name for b in graph.blocks}
        self.current: str | None = None
        self.copies: dict[str, torch.Tensor] = {}              # weight path → its device copy
        self.origin: dict[int, torch.Tensor] = {}              # id(live copy) → the weight
        self.most_blocks_at_once = 0

    def _block(self, target: str) -> str | None:
        prefix = ".".join(target.split(".")[:2])
        return prefix if prefix in self.blocks else None

    def fetch(self, target: str, value):
        if not isinstance(value, torch.Tensor):
            return value
        block = self._block(target)
        if block is not None and block != self.current:
            self.copies = {t: c for t, c in self.copies.items() if self._block(t) is None}
            self.current = block
        copy = self.copies.get(target)
        if copy is None:
            copy = self.copies[target] = value.to(self.device, copy=True)
            # Known while the copy lives (an op may save it after the run moved on).
            self.origin[id(copy)] = value
            weakref.finalize(copy, self.origin.pop, id(copy), None)
        self.most_blocks_at_once = max(self.most_blocks_at_once, len(
            {self._block(t) for t in self.copies} - {None}))
        return copy

    def to_device(self, item: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in item.items()}

    def saved_tensors(self):
        """Autograd hooks: a saved weight copy (or a view of one) is kept as a reference."""
        def pack(t):
            value = self.origin.get(id(t._base if t._base is not None else t))
            return t if value is None else (value, t.size(), t.stride(), t.storage_offset())

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            value, size, stride, offset = packed
            return value.to(self.device, copy=True).as_strided(size, stride, offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def run(self, gm: fx.GraphModule, item: dict):
        """gm(**item) on the device, its weights fetched block by block."""
        from torch.fx._pytree import tree_flatten_spec

        flat = tree_flatten_spec(((), self.to_device(item)), gm._in_spec)
        with self.saved_tensors():
            return _Offloaded(gm, self).run(*flat, enable_io_processing=False)


class _Offloaded(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, offload: BlockOffload | None):
        super().__init__(gm, garbage_collect_values=True)
        self.offload = offload

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        return value if self.offload is None else self.offload.fetch(target, value)


class _AttentionTap(_Offloaded):
    def __init__(self, gm: fx.GraphModule, statistics: dict, index: int,
                 offload: BlockOffload | None = None):
        super().__init__(gm, offload)
        self.extra_traceback = False     # a statistic's GraphoptError reaches the user unchanged
        self.statistics = statistics
        self.index = index
        self.remaining = set(statistics)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.name in self.statistics:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.statistics[n.name](self.index, _sdpa_call(args, kwargs))
            self.remaining.discard(n.name)
            if not self.remaining:
                raise _StopRun
        # The Interpreter frees a value after its last user; a value with no user (the result of
        # an in-place copy_ into a view, as rotary embeddings do) would otherwise stay alive,
        # and with it the whole tensor it views, layer after layer.
        return result if n.users or n.op == "output" else None


def run_attentions(graph, inputs: Sequence[dict],
                   statistics: dict[str, Callable[[int, SdpaCall], None]],
                   *, desc: str = "calibrating", offload: BlockOffload | None = None) -> None:
    """For each input i, run the graph and call `statistics[sdpa_node_name](i, call)` at that node.

    Runs without gradients; stops each forward pass after the last attention of interest.
    """
    from tqdm.auto import tqdm

    names = {n.name for n in graph.gm.graph.nodes}
    unknown = sorted(set(statistics) - names)
    if unknown:
        raise GraphoptError(f"no attention node(s) {unknown} in the graph")
    if not statistics:
        return
    with torch.no_grad():
        for i, item in enumerate(tqdm(inputs, desc=desc, unit="input", disable=None, leave=False)):
            try:
                if offload is not None:
                    item = offload.to_device(item)
                _AttentionTap(graph.gm, statistics, i, offload).run(*graph.flat_inputs(item),
                                                                    enable_io_processing=False)
            except _StopRun:
                pass
