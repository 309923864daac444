"""Atomic output, and output folders (`-o DIR`) that never destroy what graphopt did not write.

Files: `atomic_path` writes to a temporary file in the same folder, then renames over the target.
A crash or a bad input never leaves a half-written file under the final name.

Folders: `check_output_dir` runs before the long work, so a bad -o fails in a second. It always
refuses (overwrite or not) the root, the home folder, the current folder, an input of the run, and
any folder that contains one of them; a path that is a file or lies under one. An existing folder
is replaced only if it is empty or graphopt wrote it: its marker file (`.graphopt`, JSON: what
wrote it, and the list of the files it wrote) lists every file in it. Anything else needs
overwrite=True (`--overwrite`).

`atomic_dir` assembles the folder in `.DIR.<token>.tmp` next to it, marked from its creation (host
and pid of the writer), then swaps it in: the old output is renamed to `.DIR.<token>.old`, the new
one renamed to DIR, and only then is the old one deleted. A crash at any moment leaves the old
output or the new one: between the two renames the old one waits under its aside name, and the
next run's check puts it back. The next run also deletes the temporary folders of killed runs:
only those that carry graphopt's marker and whose process is gone (a folder made on another host
is left alone: its process cannot be checked from here).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from graphopt.errors import GraphoptError

MARKER = ".graphopt"
_ASIDE_KINDS = ("tmp", "old")     # .DIR.<token>.tmp: being written; .DIR.<token>.old: the old output


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to `path`; on success it replaces `path`, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file with a fresh name, mode 0666 less the umask: an ordinary output file
    (mkstemp would make it private, 0600, and the rename would keep that)."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {prefix}*{suffix} in {folder}")


def atomic_write_text(path: Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ---- output folders ----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(path, *, protect=(), overwrite: bool = False, what: str = "graphopt"):
    """Yield a temporary folder next to `path`; on success it replaces the folder `path` whole,
    else it is removed (an output folder is written completely or not at all).

    protect: the run's inputs (see `check_output_dir`); what: the marker's `written_by`."""
    target = check_output_dir(path, protect=protect, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_dir(target, what)
    try:
        yield tmp
        replace_dir(tmp, path, protect=protect, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(next_to, what: str):
    """A marked temporary folder `.NAME.<token>.tmp` beside `next_to`, deleted on exit (a file's
    work space); those of killed runs are deleted first."""
    target = Path(os.path.realpath(next_to))
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = _new_temp_dir(target, what)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(path, *, protect=(), overwrite: bool = False) -> Path:
    """The real path of output folder `path` if graphopt may write or replace it; else a
    GraphoptError naming the problem. `protect`: the run's inputs and what it keeps (paths; other
    entries are skipped). Also finishes or undoes what a killed run left next to it."""
    target = Path(os.path.realpath(path))
    guarded = _guarded(protect)
    for place, what in guarded:
        if target == place:
            raise GraphoptError(f"output folder '{path}' is {what}: graphopt replaces its output "
                                f"folder whole, so choose a new folder (--overwrite never allows this)")
    for place, what in guarded:
        if target in place.parents:
            raise GraphoptError(f"output folder '{path}' contains {what}: graphopt replaces its "
                                f"output folder whole, so choose a new folder (--overwrite never "
                                f"allows this)")
    if os.path.lexists(target) and not target.is_dir():
        raise GraphoptError(f"output folder '{path}' is a file: give a folder path (a new or empty "
                            f"folder, or one graphopt wrote)")
    above = _nearest_existing_parent(target)
    if not above.is_dir():
        raise GraphoptError(f"output folder '{path}' is under '{above}', which is a file: give a "
                            f"folder path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise GraphoptError(f"cannot write output folder '{path}': no write permission in '{above}'")
    if above == target.parent:
        _recover(target)
    if target.is_dir() and not overwrite:
        foreign = next(_foreign_files(target), None)
        if foreign is not None:
            raise GraphoptError(f"output folder '{path}' holds files graphopt did not write (e.g. "
                                f"'{foreign}'): choose a new folder, or pass --overwrite to replace "
                                f"it")
    return target


def _nearest_existing_parent(target: Path) -> Path:
    """The closest folder above `target` that exists (where its missing parents would be made)."""
    above = target.parent
    while not os.path.lexists(above):
        above = above.parent
    return above


def check_output_file(path, *, protect=()) -> Path:
    """The real path of output file `path` (a plot, a JSON report) if graphopt may write it, checked
    before the long work: not a folder, not an input, in a writable folder (made if missing)."""
    target = Path(os.path.realpath(path))
    for item in protect:
        if isinstance(item, (str, os.PathLike)) and str(item) and \
                target == Path(os.path.realpath(item)):
            raise GraphoptError(f"output file '{path}' is the input '{item}': choose another path")
    if target.is_dir():
        raise GraphoptError(f"output file '{path}' is a folder: give a file path, e.g. "
                            f"{Path(path) / 'out.png'}")
    above = _nearest_existing_parent(target)
    if not above.is_dir():
        raise GraphoptError(f"output file '{path}' is under '{above}', which is a file")
    if not os.access(above, os.W_OK | os.X_OK) or (
            os.path.lexists(target) and not os.access(target, os.W_OK)):
        raise GraphoptError(f"cannot write output file '{path}': no write permission")
    return target


def inside_folder(folder, name, what: str) -> Path:
    """`folder / name` for a file `name` that an index, manifest or ONNX model in `folder` refers
    to, refused unless it stays inside `folder`: no absolute path, no '..', no link leading out."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise GraphoptError(f"{what} names a file {name!r:.60}, not a relative path")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise GraphoptError(f"{what} names '{name}', outside its folder '{folder}': it may name only "
                            f"files in that folder")
    path = folder / rel
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if root not in real.parents:
        raise GraphoptError(f"{what} names '{name}', a link leading out of '{folder}': it may name "
                            f"only files in that folder")
    return path


