"""The benchmark evaluation behind docs/RESULTS.md: every task, in-domain and zero-shot, for several models.

Models ("variants"), all starting from the default model's pretrained base:
    full          pretraining and its cooldown + stage 1 + stage 2 and its focus and cooldown phases (the bundled
                  default model)
    no_stage1     stage 2 (on stage 1's budget too) and the same later phases: the paper's ablation of
                  retrieval-augmented training
    text_only     the pretrained base with no trained adapter: it follows the text alone (context layers
                  start at zero)
    single:<task> stage 2 on one task only (a one-task mix)
Where the recipe's stages train the base too, each variant carries its own base (`default_model.save_variant`)
and text_only is the base as pretraining left it.
Each example is generated once per variant with the same seed; scores come from `metrics`. Depth examples are
generated a second time, with the same seed, with the overlapping objects' depths exchanged (`tasks.swap_depths`),
for `metrics.depth_swap`: whether the model puts in front what the depth map says. Intervals
are 95% percentile bootstrap intervals of the mean over examples (1000 resamples, seeded).
Given a cache folder, each variant's score on each task is kept there under a key of everything it depends on
(the settings, the weights the variant loaded, the evaluator, this package's code), so an interrupted
evaluation goes on and a variant retrained alone is the only one scored again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instruct_core.errors import MissingFileError
from instruct_core.guidance import Conditioning, GuidanceConfig
from instruct_core.models import DEFAULT_TEXT_SCALE

from .build_default import DEFAULT_DIR, evaluator_file

EVALUATOR_FILE = evaluator_file(DEFAULT_DIR)
SINGLE_TASKS = ("edge_to_image", "subject")
DEPTH_SWAP_TASKS = ("depth_to_image",)


@dataclass
class EvalSettings:
    examples_per_task: int = 48
    seed: int = 1234
    steps: int = 12
    sampler: str = "dpmpp_2m"
    schedule: str = "karras_capped"
    text_scale: float = DEFAULT_TEXT_SCALE
    context_scale: float = GuidanceConfig.context_scale
    batch_size: int = 32
    split: str = "test"  # "train" to choose settings without looking at the test split


def variant_pipe(variant: str, folder: Path = DEFAULT_DIR):
    """An InstructImagen for an evaluation variant of the default model in `folder`. A variant whose weight file
    is missing is an error naming the file, never another model in its place."""
    from instruct_core.context_unet import ContextAdapterConfig

    from .build_default import (ablations_dir, is_variant_file, load_default, load_variant, pretrained_base_file,
                                trains_base)

    if variant == "full":
        return load_default(device="cpu", folder=folder, super_resolution=False)
    config = json.loads((folder / "config.json").read_text())
    if variant == "text_only":
        pretrained = pretrained_base_file(folder)
        if pretrained.is_file():  # stages 1 and 2 trained the base too: the pretrained one, untrained adapter
            return load_variant(pretrained, device="cpu", folder=folder)
        if trains_base(config.get("build", {}).get("recipe", {})):
            raise MissingFileError(f"variant text_only: {pretrained} is missing (the model's stages trained its "
                                   f"base, so its own base is not the pretrained one); run `python -m instruct_bench "
                                   f"build-default` first")
        adapter_config = ContextAdapterConfig.from_dict(config["adapter_config"])
        return load_default(device="cpu", adapter_config=adapter_config, folder=folder, super_resolution=False)
    path = ablations_dir(folder) / f"{variant.replace(':', '_')}.safetensors"
    if not path.is_file():
        raise MissingFileError(f"variant {variant}: {path} is missing; run `python -m instruct_bench build-default "
                               f"--phases ablations` first")
    if is_variant_file(path):
        return load_variant(path, device="cpu", folder=folder)
    return load_default(device="cpu", adapter=str(path), folder=folder, super_resolution=False)


def load_evaluator():
    from .metrics import Evaluator

    if not EVALUATOR_FILE.is_file():
        raise MissingFileError(f"evaluator: {EVALUATOR_FILE} is missing; run `python -m instruct_bench build-default "
                               f"--phases evaluator`")
    return Evaluator.load(EVALUATOR_FILE)


@torch.no_grad()
def generate_for(pipe, examples, settings: EvalSettings) -> list:
    """One image per example, batched: the instructions are encoded one by one and sampled together."""
    from instruct_core.pipeline import tensor_to_pil

    guidance = GuidanceConfig(settings.text_scale, settings.context_scale)
    images = []
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start:start + settings.batch_size]
        size = chunk[0].target.width
        cond = Conditioning.concat([pipe.encode_instruction(e.instruction, (size, size)) for e in chunk])
        result = pipe.sample(cond, seed=settings.seed + start, steps=settings.steps, sampler=settings.sampler,
                             schedule=settings.schedule, guidance=guidance, width=size, height=size)
        images.extend(tensor_to_pil(image) for image in result.images)
    return images


def score_task(pipe, task: str, examples, settings: EvalSettings, evaluator, generate=generate_for) -> dict:
    """{metric: [mean, low, high]} of `pipe` on the examples of one task; `generate(pipe, examples, settings)`
    gives their images (`generate_for` unless a diagnosis samples another way)."""
    from .metrics import score_batch

    images = generate(pipe, examples, settings)
    scores = score_batch(examples, images, evaluator)
    if task in DEPTH_SWAP_TASKS:
        for score, value in zip(scores, depth_swap_scores(pipe, examples, images, settings, generate)):
            score["depth_swap"] = value
    summary = {}
    for metric in sorted({k for s in scores for k, v in s.items() if isinstance(v, float)}):
        values = [s[metric] for s in scores if isinstance(s.get(metric), float)]
        summary[metric] = [round(x, 4) for x in bootstrap_interval(values, seed=settings.seed)]
    return summary


def depth_swap_scores(pipe, examples, images, settings: EvalSettings, generate=generate_for) -> list[float | None]:
    """`metrics.depth_swap` per example: its image against the one generated for it with its overlapping objects'
    depths exchanged. Both are sampled in the same batches with the same seeds, so only the depth map differs;
    an example without overlapping objects is generated unchanged and scores None."""
    from .metrics import depth_swap
    from .tasks import swap_depths

    swapped = [swap_depths(e) if has_overlapping_objects(e) else e for e in examples]
    swapped_images = generate(pipe, swapped, settings)
    return [depth_swap(image, e.scene, other, s.scene) if s is not e else None
            for e, image, s, other in zip(examples, images, swapped, swapped_images)]


def has_overlapping_objects(example) -> bool:
    from .scenes import overlaps

    return bool(np.triu(overlaps(example.scene, example.target.height), 1).any())


def bootstrap_interval(values, seed: int = 0, resamples: int = 1000) -> tuple[float, float, float]:
    """Mean and its 95% percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate(variants: list[str], tasks: list[str], settings: EvalSettings, log=print, jobs: int = 1,
             cache: Path | None = None, reused: list | None = None, progress=None) -> dict:
    """Scores of every variant on every task: {variant: {task: {metric: [mean, low, high]}}}. With `jobs` > 1
    the variants are scored in that many processes of one thread each (the same numbers: every draw is seeded).
    With a `cache` folder, scores kept there under the same key are reused and new ones are kept; `reused`,
    if given, collects the (variant, task) pairs read from the cache. `progress(n)`, if given, is called with
    the number of (variant, task) scores just finished."""
    if jobs > 1 and len(variants) > 1:
        return _evaluate_in_processes(variants, tasks, settings, jobs, cache, reused, progress)
    from .tasks import make_split

    evaluator = load_evaluator()
    scorer = scorer_digest() if cache is not None else None
    splits = {task: make_split(task, settings.split, settings.examples_per_task, seed=settings.seed) for task in tasks}
    results: dict = {}
    for variant in variants:
        pipe = variant_pipe(variant)
        weights = weights_digest(pipe) if cache is not None else None
        results[variant] = {}
        for task in tasks:
            started = time.perf_counter()
            key = score_key(weights, scorer, task, settings) if cache is not None else None
            summary = _cached(cache, variant, task, key)
            if summary is None:
                summary = score_task(pipe, task, splits[task], settings, evaluator)
                if cache is not None:
                    _keep(cache, variant, task, key, summary)
                took = f"{time.perf_counter() - started:.1f}s"
            else:
                took = "kept"
                if reused is not None:
                    reused.append((variant, task))
            results[variant][task] = summary
            log(f"{variant:>20} {task:<18} O={summary['overall'][0]:.3f} SC={summary['sc'][0]:.3f} "
                f"PQ={summary['pq'][0]:.3f} ({took})")
            if progress is not None:
                progress(1)
    return results


