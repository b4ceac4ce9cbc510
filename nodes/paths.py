"""Where the pack's files live inside ComfyUI: the adapter folder, model choices, confined input paths."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import folder_paths

ADAPTER_FOLDER = "instruct_imagen"          # models/instruct_imagen, also a key for extra_model_paths.yaml
ADAPTER_EXTENSIONS = {".safetensors"}
BUILTIN_MODELS = ("default", "tiny")
NO_ADAPTER = "none"
EXAMPLES_SUBFOLDER = "instruct_imagen"      # the example inputs land in input/instruct_imagen/
EXAMPLE_INPUTS = Path(__file__).resolve().parent.parent / "workflows" / "inputs"


def register_adapter_folder() -> None:
    """Make models/instruct_imagen a model folder (once); the first path of its list is where new adapters go."""
    if ADAPTER_FOLDER not in folder_paths.folder_names_and_paths or not _registered:
        # First, as ComfyUI's own folders are: extra_model_paths.yaml (read before custom nodes) adds to it.
        folder_paths.add_model_folder_path(ADAPTER_FOLDER, os.path.join(folder_paths.models_dir, ADAPTER_FOLDER),
                                           is_default=True)
        _registered.append(True)
    paths, extensions = folder_paths.folder_names_and_paths[ADAPTER_FOLDER]
    if set(extensions) != ADAPTER_EXTENSIONS:
        folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, set(ADAPTER_EXTENSIONS))


_registered: list[bool] = []


def base_model_choices() -> list[str]:
    return [*BUILTIN_MODELS, *folder_paths.get_filename_list("checkpoints")]


def adapter_choices() -> list[str]:
    register_adapter_folder()
    return [NO_ADAPTER, *folder_paths.get_filename_list(ADAPTER_FOLDER)]


def resolve_base_model(name: str) -> str:
    """A base model choice as load_pipeline takes it: a built-in name or a checkpoint's full path."""
    if name in BUILTIN_MODELS:
        return name
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise ValueError(f"model: checkpoint {name!r} not found in the checkpoints folders")
    return path


def resolve_adapter(name: str | None) -> str | None:
    if not name or name == NO_ADAPTER:
        return None
    register_adapter_folder()
    path = folder_paths.get_full_path(ADAPTER_FOLDER, name)
    if path is None:
        raise ValueError(f"adapter: {name!r} not found in models/{ADAPTER_FOLDER} "
                         f"(searched {', '.join(folder_paths.get_folder_paths(ADAPTER_FOLDER))})")
    return path


def adapter_save_path(name: str) -> Path:
    """Where an adapter called `name` is written: the first instruct_imagen folder, name checked."""
    stem = check_plain_name(name, "adapter_name")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    register_adapter_folder()
    folder = Path(folder_paths.get_folder_paths(ADAPTER_FOLDER)[0])
    return folder / f"{stem}.safetensors"


def check_plain_name(name: str, field: str) -> str:
    """A file name without folders, so a name typed in a node can never point elsewhere."""
    name = name.strip()
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\x00")) or ":" in name:
        raise ValueError(f"{field}: {name!r} must be a plain file name (no folders, no '..')")
    return name


def confined_input_path(relative: str, field: str) -> Path:
    """`relative` inside ComfyUI's input directory: refuses absolute paths, '..' and symlinks that leave it."""
    relative = relative.strip()
    if not relative:
        raise ValueError(f"{field}: must name a folder or file inside the input directory")
    if "\x00" in relative or os.path.isabs(relative) or relative.startswith(("\\", "~")) or ":" in relative:
        raise ValueError(f"{field}: {relative!r} must be a path relative to the input directory")
    if ".." in Path(relative.replace("\\", "/")).parts:
        raise ValueError(f"{field}: {relative!r} must not contain '..'")
    root = os.path.realpath(folder_paths.get_input_directory())
    real = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"{field}: {relative!r} leads outside the input directory (through a symlink)")
    if not os.path.exists(real):
        raise ValueError(f"{field}: {relative!r} does not exist in the input directory ({root})")
    return Path(real)


def install_example_inputs() -> None:
    """Copy the example workflows' input images into input/instruct_imagen/, leaving existing files alone.

    The example workflows load their images from there, so they run as soon as they are opened.
    """
    if not EXAMPLE_INPUTS.is_dir():
        return
    target = Path(folder_paths.get_input_directory()) / EXAMPLES_SUBFOLDER
    try:
        copied = 0
        for source in sorted(EXAMPLE_INPUTS.rglob("*")):
            destination = target / source.relative_to(EXAMPLE_INPUTS)
            if source.is_dir() or destination.exists():
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            copied += 1
        if copied:
            logging.info("[Instruct-Imagen] copied %d example input files to %s", copied, target)
    except OSError as error:
        logging.warning("[Instruct-Imagen] could not copy the example inputs to %s: %s", target, error)
