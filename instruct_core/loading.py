"""Load Stable Diffusion base models (SD1.x, SD2.x, SDXL) from local files, never from a hub.

Two sources are understood:

* a diffusers folder: `model_index.json` plus one subfolder per component;
* a single-file checkpoint in the original LDM/SGM key layout (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`), the way ComfyUI users keep
  them in `models/checkpoints`. A single file holds weights only, so the diffusers configs of the official
  architectures ship in `configs/` and are passed to diffusers' converters with `local_files_only=True`.

Weights are read with safetensors only. Pickle files (.ckpt/.pt/.pth/.bin) can run arbitrary code when loaded,
so they are refused with a message that names the file.

`export_single_file` goes the other way: it writes a model as one LDM-layout `.safetensors` file that
ComfyUI's checkpoint loader (and `load_base`) can read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
from diffusers.utils import is_accelerate_available
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import InstructImagenError

__all__ = [
    "BaseModel",
    "CLIP_TOKENIZER_DIR",
    "CONFIGS_DIR",
    "ModelLoadError",
    "detect_kind",
    "export_single_file",
    "infer_prediction_type",
    "load_base",
    "load_tokenizer",
    "normalize_prediction_type",
    "read_checkpoint",
    "resolve_device",
    "resolve_dtype",
    "shipped_config_dir",
    "to_ldm_state_dict",
]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CLIP_TOKENIZER_DIR = CONFIGS_DIR / "clip_tokenizer"
SHIPPED_CONFIGS = {
    ("sd1", "epsilon"): "sd15",
    ("sd1", "v_prediction"): "sd15",
    ("sd2", "v_prediction"): "sd2_768_v",
    ("sd2", "epsilon"): "sd2_512_base",
    ("sdxl", "epsilon"): "sdxl_base",
    ("sdxl", "v_prediction"): "sdxl_base",
}

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
# ComfyUI's SD2 test: this bias is spread wider in the 768 v-prediction weights than in 512 epsilon ones.
SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD_THRESHOLD = 0.09
PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction"}
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
TEXT_ENCODER_CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")


class ModelLoadError(InstructImagenError, ValueError):
    """A model file or folder cannot be loaded; the message names the path and the problem."""


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    tokenizers: list[CLIPTokenizer] = field(default_factory=list)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    prediction_type: str = "epsilon"
    kind: str = "custom"  # "sd1" | "sd2" | "sdxl" | "custom"
    vae_scaling_factor: float = 1.0
    source: str | None = None

    @property
    def is_pixel_space(self) -> bool:
        return self.vae is None


# --- device and dtype -------------------------------------------------------------------------------


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Map "auto" to cuda when available, else cpu; any other name is taken as a torch device."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device: {name!r}, but this torch sees no CUDA device (torch {torch.__version__}); "
                                 f"use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device: {name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Map "fp32" | "fp16" | "bf16" | a torch.dtype to a dtype; "auto" is fp16 on cuda, fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of auto, fp32, fp16, bf16 or a torch.dtype")
    return DTYPES[name]


def normalize_prediction_type(value: str) -> str:
    if value not in PREDICTION_ALIASES:
        raise ValueError(f"prediction_type={value!r}: expected 'epsilon' or 'v_prediction'")
    return PREDICTION_ALIASES[value]


# --- reading files ----------------------------------------------------------------------------------


def _pickle_refused(found: str, pronoun: str) -> ModelLoadError:
    return ModelLoadError(f"{found}, which can run code when loaded; only .safetensors weights are read: "
                          f"convert {pronoun} to .safetensors with a tool you trust")


def _not_a_file(path: Path, folder_too: bool = False) -> str:
    """Why `path` cannot be read as a model: missing, or a FIFO, device or socket (never opened, so never waited on)."""
    if not os.path.lexists(path):
        return "no such file or folder" if folder_too else "no such file"
    if path.is_dir():
        return "a folder, not a .safetensors file"
    return "not a regular file (a FIFO, device or socket); give a .safetensors file"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Return (state_dict, safetensors metadata) of a single-file checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: {_not_a_file(path)}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refused(f"{path}: a pickle checkpoint ({path.suffix})", "it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for bad headers and short files
        raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err
    return state, metadata


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelLoadError(f"{path}: missing") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable JSON ({err})") from err


def model_components(folder: Path) -> dict[str, list]:
    """model_index.json entries that name a component; [null, null] marks an absent one."""
    index = _read_json(folder / "model_index.json")
    return {k: v for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None}


# --- single-file layout -----------------------------------------------------------------------------


def detect_kind(keys) -> str:
    """Model family of an LDM/SGM-layout state dict: "sd1", "sd2" or "sdxl"."""
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET_PREFIX):
        sample = ", ".join(keys[:3]) or "no keys"
        raise ModelLoadError(f"unrecognized key layout: no '{UNET_PREFIX}*' UNet weights (first keys: {sample})")
    if has(OPEN_CLIP_PREFIXES["sdxl"]):
        return "sdxl"
    if has(SDXL_REFINER_PREFIX):
        raise ModelLoadError(f"SDXL refiner checkpoints ({SDXL_REFINER_PREFIX}*) are not supported")
    if has(OPEN_CLIP_PREFIXES["sd2"]):
        return "sd2"
    if has(CLIP_PREFIXES["sd1"]):
        return "sd1"
    raise ModelLoadError("unrecognized key layout: a UNet but no known text encoder (cond_stage_model / conditioner)")


def unet_input_channels(checkpoint: dict) -> int | None:
    """Input channels of the UNet's first conv (4 for SD, 9 for inpainting), None when the key is absent."""
    in_conv = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if in_conv is None:
        return None
    if in_conv.ndim != 4:
        raise ModelLoadError(f"{UNET_PREFIX}input_blocks.0.0.weight has shape {tuple(in_conv.shape)}, "
                             "not a 4-D conv weight")
    return int(in_conv.shape[1])


