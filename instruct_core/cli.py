"""Command line: `python -m instruct_core generate ...` (also installed as `instruct-imagen`).

Bad input ends with exit code 2 and one line naming what is wrong; no traceback. A fault of the machine
rather than the input (a full disk, a permission) ends with exit code 1 and one line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# torch generators take seeds in [-2**63, 2**64 - 1]; generation also uses seed + 1
SEED_RANGE = (-(2**63), 2**64 - 2)


class UsageError(ValueError):
    """A command-line value that cannot be used."""


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="base model: a single-file .safetensors checkpoint, a diffusers folder, 'default' "
                             "(the bundled model, or 'tiny' until one is bundled) or 'tiny' (small, random weights)")
    parser.add_argument("--adapter", default=None, help="context adapter .safetensors (default: a fresh one)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))


def build_parser() -> argparse.ArgumentParser:
    from .guidance import GUIDANCE_MODES, GuidanceConfig
    from .samplers import SAMPLERS
    from .schedules import DEFAULT_SCHEDULE, SCHEDULES

    parser = argparse.ArgumentParser(prog="instruct-imagen", description="Multi-modal instruction following "
                                     "image generation (Instruct-Imagen) on diffusers UNets.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="follow one instruction JSON and write PNG images")
    gen.add_argument("--instruction", required=True, help="instruction JSON file (format version 1)")
    gen.add_argument("--out", required=True, help="output PNG; with --batch > 1, NAME_0.png, NAME_1.png, ...")
    _add_model_arguments(gen)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--sampler", default="dpmpp_2m", choices=tuple(SAMPLERS))
    gen.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=tuple(SCHEDULES))
    gen.add_argument("--cfg-text", type=float, default=5.0, help="text guidance scale s_t")
    gen.add_argument("--cfg-context", type=float, default=GuidanceConfig.context_scale,
                     help="context guidance scale s_c")
    gen.add_argument("--guidance", default="dual", choices=GUIDANCE_MODES)
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--init-image", default=None, help="start from this image (img2img)")
    gen.add_argument("--denoise", type=float, default=1.0, help="with --init-image: how much to change it")
    gen.add_argument("--root", default=None, help="refuse instruction image paths outside this folder")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    train = commands.add_parser("train", help="train the context layers (stage 1 or 2) from a YAML config")
    train.add_argument("--config", required=True, help="training YAML (keys: instruct_core/train_config.py)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=100 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    build = commands.add_parser("build-default", help="train the bundled default model from scratch")
    build.add_argument("--out", default=None, help="folder for the model (default: the package's default_model/)")
    build.add_argument("--work-dir", default="runs/default_model", help="checkpoints and logs")
    build.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (e.g. 0.01 to try)")
    build.add_argument("--phases", default=None,
                       help="comma-separated phases (default: every training phase of the recipe, from pretrain "
                            "to the last stage-2 phase, then evaluator); also ablations. Training phases run in "
                            "their order")

    evaluate = commands.add_parser("eval", help="score models on the procedural benchmark; writes docs/RESULTS.md")
    evaluate.add_argument("--variants", default="full,text_only,no_stage1,single:edge_to_image,single:subject")
    evaluate.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    # None: EvalSettings' defaults, the settings docs/RESULTS.md was measured with
    evaluate.add_argument("--examples", type=int, default=None,
                          help="test examples per task (default: as in RESULTS.md)")
    evaluate.add_argument("--steps", type=int, default=None, help="sampling steps (default: as in RESULTS.md)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--out", default="docs/RESULTS.md")
    evaluate.add_argument("--quick", action="store_true", help="a reduced run (CI): 4 examples, 8 steps")
    evaluate.add_argument("--cfg-text", type=float, default=3.0, help="text guidance scale s_t")
    evaluate.add_argument("--cfg-context", type=float, default=GuidanceConfig.context_scale,
                          help=f"context guidance scale s_c ({GuidanceConfig.context_scale}: chosen on the training "
                               "split, see RESULTS.md)")
    evaluate.add_argument("--split", default="test", choices=("test", "train"),
                          help="train: tune settings on training examples, never on the test split")
    evaluate.add_argument("--jobs", type=int, default=1,
                          help="score the variants in this many processes, one thread each (same numbers)")
    evaluate.add_argument("--cache", default="runs/eval_cache",
                          help="folder keeping each score under a key of what it depends on (settings, weights, "
                               "evaluator, code): a rerun reuses them, so an interrupted eval goes on; '' for none")

    demo = commands.add_parser("demo", help="one image per benchmark task, beside its instruction and contexts, "
                                            "and a contact sheet")
    demo.add_argument("--out", required=True, help="output folder")
    _add_model_arguments(demo)
    demo.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=12)

    bench = commands.add_parser("bench", help="performance benchmarks against plain diffusers loops "
                                "(docs/BENCHMARKS.md)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    bench_sample = kinds.add_parser("sample", help="per-step sampling cost of K contexts, vs raw diffusers")
    _add_bench_arguments(bench_sample)
    bench_sample.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    bench_sample.add_argument("--contexts", default="0,1,2,4", help="comma-separated context counts K")
    bench_sample.add_argument("--steps", type=int, default=None, help="default: 8 for tiny, 10 otherwise")
    bench_sample.add_argument("--warmup", type=int, default=1, help="untimed generations per configuration")
    bench_sample.add_argument("--repeats", type=int, default=2, help="timed generations per configuration")
    bench_sample.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet (CUDA)")
    bench_sample.add_argument("--profile", action="store_true", help="print torch.profiler top operators")
    bench_train = kinds.add_parser("train", help="training images/s and MFU, vs a diffusers-style loop")
    _add_bench_arguments(bench_train)
    bench_train.add_argument("--batch", type=int, default=4)
    bench_train.add_argument("--steps", type=int, default=None, help="timed steps; default: 8 for tiny, 6 otherwise")
    bench_train.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench_train.add_argument("--modes", default="adapter,full", help="comma-separated: adapter, full")
    bench_train.add_argument("--contexts", type=int, default=1, help="contexts K per image")
    bench_comfy = kinds.add_parser("comfyui", help="InstructSampler with no contexts vs ComfyUI's KSampler, "
                                   "same checkpoint, on a running ComfyUI")
    bench_comfy.add_argument("--server", required=True, help="the ComfyUI address, e.g. http://127.0.0.1:8188")
    bench_comfy.add_argument("--checkpoint", required=True, help="a checkpoint in the server's models/checkpoints")
    bench_comfy.add_argument("--write-random-checkpoint", default=None, metavar="FOLDER",
                             help="first write a checkpoint with random weights, named --checkpoint, into FOLDER "
                                  "(the server's models/checkpoints)")
    bench_comfy.add_argument("--random-kind", default="sd15", choices=("sd15", "sdxl"),
                             help="the shape of that checkpoint")
    bench_comfy.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    bench_comfy.add_argument("--batch", type=int, default=1)
    bench_comfy.add_argument("--steps", type=int, default=20)
    bench_comfy.add_argument("--repeats", type=int, default=3, help="timed runs of each sampler")
    bench_comfy.add_argument("--cfg", type=float, default=5.0)
    bench_comfy.add_argument("--json", default=None, help="also write the full report to this JSON file")
    return parser


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    # Sizes spelled out here: importing benchmark (diffusers) would slow every command's start.
    parser.add_argument("--size", default="tiny", choices=("tiny", "sd15", "sdxl"),
                        help="UNet shape (random weights)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="auto: bf16 on cuda, fp32 on the cpu")
    parser.add_argument("--json", default=None, help="also write the full report to this JSON file")


def _progress_callback(total: int, quiet: bool):
    if quiet:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", file=sys.stderr)
    return (lambda info: bar.update(1)), bar.close


def _load_init_image(path: str, width: int, height: int):
    from PIL import Image, UnidentifiedImageError

    from .instruction import prepare_context_image
    from .pipeline import pil_to_tensor

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"--init-image: cannot read {path} ({error})") from None
    return pil_to_tensor(prepare_context_image(image, (width, height)))[None]


def _check_seed(seed: int) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}")


def _check_guidance_scales(args) -> None:
    for flag, value in (("--cfg-text", args.cfg_text), ("--cfg-context", args.cfg_context)):
        if not math.isfinite(value):
            raise UsageError(f"{flag}: {value} must be a finite number")


def run_generate(args) -> int:
    from .guidance import GuidanceConfig
    from .instruction import load_instruction

    from .models import load_pipeline

    if args.batch < 1:
        raise UsageError(f"--batch: {args.batch} must be at least 1")
    _check_seed(args.seed)
    _check_guidance_scales(args)
    pipe = load_pipeline(args.model, args.adapter, args.device, args.dtype)
    instruction = load_instruction(args.instruction, root=args.root, known_modalities=pipe.known_modalities,
                                   max_contexts=pipe.max_contexts)
    width = args.width or pipe.native_size
    height = args.height or pipe.native_size
    init = _load_init_image(args.init_image, width, height) if args.init_image else None
    if init is None and args.denoise != 1.0:
        raise UsageError("--denoise: needs --init-image")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: {out} must end in .png")
    guidance = GuidanceConfig(text_scale=args.cfg_text, context_scale=args.cfg_context, mode=args.guidance)
    callback, close = _progress_callback(args.steps, args.quiet)
    try:
        result = pipe.generate(instruction, seed=args.seed, steps=args.steps, sampler=args.sampler,
                               schedule=args.schedule, guidance=guidance, width=width, height=height,
                               batch_size=args.batch, init_image=init, denoise=args.denoise, callback=callback)
    finally:
        close()
    for path in save_images(result.images, out):
        print(path)
    return 0


def run_train(args) -> int:
    import signal

    from .stages import run_training
    from .train_config import load_config

    config = load_config(args.config, args.overrides)
    stop = {"requested": False}

    def request_stop(signum, frame):  # finish the step, write a checkpoint, exit
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train.steps, unit="step", file=sys.stderr)

    def progress(step, total, loss):
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

    try:
        result = run_training(config, progress=progress, cancel=lambda: stop["requested"], resume=args.resume,
                              device=args.device)
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    state = "stopped early" if result.cancelled else "done"
    print(f"{state} at step {result.step}: {result.adapter_path}")
    return 130 if result.cancelled else 0


def run_build_default(args) -> int:
    import copy

    from .default_model import DEFAULT_DIR, RECIPE, TRAINING_PHASES, build

    if args.scale <= 0:
        raise UsageError(f"--scale: {args.scale} must be positive")
    recipe = copy.deepcopy(RECIPE)
    for phase in (p for p in TRAINING_PHASES if p in recipe):
        recipe[phase]["steps"] = max(1, round(recipe[phase]["steps"] * args.scale))
    recipe["single_task_steps"] = max(1, round(recipe["single_task_steps"] * args.scale))
    from .default_model import build_ablations, build_evaluator

    folder = Path(args.out) if args.out else DEFAULT_DIR
    known = (*TRAINING_PHASES, "evaluator", "ablations")
    if args.phases:
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    else:
        phases = [*TRAINING_PHASES, "evaluator"]
    unknown = sorted(set(phases) - set(known))
    if unknown:
        raise UsageError(f"--phases: unknown phase {unknown[0]!r} (known: {', '.join(known)})")
    log = lambda line: print(line, flush=True)
    training = tuple(p for p in TRAINING_PHASES if p in phases)
    if training:
        build(folder, Path(args.work_dir), recipe, phases=training, log=log)
    if "evaluator" in phases:
        build_evaluator(folder, log=log)
    if "ablations" in phases:
        build_ablations(folder=folder, work_dir=Path(args.work_dir), recipe=recipe, log=log)
    return 0


def run_eval(args) -> int:
    import time

    from .bench_tasks import IN_DOMAIN_TASKS, ZERO_SHOT_TASKS
    from .evaluation import EvalSettings, evaluate, write_results

    _check_guidance_scales(args)
    chosen = {"examples_per_task": 4 if args.quick else args.examples, "steps": 8 if args.quick else args.steps}
    settings = EvalSettings(seed=args.seed, text_scale=args.cfg_text, context_scale=args.cfg_context, split=args.split,
                            **{name: value for name, value in chosen.items() if value is not None})
    tasks = _benchmark_tasks(args.tasks)
    variants = [v for v in args.variants.split(",") if v]
    started = time.perf_counter()
    if args.jobs < 1:
        raise UsageError(f"--jobs: {args.jobs} must be at least 1")
    cache = Path(args.cache) if args.cache else None
    reused: list = []
    results = evaluate(variants, tasks, settings, log=lambda line: print(line, flush=True), jobs=args.jobs,
                       cache=cache, reused=reused)
    command = "python -m instruct_core eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else "eval"
    path = write_results(results, settings, [t for t in tasks if t in IN_DOMAIN_TASKS],
                         [t for t in tasks if t in ZERO_SHOT_TASKS], Path(args.out), command,
                         time.perf_counter() - started, reused=len(reused))
    print(path)
    return 0


def _int_list(flag: str, text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{flag}: {text!r} needs integers of at least {minimum}")
    return tuple(dict.fromkeys(values))


def _at_least(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag}: {value} must be at least {minimum}")


def _bench_command() -> str:
    return "python -m instruct_core " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""


def run_bench(args) -> int:
    from . import benchmark

    if args.bench_kind == "comfyui":
        return run_bench_comfyui(args)
    _at_least("--steps", args.steps, 1)
    _at_least("--warmup", args.warmup, 0)
    common = dict(size=args.size, device=args.device, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                  command=_bench_command())
    log = lambda line: print(line, file=sys.stderr, flush=True)
    try:
        if args.bench_kind == "sample":
            _at_least("--repeats", args.repeats, 1)
            settings = benchmark.SampleBenchSettings(
                batches=_int_list("--batch", args.batch, 1), contexts=_int_list("--contexts", args.contexts, 0),
                repeats=args.repeats, compile=args.compile, profile=args.profile, **common)
            report = benchmark.bench_sample(settings, log)
            text = benchmark.format_sample_report(report)
        else:
            _at_least("--batch", args.batch, 1)
            _at_least("--contexts", args.contexts, 0)
            modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            if not modes or set(modes) - set(benchmark.TRAIN_MODES):
                raise UsageError(f"--modes: {args.modes!r} must list adapter and/or full")
            settings = benchmark.TrainBenchSettings(batch=args.batch, modes=modes, contexts=args.contexts, **common)
            report = benchmark.bench_train(settings, log)
            text = benchmark.format_train_report(report)
    except benchmark.BenchmarkError as error:
        raise UsageError(str(error)) from None
    print(text)
    if args.json:
        print(benchmark.write_json(report, args.json))
    return 0


def run_bench_comfyui(args) -> int:
    from . import bench_comfyui
    from .benchmark import write_json
    from .client import ClientError, ComfyClient

    for flag, value, least in (("--steps", args.steps, 2), ("--repeats", args.repeats, 1), ("--batch", args.batch, 1),
                               ("--size", args.size, 64)):
        _at_least(flag, value, least)
    if args.size % 64:  # SD1.5 and SDXL UNets halve the latent three times
        raise UsageError(f"--size: {args.size} must be a multiple of 64")
    if not (math.isfinite(args.cfg) and 0 <= args.cfg <= 30):  # InstructSampler's cfg_text range
        raise UsageError(f"--cfg: {args.cfg} must be a number from 0 to 30")
    name = Path(args.checkpoint)
    if name.is_absolute() or ".." in name.parts or not name.name:
        raise UsageError(f"--checkpoint: {args.checkpoint!r} must be a name the server lists, inside its "
                         f"checkpoints folder")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    settings = bench_comfyui.ComfyBenchSettings(
        server=args.server, checkpoint=args.checkpoint, size=args.size, batch=args.batch, steps=args.steps,
        repeats=args.repeats, cfg=args.cfg, command=_bench_command())
    try:
        if args.write_random_checkpoint:
            path = Path(args.write_random_checkpoint) / name
            if path.exists():
                raise UsageError(f"--write-random-checkpoint: {path} exists; choose a new --checkpoint name")
            bench_comfyui.server_stats(ComfyClient(args.server))  # reachable, before minutes of writing
            log(f"writing a random {bench_comfyui.RANDOM_KINDS[args.random_kind][1]}-shaped checkpoint to {path}")
            bench_comfyui.write_random_checkpoint(path, args.random_kind)
        report = bench_comfyui.bench_comfyui(settings, log)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    print(bench_comfyui.format_comfyui_report(report))
    if args.json:
        print(write_json(report, args.json))
    return 0


def _benchmark_tasks(text: str) -> list[str]:
    from .bench_tasks import IN_DOMAIN_TASKS, ZERO_SHOT_TASKS

    known = list(IN_DOMAIN_TASKS + ZERO_SHOT_TASKS)
    tasks = known if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task {unknown[0] if unknown else text!r} (known: {', '.join(known)})")
    return tasks


def run_demo(args) -> int:
    from .demo import run_demo as write_demo
    from .models import load_pipeline

    tasks = _benchmark_tasks(args.tasks)
    if args.steps < 1:
        raise UsageError(f"--steps: {args.steps} must be at least 1")
    _check_seed(args.seed)
    pipe = load_pipeline(args.model, args.adapter, args.device, args.dtype)
    print(write_demo(pipe, Path(args.out), tasks, seed=args.seed, steps=args.steps,
                     log=lambda line: print(line, flush=True)))
    return 0


def save_images(images, out: Path) -> list[Path]:
    """Write (B, 3, H, W) images in [0, 1] as PNGs; atomic per file so a reader never sees half an image."""
    from .pipeline import save_png, tensor_to_pil

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if images.shape[0] == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                  for i in range(images.shape[0])]
    for image, path in zip(images, paths):
        save_png(tensor_to_pil(image), path)
    return paths


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .adapter_io import AdapterError
    from .instruction import InstructionError
    from .data import DataError
    from .loading import ModelLoadError
    from .train_config import ConfigError
    from .training import TrainingError

    return (UsageError, InstructionError, AdapterError, ModelLoadError, FileNotFoundError, ConfigError, DataError,
            TrainingError)


COMMANDS = {"generate": run_generate, "train": run_train, "build-default": run_build_default, "eval": run_eval,
            "bench": run_bench, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, whatever a library defaults to
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _bad_input_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the machine, not the input: a full disk, a permission, a lost mount
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
