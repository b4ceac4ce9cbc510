"""The trainer: one loop for both stages, on one CPU or many GPUs (accelerate).

Every random draw of step s (which examples, condition dropout, timesteps, noise) comes from generators
seeded by (seed, s, micro-batch, process). Resuming from a checkpoint therefore continues the exact run: the
same examples and noise follow, and the loss curve is the one an uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..context_attention import ContextState
from ..errors import InstructImagenError
from ..instruction import prepare_context_image, prepare_mask
from ..pipeline import InstructImagen, pil_to_tensor
from .checkpointing import list_checkpoints, load_checkpoint, recover_checkpoints, save_checkpoint
from .config import TrainConfig
from .data import TrainingExample


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM has its own type; the CPU allocator raises a RuntimeError (or MemoryError) with its own words."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


class TrainingError(InstructImagenError, RuntimeError):
    """Training stopped for a reason the user can act on; the last good checkpoint is intact."""


LOCK_NAME = "trainer.lock"
_HELD_LOCKS: dict[str, int] = {}  # folders this process holds, with how many holders nest inside it


@contextlib.contextmanager
def training_folder_lock(folder: Path, log: Callable[[str], None] | None = None):
    """Own `folder` for one trainer: a lock file naming this process (pid and host) refuses a second trainer,
    in this process or another, until the first one ends. A lock left by a process of this host that no longer
    runs (a kill -9) is stale: it is reported through `log` and taken over. One from another host cannot be
    checked; the refusal says how to clear it. Nested holders in one process share the lock, and the processes
    of one data-parallel job (torchrun) are one trainer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if os.environ.get("RANK", "0") != "0":  # a data-parallel job is one trainer: its rank-0 process holds the lock
        yield
        return
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key] -= 1
        return
    path = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _take_lock(path, record, log or (lambda line: warnings.warn(line, stacklevel=4)))
    _HELD_LOCKS[key] = 1
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        if _read_lock(path) == record:
            path.unlink(missing_ok=True)


def _take_lock(path: Path, record: dict, log: Callable[[str], None]) -> None:
    for _ in range(2):
        # written whole under another name, then linked: the lock never exists without its owner in it
        draft = path.with_name(f"{path.name}.{record['pid']}.tmp")
        draft.write_text(json.dumps(record))
        try:
            os.link(draft, path)
            return
        except FileExistsError:
            owner = _read_lock(path)
        finally:
            draft.unlink(missing_ok=True)
        if not _is_stale(owner):
            raise TrainingError(_lock_message(path, owner))
        log(f"{path}: removed a stale lock of pid {owner['pid']} on {owner['host']} (since {owner.get('started')}), "
            f"which no longer runs")
        path.unlink(missing_ok=True)
    raise TrainingError(_lock_message(path, _read_lock(path)))


def _read_lock(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _is_stale(owner: dict | None) -> bool:
    if owner is None or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


def _lock_message(path: Path, owner: dict | None) -> str:
    clear = f"if no trainer is running there, delete {path}"
    if owner is None:
        return f"output_dir: {path.parent} is locked by {path}, which cannot be read; {clear}"
    where = f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('started')}"
    if owner.get("host") != socket.gethostname():
        return (f"output_dir: {path.parent} is in use by a trainer on another host ({where}), which cannot be "
                f"checked from here; {clear}")
    return (f"output_dir: {path.parent} is in use by another trainer ({where}); wait for it to end or stop it "
            f"({clear})")


@dataclass
class TrainResult:
    adapter_path: Path
    step: int
    losses: list[float]
    cancelled: bool = False
    report: dict = field(default_factory=dict)


# -- batches ------------------------------------------------------------------------------------------------

@dataclass
class ExampleTensors:
    """One example as tensors (built in DataLoader workers): images in [0, 1], (C, H, W)."""

    text: str
    target: torch.Tensor
    context_images: list[torch.Tensor]
    context_texts: list[str]
    modalities: list[str]
    weights: list[float]
    masks: list[torch.Tensor | None]
    task: str
    annotations: dict = field(default_factory=dict)  # the example's own, as it came