def infer_prediction_type(checkpoint: dict, metadata: dict[str, str], kind: str) -> str:
    """What the UNet predicts, from the evidence a checkpoint carries, strongest first."""
    if "v_pred" in checkpoint:  # marker key written by SGM-style trainers and read by ComfyUI
        return "v_prediction"
    declared = metadata.get("modelspec.prediction_type")
    if declared in PREDICTION_ALIASES:
        return PREDICTION_ALIASES[declared]
    if kind != "sd2":
        return "epsilon"
    in_channels = unet_input_channels(checkpoint)
    if in_channels is not None and in_channels != 4:
        return "epsilon"  # the SD2 inpainting model predicts noise
    # SD2 768-v and 512-base share one architecture. ComfyUI's weight statistic tells them apart;
    # without the probe tensor, follow diffusers and assume the 768 v-prediction model.
    probe = checkpoint.get(SD2_V_PROBE)
    if probe is None:
        return "v_prediction"
    return "v_prediction" if probe.float().std(unbiased=False) > SD2_V_STD_THRESHOLD else "epsilon"


def shipped_config_dir(kind: str, prediction_type: str) -> Path:
    key = (kind, normalize_prediction_type(prediction_type))
    if key not in SHIPPED_CONFIGS:
        raise ModelLoadError(f"no shipped config for kind={kind!r}")
    return CONFIGS_DIR / SHIPPED_CONFIGS[key]


