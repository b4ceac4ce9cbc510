"""Saving and loading adapters: only the new parameters, as .safetensors with self-describing metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .context_unet import (BaseLayout, ContextAdapter, ContextAdapterConfig, ContextAugmentedUNet, base_fingerprint,
                           fingerprint_digest)
from .errors import InstructImagenError

ADAPTER_FORMAT = "instruct-imagen-adapter"
ADAPTER_FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header larger than this is not an adapter we wrote
# Bounds on the metadata's adapter_config, checked before any parameter is allocated from it: a file we
# wrote stays far inside them, and a hostile one cannot make a load allocate gigabytes.
MAX_NUM_FREQS = 32          # Fourier position features; float32 positions carry no detail past ~2**24
MAX_MODALITIES = 256
MAX_CONTEXTS_LIMIT = 1024
MAX_ENCODE_TIMESTEP = 9999  # training schedules have 1000 steps
MAX_HEAD_DIM = 4096


class AdapterError(InstructImagenError, ValueError):
    """An adapter file that cannot be used: unreadable, not an adapter, or made for another base."""


LORA_PREFIX = "base_lora."
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def base_lora_tensors(unet) -> dict:
    """LoRA weights added to the base UNet by peft (training with train_base=lora), keyed by module path."""
    return {name: p for name, p in unet.named_parameters() if ".lora_" in name}


def save_adapter(model: ContextAugmentedUNet, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
    """Write the adapter's parameters and metadata; atomic (temp file + rename) so a crash never leaves half a file.

    LoRA weights on the base (if any) travel in the same file under `base_lora.`, so one file carries
    everything a generation needs besides the base checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = base_fingerprint(model.unet)
    config = model.adapter.config.to_dict()
    config["levels"] = list(model.adapter.levels)
    metadata = {
        "format": ADAPTER_FORMAT,
        "format_version": str(ADAPTER_FORMAT_VERSION),
        "base_fingerprint": fingerprint_digest(facts),
        "base_architecture": json.dumps(facts, sort_keys=True),
        "levels": json.dumps(list(model.adapter.levels)),
        "modalities": json.dumps(list(model.adapter.config.modalities)),
        "adapter_config": json.dumps(config, sort_keys=True),
    }
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter.state_dict().items()}
    lora = base_lora_tensors(model.unet)
    if lora:
        rank = next(p.shape[0] for n, p in lora.items() if ".lora_A." in n)
        metadata["base_lora"] = json.dumps({"rank": int(rank), "target_modules": LORA_TARGETS})
        tensors.update({LORA_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora.items()})
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except SafetensorError as error:  # how safetensors reports a failed write (disk full, quota)
        tmp.unlink(missing_ok=True)
        raise OSError(f"adapter: could not write {path} ({error})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an adapter file, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        if os.path.lexists(path):  # a FIFO would block the open below; a folder cannot be read
            raise AdapterError(f"adapter: not a regular file: {path}")
        raise AdapterError(f"adapter: file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(f"adapter: {path.name}: only .safetensors adapters are loaded")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > MAX_HEADER_BYTES:
        raise AdapterError(f"adapter: {path.name}: not a safetensors file (bad or oversized header)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"adapter: {path.name}: unreadable safetensors file ({error})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"adapter: {path.name}: metadata 'format' is {metadata.get('format')!r}, "
                           f"expected {ADAPTER_FORMAT!r}")
    if metadata.get("format_version") != str(ADAPTER_FORMAT_VERSION):
        raise AdapterError(f"adapter: {path.name}: format_version {metadata.get('format_version')!r} "
                           f"is not supported (this build reads {ADAPTER_FORMAT_VERSION})")
    return metadata


def _recorded_facts(metadata: dict) -> dict:
    try:
        recorded = json.loads(metadata.get("base_architecture", "{}"))
    except json.JSONDecodeError:
        recorded = {}
    return recorded if isinstance(recorded, dict) else {}


def _check_base(path: Path, metadata: dict, unet) -> None:
    facts = base_fingerprint(unet)
    if metadata.get("base_fingerprint") == fingerprint_digest(facts):
        return
    expected = _recorded_facts(metadata)
    differing = [f"{k}: adapter {expected.get(k)!r} vs base {facts.get(k)!r}"
                 for k in facts if expected.get(k) != facts.get(k)]
    detail = "; ".join(differing) or "fingerprint differs"
    raise AdapterError(f"adapter: {path.name} was trained for another base UNet ({detail})")


def load_adapter(path: str | os.PathLike, unet, *, device=None, dtype=None) -> ContextAugmentedUNet:
    """Load an adapter onto `unet` (a diffusers UNet2DConditionModel), refusing a mismatched base."""
    path = Path(path)
    metadata = read_adapter_metadata(path)
    _check_base(path, metadata, unet)
    adapter, lora = _read_adapter(path, metadata, unet)
    if lora:  # last: the base UNet is changed only once everything else in the file has passed
        _apply_base_lora(path, metadata, unet, lora)
    model = ContextAugmentedUNet(unet, adapter=adapter)
    return model.to(device=device or unet.device, dtype=dtype or unet.dtype)


def load_adapter_layers(path: str | os.PathLike, layout: BaseLayout, facts: dict) -> ContextAdapter:
    """Load an adapter's own layers for a base given by its layout (a host's UNet, see ldm_unet.py) and the
    base facts the host knows (a subset of FINGERPRINT_KEYS). An adapter that also changes the base's
    weights (trained with train_base=lora) is refused: those weights belong to the host's model."""
    path = Path(path)
    metadata = read_adapter_metadata(path)
    expected = _recorded_facts(metadata)
    differing = [f"{k}: adapter {expected.get(k)!r} vs base {v!r}" for k, v in facts.items() if expected.get(k) != v]
    if differing:
        raise AdapterError(f"adapter: {path.name} was trained for another base UNet ({'; '.join(differing)})")
    if "base_lora" in metadata:
        raise AdapterError(f"adapter: {path.name} also carries LoRA weights for the base UNet; load it with "
                           f"InstructImagenLoader, or train it without train_base=lora")
    adapter, _ = _read_adapter(path, metadata, layout)
    return adapter


def _read_adapter(path: Path, metadata: dict, base) -> tuple[ContextAdapter, dict]:
    """The adapter's layers with the file's weights (checked), and the file's base LoRA tensors, if any."""
    config = _adapter_config(path, metadata)
    try:
        adapter = ContextAdapter(base, config)
    except ValueError as error:  # levels the base has no cross-attention at
        raise AdapterError(f"adapter: {path.name}: {error}") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"adapter: {path.name}: unreadable tensors ({error})") from None
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter: {path.name}: tensors do not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise AdapterError(f"adapter: {path.name}: tensor {key} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(expected[key].shape)}")
        _check_values(path, key, tensor)
    adapter.load_state_dict(tensors)
    return adapter, lora


def _adapter_config(path: Path, metadata: dict) -> ContextAdapterConfig:
    """The adapter's config from its metadata, with every size it sets checked before anything is built."""
    try:
        data = json.loads(metadata["adapter_config"])
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        config = ContextAdapterConfig.from_dict(data)
    except (KeyError, json.JSONDecodeError, TypeError, ValueError, OverflowError) as error:
        raise AdapterError(f"adapter: {path.name}: bad 'adapter_config' metadata ({error})") from None
    checks = [
        (_is_int(config.num_freqs, 1, MAX_NUM_FREQS), "num_freqs", f"an integer in 1..{MAX_NUM_FREQS}"),
        (_is_int(config.max_contexts, 1, MAX_CONTEXTS_LIMIT), "max_contexts", f"an integer in 1..{MAX_CONTEXTS_LIMIT}"),
        (_is_int(config.encode_timestep, 0, MAX_ENCODE_TIMESTEP), "encode_timestep",
         f"an integer in 0..{MAX_ENCODE_TIMESTEP}"),
        (config.head_dim is None or _is_int(config.head_dim, 1, MAX_HEAD_DIM), "head_dim",
         f"null or an integer in 1..{MAX_HEAD_DIM}"),
        (_is_int(config.content_heads, 0, MAX_HEAD_DIM), "content_heads", f"an integer in 0..{MAX_HEAD_DIM}"),
        (1 <= len(config.modalities) <= MAX_MODALITIES and all(isinstance(m, str) for m in config.modalities),
         "modalities", f"a list of 1..{MAX_MODALITIES} names"),
    ]
    for ok, key, expected in checks:
        if not ok:
            value = getattr(config, key)
            shown = f"{len(value)} entries" if key == "modalities" else repr(value)[:40]
            raise AdapterError(f"adapter: {path.name}: adapter_config.{key} is {shown}, expected {expected}")
    return config


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_values(path: Path, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterError(f"adapter: {path.name}: tensor {key} has dtype {tensor.dtype}, expected floating point")
    # float32 first: isfinite is not implemented for every storage dtype (float8).
    if not torch.isfinite(tensor.float()).all():
        raise AdapterError(f"adapter: {path.name}: tensor {key} holds NaN or infinite values")


def _apply_base_lora(path: Path, metadata: dict, unet, lora: dict) -> None:
    from peft import LoraConfig

    try:
        settings = json.loads(metadata["base_lora"])
        if not isinstance(settings, dict):
            raise TypeError(f"expected a JSON object, got {type(settings).__name__}")
        rank, targets = settings["rank"], settings.get("target_modules", LORA_TARGETS)
        if not _is_int(rank, 1, 2**31):
            raise ValueError(f"rank {str(rank)[:20]} is not a positive integer")
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise TypeError("target_modules must be a list of module names")
    except (KeyError, ValueError, TypeError) as error:
        raise AdapterError(f"adapter: {path.name}: bad 'base_lora' metadata ({error})") from None
    for name, value in lora.items():
        _check_values(path, LORA_PREFIX + name, value)
    if not base_lora_tensors(unet):
        # Checked against the file before peft allocates anything: the LoRA built is exactly what it holds.
        if _lora_shapes(unet, rank, targets) != {name: tuple(v.shape) for name, v in lora.items()}:
            raise AdapterError(f"adapter: {path.name}: its LoRA weights do not fit this base UNet "
                               f"(rank {rank}, targets {targets[:4]})")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    expected = base_lora_tensors(unet)
    if set(expected) != set(lora):
        raise AdapterError(f"adapter: {path.name}: its LoRA weights do not fit this base UNet")
    for name, value in lora.items():
        if value.shape != expected[name].shape:
            raise AdapterError(f"adapter: {path.name}: LoRA tensor {name} has shape {tuple(value.shape)}")
    with torch.no_grad():
        for name, value in lora.items():
            expected[name].copy_(value)


def _lora_shapes(unet, rank: int, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The LoRA tensors peft would add for `targets` (its suffix match on module names), with their shapes."""
    shapes = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes[f"{name}.lora_A.default.weight"] = (rank, module.in_features)
            shapes[f"{name}.lora_B.default.weight"] = (module.out_features, rank)
    return shapes
