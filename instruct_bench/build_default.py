"""The bundled default model: a small pixel-space (Imagen-like) model trained on the procedural benchmark.

It is built in three phases, all with this package's own trainer:
  0. text-to-image pretraining of the base UNet (the text encoder is a small seeded CLIP, frozen until the
     last phase), at a constant rate and then a cooldown (`pretrain_cooldown`) while the rate decays to 0,
  1. stage 1: retrieval-augmented training (neighbours from the base's own encoder),
  2. stage 2: multi-task instruction tuning on the benchmark's in-domain tasks, then a focus phase
     (`stage2_focus`) on the tasks that take content rather than a layout from a reference, and a cooldown
     (`stage2_cooldown`): the focus mix again while the learning rate decays linearly to 0, a subject phase
     (`stage2_subjects`): a mix that is mostly subjects, its rate decaying linearly to 0 again, then a
     wording phase (`stage2_wording`): the subject mix with random words before half the texts, the text
     encoder trained too, so that a phrasing never seen in training still reads as its description, and last
     an overlap phase (`stage2_overlap`): depth scenes whose objects overlap and the tasks that name colours,
     worded and with the text encoder trained as in the wording phase.
Stages 1 and 2 train the adapter and, as in Instruct-Imagen, the base UNet too (`train_base` per phase): a
frozen base draws only what pretraining showed it, plain scenes here. The pretrained base is
kept with the harness (`weights/ablations/text_only.safetensors`, with the text encoder it was pretrained with) as
the text-only baseline and the start of the ablations. `python -m instruct_bench build-default` reruns it; the recipe
and measured losses are stored beside the weights in `default_model/config.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instruct_core import models
from instruct_core.models import load_default
from instruct_core.progress import Progress

ProgressFactory = Callable[[str, int], Progress]  # (what, total steps) -> its progress display


def no_progress(desc: str, total: int) -> Progress:
    return Progress(total, desc, enabled=False)

DEFAULT_DIR = models.DEFAULT_MODEL_DIR
WEIGHTS = models.DEFAULT_WEIGHTS

ARCHITECTURE = {
    "unet": {
        "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 96],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
        # diffusers reads this as the number of heads: 32 of 2-3 channels, slow on a CPU (docs/BENCHMARKS.md)
        "attention_head_dim": 32, "norm_num_groups": 32,
    },
    "text_encoder": {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 32, "projection_dim": 64},
    "tokenizer_max_length": 32,
    "scheduler": {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                  "prediction_type": "v_prediction"},
}

# The adapter's own settings; its context heads are 32 wide, where the base's are 2-3 wide, and one head per
# layer starts free of the positional prior, to find a subject or a style anywhere in a reference.
ADAPTER = {"head_dim": 32, "content_heads": 1}

# About 6 hours on one core of a 2-core CPU, at 1.1 to 1.8 s a step (the last build: pretraining's cooldown
# 41 min, stage 1 8, stage 2 49, its focus phase 39, the cooldown 25, the subject phase 68, the wording phase
# 37 and the overlap phase 88, on a CPU shared with other jobs; pretraining itself
# about 70 at the faster rate): a small UNet seeing many images learns these scenes faster than a wide one seeing few.
# Pretraining runs until the base reads its text: another example's caption raises its loss by 3% after 1,500
# steps, by 17% after 5,100. Its cooldown lets the base settle into drawing: 1,500 decaying steps after the
# 5,100 took text-to-image's shape accuracy from 0.062 to 0.146 and text alignment from 0.223 to 0.330 on the
# training split, where the later stages can only build on what the base draws. Stage 2 ends on the tasks
# that take content from a reference rather than a layout at the query's own place; a little of every control
# and of text-to-image stays in, so those are not forgotten. 1,200 focus steps were chosen over 600 on the
# training split. The constant rate keeps the weights moving to the end; the cooldown lets them
# settle, which lowered the fixed-sample loss by 11% in 800 steps where 600 more constant-rate focus steps lowered
# theirs by 1%. 800 cooldown steps were chosen over 400 on the training split.
FOCUS_MIX = {"subject": 0.30, "styled_generation": 0.22, "style_transfer": 0.22, "inpainting": 0.12,
             "text_to_image": 0.04, "edge_to_image": 0.025, "sketch_to_image": 0.025, "mask_to_image": 0.025,
             "depth_to_image": 0.025}

# Subjects are the last task to be learnt: carrying a composite object from a reference over into a new place took
# thousands of subject steps where the layout tasks took hundreds (CHANGELOG.md, "Why subjects are rarely
# drawn"). Their phase keeps a little of every other task in, so those are not forgotten, as subject-only steps
# made them.
SUBJECT_MIX = {"subject": 0.60, "styled_generation": 0.08, "style_transfer": 0.08, "inpainting": 0.08,
               "text_to_image": 0.04, "edge_to_image": 0.03, "sketch_to_image": 0.03, "mask_to_image": 0.03,
               "depth_to_image": 0.03}

# Depth scenes whose objects overlap (the depth map's order is only readable where they do) came after the
# phases above; the overlap phase teaches them, with the tasks that name colours at a place, and keeps a share of
# subjects and of every other task, so those are not forgotten.
OVERLAP_MIX = {"depth_to_image": 0.35, "subject": 0.20, "text_to_image": 0.10, "mask_to_image": 0.06,
               "edge_to_image": 0.05, "sketch_to_image": 0.04, "styled_generation": 0.06, "style_transfer": 0.07,
               "inpainting": 0.07}

# The seeded text encoder reads each token in the light of the ones before it: a caption under a phrasing never
# seen in training read as another caption (cosine to its own states 0.70-0.80, between two captions 0.83), and
# the held-out phrasings lost the subject's place. Random words before half the texts taught nothing with the
# encoder frozen (layout IoU 0.05 after 1,100 steps); with it trained too, every test row rose (CHANGELOG.md).

RECIPE = {
    "seed": 0,
    "pretrain": {"steps": 5100, "batch_size": 16, "lr": 6e-4, "warmup_steps": 100},
    "pretrain_cooldown": {"steps": 1500, "batch_size": 16, "lr": 6e-4, "warmup_steps": 20, "lr_schedule": "linear"},
    "stage1": {"steps": 200, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "items": 2000, "train_base": "full"},
    "stage2": {"steps": 1600, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "train_base": "full"},
    "stage2_focus": {"steps": 1200, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "train_base": "full",
                     "mix": FOCUS_MIX},
    "stage2_cooldown": {"steps": 800, "batch_size": 12, "lr": 3e-4, "warmup_steps": 0, "train_base": "full",
                        "lr_schedule": "linear", "mix": FOCUS_MIX},
    "stage2_subjects": {"steps": 3600, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "train_base": "full",
                        "lr_schedule": "linear", "mix": SUBJECT_MIX},
    "stage2_wording": {"steps": 2000, "batch_size": 12, "lr": 3e-4, "warmup_steps": 20, "train_base": "full",
                       "lr_schedule": "linear", "mix": SUBJECT_MIX, "p_filler_words": 0.5, "max_filler_words": 8,
                       "train_text_encoder": True},
    "stage2_overlap": {"steps": 1000, "batch_size": 12, "lr": 2e-4, "warmup_steps": 20, "train_base": "full",
                       "lr_schedule": "linear", "mix": OVERLAP_MIX, "p_filler_words": 0.5, "max_filler_words": 8,
                       "train_text_encoder": True},
    "single_task_steps": 200,  # the single-task ablations' budget
}

PRETRAIN_PHASES = ("pretrain", "pretrain_cooldown")
STAGE2_PHASES = ("stage2", "stage2_focus", "stage2_cooldown", "stage2_subjects", "stage2_wording", "stage2_overlap")
TRAINING_PHASES = (*PRETRAIN_PHASES, "stage1", *STAGE2_PHASES)

# The weights only the harness reads (the ablations, the pretrained base, the evaluator) live beside it, not in the
# installed package; a build into another folder (--out) keeps them in that folder.
HARNESS_WEIGHTS_DIR = Path(__file__).parent / "weights"
ABLATIONS = "ablations"
EVALUATOR = "evaluator.safetensors"
# The pretrained base, before stages 1 and 2 trained it: the text-only baseline and the ablations' start.
PRETRAINED_BASE = "text_only"
VARIANT_FORMAT = "instruct-imagen-default-variant"


def build_default_base(seed: int = 0, architecture: dict = ARCHITECTURE):
    """The default model's base, freshly initialised (seeded)."""
    return models.build_default_base(architecture, seed)