def _normalize_clip_keys(checkpoint: dict) -> dict:
    """Old SD1 files lack the `text_model.` level under cond_stage_model.transformer; add it."""
    prefix = CLIP_PREFIXES["sd1"]
    if not any(k.startswith(prefix + "embeddings.") for k in checkpoint):
        return checkpoint
    return {
        (prefix + "text_model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in checkpoint.items()
    }


# --- loading ----------------------------------------------------------------------------------------


def load_base(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
) -> BaseModel:
    """Load a base model from a diffusers folder or a single-file LDM/SGM checkpoint, offline.

    config_dir: diffusers-format config folder for a single file (default: the shipped one for the
    detected family). prediction_type: "epsilon" | "v_prediction", overriding what the files say.
    """
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if prediction_type is not None:
        prediction_type = normalize_prediction_type(prediction_type)
    if path.is_dir():
        if config_dir is not None:
            raise ValueError(f"config_dir is for single-file checkpoints; {path} is a folder with its own configs")
        model = _load_folder(path, dtype, prediction_type)
    elif path.is_file():
        model = _load_single_file(path, dtype, config_dir, prediction_type)
    else:
        raise ModelLoadError(f"{path}: {_not_a_file(path, folder_too=True)}")
    for module in [model.unet, model.vae, *model.text_encoders]:
        if module is not None:
            module.to(device).eval()
    return model


def _load_single_file(path, dtype, config_dir, prediction_type) -> BaseModel:
    if not is_accelerate_available():
        # without it diffusers fills randomly initialised models, and missing weights would go unnoticed
        raise ImportError("loading single-file checkpoints needs the accelerate package (pip install accelerate)")
    checkpoint, metadata = read_checkpoint(path)
    try:
        kind = detect_kind(checkpoint)
        in_channels = unet_input_channels(checkpoint)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path}: {err}") from None
    checkpoint = _normalize_clip_keys(checkpoint)
    prediction = prediction_type or infer_prediction_type(checkpoint, metadata, kind)
    folder = Path(config_dir) if config_dir is not None else shipped_config_dir(kind, prediction)
    components = model_components(folder)
    for name in ("unet", "vae"):
        if name not in components:
            raise ModelLoadError(f"{folder / 'model_index.json'}: no {name} entry")

    overrides = {}
    if in_channels is not None:
        overrides["in_channels"] = in_channels  # 9 for inpainting models
    unet = _from_single_file(UNet2DConditionModel, checkpoint, folder, "unet", dtype, path, **overrides)
    vae_dtype = _vae_dtype(folder, dtype)
    vae = _from_single_file(AutoencoderKL, checkpoint, folder, "vae", vae_dtype, path)
    text_encoders = [
        _clip_from_single_file(text_encoder_class(components[name], folder), checkpoint, folder, name, dtype, path)
        for name in TEXT_ENCODER_NAMES
        if name in components
    ]
    scheduler_config = _scheduler_config(folder, prediction)
    if "ztsnr" in checkpoint:  # trained with zero terminal SNR; the schedule must match
        scheduler_config["rescale_betas_zero_snr"] = True
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=[load_tokenizer(folder / name) for name in TOKENIZER_NAMES if name in components],
        scheduler_config=scheduler_config,
        prediction_type=prediction,
        kind=kind,
        vae_scaling_factor=float(vae.config.scaling_factor),
        source=str(path),
    )


@contextlib.contextmanager
def _quiet_diffusers():
    """from_single_file casts with `.to(dtype)`, which makes diffusers warn about an empty fp32 module list."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _from_single_file(cls, checkpoint, folder, name, dtype, path, **config_overrides):
    try:
        with _quiet_diffusers():
            model = cls.from_single_file(
                checkpoint, config=str(folder), subfolder=name, local_files_only=True, torch_dtype=dtype,
                **config_overrides,
            )
    except (SingleFileComponentError, ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelLoadError(f"{path}: cannot load the {name} with the config in {folder / name}: {err}") from err
    _require_loaded(model, name, path)
    return model


def _clip_from_single_file(cls, checkpoint, folder, name, dtype, path):
    try:
        model = create_diffusers_clip_model_from_ldm(
            cls, checkpoint, subfolder=name, config=str(folder), torch_dtype=dtype, local_files_only=True
        )
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelLoadError(f"{path}: cannot load the {name} with the config in {folder / name}: {err}") from err
    _require_loaded(model, name, path)
    return model


def _require_loaded(module: torch.nn.Module, name: str, path) -> None:
    """Converters build on the meta device and fill what they find; anything left empty was missing."""
    missing = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: no weights for {len(missing)} {name} tensors (first: {missing[0]})")


def text_encoder_class(entry: list, folder: Path):
    if entry[1] not in TEXT_ENCODER_CLASSES:
        raise ModelLoadError(f"{folder / 'model_index.json'}: unsupported text encoder class {entry[1]!r}")
    return TEXT_ENCODER_CLASSES[entry[1]]


def _vae_dtype(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """The SD VAEs overflow in fp16 (their configs set force_upcast), so they stay fp32 then."""
    config = _read_json(folder / "vae" / "config.json")
    return torch.float32 if dtype == torch.float16 and config.get("force_upcast", True) else dtype


def _scheduler_config(folder: Path, prediction_type: str | None) -> dict:
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    config["prediction_type"] = prediction_type or config.get("prediction_type", "epsilon")
    return config


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """A CLIP tokenizer from `folder`; a folder with settings but no vocabulary uses the shipped CLIP BPE."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = _read_json(folder / "tokenizer_config.json")
    overrides = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length"):
        if key in settings:
            value = settings[key]
            overrides[key] = value["content"] if isinstance(value, dict) else value
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True, **overrides)