def read_index(path) -> tuple[dict[str, str], dict]:
    """(weight_map, metadata) of the safetensors index at `path`: JSON of the right shape whose
    shards all lie inside the index's folder (see `inside_folder`); else a GraphoptError."""
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphoptError(f"'{path}' is not valid JSON ({e}): write it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata", {}) if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in weight_map.items())):
        raise GraphoptError(f"'{path}' is not a safetensors index: it needs a 'weight_map' object "
                            f"mapping tensor names to shard file names")
    if not isinstance(metadata, dict):
        raise GraphoptError(f"'{path}': 'metadata' must be an object")
    for shard in sorted(set(weight_map.values())):
        inside_folder(path.parent, shard, f"the index '{path}'")
    return weight_map, metadata


def replace_dir(new: Path, path, *, protect=(), overwrite: bool = False) -> Path:
    """Swap the finished folder `new` (marked, next to `path`) in for `path`; see the module
    docstring. Checks `path` again first: it may have changed while the run worked."""
    target = check_output_dir(path, protect=protect, overwrite=overwrite)
    token = seal(new)
    if not os.path.lexists(target):
        os.replace(new, target)
        return target
    aside = target.parent / f".{target.name}.{token}.old"
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)     # the old output goes back
        raise
    with contextlib.suppress(OSError):     # left for the next run's check to delete
        shutil.rmtree(aside)
    return target