def with_fresh_adapter(base):
    """`base` with the default model's context layers, untrained."""
    from instruct_core.context_unet import ContextAdapterConfig, ContextAugmentedUNet
    from instruct_core.pipeline import InstructImagen

    return InstructImagen(base, ContextAugmentedUNet(base.unet, ContextAdapterConfig(**ADAPTER)))


def _fp16_weights(modules) -> dict:
    """State dicts of (prefix, module) pairs in one flat dict, floating tensors as fp16, base LoRA left out."""
    return {prefix + name: value.detach().cpu().to(torch.float16 if value.is_floating_point() else value.dtype)
            .contiguous() for prefix, module in modules for name, value in module.state_dict().items()
            if ".lora_" not in name}


def architecture_of(pipe) -> dict:
    """`ARCHITECTURE`'s entries as the model in `pipe` has them: a model loaded from a folder written by another
    version keeps its own when saved again."""
    base = pipe.base
    unet, encoder = base.unet.config, base.text_encoders[0].config
    architecture = {"unet": {key: unet[key] for key in ARCHITECTURE["unet"]},
                    "text_encoder": {key: getattr(encoder, key) for key in ARCHITECTURE["text_encoder"]},
                    "tokenizer_max_length": base.tokenizers[0].model_max_length,
                    "scheduler": {key: base.scheduler_config[key] for key in ARCHITECTURE["scheduler"]}}
    return json.loads(json.dumps(architecture))  # as a run record reads it back: tuples become lists