def weights_digest(pipe) -> str:
    """sha256 of the weights a variant samples with: its UNet and adapter, and the text encoders."""
    import hashlib

    digest = hashlib.sha256()
    modules = [("model", pipe.model)] + [(f"text_encoder_{i}", m) for i, m in enumerate(pipe.base.text_encoders)]
    for name, module in modules:
        for key, value in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scorer_digest() -> str:
    """sha256 of what scores every variant alike: the evaluator file and the package's code (benchmark, metrics,
    sampler)."""
    import hashlib

    digest = hashlib.sha256(EVALUATOR_FILE.read_bytes())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def score_key(weights: str, scorer: str, task: str, settings: EvalSettings) -> str:
    """sha256 of everything a variant's score on a task depends on: the weights it sampled with
    (`weights_digest`), the evaluator and code that scored it (`scorer_digest`), the task and the settings."""
    import hashlib

    return hashlib.sha256(json.dumps({"task": task, "settings": settings.__dict__, "weights": weights,
                                      "scorer": scorer}, sort_keys=True).encode()).hexdigest()


def _score_file(cache: Path, variant: str, task: str) -> Path:
    return cache / variant.replace(":", "_") / f"{task}.json"


def _cached(cache: Path | None, variant: str, task: str, key: str | None) -> dict | None:
    if cache is None:
        return None
    path = _score_file(cache, variant, task)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or a half-written one: score again
        return None
    return stored.get("summary") if isinstance(stored, dict) and stored.get("key") == key else None


