"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a folder `step_000123/` holding `tensors.safetensors` and `state.json`. It is written as
`step_000123.tmp/`, flushed to disk and renamed, so a folder without a suffix is always complete; a kill at
any moment leaves at worst a `.tmp` folder, which the next save or resume removes.

Saving a step that is already on disk (a cancel right after a periodic save) moves the old folder to
`step_000123.old/` before the new one is renamed into place. `.old` folders are complete too: until the new
folder is in place, `.old` is the step's checkpoint (listed, and put back by `recover_checkpoints`). Old
checkpoints are pruned by renaming them to `.tmp` first, so no folder without a suffix is ever half deleted.
At every moment of a save at least one complete copy of the newest checkpoint is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step_"
PARTIAL_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"


def flatten_state(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested dict/list structure by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` (nested dicts/lists of tensors and JSON values) as checkpoint `step`; keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:09d}"
    tmp = folder / (final.name + PARTIAL_SUFFIX)
    recover_checkpoints(folder)
    tmp.mkdir()
    try:
        tensors: dict = {}
        structure = flatten_state(state, tensors)
        try:
            save_file(tensors, str(tmp / "tensors.safetensors"))
        except SafetensorError as error:  # safetensors' own type for a failed write (disk full, quota)
            raise OSError(f"{tmp / 'tensors.safetensors'}: {error}") from None
        with open(tmp / "state.json", "w") as handle:
            json.dump({"step": step, "state": structure}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        with open(tmp / "tensors.safetensors", "rb") as handle:
            os.fsync(handle.fileno())
        _replace_folder(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        _remove_folder(old)
    return final


def _remove_folder(path: Path) -> None:
    """Delete a checkpoint folder: renamed to `.tmp` first (atomic), so it is never seen half deleted."""
    doomed = path.with_name(path.name + PARTIAL_SUFFIX)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`. A folder already there (the same step saved twice: a cancel right after a
    periodic save) is first renamed to `.old`, which counts as that step's checkpoint until `new` is in place
    and is put back if the rename fails, so no moment is without a complete copy of the step."""
    if not final.exists():
        os.replace(new, final)
        return
    aside = final.with_name(final.name + ASIDE_SUFFIX)
    if aside.exists():
        _remove_folder(aside)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    _fsync_dir(final.parent)
    _remove_folder(aside)


def _step_name(path: Path) -> str:
    return path.name[:-len(ASIDE_SUFFIX)] if path.name.endswith(ASIDE_SUFFIX) else path.name


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step_N/`, or `step_N.old/` while a save of the same step replaces
    it. Read-only: another process (a monitor, a UI) may list the folder while the trainer writes in it."""
    if not folder.is_dir():
        return []
    found: dict[str, Path] = {}
    for path in folder.iterdir():
        if (not path.name.startswith(CHECKPOINT_PREFIX) or path.name.endswith(PARTIAL_SUFFIX)
                or not (path / "state.json").is_file()):
            continue
        name = _step_name(path)
        if name not in found or not path.name.endswith(ASIDE_SUFFIX):  # the folder in place wins over .old
            found[name] = path
    return [found[name] for name in sorted(found)]


def recover_checkpoints(folder: Path) -> None:
    """Finish what a killed save left: a `.old` folder goes back in place if its step has no folder, else it
    is removed; `.tmp` folders are removed. Only the (single) writer calls this."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.name.endswith(ASIDE_SUFFIX) and path.name.startswith(CHECKPOINT_PREFIX):
            final = path.with_name(_step_name(path))
            if (final / "state.json").is_file():
                _remove_folder(path)
            else:
                if final.exists():  # an incomplete folder in place cannot be a finished rename; set it aside
                    _remove_folder(final)
                os.replace(path, final)
    for path in folder.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[int, dict]:
    with open(path / "state.json") as handle:
        data = json.load(handle)
    tensors = load_file(str(path / "tensors.safetensors"))
    return int(data["step"]), unflatten_state(data["state"], tensors)