def example_to_tensors(example: TrainingExample, resolution: int, policy: str = "crop") -> ExampleTensors:
    size = (resolution, resolution)
    contexts = example.instruction.contexts
    return ExampleTensors(
        text=example.instruction.text,
        target=pil_to_tensor(prepare_context_image(example.target, size, policy)),
        context_images=[pil_to_tensor(prepare_context_image(c.image, size, policy)) for c in contexts],
        context_texts=[c.marker_text for c in contexts],
        modalities=[c.modality for c in contexts],
        weights=[float(c.weight) for c in contexts],
        masks=[None if c.mask is None else pil_to_tensor(prepare_mask(c.mask, size, policy))[0] for c in contexts],
        task=example.task,
        annotations=example.annotations,
    )


def step_rng(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, micro, rank])


def filler_words(tokenizer) -> tuple[str, ...]:
    """The whole alphabetic words of a tokenizer's vocabulary (CLIP's "word</w>", sentencepiece's "▁word"),
    lower-cased and sorted: what `add_filler_words` draws from."""
    words = set()
    for token in tokenizer.get_vocab():
        word = token.removesuffix("</w>").removeprefix("▁").removeprefix("Ġ")
        if word != token and word.isascii() and word.isalpha() and 2 <= len(word) <= 12:
            words.add(word.lower())
    return tuple(sorted(words))


def add_filler_words(example: TrainingExample, rng: np.random.Generator, words: tuple[str, ...], p: float,
                     max_words: int) -> TrainingExample:
    """With probability `p`, 1 to `max_words` random `words` before the example's text (never before an empty,
    unconditional one). Phrasings a model never saw read as unfamiliar words around a familiar description;
    training on random ones teaches it to read the description whatever comes first. One uniform draw from
    `rng`, and the words' draws only when they are added."""
    text = example.instruction.text
    if rng.random() >= p or not text:
        return example
    picks = rng.integers(len(words), size=int(rng.integers(1, max_words + 1)))
    text = " ".join([*(words[i] for i in picks), text])
    return replace(example, instruction=replace(example.instruction, text=text))


class StepBatches(torch.utils.data.Dataset):
    """Item k is the micro-batch of global index k = (step * grad_accum + micro): deterministic and resumable."""

    def __init__(self, dataset, config: TrainConfig, rank: int = 0, words: tuple[str, ...] = ()):
        if config.train.p_filler_words > 0 and not words:
            raise ValueError("train.p_filler_words: needs filler words (the tokenizer has no whole words)")
        self.dataset = dataset
        self.config = config
        self.rank = rank
        self.words = words

    def __len__(self):
        return self.config.train.steps * self.config.train.grad_accum

    def __getitem__(self, index: int) -> list[ExampleTensors]:
        from .retrieval import apply_condition_dropout

        train = self.config.train
        step, micro = divmod(index, train.grad_accum)
        rng = step_rng(train.seed, step, micro, self.rank)
        batch = []
        for _ in range(train.batch_size):
            example = self.dataset[int(rng.integers(len(self.dataset)))]
            example = apply_condition_dropout(example, rng, train.p_drop_all, train.p_drop_context)
            if train.p_filler_words > 0:  # no extra draw otherwise: runs without it stay as they were
                example = add_filler_words(example, rng, self.words, train.p_filler_words, train.max_filler_words)
            batch.append(example_to_tensors(example, self.config.data.resolution, self.config.data.resize_policy))
        return batch


# -- the loss -----------------------------------------------------------------------------------------------