def mark_dir(folder: Path, what: str, token: str | None = None) -> str:
    """Write graphopt's marker into `folder` (replacing one there), as made by this process; its
    token (fresh unless given) names the folder's temporary and aside copies."""
    token = token or secrets.token_hex(6)
    marker = {"written_by": what, "graphopt": _version(), "token": token,
              "host": socket.gethostname(), "pid": os.getpid(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(Path(folder) / MARKER, json.dumps(marker, indent=1) + "\n")
    return token


def seal(folder: Path) -> str:
    """Record in the marker of `folder` every file now in it (the files graphopt wrote); its token."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise GraphoptError(f"'{folder}' has no graphopt marker ({MARKER}): not a folder graphopt "
                            f"is writing")
    marker["files"] = sorted(f for f in _files(folder) if f != MARKER)
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=1) + "\n")
    return marker["token"]


def read_marker(folder: Path) -> dict | None:
    """The marker graphopt wrote into `folder`, or None (no marker, or not one graphopt wrote)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(marker, dict) and isinstance(marker.get("written_by"), str)
            and _is_token(marker.get("token"))):
        return None
    files = marker.get("files", [])
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return None
    return marker


def check_work_dir(path, *, adopt=lambda name: False, fix: str) -> Path:
    """Refuse `path` as a working folder graphopt adds files to over time (checkpoints) if it
    holds files graphopt did not mark, unless every entry is one `adopt(name)` recognises (written
    before markers existed); `fix` ends the message. A missing folder is fine."""
    path = Path(path)
    above = path
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise GraphoptError(f"'{above}' is a file, not a folder: {fix}")
    if path.is_dir() and read_marker(path) is None:
        foreign = sorted(p.name for p in path.iterdir() if not adopt(p.name))
        if foreign:
            raise GraphoptError(f"'{path}' holds files graphopt did not write (e.g. "
                                f"'{foreign[0]}'): {fix}")
    return path


def claim_dir(path, *, what: str, adopt=lambda name: False, fix: str) -> Path:
    """`check_work_dir`, then create `path` if needed and mark it as graphopt's."""
    path = check_work_dir(path, adopt=adopt, fix=fix)
    path.mkdir(parents=True, exist_ok=True)
    if read_marker(path) is None:
        mark_dir(path, what)
    return path


def _guarded(protect) -> list[tuple[Path, str]]:
    """Folders an output may never be, nor contain: root, home, the current folder, the inputs
    (in this order: a model name such as tiny:wan reads as a path under the current folder)."""
    places = [(Path(os.path.realpath(os.sep)), "the root folder")]
    home = os.path.expanduser("~")
    if home != "~":
        places.append((Path(os.path.realpath(home)), f"your home folder ({home})"))
    places.append((Path(os.getcwd()).resolve(), "the current folder"))
    for item in protect:        # one not made yet counts too (a checkpoint folder the run makes)
        if isinstance(item, (str, os.PathLike)) and str(item):
            places.append((Path(os.path.realpath(item)), f"the input '{item}'"))
    return places


def _files(folder: Path):
    """Every entry under `folder` that is not a folder (links included, never followed), as
    relative POSIX paths."""
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            yield (base / name).as_posix()


def _foreign_files(folder: Path):
    """Files in `folder` its marker does not list (all files, for a folder graphopt did not mark)."""
    marker = read_marker(folder)
    listed = set() if marker is None else {MARKER, *marker.get("files", [])}
    return (f for f in _files(folder) if f not in listed)


def _new_temp_dir(target: Path, what: str) -> Path:
    """A fresh, marked `.NAME.<token>.tmp` next to `target` (mode 0777 less the umask)."""
    for _ in range(100):
        token = secrets.token_hex(6)
        tmp = target.parent / f".{target.name}.{token}.tmp"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        mark_dir(tmp, what, token)
        return tmp
    raise FileExistsError(f"no free temporary name for .{target.name}.* in {target.parent}")


def _recover(target: Path) -> None:
    """Finish or undo what killed runs left next to `target`: an old output set aside goes back
    when `target` is missing, or is deleted when the new output is in place; temporary folders
    whose process is gone are deleted. Only folders named and marked as graphopt made them."""
    prefix = f".{target.name}."
    owners, temps, asides = {}, [], []
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        marker = read_marker(entry)
        if marker is not None:
            owners[marker["token"]] = marker     # a writing folder (apply's .NAME.partial too)
        token, _, kind = entry.name[len(prefix):].partition(".")
        if kind not in _ASIDE_KINDS or not _is_token(token):
            continue
        if kind == "old":
            asides.append((entry, token))
        elif marker is not None and marker["token"] == token:
            temps.append((entry, marker))
        elif marker is None and not any(entry.iterdir()):
            entry.rmdir()                        # a run killed before it marked the folder
    current = read_marker(target) if target.is_dir() else None
    for aside, token in asides:
        if token in owners and _running(owners[token]):
            continue
        if not os.path.lexists(target):
            os.replace(aside, target)            # killed between the two renames
        elif current is not None and current["token"] == token:
            shutil.rmtree(aside, ignore_errors=True)   # killed after the new output was in place
    for tmp, marker in temps:
        if not _running(marker):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(marker: dict) -> bool:
    """Whether the process that marked a folder may still be writing it (unknown counts as yes)."""
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_token(text) -> bool:
    return isinstance(text, str) and len(text) == 12 and all(c in "0123456789abcdef" for c in text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphopt")
    except PackageNotFoundError:
        return "unknown"