def _load_folder(folder: Path, dtype, prediction_type) -> BaseModel:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: not a diffusers model folder (no model_index.json)")
    components = model_components(folder)
    if "unet" not in components:
        raise ModelLoadError(f"{folder / 'model_index.json'}: no unet entry")
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        if name in components and components[name][1] != cls.__name__:
            raise ModelLoadError(f"{folder / 'model_index.json'}: unsupported {name} class {components[name][1]!r}")

    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = None
    if "vae" in components:
        vae_dtype = _vae_dtype(folder, dtype)
        vae = _from_pretrained(AutoencoderKL, folder, "vae", torch_dtype=vae_dtype)
    text_encoders = [
        _from_pretrained(text_encoder_class(components[name], folder), folder, name, dtype=dtype)
        for name in TEXT_ENCODER_NAMES
        if name in components
    ]
    scheduler_config = _scheduler_config(folder, prediction_type)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=[load_tokenizer(folder / name) for name in TOKENIZER_NAMES if name in components],
        scheduler_config=scheduler_config,
        prediction_type=scheduler_config["prediction_type"],
        kind=_folder_kind(unet, vae, text_encoders),
        vae_scaling_factor=float(vae.config.scaling_factor) if vae is not None else 1.0,
        source=str(folder),
    )


def _from_pretrained(cls, folder: Path, name: str, **dtype_kwarg):
    variant = _safetensors_variant(folder / name)
    try:
        model, info = cls.from_pretrained(
            str(folder), subfolder=name, local_files_only=True, use_safetensors=True, variant=variant,
            output_loading_info=True, **dtype_kwarg,
        )
    except Exception as err:  # the libraries raise OSError, ValueError, SafetensorError, ... for bad files
        raise ModelLoadError(f"{folder / name}: cannot load {cls.__name__} ({err})") from err
    # both libraries only warn and initialise randomly what the files lack
    missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if missing:
        raise ModelLoadError(f"{folder / name}: no weights for {len(missing)} {name} tensors (first: {missing[0]})")
    return model