class DiffusionLoss(nn.Module):
    """Encodes the batch's contexts with the UNet's own encoder and returns the denoising loss.

    A module (not a function) so that data-parallel wrappers see one forward per step.
    """

    def __init__(self, pipe: InstructImagen):
        super().__init__()
        self.model = pipe.model
        self.register_buffer("alphas_cumprod", pipe.schedule.alphas_cumprod.float(), persistent=False)
        self.prediction_type = pipe.base.prediction_type

    def forward(self, x0, text, context_images, context_text, modalities, layout, weights, masks,
                added=None, context_added=None, generator_seed: int = 0):
        generator = torch.Generator().manual_seed(generator_seed)
        batch = x0.shape[0]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        timesteps = timesteps.to(x0.device)
        alpha = self.alphas_cumprod.to(x0.device)[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        state = None
        if context_images is not None:
            features = self.model.encode_contexts(context_images, context_text, modalities, context_added)
            state = ContextState.from_encoded(features, layout, weights, masks)
        prediction = self.model(noisy, timesteps, text, state, added)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        else:
            target = x0
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        if state is None:
            # No context in this batch: keep the adapter in the graph so every process reduces the same
            # parameters (data parallel) and backward works when only the adapter trains.
            loss = loss + 0.0 * sum(p.sum() for p in self.model.adapter.parameters())
        return loss


# -- the trainer --------------------------------------------------------------------------------------------

def lr_factor(warmup_steps: int, total_steps: int, schedule: str, step: int) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): a linear warmup, then constant, or a
    linear or cosine decay that reaches 0 after the last step. A short decay at the end of a run at a constant
    rate (a cooldown) settles weights that the constant rate keeps moving."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable parameters."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone().float() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, nn.Parameter]):
        for name, p in parameters.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, parameters: dict[str, nn.Parameter]):
        for name, p in parameters.items():
            p.copy_(self.shadow[name].to(p.dtype))