def _adapter_config(pipe) -> dict:
    config = pipe.model.adapter.config.to_dict()
    config["levels"] = list(pipe.model.adapter.levels)
    return config


def _save_atomically(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_default(pipe, folder: Path = DEFAULT_DIR, info: dict | None = None) -> Path:
    """Weights (fp16: UNet, text encoder, adapter) and config.json; both written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _fp16_weights((("unet.", pipe.base.unet), ("text_encoder.", pipe.base.text_encoders[0]),
                             ("adapter.", pipe.model.adapter)))
    config = {"architecture": architecture_of(pipe), "adapter_config": _adapter_config(pipe), **(info or {})}
    _save_atomically(tensors, folder / WEIGHTS, {"format": "instruct-imagen-default-model", "format_version": "1"})
    (folder / "config.json.tmp").write_text(json.dumps(config, indent=2))
    (folder / "config.json.tmp").replace(folder / "config.json")
    return folder / WEIGHTS


def save_variant(pipe, path: Path, info: dict | None = None, with_adapter: bool = True) -> Path:
    """A variant of the default model whose base UNet was trained too: its UNet, (unless `with_adapter` is False:
    an untrained one) its adapter and its text encoder, fp16, in one file. A text encoder that is the pretrained
    base's is not stored twice: the file names it ("text_encoder": "pretrained" in its metadata) and
    `load_variant` reads it from the pretrained base's file, which always holds its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    modules = [("unet.", pipe.base.unet)] + ([("adapter.", pipe.model.adapter)] if with_adapter else [])
    encoder = _fp16_weights((("text_encoder.", pipe.base.text_encoders[0]),))
    pretrained = _pretrained_beside(path)
    shared = path != pretrained and pretrained.is_file() and _same_tensors(encoder, _text_encoder_of(pretrained))
    tensors = _fp16_weights(modules) | ({} if shared else encoder)
    _save_atomically(tensors, path, {"format": VARIANT_FORMAT, "info": json.dumps(info or {}),
                                     "adapter_config": json.dumps(_adapter_config(pipe)),
                                     "text_encoder": "pretrained" if shared else "own"})
    return path


def _pretrained_beside(variant: Path) -> Path:
    """The pretrained base's file in a variant's folder, where a variant on its text encoder reads it from."""
    return variant.with_name(pretrained_base_file(Path()).name)


def _text_encoder_of(path: Path) -> dict:
    """A saved model's text-encoder tensors, read without the rest of the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith("text_encoder.")}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def harness_weights_dir(folder: Path = DEFAULT_DIR) -> Path:
    """Where the harness's weights of the model in `folder` are kept."""
    return HARNESS_WEIGHTS_DIR if Path(folder).resolve() == DEFAULT_DIR.resolve() else Path(folder)


def ablations_dir(folder: Path = DEFAULT_DIR) -> Path:
    return harness_weights_dir(folder) / ABLATIONS


def evaluator_file(folder: Path = DEFAULT_DIR) -> Path:
    return harness_weights_dir(folder) / EVALUATOR


def pretrained_base_file(folder: Path = DEFAULT_DIR) -> Path:
    """Where a build whose stages train the base keeps the base as pretraining left it."""
    return ablations_dir(folder) / f"{PRETRAINED_BASE}.safetensors"


def trains_base(recipe: dict) -> bool:
    """Whether a recipe's stages train the base UNet too (then the pretrained base is kept as its own file)."""
    return any(isinstance(settings, dict) and settings.get("train_base", "adapter") != "adapter"
               for phase, settings in recipe.items() if phase not in PRETRAIN_PHASES)


def is_variant_file(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("format") == VARIANT_FORMAT


def load_variant(path: Path, device: str = "auto", dtype: str = "auto", folder: Path = DEFAULT_DIR):
    """A variant written by `save_variant`, on its own text encoder (a file written before variants held one: on
    the default model's)."""
    from safetensors import safe_open

    from instruct_core.context_unet import ContextAdapterConfig

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != VARIANT_FORMAT:
        raise ValueError(f"{path}: not a default-model variant (format {metadata.get('format')!r})")
    config = ContextAdapterConfig.from_dict(json.loads(metadata["adapter_config"]))
    pipe = load_default(device=device, dtype=dtype, adapter_config=config, folder=folder, super_resolution=False)
    tensors = load_file(str(path))
    if metadata.get("text_encoder") == "pretrained":
        pretrained = _pretrained_beside(path)
        if not pretrained.is_file():
            raise FileNotFoundError(f"{path}: its text encoder is the pretrained base's, and {pretrained} is missing")
        tensors |= _text_encoder_of(pretrained)
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    pipe.base.unet.load_state_dict(part("unet."))  # copies into the placed weights, keeping device and dtype
    if any(key.startswith("adapter.") for key in tensors):
        pipe.model.adapter.load_state_dict(part("adapter."))
    if any(key.startswith("text_encoder.") for key in tensors):
        pipe.base.text_encoders[0].load_state_dict(part("text_encoder."), strict=False)
    return pipe


def _lr_schedule(phase: dict) -> str:
    """A recipe phase's learning-rate schedule; phases that name none keep the trainer's default."""
    from instruct_core.train.config import OptimConfig

    return phase.get("lr_schedule", OptimConfig.lr_schedule)


def phase_trainer_config(phase: dict, output_dir: Path, seed: int, train_base: str):
    from instruct_core.train.config import config_from_dict

    return config_from_dict({
        "stage": 2, "base_model": "default", "output_dir": str(output_dir),
        "data": {"source": "benchmark", "resolution": ARCHITECTURE["unet"]["sample_size"]},
        "train": {"steps": phase["steps"], "batch_size": phase["batch_size"], "lr": phase["lr"],
                  "warmup_steps": phase["warmup_steps"], "lr_schedule": _lr_schedule(phase),
                  "seed": seed, "train_base": train_base,
                  "train_text_encoder": phase.get("train_text_encoder", False),
                  # only what the phase sets: the trainer's own defaults stand for the rest
                  **{key: phase[key] for key in ("p_filler_words", "max_filler_words") if key in phase}},
        "checkpoint": {"every": 50, "keep": 1},
    })


def build(folder: Path = DEFAULT_DIR, work_dir: Path = Path("runs/default_model"), recipe: dict = RECIPE,
          phases: tuple[str, ...] | None = None, progress: ProgressFactory = no_progress, log=print) -> dict:
    """Train the default model from scratch and save it; returns what was measured. `phases` (default: every
    training phase the recipe has) run in their fixed order; later phases continue from the saved model.
    `progress(phase, steps)` gives each phase's progress display."""
    from .tasks import BenchmarkTaskDataset, stage1_items
    from instruct_core.train.checkpointing import list_checkpoints
    from instruct_core.train.retrieval import ModelEmbedder, RetrievalExamples, build_index, form_clusters
    from instruct_core.train.trainer import Trainer

    seed = recipe["seed"]
    phases = tuple(p for p in TRAINING_PHASES if p in (recipe if phases is None else phases))
    missing = [p for p in phases if p not in recipe]
    if missing:
        raise ValueError(f"recipe: no settings for phase {missing[0]!r}")
    pretrained_base = pretrained_base_file(folder)
    if "pretrain" in phases:
        pipe = with_fresh_adapter(build_default_base(seed))
        measured: dict = {"recipe": recipe, "phases": {}}
    else:
        if phases[:1] == ("pretrain_cooldown",) and pretrained_base.is_file():
            # the cooldown continues pretraining: from the base as pretraining left it
            pipe = with_fresh_adapter(load_variant(pretrained_base, device="cpu", folder=folder).base)
        else:  # later phases continue from the saved model (its pretrained base and adapter)
            pipe = load_default(device="cpu", folder=folder, super_resolution=False)
        measured = json.loads((folder / "config.json").read_text()).get("build", {"phases": {}})
        measured["recipe"] = recipe
    size = ARCHITECTURE["unet"]["sample_size"]
    for phase in phases:
        settings = recipe[phase]
        if phase in PRETRAIN_PHASES:  # the cooldown draws its own examples
            dataset = BenchmarkTaskDataset({"text_to_image": 1.0}, length=100_000,
                                           seed=seed + 100 * PRETRAIN_PHASES.index(phase), size=size)
            train_base = "full"
        elif phase == "stage1":
            items = stage1_items(settings["items"], seed=seed, size=size)
            embeddings = ModelEmbedder(pipe, size=size).embed(items)
            clusters, stats = form_clusters(embeddings, build_index(embeddings, kind="flat"))
            measured["phases"]["stage1_clusters"] = stats.to_dict()
            dataset = RetrievalExamples(items, clusters, num_context=3, seed=seed)
            train_base = settings.get("train_base", "adapter")
        else:
            dataset = instruction_dataset(phase, settings, seed)
            train_base = settings.get("train_base", "adapter")
        config = phase_trainer_config(settings, work_dir / phase, seed, train_base)
        bar = progress(phase, settings["steps"])
        trainer = Trainer(config, pipe, dataset, progress=bar.trainer_callback)
        later_runs = [work_dir / name / RUN_RECORD for name in TRAINING_PHASES[TRAINING_PHASES.index(phase) + 1:]]
        claim_work_dir(trainer.checkpoint_dir, run_identity(phase, settings, seed, pipe, train_base), later_runs)
        if phase not in PRETRAIN_PHASES and train_base != "adapter" and not pretrained_base.is_file():
            # the last moment the base is as pretraining left it
            save_variant(pipe, pretrained_base, {"variant": PRETRAINED_BASE}, with_adapter=False)
        probe = probe_examples(dataset, recipe.get("probe_size", PROBE_SIZE))
        earlier = measured["phases"].get(phase) if list_checkpoints(trainer.checkpoint_dir) else None
        # a finished phase run longer starts from its own result: its loss before is the first run's
        before = earlier["probe_loss_before"] if earlier else trainer.held_out_loss(probe)
        with bar:
            result = trainer.run(resume=True)  # an interrupted build goes on
        if phase != "pretrain":
            record_finished(trainer.checkpoint_dir, pipe)
        pipe.base.unet.requires_grad_(False)
        pipe.model.eval()
        losses = result.losses
        measured["phases"][phase] = {
            # training time summed over every run that led here, so a resumed phase reports its whole cost
            "steps": result.step, "seconds": round(result.report["train_seconds"], 1),
            "loss_first_50": round(sum(losses[:50]) / max(1, len(losses[:50])), 5),
            "loss_last_50": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5),
            "probe_loss_before": round(before, 5), "probe_loss_after": round(trainer.held_out_loss(probe), 5),
        }
        log(f"{phase}: {measured['phases'][phase]}")
        save_default(pipe, folder, {"build": measured})
        if phase in PRETRAIN_PHASES:  # a new base: the old snapshot of it is stale
            pretrained_base.unlink(missing_ok=True)
    return measured


def instruction_dataset(phase: str, settings: dict, seed: int):
    """A stage-2 phase's examples: its task mix (the benchmark's own by default); each phase draws its own."""
    from .tasks import BENCH_MIX, BenchmarkTaskDataset

    return BenchmarkTaskDataset(settings.get("mix", BENCH_MIX), length=100_000,
                                seed=seed + 1 + STAGE2_PHASES.index(phase), size=ARCHITECTURE["unet"]["sample_size"])


RUN_RECORD = "run.json"


def run_identity(name: str, settings: dict, seed: int, pipe, train_base: str) -> dict:
    """What decides a phase's run, its length aside (unless its learning rate decays): a longer run of the same
    identity continues it. Phases after pretraining also name the base they start from, so a rebuilt base or
    earlier phase makes their checkpoints stale (`claim_work_dir` also accepts the base a finished run of the
    phase left)."""
    adapter = pipe.model.adapter
    # a decaying learning rate spans the run's own length: a longer one is another run, not a continuation
    decays = _lr_schedule(settings) != "constant"
    identity = {"phase": name, "seed": seed,
                "settings": dict(settings) if decays else {k: v for k, v in settings.items() if k != "steps"},
                "architecture": architecture_of(pipe),
                "adapter": dict(adapter.config.to_dict(), levels=list(adapter.levels))}
    if name != "pretrain":
        identity["base_sha256"] = base_digest(pipe)
    return identity


def base_digest(pipe) -> str:
    """sha256 of the base UNet's weights, rounded as the saved model stores them (fp16), so a build restarted
    from its folder matches."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(pipe.base.unet.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().to(torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


def record_finished(checkpoint_dir: Path, pipe) -> None:
    """Note in the run's record the base its phase ended with: a later, longer recipe starts from the saved
    model, whose base the phase itself has trained, and must still continue these checkpoints."""
    record = checkpoint_dir.parent / RUN_RECORD
    stored = json.loads(record.read_text())
    stored[FINISHED_BASE] = base_digest(pipe)
    record.write_text(json.dumps(stored, indent=2, sort_keys=True))


FINISHED_BASE = "finished_base_sha256"


def _base_before(later_runs: list[Path], digest: str | None) -> str | None:
    """Walk back from the saved model's base through finished later runs, each to the base it started from."""
    for record in reversed(list(later_runs)):
        stored = json.loads(record.read_text()) if record.is_file() else {}
        if digest is not None and stored.get(FINISHED_BASE) == digest:
            digest = stored.get("base_sha256")
    return digest


def claim_work_dir(checkpoint_dir: Path, identity: dict, later_runs: list[Path] = ()) -> None:
    """Refuse to continue checkpoints that another run left in a work folder (a build resumes whatever it
    finds there); record this run's identity for the next resume. `later_runs` are the run records of the
    phases after this one: when the saved model is this run's result carried on by finished runs of those,
    extending this run is still its own continuation (and those later runs become stale)."""
    from instruct_core.train.checkpointing import list_checkpoints
    from instruct_core.train.trainer import TrainingError

    record = checkpoint_dir.parent / RUN_RECORD
    if list_checkpoints(checkpoint_dir):
        if not record.is_file():
            raise TrainingError(f"{checkpoint_dir.parent}: holds checkpoints of an unrecorded run; remove the folder "
                                f"or choose another work folder")
        stored = json.loads(record.read_text())
        finished = stored.pop(FINISHED_BASE, None)
        if finished is not None and _base_before(later_runs, identity.get("base_sha256")) == finished:
            stored["base_sha256"] = identity["base_sha256"]  # the saved model grew from this run's result
        differs = sorted(k for k in identity.keys() | stored.keys() if identity.get(k) != stored.get(k))
        if differs:
            raise TrainingError(f"{checkpoint_dir.parent}: holds checkpoints of a run with other "
                                f"{', '.join(differs)}; remove the folder or choose another work folder")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=2, sort_keys=True))


