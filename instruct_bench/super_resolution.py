"""The bundled super-resolution stage: its training on the benchmark's scenes, and its measurement.

Training pairs are the training split's in-domain examples: the 32x32 target the base model learns to draw, and
the same scene rendered at 128x128; the text is the example's instruction, embedded by the bundled base's text
encoder (the embeddings the stage is given at sampling time). Like Imagen's super-resolution models, the stage
trains on random crops (a quarter of each side here) and samples whole images: it is convolutional, and a crop
costs a sixteenth of a full image on a CPU.

The measurement (`measure`) samples the base on test examples of the control tasks, upsamples each result both
by the stage and bicubically, and scores both at 128x128 against the scene's own 128x128 truths (edge F1 and mask
IoU), and checks that the evaluator reads the stage's result, downscaled, as it reads the base's. It also upsamples
the true 32x32 scenes both ways: what the stage adds where the base's image is not in the way.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instruct_core.models import DEFAULT_MODEL_DIR, load_default
from instruct_core.pipeline import pil_to_tensor
from instruct_core.super_resolution import SuperResolution, SuperResolutionConfig
from instruct_core.train.checkpointing import list_checkpoints, load_checkpoint, save_checkpoint

from . import scenes
from .tasks import IN_DOMAIN_TASKS, make_split

HIGH_SIZE = 128
LOW_SIZE = 32
RECIPE = {"seed": 0, "examples_per_task": 400, "steps": 3000, "batch_size": 16, "crop": 32, "lr": 5e-4,
          "warmup_steps": 100, "text_dropout": 0.1, "residual": True, "residual_scale": 14.0}


def training_pairs(examples_per_task: int, seed: int = 0, tasks=IN_DOMAIN_TASKS, log=print):
    """(low (N, 3, 32, 32), high (N, 3, 128, 128)) in [-1, 1] and the N instruction texts, from the training
    split of every task in `tasks`."""
    lows, highs, texts = [], [], []
    started = time.time()
    for task in tasks:
        for example in make_split(task, "train", examples_per_task, seed=seed, size=LOW_SIZE):
            lows.append(pil_to_tensor(example.target))
            highs.append(pil_to_tensor(scenes.render(example.scene, HIGH_SIZE)))
            texts.append(example.instruction.text)
        log(f"super-resolution pairs: {task} done ({time.time() - started:.0f} s)")
    return torch.stack(lows) * 2 - 1, torch.stack(highs) * 2 - 1, texts


@torch.no_grad()
def embed_texts(pipe, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, L, D) embeddings; a text longer than one window of the encoder keeps its first window, so every row
    has one length (sampling passes the whole text: attention takes any length)."""
    length = pipe.base.tokenizers[0].model_max_length
    return torch.cat([pipe.encode_text(texts[i:i + batch])[0][:, :length].float().cpu()
                      for i in range(0, len(texts), batch)])


def random_crops(low: torch.Tensor, high: torch.Tensor, crop: int, factor: int, generator: torch.Generator):
    """The same random window of each low/high pair: `crop` pixels a side at high resolution."""
    cells = (high.shape[-1] - crop) // factor + 1
    rows = low.shape[0]
    ys = torch.randint(0, cells, (rows,), generator=generator).tolist()
    xs = torch.randint(0, cells, (rows,), generator=generator).tolist()
    small = crop // factor
    low_crops = torch.stack([low[i, :, y:y + small, x:x + small] for i, (y, x) in enumerate(zip(ys, xs))])
    high_crops = torch.stack([high[i, :, y * factor:y * factor + crop, x * factor:x * factor + crop]
                              for i, (y, x) in enumerate(zip(ys, xs))])
    return low_crops, high_crops