class Trainer:
    """Trains the adapter (and optionally LoRA or the whole base) of `pipe` on `dataset`.

    progress(step, total, loss) is called after each optimizer step; cancel() returning True stops the run
    after the current step with a checkpoint written.
    """

    def __init__(self, config: TrainConfig, pipe: InstructImagen, dataset, *,
                 progress: Callable[[int, int, float], None] | None = None,
                 cancel: Callable[[], bool] | None = None, accelerator=None, report: dict | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.config = config
        self.pipe = pipe
        self.dataset = dataset
        self.progress = progress
        self.cancel = cancel or (lambda: False)
        self.report = report or {}
        self.output_dir = Path(config.output_dir)
        if accelerator is None:
            from accelerate.state import AcceleratorState

            # One process may train several times (tests, the ComfyUI node) with different precisions.
            AcceleratorState._reset_state()
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.train.mixed_precision, gradient_accumulation_steps=config.train.grad_accum,
            cpu=pipe.device.type == "cpu",
            # A batch without contexts leaves the context layers unused; DDP must tolerate that.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.trainable = self._select_trainable()
        self.loss_module = DiffusionLoss(pipe)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, config.train.warmup_steps, config.train.steps, config.train.lr_schedule))
        self.ema = EMA(self.trainable, config.train.ema_decay) if config.train.ema_decay > 0 else None
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.step = 0

    # setup
    def _select_trainable(self) -> dict[str, nn.Parameter]:
        model = self.pipe.model
        mode = self.config.train.train_base
        model.unet.requires_grad_(False)
        for encoder in self.pipe.base.text_encoders:
            encoder.requires_grad_(False)
        if self.pipe.base.vae is not None:
            self.pipe.base.vae.requires_grad_(False)
        if mode == "lora":
            from peft import LoraConfig

            model.unet.add_adapter(LoraConfig(r=self.config.train.lora_rank, lora_alpha=self.config.train.lora_rank,
                                              init_lora_weights="gaussian",
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        elif mode == "full":
            model.unet.requires_grad_(True)
        model.adapter.requires_grad_(True)
        if self.config.train.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.unet.train()
        model.adapter.train()
        # Trainable parameters are kept in fp32 even when the frozen base runs in half precision.
        trainable = {f"adapter.{n}": p for n, p in model.adapter.named_parameters()}
        trainable.update({f"unet.{n}": p for n, p in model.unet.named_parameters() if p.requires_grad})
        if self.config.train.train_text_encoder:
            for prefix, encoder in self._text_encoders():
                encoder.requires_grad_(True)
                encoder.train()
                trainable.update({f"{prefix}.{n}": p for n, p in encoder.named_parameters()})
        for p in trainable.values():
            p.data = p.data.float()
        return trainable

    def _text_encoders(self):
        """(name, encoder) pairs, named as in a diffusers folder."""
        from ..loading import TEXT_ENCODER_NAMES

        return list(zip(TEXT_ENCODER_NAMES, self.pipe.base.text_encoders))

    def _make_optimizer(self):
        train = self.config.train
        params = list(self.trainable.values())
        if train.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=train.lr, relative_step=False, scale_parameter=False,
                             warmup_init=False, weight_decay=train.weight_decay)
        # foreach: one multi-tensor update instead of a Python loop over parameters (torch only defaults to it
        # on CUDA); on a CPU that loop was an eighth of a small model's step
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)

    # checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def state_dict(self) -> dict:
        return {
            "trainable": {n: p.detach() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "ema": None if self.ema is None else self.ema.shadow,
            "losses": list(self.losses),
            "train_seconds": self.train_seconds,
            "data_position": self.step * self.config.train.grad_accum,
            "rng": {"seed": self.config.train.seed, "scheme": "per-step generators seeded by (seed, step, micro, rank)"},
            "lr_schedule": self._lr_schedule(),
        }

    def _lr_schedule(self) -> dict:
        train = self.config.train
        return {"schedule": train.lr_schedule, "warmup_steps": train.warmup_steps, "steps": train.steps}

    def _check_lr_schedule(self, stored: dict | None) -> None:
        """A decaying rate spans the run's steps: resuming it over other steps would move the rate back up."""
        wanted = self._lr_schedule()
        if stored is None or "constant" == stored["schedule"] == wanted["schedule"] or stored == wanted:
            return
        describe = lambda s: (f"{s['schedule']} over {s['steps']} steps" if s["schedule"] != "constant"
                              else "constant") + f" after {s['warmup_steps']} warmup steps"
        raise TrainingError(f"resume: the checkpoint's learning rate is {describe(stored)}, this run's "
                            f"{describe(wanted)}; keep train.steps, train.lr_schedule and train.warmup_steps "
                            f"as they were, or start in another output_dir")

    def load_state_dict(self, step: int, state: dict):
        self._check_lr_schedule(state.get("lr_schedule"))  # absent from older checkpoints
        missing = next((n for n in self.trainable if n not in state["trainable"]), None)
        if missing is not None:
            raise TrainingError(f"resume: checkpoint lacks parameter {missing} (different train_base, "
                                f"train_text_encoder or adapter?)")
        unused = next((n for n in state["trainable"] if n not in self.trainable), None)
        if unused is not None:  # its training would be lost without a word
            raise TrainingError(f"resume: checkpoint trains {unused}, which this run does not (different "
                                f"train_base, train_text_encoder or adapter?)")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler_state = self.scheduler.state_dict()
        scheduler_state.update(state["scheduler"])
        self.scheduler.load_state_dict(scheduler_state)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        self.losses = [float(x) for x in state["losses"]]
        self.train_seconds = float(state.get("train_seconds", 0.0))  # absent from older checkpoints
        self.step = step

    def resume(self) -> bool:
        if self.accelerator.is_main_process:
            recover_checkpoints(self.checkpoint_dir)
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if not checkpoints:
            return False
        step, state = load_checkpoint(checkpoints[-1])
        self.load_state_dict(step, state)
        return True

    def save(self) -> Path:
        if not self.accelerator.is_main_process:
            return self.checkpoint_dir
        try:
            return save_checkpoint(self.checkpoint_dir, self.step, self.state_dict(), keep=self.config.checkpoint.keep)
        except OSError as error:
            raise TrainingError(f"checkpoint: could not write to {self.checkpoint_dir} ({error}); "
                                f"the previous checkpoint is intact") from None

    # the loop
    def run(self, resume: bool = False) -> TrainResult:
        with training_folder_lock(self.output_dir):
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        if resume:
            self.resume()
        config = self.config
        module, optimizer = self.accelerator.prepare(self.loss_module, self.optimizer)
        words = filler_words(self.pipe.base.tokenizers[0]) if config.train.p_filler_words > 0 else ()
        batches = StepBatches(self.dataset, config, rank=self.accelerator.process_index, words=words)
        start = self.step * config.train.grad_accum
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(batches, range(start, len(batches))), batch_size=None,
            num_workers=config.data.num_workers, collate_fn=lambda b: b)
        cancelled = False
        started, micro_losses = time.perf_counter(), []
        carried_seconds = self.train_seconds
        for index, examples in zip(range(start, len(batches)), loader):
            step, micro = divmod(index, config.train.grad_accum)
            with self.accelerator.accumulate(module):
                try:
                    loss = self._micro_step(module, examples, step, micro)
                    self.accelerator.backward(loss)
                except (MemoryError, RuntimeError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    if not is_out_of_memory(error):
                        raise
                    raise TrainingError(
                        f"out of memory at step {step + 1} (train.batch_size={config.train.batch_size}, "
                        f"data.resolution={config.data.resolution}); lower them, raise train.grad_accum or set "
                        f"train.gradient_checkpointing; the last checkpoint is intact") from None
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {float(loss)} at step {step + 1}; lower train.lr or use "
                                        f"train.mixed_precision=bf16; the last checkpoint is intact")
                micro_losses.append(float(loss.detach()))
                if self.accelerator.sync_gradients:
                    if config.train.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(list(self.trainable.values()), config.train.max_grad_norm)
                    optimizer.step()
                    self.scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if micro != config.train.grad_accum - 1:
                continue
            self.step = step + 1
            self.train_seconds = carried_seconds + time.perf_counter() - started
            if self.ema is not None:
                self.ema.update(self.trainable)
            self.losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            if self.progress is not None:
                self.progress(self.step, config.train.steps, self.losses[-1])
            if self.step % config.checkpoint.every == 0 or self.step == config.train.steps:
                self.save()
            if config.validation.every and self.step % config.validation.every == 0:
                self.validate()
            if self.cancel():
                self.save()
                cancelled = True
                break
        elapsed = time.perf_counter() - started
        adapter_path = self.export()
        # seconds: this run; train_seconds: every run that led to this step, resumed ones included
        self.report.update({"steps": self.step, "seconds": round(elapsed, 2),
                            "train_seconds": round(self.train_seconds, 2), "cancelled": cancelled,
                            "final_loss": self.losses[-1] if self.losses else None})
        self._write_report()
        return TrainResult(adapter_path, self.step, list(self.losses), cancelled, dict(self.report))

    def _micro_step(self, module, examples: list[ExampleTensors], step: int, micro: int):
        seed = int(step_rng(self.config.train.seed, step, micro, self.accelerator.process_index).integers(2**62))
        return self._loss(module, examples, seed)

    @torch.no_grad()
    def held_out_loss(self, examples: list, batch_size: int = 16, seed: int = 0) -> float:
        """Mean loss over fixed examples with fixed timesteps and noise: comparable before and after training,
        unlike the running training loss, whose draws change every step."""
        tensors = [example_to_tensors(e, self.config.data.resolution, self.config.data.resize_policy)
                   for e in examples]
        was_training = self.pipe.model.training
        self.pipe.model.eval()
        try:
            total = 0.0
            for start in range(0, len(tensors), batch_size):
                chunk = tensors[start:start + batch_size]
                total += float(self._loss(self.loss_module, chunk, seed + start)) * len(chunk)
        finally:
            self.pipe.model.train(was_training)
        return total / max(1, len(tensors))

    def _loss(self, module, examples: list[ExampleTensors], seed: int):
        pipe = self.pipe
        device = self.accelerator.device
        # the text encoders keep their graph only when they are trained (encoding images never does)
        encode_text = pipe.embed_text if self.config.train.train_text_encoder else pipe.encode_text
        x0 = pipe.to_model_space(torch.stack([e.target for e in examples]).to(device))
        text, pooled = encode_text([e.text for e in examples])
        added = pipe.added_cond(pooled, *examples[0].target.shape[-2:])
        layout, offset = [], 0
        for e in examples:
            layout.append(list(range(offset, offset + len(e.context_images))))
            offset += len(e.context_images)
        context_images = context_text = context_added = weights = masks = None
        modalities = [m for e in examples for m in e.modalities]
        if offset:
            context_images = pipe.to_model_space(torch.stack([i for e in examples for i in e.context_images]))
            context_text, context_pooled = encode_text([t for e in examples for t in e.context_texts])
            context_added = pipe.added_cond(context_pooled, *examples[0].target.shape[-2:])
            weights = torch.tensor([w for e in examples for w in e.weights], device=device)
            flat_masks = [m for e in examples for m in e.masks]
            if any(m is not None for m in flat_masks):
                ones = torch.ones_like(examples[0].target[0])
                masks = torch.stack([ones if m is None else m for m in flat_masks]).to(device)
        with self.accelerator.autocast():
            return module(x0, text, context_images, context_text, modalities, layout, weights, masks,
                          added, context_added, generator_seed=seed)

    # outputs
    def export(self) -> Path:
        """The final adapter (EMA weights when enabled), the loss curve and, for LoRA/full, the base weights."""
        path = self.output_dir / "adapter.safetensors"
        if not self.accelerator.is_main_process:
            return path
        try:
            self._export(path)
        except OSError as error:
            raise TrainingError(f"export: could not write to {self.output_dir} ({error}); the checkpoint of step "
                                f"{self.step} in {self.checkpoint_dir} is intact: free space and rerun with "
                                f"--resume to export it") from None
        return path

    def _export(self, path: Path):
        from ..adapter_io import save_adapter

        backup = None
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in self.trainable.items()}
            self.ema.copy_to(self.trainable)
        try:
            metadata = {"trained_steps": self.step, "stage": self.config.stage,
                        "train_base": self.config.train.train_base}
            save_adapter(self.pipe.model, path, metadata)
            if self.config.train.train_base != "adapter":
                self._save_base_weights()
        finally:
            if backup is not None:
                with torch.no_grad():
                    for n, p in self.trainable.items():
                        p.copy_(backup[n])
        save_loss_curve(self.losses, self.output_dir / "loss_curve.png")

    def _save_base_weights(self):
        """LoRA travels inside the adapter file; a fully fine-tuned base is written as a checkpoint of its own:
        a single-file SD/SDXL checkpoint (usable as --model and in ComfyUI; its text encoders in it too) or, for
        other bases, the UNet's weights in diffusers layout, and trained text encoders beside them."""
        if self.config.train.train_base != "full":
            return
        base = self.pipe.base
        if base.kind in ("sd1", "sd2", "sdxl"):
            from ..loading import export_single_file

            export_single_file(base, self.output_dir / "base_model.safetensors")
            return
        from safetensors.torch import save_file

        parts = [("base_unet", base.unet.state_dict())]
        if self.config.train.train_text_encoder:
            parts.append(("base_text_encoders", {f"{prefix}.{k}": v for prefix, encoder in self._text_encoders()
                                                 for k, v in encoder.state_dict().items()}))
        for name, state in parts:
            tmp = self.output_dir / f"{name}.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"train_base": "full"})
            tmp.replace(self.output_dir / f"{name}.safetensors")

    @torch.no_grad()
    def validate(self):
        from ..pipeline import save_images
        from ..instruction import load_instruction

        if not self.accelerator.is_main_process:
            return
        if self.config.validation.instruction:
            instruction = load_instruction(self.config.validation.instruction,
                                           known_modalities=self.pipe.known_modalities)
        else:
            instruction = self.dataset[0].instruction
        self.pipe.model.eval()
        try:
            size = self.config.data.resolution
            result = self.pipe.generate(instruction, seed=0, steps=self.config.validation.steps, width=size,
                                        height=size)
            save_images(result.images, self.output_dir / "samples" / f"step_{self.step:06d}.png")
        finally:
            self.pipe.model.train()

    def _write_report(self):
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "train_report.json").write_text(json.dumps(self.report, indent=2, default=str))


def save_loss_curve(losses: list[float], path: Path, size=(640, 360)) -> Path:
    """A plain loss-versus-step plot (log scale), drawn with PIL to keep plotting dependencies out."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 20, size[0] - 20, size[1] - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    values = [math.log10(max(v, 1e-12)) for v in losses if math.isfinite(v)]
    if len(values) >= 2:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        points = [(left + (right - left) * i / (len(values) - 1), bottom - (bottom - top) * (v - low) / span)
                  for i, v in enumerate(values)]
        draw.line(points, fill=(30, 90, 200), width=2)
        draw.text((5, top), f"{10 ** high:.3g}", fill=(0, 0, 0))
        draw.text((5, bottom - 10), f"{10 ** low:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 10), f"loss (log scale) over {len(losses)} steps", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