PROBE_SIZE = 128  # examples in each phase's fixed sample; a recipe may set its own ("probe_size")


def probe_examples(dataset, size: int = PROBE_SIZE) -> list:
    """A fixed sample from the end of a phase's dataset: its loss, with fixed noise and timesteps, before and
    after the phase shows what the phase learned (the running loss mixes that with each step's draws)."""
    return [dataset[len(dataset) - 1 - i] for i in range(min(size, len(dataset)))]


def build_evaluator(folder: Path = DEFAULT_DIR, seed: int = 0, steps: int = 1200, log=print,
                    progress: ProgressFactory = no_progress) -> dict:
    """Train the benchmark's evaluator (the measuring instrument) and store it beside the model."""
    from .metrics import evaluator_accuracy, train_evaluator

    started = time.perf_counter()
    with progress("evaluator", steps) as bar:
        evaluator = train_evaluator(seed=seed, steps=steps,
                                    log=lambda step, loss: bar.set(step + 1, loss=f"{loss:.4f}"))
    path = evaluator_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluator.save(path)
    accuracy = {k: round(v, 4) for k, v in evaluator_accuracy(evaluator).items()}
    info = {"steps": steps, "seconds": round(time.perf_counter() - started, 1), "accuracy": accuracy}
    log(f"evaluator: {info}")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config.setdefault("build", {}).setdefault("phases", {})["evaluator"] = info
        config_path.write_text(json.dumps(config, indent=2))
    return info


