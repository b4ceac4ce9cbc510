"""Training configuration: one YAML file, every key documented here, errors that name the key.

Example (recipes/ holds complete ones):

    stage: 2
    base_model: tiny
    output_dir: runs/sd15_stage2
    data:
      source: data/my_images
    train:
      steps: 2000
      batch_size: 4
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import InstructImagenError

MAX_RESOLUTION = 4096          # the instruction format's image limit is 4096 x 4096 pixels
MAX_BATCH_PIXELS = 2**26       # pixels per micro-batch (64 images of 1024 x 1024): beyond any one GPU
LR_SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(InstructImagenError, ValueError):
    """A training configuration value that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    source: str | None = None            # image folder with .txt captions, JSONL manifest, or .tar shards
    instructions: str | None = None      # stage 2: JSONL of ready-made instructions (+ target) instead of tasks
    resolution: int = 32                 # training image size in pixels (square)
    resize_policy: str = "crop"          # crop | fit | stretch (see docs/INSTRUCTION_FORMAT.md)
    embedder: str = "model"              # stage 1 neighbours: model (the base UNet encoder + text) | pixel
    embeddings: str | None = None        # stage 1: precomputed embeddings (.npy rows = items, or .npz keys)
    index: str = "auto"                  # stage 1 faiss index: auto | flat | ivf | hnsw
    mix: str = "paper"                   # stage 2 task mix: "paper" or "text_to_image=0.3,edge_to_image=0.2,..."
    num_workers: int = 0                 # DataLoader workers building examples


@dataclass
class AdapterSettings:
    levels: list[int] | None = None      # resolution levels with context attention (None: two lowest)
    modalities: list[str] | None = None  # None: the default set
    max_contexts: int = 8


@dataclass
class OptimConfig:
    steps: int = 1000                    # optimizer steps
    batch_size: int = 4                  # examples per step per process (before accumulation)
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 100              # linear warmup, then the lr_schedule
    lr_schedule: str = "constant"        # constant | linear | cosine: after warmup, decay to 0 at the last step
    optimizer: str = "adamw"             # adamw | adafactor
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # 0 disables clipping
    mixed_precision: str = "no"          # no | fp16 | bf16 (autocast through accelerate)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0               # 0 disables EMA; e.g. 0.999
    train_base: str = "adapter"          # adapter (base frozen) | lora | full
    train_text_encoder: bool = False     # the base's text encoder(s) too, whole (exported with the base)
    lora_rank: int = 8
    p_drop_all: float = 0.1              # condition dropout: text and contexts together
    p_drop_context: float = 0.1          # condition dropout: contexts only
    p_filler_words: float = 0.0          # wording robustness: chance of random words put before a text
    max_filler_words: int = 8            # 1 to this many, drawn from the tokenizer's whole words
    seed: int = 0


@dataclass
class CheckpointConfig:
    every: int = 100                     # steps between checkpoints (and on interrupt)
    keep: int = 2                        # newest checkpoints kept


@dataclass
class ValidationConfig:
    every: int = 0                       # steps between validation samples; 0 disables
    instruction: str | None = None       # instruction JSON to sample; None: a training example
    steps: int = 10                      # sampler steps for validation images


@dataclass
class TrainConfig:
    stage: int = 2                       # 1: retrieval-augmented, 2: multi-task instruction tuning
    base_model: str = "tiny"             # checkpoint .safetensors, diffusers folder, or tiny
    adapter: str | None = None           # adapter .safetensors to continue from
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    adapter_config: AdapterSettings = field(default_factory=AdapterSettings)
    train: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.stage in (1, 2), "stage", "must be 1 or 2"),
            (self.train.steps >= 1, "train.steps", "must be at least 1"),
            (self.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
            (self.train.grad_accum >= 1, "train.grad_accum", "must be at least 1"),
            (self.train.lr > 0, "train.lr", "must be positive"),
            (self.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
            (self.train.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}"),
            (self.train.optimizer in ("adamw", "adafactor"), "train.optimizer", "must be adamw or adafactor"),
            (self.train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "must be no, fp16 or bf16"),
            (self.train.train_base in ("adapter", "lora", "full"), "train.train_base", "must be adapter, lora or full"),
            (not self.train.train_text_encoder or self.train.train_base == "full", "train.train_text_encoder",
             "needs train.train_base: full (the text encoders are exported with the base)"),
            (0 <= self.train.ema_decay < 1, "train.ema_decay", "must be in [0, 1)"),
            (self.train.lora_rank >= 1, "train.lora_rank", "must be at least 1"),
            (self.train.seed >= 0, "train.seed", "must be >= 0"),
            (0 <= self.train.p_drop_all + self.train.p_drop_context <= 1, "train.p_drop_all",
             "p_drop_all + p_drop_context must be in [0, 1]"),
            (0 <= self.train.p_filler_words <= 1, "train.p_filler_words", "must be in [0, 1]"),
            (self.train.max_filler_words >= 1, "train.max_filler_words", "must be at least 1"),
            (self.checkpoint.every >= 1, "checkpoint.every", "must be at least 1"),
            (self.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1"),
            (8 <= self.data.resolution <= MAX_RESOLUTION, "data.resolution", f"must be between 8 and {MAX_RESOLUTION}"),
            (self.train.batch_size * self.data.resolution ** 2 <= MAX_BATCH_PIXELS, "train.batch_size",
             f"{self.train.batch_size} images of {self.data.resolution}x{self.data.resolution} exceed "
             f"{MAX_BATCH_PIXELS} pixels per micro-batch; lower it and raise train.grad_accum"),
            (self.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
            (1 <= self.validation.steps <= 1000, "validation.steps", "must be between 1 and 1000"),
            (self.data.resize_policy in ("crop", "fit", "stretch"), "data.resize_policy", "must be crop, fit or stretch"),
            (self.data.embedder in ("model", "pixel"), "data.embedder", "must be model or pixel"),
            (self.data.index in ("auto", "flat", "ivf", "hnsw"), "data.index", "must be auto, flat, ivf or hnsw"),
            (self.data.source is not None or self.data.instructions is not None, "data.source",
             "is required (or data.instructions for stage 2)"),
            (self.stage == 2 or self.data.source is not None, "data.source", "is required for stage 1"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        return self


def _build(cls, values, prefix: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        key = f"{prefix}{name}"
        if hasattr(default, "__dataclass_fields__"):
            kwargs[name] = _build(type(default), value, key + ".")
        else:
            kwargs[name] = _coerce(value, default, key)
    return cls(**kwargs)


SCIENTIFIC_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value, default, key):
    if value is None or default is None:
        return value
    expected = type(default)
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if expected in (int, float):
        if isinstance(value, str) and SCIENTIFIC_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as text; it is meant as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if abs(value) >= 2**63:  # also keeps float() below from overflowing on huge integers
            raise ConfigError(f"{key}: out of range (must be below 2**63 in size)")
        if expected is int and float(value) != int(value):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return expected(value)
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def config_from_dict(values: dict) -> TrainConfig:
    return _build(TrainConfig, values, "").validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config; `overrides` like ["train.steps=10"] win over the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path.name} is not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config: {path.name} must hold a mapping at the top level")
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(f"override: {override!r} must look like key=value")
        target = values
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override: {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
        target[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(values)