def train(stage: SuperResolution, low, high, text, null_text, recipe: dict = RECIPE, work_dir: Path | None = None,
          log=print, progress=None) -> dict:
    """Train `stage` in place; with `work_dir`, checkpoints there every 250 steps and resumes from the last."""
    generator = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(stage.unet.parameters(), lr=recipe["lr"], weight_decay=0.0)
    steps, warmup = recipe["steps"], recipe["warmup_steps"]
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, losses, seconds = 0, [], 0.0
    checkpoints = None if work_dir is None else Path(work_dir) / "checkpoints"
    saved = [] if checkpoints is None else list_checkpoints(checkpoints)
    if saved:  # safetensors and JSON, as the trainer's own checkpoints: nothing is unpickled
        _, state = load_checkpoint(saved[-1])
        stage.unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        log(f"super-resolution: resumed at step {start}")
    stage.unet.train()
    began = time.time() - seconds
    for step in range(start, steps):
        index = torch.randint(0, low.shape[0], (recipe["batch_size"],), generator=generator)
        low_crop, high_crop = random_crops(low[index], high[index], recipe["crop"], stage.factor, generator)
        embeddings = text[index].clone()
        dropped = torch.rand(len(index), generator=generator) < recipe["text_dropout"]
        embeddings[dropped] = null_text
        loss = stage.training_loss(low_crop, high_crop, embeddings, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
        if (step + 1) % 50 == 0:
            log(f"super-resolution step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f} "
                f"({time.time() - began:.0f} s)")
        if checkpoints is not None and ((step + 1) % 250 == 0 or step + 1 == steps):
            save_checkpoint(checkpoints, step + 1, {
                "unet": stage.unet.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "step": step + 1,
                "losses": losses, "seconds": time.time() - began}, keep=1)
    stage.unet.eval()
    return {"steps": steps, "seconds": round(time.time() - began, 1),
            "loss_first_50": round(float(np.mean(losses[:50])), 5), "loss_last_50": round(float(np.mean(losses[-50:])), 5)}


def new_stage(recipe: dict, text_width: int) -> SuperResolution:
    """A freshly initialised stage as `recipe` trains it, reading text embeddings `text_width` wide."""
    config = SuperResolutionConfig(unet={**SuperResolutionConfig().unet, "cross_attention_dim": text_width},
                                   residual=recipe["residual"], residual_scale=recipe["residual_scale"])
    return SuperResolution.build(config, seed=recipe["seed"])


def build(folder: Path = DEFAULT_MODEL_DIR, work_dir: Path = Path("runs/super_resolution"), recipe: dict = RECIPE,
          log=print) -> dict:
    """Train the bundled super-resolution stage from scratch (resuming an interrupted run) and save it beside
    the base in `folder`; returns what was measured."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_default(device="cpu", folder=folder, super_resolution=False)
    low, high, texts = training_pairs(recipe["examples_per_task"], recipe["seed"], log=log)
    text = embed_texts(pipe, texts)
    null_text = embed_texts(pipe, [""])[0]
    stage = new_stage(recipe, int(text.shape[-1]))
    measured = train(stage, low, high, text, null_text, recipe, work_dir, log=log)
    measured["recipe"] = recipe
    stage.save(folder, {"build": json.dumps(measured)})
    return measured


MEASURED_TASKS = ("edge_to_image", "mask_to_image", "depth_to_image", "text_to_image")


def _bicubic(image, size: int):
    from PIL import Image

    return image.resize((size, size), Image.Resampling.BICUBIC)


def _readings(output, row: int) -> dict:
    """What the evaluator reads in one image: per cell, occupied and, where occupied, shape and colour."""
    occupied = output.occupied()[row]
    return {"occupied": occupied, "shape": output.shape[row].argmax(-1), "colour": output.colour[row].argmax(-1)}


def _agreement(a: dict, b: dict) -> float:
    """1 when two readings agree on which cells hold an object and, in each, on its shape and colour."""
    if not np.array_equal(a["occupied"], b["occupied"]):
        return 0.0
    cells = a["occupied"]
    return float(np.array_equal(a["shape"][cells], b["shape"][cells])
                 and np.array_equal(a["colour"][cells], b["colour"][cells]))


def measure(tasks=MEASURED_TASKS, examples: int = 48, seed: int = 1234, folder: Path = DEFAULT_MODEL_DIR,
            log=print) -> dict:
    """Per task: edge F1 (control tasks with edges in their scores: all here) and mask IoU at 128x128 of the
    stage's result and of the bicubic-upscaled base image against the scene's 128x128 truths, the evaluator's
    agreement between the base image and the stage's (downscaled by the evaluator), sampling times, and edge F1 of
    both upscalings of the true 32x32 scenes."""
    from instruct_core.guidance import Conditioning, GuidanceConfig
    from instruct_core.pipeline import tensor_to_pil

    from .evaluation import EvalSettings, bootstrap_interval, load_evaluator
    from .metrics import edge_f1, extract_edges, mask_iou

    settings = EvalSettings(examples_per_task=examples, seed=seed)
    pipe = load_default(device="cpu", folder=folder)
    stage = pipe.super_resolution
    evaluator = load_evaluator()
    guidance = GuidanceConfig(settings.text_scale, settings.context_scale)
    results: dict = {"settings": {"examples": examples, "seed": seed, "base_steps": settings.steps,
                                  "stage": {"steps": stage.config.steps, "sampler": stage.config.sampler,
                                            "schedule": stage.config.schedule,
                                            "noise_level": stage.config.noise_level,
                                            "denoise": stage.config.denoise}},
                     "tasks": {}}
    for task in tasks:
        chunk = make_split(task, "test", examples, seed=seed, size=LOW_SIZE)
        started = time.perf_counter()
        cond = Conditioning.concat([pipe.encode_instruction(e.instruction, (LOW_SIZE, LOW_SIZE)) for e in chunk])
        result = pipe.sample(cond, seed=seed, steps=settings.steps, sampler=settings.sampler,
                             schedule=settings.schedule, guidance=guidance, width=LOW_SIZE, height=LOW_SIZE,
                             upscale=False)
        base_seconds = time.perf_counter() - started
        started = time.perf_counter()
        upscaled = stage.upscale(result.images, cond.text, seed=seed)
        stage_seconds = time.perf_counter() - started
        base_images = [tensor_to_pil(image) for image in result.images]
        stage_images = [tensor_to_pil(image) for image in upscaled]
        bicubic_images = [_bicubic(image, HIGH_SIZE) for image in base_images]
        true_low = torch.stack([pil_to_tensor(example.target) for example in chunk])
        true_stage = [tensor_to_pil(image) for image in stage.upscale(true_low, cond.text, seed=seed)]
        true_bicubic = [_bicubic(example.target, HIGH_SIZE) for example in chunk]
        scores: dict[str, list[float]] = {name: [] for name in (
            "edge_f1_stage", "edge_f1_bicubic", "mask_iou_stage", "mask_iou_bicubic", "edge_f1_true_input_stage",
            "edge_f1_true_input_bicubic")}
        for example, *images in zip(chunk, stage_images, bicubic_images, true_stage, true_bicubic):
            truth = np.asarray(scenes.render_edges(example.scene, HIGH_SIZE)) > 0
            for name, image in zip(("stage", "bicubic", "true_input_stage", "true_input_bicubic"), images):
                pixels = np.asarray(image, dtype=np.float32)
                scores[f"edge_f1_{name}"].append(edge_f1(extract_edges(pixels, example.scene, HIGH_SIZE), truth))
                if not name.startswith("true_input"):
                    scores[f"mask_iou_{name}"].append(mask_iou(pixels, example.scene, HIGH_SIZE))
        base_read = evaluator.predict(base_images)
        stage_read = evaluator.predict(stage_images)
        agreement = [_agreement(_readings(base_read, i), _readings(stage_read, i)) for i in range(len(chunk))]
        summary = {name: bootstrap_interval(values) for name, values in scores.items()}
        for metric in ("edge_f1", "mask_iou", "edge_f1_true_input"):
            gain = np.asarray(scores[f"{metric}_stage"]) - np.asarray(scores[f"{metric}_bicubic"])
            summary[f"{metric}_gain"] = bootstrap_interval(gain)
        summary["evaluator_agreement"] = bootstrap_interval(agreement)
        summary["seconds_per_image"] = {"base": base_seconds / len(chunk), "stage": stage_seconds / len(chunk)}
        summary["seconds_one_image"] = _one_image_seconds(pipe, chunk[0], settings, guidance)
        results["tasks"][task] = summary
        log(f"{task}: edge F1 {summary['edge_f1_stage'][0]:.3f} vs bicubic {summary['edge_f1_bicubic'][0]:.3f}, "
            f"mask IoU {summary['mask_iou_stage'][0]:.3f} vs {summary['mask_iou_bicubic'][0]:.3f}, agreement "
            f"{summary['evaluator_agreement'][0]:.3f}; {base_seconds:.1f} s base, {stage_seconds:.1f} s stage")
    return results


def _one_image_seconds(pipe, example, settings, guidance, repeats: int = 3) -> dict:
    """Median seconds of the base's sampling of one image and of the stage on its result."""
    cond = pipe.encode_instruction(example.instruction, (LOW_SIZE, LOW_SIZE))
    base, stage = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        result = pipe.sample(cond, seed=repeat, steps=settings.steps, sampler=settings.sampler,
                             schedule=settings.schedule, guidance=guidance, width=LOW_SIZE, height=LOW_SIZE,
                             upscale=False)
        base.append(time.perf_counter() - started)
        started = time.perf_counter()
        pipe.super_resolution.upscale(result.images, cond.text, seed=repeat)
        stage.append(time.perf_counter() - started)
    return {"base": float(np.median(base)), "stage": float(np.median(stage))}


def _interval(value) -> str:
    mean, low, high = value
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def results_page(results: dict, command: str, commit: str, machine: str) -> str:
    """The measurement as a Markdown page: the command, the commit, the machine, one table."""
    settings = results["settings"]
    stage = settings["stage"]
    lines = [
        "# The super-resolution stage",
        "",
        "The bundled model's second stage (32x32 to 128x128) against bicubic upscaling of the same base images, on "
        f"{settings['examples']} test examples per task (test split seed {settings['seed']}); every number is a "
        "mean with its 95% bootstrap interval. Edge F1 (1-pixel tolerance) and mask IoU are measured at 128x128 "
        "against the scene rendered at 128x128; *gain* is the stage's score minus bicubic's, per example. "
        "*Agreement* is the share of examples where the evaluator, reading the stage's image downscaled to "
        "32x32, sees objects in the same cells with the same shapes and colours as in the base image.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| commit | {commit} |",
        f"| machine | {machine} |",
        f"| base sampling | {settings['base_steps']} steps, as in RESULTS.md |",
        f"| stage sampling | {stage['sampler']}, {stage['schedule']}, {stage['steps']} steps, noise level "
        f"{stage['noise_level']}, denoise {stage.get('denoise', 1.0)} |",
        "",
        "| task | edge F1 stage | edge F1 bicubic | gain | mask IoU stage | mask IoU bicubic | gain | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, summary in results["tasks"].items():
        lines.append("| " + " | ".join([
            task, _interval(summary["edge_f1_stage"]), _interval(summary["edge_f1_bicubic"]),
            _interval(summary["edge_f1_gain"]), _interval(summary["mask_iou_stage"]),
            _interval(summary["mask_iou_bicubic"]), _interval(summary["mask_iou_gain"]),
            _interval(summary["evaluator_agreement"])]) + " |")
    lines += ["", "Sampling time on the machine above, in seconds per image: in a batch of the task's examples, and "
              "for one image alone (median of 3).", "",
              "| task | batch: base | batch: stage | one image: base | one image: stage |", "|---|---|---|---|---|"]
    for task, summary in results["tasks"].items():
        batch, one = summary["seconds_per_image"], summary["seconds_one_image"]
        lines.append(f"| {task} | {batch['base']:.3f} | {batch['stage']:.3f} | {one['base']:.3f} | "
                     f"{one['stage']:.3f} |")
    lines += ["", "The same upscaling of the true 32x32 scenes instead of the base's images (edge F1 at 128x128): what "
              "the stage adds where the base's image is not in the way.", "",
              "| task | edge F1 stage | edge F1 bicubic | gain |", "|---|---|---|---|"]
    for task, summary in results["tasks"].items():
        lines.append(f"| {task} | {_interval(summary['edge_f1_true_input_stage'])} | "
                     f"{_interval(summary['edge_f1_true_input_bicubic'])} | "
                     f"{_interval(summary['edge_f1_true_input_gain'])} |")
    return "\n".join(lines) + "\n"
