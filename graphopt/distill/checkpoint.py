"""The trainer's checkpoint files: safetensors for tensors, JSON for the rest (nothing is ever
unpickled), and finding the newest complete `step-*` folder of a run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from graphopt.io import atomic_path, check_work_dir


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors refuses tensors sharing storage (tied weights): such duplicates are cloned."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp))


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """FQN-keyed optimizer state → tensors `state/<fqn>/<name>` + JSON for scalars and param groups."""
    tensors, scalars = {}, {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"state/{fqn}/{name}"] = value
            else:
                scalars.setdefault(fqn, {})[name] = value
    return tensors, {"state_scalars": scalars, "param_groups": state["param_groups"]}


def optimizer_from_files(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {fqn: dict(values) for fqn, values in meta["state_scalars"].items()}
    for key, value in tensors.items():
        fqn, name = key[len("state/"):].rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under output_dir, or None."""
    found = checkpoint_dirs(Path(output_dir))
    return found[-1] if found else None

# What a checkpoint folder holds; a folder with only these (written before graphopt marked its
# folders) is adopted, one with anything else is refused: graphopt deletes old checkpoints there.
CHECKPOINT_ENTRY = re.compile(r"step-\d{8}|\.step-\d{8}\.tmp|log\.jsonl")
CHECKPOINT_FIX = "choose a new or empty checkpoint folder ([run] output_dir, or --checkpoints)"


def check_checkpoint_dir(output_dir: str | Path) -> Path:
    """Refuse a checkpoint folder that holds files graphopt did not write (before the run starts)."""
    return check_work_dir(output_dir, adopt=CHECKPOINT_ENTRY.fullmatch, fix=CHECKPOINT_FIX)
