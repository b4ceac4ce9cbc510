"""Saving and loading adapters: only the new parameters, as .safetensors with self-describing metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .context_unet import ContextAdapter, ContextAdapterConfig, ContextAugmentedUNet, base_fingerprint, fingerprint_digest

ADAPTER_FORMAT = "instruct-imagen-adapter"
ADAPTER_FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header larger than this is not an adapter we wrote


class AdapterError(ValueError):
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
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an adapter file, checked for format and version."""
    path = Path(path)
    if not path.is_file():
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


def _check_base(path: Path, metadata: dict, unet) -> None:
    facts = base_fingerprint(unet)
    if metadata.get("base_fingerprint") == fingerprint_digest(facts):
        return
    try:
        expected = json.loads(metadata.get("base_architecture", "{}"))
    except json.JSONDecodeError:
        expected = {}
    differing = [f"{k}: adapter {expected.get(k)!r} vs base {facts.get(k)!r}"
                 for k in facts if expected.get(k) != facts.get(k)]
    detail = "; ".join(differing) or "fingerprint differs"
    raise AdapterError(f"adapter: {path.name} was trained for another base UNet ({detail})")


def load_adapter(path: str | os.PathLike, unet, *, device=None, dtype=None) -> ContextAugmentedUNet:
    """Load an adapter onto `unet` (a diffusers UNet2DConditionModel), refusing a mismatched base."""
    path = Path(path)
    metadata = read_adapter_metadata(path)
    _check_base(path, metadata, unet)
    try:
        config = ContextAdapterConfig.from_dict(json.loads(metadata["adapter_config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise AdapterError(f"adapter: {path.name}: bad 'adapter_config' metadata ({error})") from None
    adapter = ContextAdapter(unet, config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"adapter: {path.name}: unreadable tensors ({error})") from None
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}
    if lora:
        _apply_base_lora(path, metadata, unet, lora)
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
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter: {path.name}: tensor {key} holds NaN or infinite values")
    adapter.load_state_dict(tensors)
    model = ContextAugmentedUNet(unet, adapter=adapter)
    return model.to(device=device or unet.device, dtype=dtype or unet.dtype)


def _apply_base_lora(path: Path, metadata: dict, unet, lora: dict) -> None:
    from peft import LoraConfig

    try:
        settings = json.loads(metadata["base_lora"])
        rank = int(settings["rank"])
    except (KeyError, ValueError, TypeError) as error:
        raise AdapterError(f"adapter: {path.name}: bad 'base_lora' metadata ({error})") from None
    if not base_lora_tensors(unet):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=settings.get("target_modules", LORA_TARGETS)))
    expected = base_lora_tensors(unet)
    if set(expected) != set(lora):
        raise AdapterError(f"adapter: {path.name}: its LoRA weights do not fit this base UNet")
    with torch.no_grad():
        for name, value in lora.items():
            if value.shape != expected[name].shape:
                raise AdapterError(f"adapter: {path.name}: LoRA tensor {name} has shape {tuple(value.shape)}")
            expected[name].copy_(value)