def _keep(cache: Path, variant: str, task: str, key: str, summary: dict) -> None:
    path = _score_file(cache, variant, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"key": key, "summary": summary}))
    partial.replace(path)  # a score file is whole or absent


def _evaluate_in_processes(variants: list[str], tasks: list[str], settings: EvalSettings, jobs: int,
                           cache: Path | None, reused: list | None, progress=None) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(min(jobs, len(variants)), mp_context=context, initializer=_one_thread) as pool:
        parts = [pool.submit(_evaluate_one, (variant, tasks, settings, cache)) for variant in variants]
        merged = {}
        for finished in as_completed(parts):
            part, part_reused = finished.result()
            merged.update(part)
            if reused is not None:
                reused.extend(part_reused)
            if progress is not None:
                progress(len(tasks))
    return {variant: merged[variant] for variant in variants}


def _one_thread():
    torch.set_num_threads(1)


def _evaluate_one(job) -> dict:
    variant, tasks, settings, cache = job
    reused: list = []
    results = evaluate([variant], tasks, settings, log=lambda line: print(line, flush=True), cache=cache,
                       reused=reused)
    return results, reused


KEY_METRICS = ("edge_f1", "mask_iou", "depth_order", "depth_swap", "subject", "style", "hole", "text", "colour")
# What the text and the depth map ask for beyond the layout, each in its own table
FOLLOWING_METRICS = ("colour", "depth_order", "depth_swap")