def build_ablations(variants=("no_stage1", "single:edge_to_image", "single:subject"), folder: Path = DEFAULT_DIR,
                    work_dir: Path = Path("runs/default_model"), recipe: dict = RECIPE, log=print,
                    progress: ProgressFactory = no_progress) -> dict:
    """The evaluation's ablations, each trained from the default model's pretrained base: an adapter file
    when the recipe trains the adapter alone, a variant file (`save_variant`) when it trains the base too.
    `no_stage1` spends stage 1's steps on stage 2 and then runs the same later stage-2 phases (focus, cooldown,
    subjects) as the full model. A saved variant whose phases are the first of its runs continues from its
    file, as the full model's later phases continue from the saved model."""
    from instruct_core.context_unet import ContextAdapterConfig, ContextAugmentedUNet
    from instruct_core.adapter_io import save_adapter
    from instruct_core.pipeline import InstructImagen
    from instruct_core.train.trainer import Trainer

    config = json.loads((folder / "config.json").read_text())
    measured = {}
    pretrained_base = pretrained_base_file(folder)
    seed = recipe["seed"]
    for variant in variants:
        # with no snapshot, stages 1 and 2 left the base as it was pretrained
        pipe = (load_variant(pretrained_base, device="cpu", folder=folder) if pretrained_base.is_file()
                else load_default(device="cpu", folder=folder, super_resolution=False))
        fresh = ContextAdapterConfig.from_dict(config["adapter_config"])
        pipe = InstructImagen(pipe.base, ContextAugmentedUNet(pipe.base.unet, fresh))
        name = variant.replace(":", "_")
        if variant == "no_stage1":
            runs = [("stage2", name, dict(recipe["stage2"],
                                          steps=recipe["stage1"]["steps"] + recipe["stage2"]["steps"]))]
            runs += [(phase, f"{name}_{phase.removeprefix('stage2_')}", dict(recipe[phase]))
                     for phase in STAGE2_PHASES[1:] if phase in recipe]
        else:
            runs = [("stage2", name, dict(recipe["stage2"], steps=recipe["single_task_steps"],
                                          mix={variant.split(":", 1)[1]: 1.0}))]
        path = ablations_dir(folder) / f"{name}.safetensors"
        steps, seconds, trains_base = [], 0.0, False
        done = _finished_runs(path, variant, [settings for _, _, settings in runs])
        if done:
            pipe = load_variant(path, device="cpu", folder=folder)
            steps, trains_base = [settings["steps"] for _, _, settings in runs[:done]], True
            log(f"{variant}: continues {path.name} after its first {done} phase(s)")
        for phase, run_name, settings in runs[done:]:
            train_base = settings.get("train_base", "adapter")
            trains_base |= train_base != "adapter"
            bar = progress(run_name, settings["steps"])
            trainer = Trainer(phase_trainer_config(settings, work_dir / run_name, seed, train_base), pipe,
                              instruction_dataset(phase, settings, seed), progress=bar.trainer_callback)
            claim_work_dir(trainer.checkpoint_dir, run_identity(run_name, settings, seed, pipe, train_base))
            with bar:
                result = trainer.run(resume=True)  # an interrupted ablation goes on
            record_finished(trainer.checkpoint_dir, pipe)
            steps.append(result.step)
            seconds += result.report["train_seconds"]
        info = {"variant": variant, "trained_steps": sum(steps), "phase_steps": steps,
                "phase_settings": [settings for _, _, settings in runs]}
        if runs[done:]:  # a variant that already holds every run is left as it is
            path = save_variant(pipe, path, info) if trains_base else save_adapter(pipe.model, path, info)
        last = result.losses[-50:] if runs[done:] else []
        measured[variant] = {"steps": sum(steps), "seconds": round(seconds, 1),
                             "loss_last_50": round(sum(last) / len(last), 5) if last else None}
        log(f"{variant}: {measured[variant]} -> {path.name}")
    return measured


def _finished_runs(path: Path, variant: str, run_settings: list[dict]) -> int:
    """How many of an ablation's runs its saved variant file already holds (0 if none, or if the file's phases
    are not the first of `run_settings`: another recipe's, which is trained again from the pretrained base). A
    file written before variants kept their phases' settings is matched by the phases' steps."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != VARIANT_FORMAT:  # an adapter file: its base was not trained, nothing to go on from
        return 0
    info = json.loads(metadata.get("info", "{}"))
    held = info.get("phase_steps", [])
    if info.get("variant") != variant or not held or held != [s["steps"] for s in run_settings[:len(held)]]:
        return 0
    if "phase_settings" in info and info["phase_settings"] != json.loads(json.dumps(run_settings[:len(held)])):
        return 0
    return len(held)
