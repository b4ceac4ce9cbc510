"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a folder `step_000123/` holding `tensors.safetensors` and `state.json`. It is written as
`step_000123.tmp/`, flushed to disk and renamed, so a folder without the suffix is always complete; a kill at
any moment leaves at worst a `.tmp` folder, which the next save or resume removes.
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
    tmp = folder / (final.name + ".tmp")
    remove_partial_checkpoints(folder)
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
        shutil.rmtree(old, ignore_errors=True)
    return final


def _replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`. A folder already there (the same step saved twice: a cancel right after a
    periodic save) is set aside and put back if the rename fails, so a failed save never costs the copy
    of that step already on disk."""
    if not final.exists():
        os.replace(new, final)
        return
    aside = final.with_name(final.name + ".old.tmp")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Read-only: another process (a monitor, a UI) may list the folder
    while the trainer is writing a `.tmp` folder in it."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if path.name.startswith(CHECKPOINT_PREFIX) and not path.name.endswith(".tmp")
                  and (path / "state.json").is_file())


def remove_partial_checkpoints(folder: Path) -> None:
    """Delete `.tmp` folders a killed writer left behind; only the (single) writer calls this."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[int, dict]:
    with open(path / "state.json") as handle:
        data = json.load(handle)
    tensors = load_file(str(path / "tensors.safetensors"))
    return int(data["step"]), unflatten_state(data["state"], tensors)