def _cell(summary: dict, metric: str) -> str:
    if metric not in summary:
        return "–"
    mean, low, high = summary[metric]
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def results_table(results: dict, tasks: list[str], metric: str) -> str:
    variants = list(results)
    lines = ["| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_cell(results[v][task], metric) for v in variants) + " |")
    return "\n".join(lines)


def components_table(results: dict, tasks: list[str], metric_names: tuple[str, ...] = KEY_METRICS) -> str:
    """A row per task and metric (of `metric_names`) that some variant has for the task."""
    variants = list(results)
    lines = ["| task | metric | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for task in tasks:
        for metric in metric_names:
            if any(metric in results[v][task] for v in variants):
                lines.append(f"| {task} | {metric} | " + " | ".join(_cell(results[v][task], metric)
                                                                    for v in variants) + " |")
    return "\n".join(lines)


def plot_overall(results: dict, tasks: list[str], path: Path) -> Path:
    """Grouped bars of the overall score with interval whiskers (PIL, no plotting dependency)."""
    from PIL import Image, ImageDraw

    variants = list(results)
    colours = [(60, 110, 200), (220, 120, 40), (120, 120, 120), (60, 170, 90), (170, 60, 160), (200, 60, 60)]
    width, height, left, bottom = 120 + 70 * len(tasks) * max(1, len(variants)) // 2, 420, 50, 330
    image = Image.new("RGB", (max(width, 600), height), "white")
    draw = ImageDraw.Draw(image)
    draw.line((left, 20, left, bottom), fill=(0, 0, 0))
    draw.line((left, bottom, image.width - 10, bottom), fill=(0, 0, 0))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - 20)
        draw.text((5, y - 6), f"{tick:.2f}", fill=(0, 0, 0))
        draw.line((left - 3, y, left, y), fill=(0, 0, 0))
    group = (image.width - left - 20) / max(1, len(tasks))
    bar = group * 0.8 / max(1, len(variants))
    for t, task in enumerate(tasks):
        x0 = left + 10 + t * group
        for v, variant in enumerate(variants):
            mean, low, high = results[variant][task]["overall"]
            x = x0 + v * bar
            y = lambda value: bottom - value * (bottom - 20)
            draw.rectangle((x, y(mean), x + bar - 2, bottom), fill=colours[v % len(colours)])
            draw.line((x + bar / 2 - 1, y(low), x + bar / 2 - 1, y(high)), fill=(0, 0, 0), width=1)
        draw.text((x0, bottom + 5 + 12 * (t % 2)), task[:14], fill=(0, 0, 0))
    for v, variant in enumerate(variants):
        draw.rectangle((left + 10 + 150 * v, 380, left + 22 + 150 * v, 392), fill=colours[v % len(colours)])
        draw.text((left + 28 + 150 * v, 380), variant, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def compare(results: dict, variant: str, baseline: str, task: str, metric: str = "overall") -> tuple[float, str]:
    """`variant` minus `baseline` on a task's mean, and whether their 95% intervals separate."""
    mean, low, high = results[variant][task][metric]
    base_mean, base_low, base_high = results[baseline][task][metric]
    verdict = "above" if low > base_high else "below" if high < base_low else "overlap"
    return mean - base_mean, verdict


def summary_table(results: dict, tasks: list[str], baselines=("text_only", "no_stage1")) -> str:
    """The full model against each baseline on every context task: difference in O and interval verdict."""
    present = [b for b in baselines if b in results and "full" in results]
    context_tasks = [t for t in tasks if t != "text_to_image"]
    if not present or not context_tasks:
        return ""
    lines = ["| task | " + " | ".join(f"full − {b}" for b in present) + " |",
             "|---|" + "---|" * len(present)]
    counts = {b: {"above": 0, "overlap": 0, "below": 0} for b in present}
    for task in context_tasks:
        cells = []
        for baseline in present:
            difference, verdict = compare(results, "full", baseline, task)
            counts[baseline][verdict] += 1
            cells.append(f"{difference:+.3f} ({verdict})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    totals = "; ".join(f"against {b}: above on {c['above']}, overlapping on {c['overlap']}, below on {c['below']} "
                       f"of {len(context_tasks)}" for b, c in counts.items())
    return "\n".join(lines) + "\n\n" + f"Separated 95% intervals, {totals}."


def _reuse_note(reused: int, total: int) -> str:
    if not reused:
        return ""
    return f" with {reused} of {total} scores read from the cache, computed by earlier runs"


def source_commit() -> str:
    """The checkout's commit, marked when files differ from it: the code and weights a page was made with."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{commit}`" + (" with uncommitted changes" if changed else "")


def write_results(results: dict, settings: EvalSettings, in_domain: list[str], zero_shot: list[str], path: Path,
                  command: str, seconds: float, reused: int = 0) -> Path:
    """docs/RESULTS.md's text, tables and plots, and results.json beside it. `seconds` is the run's time;
    `reused` says how many of its scores came from a cache, so that time is not read as the cost of them all."""
    import platform

    import diffusers

    plots = []
    for name, tasks in (("in_domain", in_domain), ("zero_shot", zero_shot)):
        if tasks:
            plots.append(plot_overall(results, tasks, path.parent / f"results_{name}.png"))
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    text = [
        "# Results on the procedural benchmark",
        "",
        "The bundled default model against its baselines on the project's procedural benchmark: every number is "
        f"a mean over {settings.examples_per_task} {settings.split} examples per task with its 95% bootstrap "
        "interval. How the model and its numbers came to be is in CHANGELOG.md; the raw scores are in "
        "`results.json` beside this page.",
        "",
        "## How these numbers were produced",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| commit | {source_commit()} |",
        f"| machine | {platform.machine()} CPU, torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"the run took {seconds / 60:.1f} minutes"
        f"{_reuse_note(reused, sum(len(by_task) for by_task in results.values()))} |",
        f"| examples | {settings.examples_per_task} {settings.split} examples per task, {settings.split} split "
        f"seed {settings.seed} |",
        f"| sampling | {settings.sampler} with the {settings.schedule} schedule, {settings.steps} steps, text and "
        f"context guidance {settings.text_scale} / {settings.context_scale}, per-batch sampling seeds "
        f"{settings.seed} + offset |",
        "| intervals | 95% bootstrap over the examples |",
        "",
        "Scores (see `instruct_bench/metrics.py`): SC is the task's semantic consistency in [0, 1] "
        "(text alignment, control fidelity, subject and style fidelity, hole agreement, as the task needs), "
        "PQ the evaluator's probability that the image is a clean render, and overall O = √(SC·PQ) as in "
        "Instruct-Imagen.",
        "",
        "Models, each starting from the same pretrained base: **full** = the bundled default model (pretraining, "
        "which ends with a cooldown, + "
        "stage 1 + stage 2, which ends with a focus phase on the subject, style and inpainting tasks and a cooldown "
        "whose learning rate decays to zero, then a subject phase, a wording phase that trains the text encoder "
        "too and an overlap phase on depth scenes whose objects overlap); **no_stage1** = stage 2 alone, given "
        "stage 1's steps too, with the same focus, cooldown, subject, wording and overlap phases; **text_only** = "
        "the pretrained base with its text encoder and an untrained adapter (it follows the text alone); **single_*** = stage 2 on one task. Each samples with its own text "
        "encoder. Stages 1 and 2 train the adapter and the base UNet as the recipe says (`train_base`, in the "
        "build below).",
        "",
        "## The full model against its baselines",
        "",
        "Overall score O of the full model minus the baseline's, per context task; *above* / *below* when the two "
        "95% intervals do not overlap.",
        "",
        summary_table(results, in_domain + zero_shot),
        "",
        "## Overall score O, in-domain tasks",
        "",
        results_table(results, in_domain, "overall"),
        "",
        "![in-domain](results_in_domain.png)" if in_domain else "",
        "",
    ]
    if zero_shot:
        text += ["## Overall score O, zero-shot compositions (never trained)", "",
                 "Held-out subjects and styles, combined in ways no training example shows.", "",
                 results_table(results, zero_shot, "overall"), "", "![zero-shot](results_zero_shot.png)", ""]
    text += ["## Named colour and depth order", "",
             "**colour**: the share of plain objects whose named colour the evaluator reads at their place (every "
             "task whose text names colours that no style repaints; within text alignment where the task has it). "
             "**depth_order**: in depth-to-image, the share of the pixels where two objects overlap that show the "
             "nearer one. **depth_swap**: the share of depth examples where the image for the depth map and the "
             "image for the same instruction with the two overlapping objects' depths exchanged (same seed) both "
             "show the nearer object in front: 0 for a model that draws one order whatever the map says.", "",
             components_table(results, in_domain + zero_shot, FOLLOWING_METRICS), "",
             "## Semantic consistency SC", "", results_table(results, in_domain + zero_shot, "sc"), "",
             "## Components", "", components_table(results, in_domain + zero_shot), "",
             "## How the default model was trained", "", "```json", json.dumps(config.get("build", {}), indent=2),
             "```", ""]
    path.write_text("\n".join(text))
    (path.parent / "results.json").write_text(json.dumps({"settings": settings.__dict__, "results": results},
                                                          indent=2))
    return path