def _safetensors_variant(sub: Path) -> str | None:
    """The variant (e.g. "fp16") of a component folder's safetensors weights, None for the plain ones; a folder
    with pickle weights only is refused."""
    if not sub.is_dir():
        raise ModelLoadError(f"{sub}: component folder missing")
    names = sorted(p.name for p in sub.iterdir())
    safe = [n for n in names if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
    plain = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    if any(n in plain or n.endswith(".index.json") for n in safe):
        return None
    for n in safe:
        match = re.fullmatch(r"(?:diffusion_pytorch_model|model)\.(\w+)\.safetensors", n)
        if match:
            return match.group(1)
    if safe:
        return None
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refused(f"{sub}: only pickle weights ({pickles[0]})", "them")
    raise ModelLoadError(f"{sub}: no weights file")


def _folder_kind(unet, vae, text_encoders) -> str:
    if vae is None or not text_encoders:
        return "custom"
    if len(text_encoders) == 2 and unet.config.addition_embed_type == "text_time":
        return "sdxl"
    if len(text_encoders) == 1:
        # OpenCLIP ViT-H (SD2) uses exact GELU; OpenAI CLIP ViT-L (SD1) uses quick_gelu
        return "sd2" if text_encoders[0].config.hidden_act == "gelu" else "sd1"
    return "custom"


# --- export to one LDM-layout file ------------------------------------------------------------------

UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
RESNET_NAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
VAE_ATTENTION_NAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, per_block: int, up_with_attention: set[int]) -> str:
    """diffusers UNet2DConditionModel key -> LDM openaimodel key (SD1/SD2/SDXL block structure)."""
    for old, new in UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    step = per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * step + j}.0.{_rename(rest, RESNET_NAMES)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET_NAMES)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.0.{_rename(m[3], RESNET_NAMES)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if i in up_with_attention else 1
        return f"output_blocks.{i * step + per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"unet key {key!r} has no place in the LDM layout")


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("export_single_file needs one layers_per_block for every UNet block")
    state = {k: v for k, v in unet.state_dict().items() if ".processor." not in k}  # adapters are saved apart
    up_with_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {UNET_PREFIX + _unet_key(k, per_block, up_with_attention): v for k, v in state.items()}


def _vae_key(key: str, num_up: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION_NAMES)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # the LDM decoder numbers its levels from the bottom
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    raise ValueError(f"vae key {key!r} has no place in the LDM layout")


def _vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        ldm_key = _vae_key(key, num_up)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + ldm_key] = value
    return out


def _flat_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Text encoder state with the optional `text_model.` level removed."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}


def _clip_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    state = _flat_clip_state(model)
    state.pop("embeddings.position_ids", None)
    return {f"{prefix}text_model.{k}": v for k, v in state.items()}


def _open_clip_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    state = _flat_clip_state(model)
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    for i in range(model.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):  # OpenCLIP keeps q, k, v stacked in one in_proj
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"{block}attn.in_proj_{part}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(layer)]:
            out[block + _rename(key[len(layer):], OPEN_CLIP_LAYER_NAMES)] = state.pop(key)
    if state:
        raise ValueError(f"text encoder keys with no place in the OpenCLIP layout: {sorted(state)[:3]}")
    return out


def to_ldm_state_dict(model: BaseModel) -> dict[str, torch.Tensor]:
    """The model's weights under the original LDM (SD1/SD2) or SGM (SDXL) key names."""
    if model.kind not in ("sd1", "sd2", "sdxl") or model.vae is None:
        raise ValueError(f"kind={model.kind!r}: only sd1, sd2 and sdxl models with a VAE have a single-file layout")
    expected = 2 if model.kind == "sdxl" else 1
    if len(model.text_encoders) != expected:
        raise ValueError(f"kind={model.kind!r} needs {expected} text encoder(s), got {len(model.text_encoders)}")
    state = {**_unet_to_ldm(model.unet), **_vae_to_ldm(model.vae)}
    if model.kind == "sd1":
        state.update(_clip_to_ldm(model.text_encoders[0], CLIP_PREFIXES["sd1"]))
    elif model.kind == "sd2":
        state.update(_open_clip_to_ldm(model.text_encoders[0], OPEN_CLIP_PREFIXES["sd2"]))
    else:
        state.update(_clip_to_ldm(model.text_encoders[0], CLIP_PREFIXES["sdxl"]))
        state.update(_open_clip_to_ldm(model.text_encoders[1], OPEN_CLIP_PREFIXES["sdxl"]))
    return state


def export_single_file(model: BaseModel, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as one LDM/SGM-layout .safetensors checkpoint (atomically) and return its path.

    v-prediction is recorded both as a `v_pred` marker tensor (read by ComfyUI and `load_base`) and as
    `modelspec.prediction_type` metadata.
    """
    path = Path(path)
    cast = resolve_dtype(dtype) if dtype is not None else None
    state = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in to_ldm_state_dict(model).items()
    }
    v_pred = model.prediction_type == "v_prediction"
    if v_pred:
        state["v_pred"] = torch.zeros(0)
    metadata = {"modelspec.prediction_type": "v" if v_pred else "epsilon"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
