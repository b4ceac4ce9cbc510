"""The harness's command line: `python -m instruct_bench build-default | eval | demo | demo-examples | speed ...`.

What reproduces the published figures: the bundled model's build, the benchmark evaluation behind docs/RESULTS.md,
the demo with the benchmark's ground truth, and the speed measurements behind docs/BENCHMARKS.md. Bad input ends
with exit code 2 and one line, as in `python -m instruct_core`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from instruct_core.cli import (UsageError, add_model_arguments, check_at_least, check_at_most, check_guidance_scales,
                               check_seed, chosen_names, run_command)
from instruct_core.progress import Progress

# `build-default --scale` multiplies every phase's steps; the bundled recipe at 100 times is weeks on a CPU
MAX_BUILD_SCALE = 100.0
SUPER_RESOLUTION_TASKS = ("edge_to_image", "mask_to_image", "depth_to_image", "text_to_image")
GIVEN_ROUTING_TASKS = ("text_to_image", "mask_to_image", "edge_to_image", "depth_to_image")
# `speed` sizes: well beyond what a benchmark needs; a larger request is a typo, not a measurement
MAX_SPEED_BATCH = 256
MAX_SPEED_CONTEXTS = 64


def build_parser() -> argparse.ArgumentParser:
    from instruct_core.guidance import GuidanceConfig
    from instruct_core.models import DEFAULT_TEXT_SCALE

    from .given_routing import ROUTING_MASKS

    parser = argparse.ArgumentParser(prog="python -m instruct_bench", description="The Instruct-Imagen harness: "
                                     "builds the bundled model, evaluates it on the procedural benchmark and "
                                     "measures speed.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-default", help="train the bundled default model from scratch")
    build.add_argument("--out", default=None, help="folder for the model (default: the package's default_model/)")
    build.add_argument("--work-dir", default="runs/default_model", help="checkpoints and logs")
    build.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (e.g. 0.01 to try)")
    build.add_argument("--phases", default=None,
                       help="comma-separated phases (default: every training phase of the recipe, from pretrain "
                            "to the last stage-2 phase, then super_resolution and evaluator); also ablations. "
                            "Training phases run in their order")

    upscale = commands.add_parser("super-resolution", help="measure the bundled super-resolution stage against "
                                                           "bicubic upscaling; writes SUPER_RESOLUTION.md and "
                                                           "super_resolution.json into --out")
    upscale.add_argument("--tasks", default=",".join(SUPER_RESOLUTION_TASKS),
                         help="comma-separated task names, or all")
    upscale.add_argument("--examples", type=int, default=48, help="test examples per task")
    upscale.add_argument("--seed", type=int, default=1234)
    upscale.add_argument("--out", default="out/super_resolution",
                         help="output folder (docs to replace the published page)")

    evaluate = commands.add_parser("eval", help="score models on the procedural benchmark; writes RESULTS.md, "
                                                "results.json and plots into --out")
    evaluate.add_argument("--variants", default="full,text_only,no_stage1,single:edge_to_image,single:subject")
    evaluate.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    # None: EvalSettings' defaults, the settings docs/RESULTS.md was measured with
    evaluate.add_argument("--examples", type=int, default=None,
                          help="test examples per task (default: as in RESULTS.md)")
    evaluate.add_argument("--steps", type=int, default=None, help="sampling steps (default: as in RESULTS.md)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--out", default="out/eval",
                          help="output folder (docs to replace the published results)")
    evaluate.add_argument("--quick", action="store_true", help="a reduced run (CI): 4 examples, 8 steps")
    evaluate.add_argument("--cfg-text", type=float, default=DEFAULT_TEXT_SCALE, help="text guidance scale s_t")
    evaluate.add_argument("--cfg-context", type=float, default=GuidanceConfig.context_scale,
                          help=f"context guidance scale s_c ({GuidanceConfig.context_scale}: chosen on the training "
                               "split, see CHANGELOG.md)")
    evaluate.add_argument("--split", default="test", choices=("test", "train"),
                          help="train: tune settings on training examples, never on the test split")
    evaluate.add_argument("--jobs", type=int, default=1,
                          help="score the variants in this many processes, one thread each (same numbers)")
    evaluate.add_argument("--cache", default="runs/eval_cache",
                          help="folder keeping each score under a key of what it depends on (settings, weights, "
                               "evaluator, code): a rerun reuses them, so an interrupted eval goes on; '' for none")

    diagnose = commands.add_parser("diagnose", help="how far apart a model's text encoder holds colour and shape "
                                                    "words (cosine between captions, linear probe), and where its "
                                                    "images put the named colours and which object they draw in "
                                                    "front, and whether its text cross-attention routes each object's "
                                                    "words to that object's pixels; prints JSON")
    diagnose.add_argument("--variants", default="full,text_only",
                          help="comma-separated variants; 'truth' reads the true images (drawing only)")
    diagnose.add_argument("--captions", type=int, default=400)
    diagnose.add_argument("--seed", type=int, default=0)
    diagnose.add_argument("--examples", type=int, default=48,
                          help="test examples per task for the drawing report and the attention's routing "
                               "(0: the text encoder only)")

    routing = commands.add_parser("given-routing", help="what the bundled model draws when its text cross-attention "
                                                        "is given the routing (each object's pixels read only their "
                                                        "own object's words), before and after fine-tuning with it; "
                                                        "prints JSON")
    routing.add_argument("--steps", type=int, default=600, help="fine-tuning steps with the routing given (0: none)")
    routing.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text encoder too")
    routing.add_argument("--train-unrouted", action="store_true",
                         help="fine-tune without the routing (the same recipe: what the routing adds to it)")
    routing.add_argument("--routed-share", type=float, default=1.0,
                         help="route this share of the fine-tuning examples (the rest place objects from the text)")
    routing.add_argument("--open", action="store_true",
                         help="leave the words outside the objects' phrases open to every pixel (default: an "
                              "object's pixels read only their own phrase and the start token)")
    routing.add_argument("--masks", choices=ROUTING_MASKS, default="whole",
                         help="an object's pixels: its whole silhouette (both phrases open where two objects "
                              "overlap) or where it is seen (the nearer object owns the overlap)")
    routing.add_argument("--tasks", default=",".join(GIVEN_ROUTING_TASKS), help="comma-separated task names")
    routing.add_argument("--examples", type=int, default=48, help="test examples per task")
    routing.add_argument("--work-dir", default="runs/given_routing",
                         help="checkpoints, in a folder named after the settings (a rerun of the same resumes them)")

    demo = commands.add_parser("demo", help="one image per benchmark task, beside its instruction, contexts and "
                                            "ground truth, and a contact sheet")
    demo.add_argument("--out", required=True, help="output folder")
    add_model_arguments(demo)
    demo.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=12)
    examples = commands.add_parser("demo-examples", help="write the benchmark's demo instructions into the package "
                                                         "(what `python -m instruct_core demo` runs)")
    examples.add_argument("--seed", type=int, default=0)

    speed = commands.add_parser("speed", help="speed and memory against plain diffusers loops (docs/BENCHMARKS.md)")
    kinds = speed.add_subparsers(dest="speed_kind", required=True)
    add_speed_parsers(kinds)
    return parser


def add_speed_parsers(kinds) -> None:
    sample = kinds.add_parser("sample", help="per-step sampling cost of K contexts, vs raw diffusers")
    add_speed_arguments(sample)
    sample.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    sample.add_argument("--contexts", default="0,1,2,4", help="comma-separated context counts K")
    sample.add_argument("--steps", type=int, default=None, help="default: 8 for tiny, 10 otherwise")
    sample.add_argument("--warmup", type=int, default=1, help="untimed generations per configuration")
    sample.add_argument("--repeats", type=int, default=2, help="timed generations per configuration")
    sample.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet (CUDA)")
    sample.add_argument("--profile", action="store_true", help="print torch.profiler top operators")
    train = kinds.add_parser("train", help="training images/s and MFU, vs a diffusers-style loop")
    add_speed_arguments(train)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--steps", type=int, default=None, help="timed steps; default: 8 for tiny, 6 otherwise")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    train.add_argument("--modes", default="adapter,full", help="comma-separated: adapter, full")
    train.add_argument("--contexts", type=int, default=1, help="contexts K per image")
    comfy = kinds.add_parser("comfyui", help="InstructSampler with no contexts vs ComfyUI's KSampler, "
                             "same checkpoint, on a running ComfyUI")
    comfy.add_argument("--server", required=True, help="the ComfyUI address, e.g. http://127.0.0.1:8188")
    comfy.add_argument("--checkpoint", required=True, help="a checkpoint in the server's models/checkpoints")
    comfy.add_argument("--write-random-checkpoint", default=None, metavar="FOLDER",
                       help="first write a checkpoint with random weights, named --checkpoint, into FOLDER "
                            "(the server's models/checkpoints)")
    comfy.add_argument("--random-kind", default="sd15", choices=("sd15", "sdxl"), help="the shape of that checkpoint")
    comfy.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    comfy.add_argument("--batch", type=int, default=1)
    comfy.add_argument("--steps", type=int, default=20)
    comfy.add_argument("--repeats", type=int, default=3, help="timed runs of each sampler")
    comfy.add_argument("--cfg", type=float, default=5.0)
    comfy.add_argument("--patch-contexts", default=None, metavar="K,K,...",
                       help="instead: peak memory and per-step time of plain KSampler and of KSampler on "
                            "ApplyInstructImagen with these numbers of contexts (e.g. 0,1,2,4,8); the server "
                            "must run on this machine")
    comfy.add_argument("--json", default=None, help="also write the full report to this JSON file")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    # Sizes spelled out here: importing the speed module (diffusers) would slow every command's start.
    parser.add_argument("--size", default="tiny", choices=("tiny", "sd15", "sdxl"),
                        help="UNet shape (random weights)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="auto: bf16 on cuda, fp32 on the cpu")
    parser.add_argument("--json", default=None, help="also write the full report to this JSON file")


def this_command() -> str:
    """The command line as typed, for the reports that say how to reproduce them."""
    return "python -m instruct_bench " + " ".join(sys.argv[1:])


def benchmark_tasks(text: str) -> list[str]:
    from .tasks import IN_DOMAIN_TASKS, ZERO_SHOT_TASKS

    return chosen_names("--tasks", text, list(IN_DOMAIN_TASKS + ZERO_SHOT_TASKS))


def run_build_default(args) -> int:
    import copy

    from .build_default import DEFAULT_DIR, RECIPE, TRAINING_PHASES, build

    if not (math.isfinite(args.scale) and 0 < args.scale <= MAX_BUILD_SCALE):
        raise UsageError(f"--scale: {args.scale} must be a number in (0, {MAX_BUILD_SCALE:g}]")
    recipe = copy.deepcopy(RECIPE)
    for phase in (p for p in TRAINING_PHASES if p in recipe):
        recipe[phase]["steps"] = max(1, round(recipe[phase]["steps"] * args.scale))
    recipe["single_task_steps"] = max(1, round(recipe["single_task_steps"] * args.scale))
    from .build_default import build_ablations, build_evaluator

    folder = Path(args.out) if args.out else DEFAULT_DIR
    known = (*TRAINING_PHASES, "super_resolution", "evaluator", "ablations")
    if args.phases:
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    else:
        phases = [*TRAINING_PHASES, "super_resolution", "evaluator"]
    unknown = sorted(set(phases) - set(known))
    if unknown:
        raise UsageError(f"--phases: unknown phase {unknown[0]!r} (known: {', '.join(known)})")
    log = lambda line: print(line, flush=True)
    progress = lambda what, steps: Progress(steps, what)
    training = tuple(p for p in TRAINING_PHASES if p in phases)
    if training:
        build(folder, Path(args.work_dir), recipe, phases=training, log=log, progress=progress)
    if "super_resolution" in phases:
        from . import super_resolution

        sr_recipe = {**super_resolution.RECIPE,
                     "steps": max(1, round(super_resolution.RECIPE["steps"] * args.scale))}
        super_resolution.build(folder, Path(args.work_dir) / "super_resolution", sr_recipe, log=log)
    if "evaluator" in phases:
        build_evaluator(folder, log=log, progress=progress)
    if "ablations" in phases:
        build_ablations(folder=folder, work_dir=Path(args.work_dir), recipe=recipe, log=log, progress=progress)
    return 0


def run_eval(args) -> int:
    import time

    from .tasks import IN_DOMAIN_TASKS, ZERO_SHOT_TASKS
    from .evaluation import EvalSettings, evaluate, write_results

    check_guidance_scales(args)
    check_at_least("--examples", args.examples, 1)
    check_at_most("--examples", args.examples, 100_000)
    check_at_least("--steps", args.steps, 1)
    check_at_most("--steps", args.steps, 1000)
    check_seed(args.seed)
    chosen = {"examples_per_task": 4 if args.quick else args.examples, "steps": 8 if args.quick else args.steps}
    settings = EvalSettings(seed=args.seed, text_scale=args.cfg_text, context_scale=args.cfg_context, split=args.split,
                            **{name: value for name, value in chosen.items() if value is not None})
    tasks = benchmark_tasks(args.tasks)
    variants = [v for v in args.variants.split(",") if v]
    started = time.perf_counter()
    if args.jobs < 1:
        raise UsageError(f"--jobs: {args.jobs} must be at least 1")
    cache = Path(args.cache) if args.cache else None
    reused: list = []
    with Progress(len(variants) * len(tasks), "eval", "score", every_s=0) as progress:
        results = evaluate(variants, tasks, settings, log=progress.write, jobs=args.jobs, cache=cache,
                           reused=reused, progress=progress.update)
    path = write_results(results, settings, [t for t in tasks if t in IN_DOMAIN_TASKS],
                         [t for t in tasks if t in ZERO_SHOT_TASKS], results_file(args.out), this_command(),
                         time.perf_counter() - started, reused=len(reused))
    print(path)
    return 0


def run_super_resolution(args) -> int:
    import json
    import platform
    import time

    import torch

    from .evaluation import source_commit
    from .super_resolution import measure, results_page

    tasks = benchmark_tasks(args.tasks)
    check_at_least("--examples", args.examples, 1)
    check_at_most("--examples", args.examples, 10_000)
    check_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = measure(tasks, args.examples, args.seed, log=lambda line: print(line, flush=True))
    minutes = (time.perf_counter() - started) / 60
    threads = torch.get_num_threads()
    machine = (f"{platform.machine()} CPU ({threads} thread{'s' if threads != 1 else ''}), torch {torch.__version__}; "
               f"the run took {minutes:.1f} minutes")
    (out / "super_resolution.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    page = out / "SUPER_RESOLUTION.md"
    page.write_text(results_page(results, this_command(), source_commit(), machine))
    print(page)
    return 0


def run_diagnose(args) -> int:
    import json

    from .diagnostics import ROUTING_TASKS, drawing_report, encoder_binding, text_routing, word_separation
    from .evaluation import EvalSettings, load_evaluator, variant_pipe

    check_at_least("--captions", args.captions, 8)
    check_at_most("--captions", args.captions, 100_000)
    check_at_least("--examples", args.examples, 0)
    check_at_most("--examples", args.examples, 10_000)
    check_seed(args.seed)
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        raise UsageError("--variants: name at least one model variant")
    if "truth" in variants and not args.examples:
        raise UsageError("--variants: 'truth' has images only; give --examples above 0")
    evaluator = load_evaluator() if args.examples else None
    settings = EvalSettings(examples_per_task=args.examples)
    report = {}
    for variant in variants:
        pipe = None if variant == "truth" else variant_pipe(variant)
        report[variant] = {} if pipe is None else {"words": word_separation(pipe, args.captions, args.seed),
                                                   "binding": encoder_binding(pipe, args.captions, args.seed)}
        if args.examples:
            report[variant]["drawing"] = drawing_report(pipe, evaluator, settings)
        if args.examples and pipe is not None:
            report[variant]["routing"] = {task: text_routing(pipe, task, examples=args.examples, seed=settings.seed)
                                          for task in ROUTING_TASKS}
    print(json.dumps(report, indent=1))
    return 0


def run_given_routing(args) -> int:
    import json

    from .evaluation import EvalSettings, load_evaluator, variant_pipe
    from .given_routing import GivenRouting, measure, train

    check_at_least("--steps", args.steps, 0)
    check_at_most("--steps", args.steps, 1_000_000)
    check_at_least("--examples", args.examples, 1)
    check_at_most("--examples", args.examples, 10_000)
    if not 0.0 <= args.routed_share <= 1.0:
        raise UsageError(f"--routed-share: {args.routed_share} is not a share in [0, 1]")
    if args.train_unrouted and args.routed_share != 1.0:
        raise UsageError("--routed-share: fine-tuning with --train-unrouted routes no example")
    tasks = benchmark_tasks(args.tasks)
    evaluator = load_evaluator()
    settings = EvalSettings(examples_per_task=args.examples)
    pipe = variant_pipe("full")
    routing = GivenRouting(strict=not args.open, masks=args.masks)
    report = {"routed": measure(pipe, tasks, settings, evaluator, routing)}
    if args.steps:
        what = "fine-tuning " + ("without" if args.train_unrouted else "with") + " the routing"
        # another setting is another run, never a continuation of this one
        run = (f"{args.steps}-{'unrouted' if args.train_unrouted else f'routed{args.routed_share:g}'}-"
               f"{'open' if args.open else 'strict'}-{'encoder' if args.train_text_encoder else 'frozen'}"
               f"{'-shown' if args.masks == 'shown' else ''}")
        with Progress(args.steps, what) as bar:
            train(pipe, None if args.train_unrouted else routing, args.steps, Path(args.work_dir) / run,
                  args.train_text_encoder, progress=bar.trainer_callback, routed_share=args.routed_share)
        report = {"before": report, "after": {"routed": measure(pipe, tasks, settings, evaluator, routing),
                                              "unrouted": measure(pipe, tasks, settings, evaluator, None)}}
    report["routed_rows"] = routing.matched  # cross-attention rows the routing reached, training included
    print(json.dumps(report, indent=1))
    return 0


def int_list(flag: str, text: str, minimum: int, maximum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",")[:64] if part.strip())
    except ValueError:
        raise UsageError(f"{flag}: {text[:80]!r} is not a comma-separated list of integers") from None
    if not values or min(values) < minimum or max(values) > maximum:
        raise UsageError(f"{flag}: {text[:80]!r} needs integers from {minimum} to {maximum}")
    return tuple(dict.fromkeys(values))


def run_speed(args) -> int:
    from . import speed

    if args.speed_kind == "comfyui":
        return run_speed_comfyui(args)
    check_at_least("--steps", args.steps, 1)
    check_at_least("--warmup", args.warmup, 0)
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--repeats", getattr(args, "repeats", 1))):
        check_at_most(flag, value, 1000)
    common = dict(size=args.size, device=args.device, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                  command=this_command())
    progress = Progress(0, f"speed {args.speed_kind}", "run")
    log = lambda line: progress.write(line, file=sys.stderr)
    try:
        if args.speed_kind == "sample":
            check_at_least("--repeats", args.repeats, 1)
            settings = speed.SampleSpeedSettings(
                batches=int_list("--batch", args.batch, 1, MAX_SPEED_BATCH),
                contexts=int_list("--contexts", args.contexts, 0, MAX_SPEED_CONTEXTS),
                repeats=args.repeats, compile=args.compile, profile=args.profile, **common)
            report = speed.sample_speed(settings, log, progress.follow)
            text = speed.format_sample_report(report)
        else:
            check_at_least("--batch", args.batch, 1)
            check_at_most("--batch", args.batch, MAX_SPEED_BATCH)
            check_at_least("--contexts", args.contexts, 0)
            check_at_most("--contexts", args.contexts, MAX_SPEED_CONTEXTS)
            modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            if not modes or set(modes) - set(speed.TRAIN_MODES):
                raise UsageError(f"--modes: {args.modes!r} must list adapter and/or full")
            settings = speed.TrainSpeedSettings(batch=args.batch, modes=modes, contexts=args.contexts, **common)
            report = speed.train_speed(settings, log, progress.follow)
            text = speed.format_train_report(report)
    except speed.SpeedSettingsError as error:
        raise UsageError(str(error)) from None
    finally:
        progress.close()
    print(text)
    if args.json:
        print(speed.write_json(report, args.json))
    return 0


def context_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--patch-contexts: {text!r} must be numbers separated by commas, e.g. 0,1,2,4,8") from None
    if not counts or any(not 0 <= k <= 8 for k in counts):  # a fresh adapter takes 8 contexts
        raise UsageError(f"--patch-contexts: {text!r}: each number must be from 0 to 8")
    return counts


def run_speed_comfyui(args) -> int:
    from . import speed_comfyui
    from instruct_bench.speed import write_json
    from instruct_core.client import ClientError, ComfyClient

    for flag, value, least in (("--steps", args.steps, 2), ("--repeats", args.repeats, 1), ("--batch", args.batch, 1),
                               ("--size", args.size, 64)):
        check_at_least(flag, value, least)
    if args.size % 64:  # SD1.5 and SDXL UNets halve the latent three times
        raise UsageError(f"--size: {args.size} must be a multiple of 64")
    if not (math.isfinite(args.cfg) and 0 <= args.cfg <= 30):  # InstructSampler's cfg_text range
        raise UsageError(f"--cfg: {args.cfg} must be a number from 0 to 30")
    name = Path(args.checkpoint)
    if name.is_absolute() or ".." in name.parts or not name.name:
        raise UsageError(f"--checkpoint: {args.checkpoint!r} must be a name the server lists, inside its "
                         f"checkpoints folder")
    contexts = None if args.patch_contexts is None else context_counts(args.patch_contexts)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    settings = speed_comfyui.ComfySpeedSettings(
        server=args.server, checkpoint=args.checkpoint, size=args.size, batch=args.batch, steps=args.steps,
        repeats=args.repeats, cfg=args.cfg, command=this_command())
    try:
        if args.write_random_checkpoint:
            path = Path(args.write_random_checkpoint) / name
            if path.exists():
                raise UsageError(f"--write-random-checkpoint: {path} exists; choose a new --checkpoint name")
            speed_comfyui.server_stats(ComfyClient(args.server))  # reachable, before minutes of writing
            log(f"writing a random {speed_comfyui.RANDOM_KINDS[args.random_kind][1]}-shaped checkpoint to {path}")
            speed_comfyui.write_random_checkpoint(path, args.random_kind)
        if contexts is not None:
            report = speed_comfyui.comfyui_patch_speed(settings, contexts, log)
        else:
            report = speed_comfyui.comfyui_speed(settings, log)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    print(speed_comfyui.format_patch_report(report) if contexts is not None
          else speed_comfyui.format_comfyui_report(report))
    if args.json:
        print(write_json(report, args.json))
    return 0


def results_file(out: str) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "RESULTS.md"


def run_demo(args) -> int:
    from instruct_core.demo import run_demo as write_demo
    from instruct_core.models import load_pipeline

    from .demo import benchmark_examples

    tasks = benchmark_tasks(args.tasks)
    check_at_least("--steps", args.steps, 1)
    check_seed(args.seed)
    pipe = load_pipeline(args.model, args.adapter, args.device, args.dtype)
    examples = benchmark_examples(tasks, args.seed, pipe.native_size)
    with Progress(len(examples), "demo", "image") as progress:
        sheet = write_demo(pipe, Path(args.out), examples, seed=args.seed, steps=args.steps, log=progress.write,
                           progress=progress.follow)
    print(sheet)
    return 0


def run_demo_examples(args) -> int:
    from instruct_core.models import load_pipeline

    from .demo import write_shipped_examples

    check_seed(args.seed)
    size = load_pipeline("default", device="cpu").native_size
    for path in write_shipped_examples(benchmark_tasks("all"), args.seed, size):
        print(path)
    return 0


COMMANDS = {"build-default": run_build_default, "eval": run_eval, "demo": run_demo, "demo-examples": run_demo_examples,
            "speed": run_speed, "super-resolution": run_super_resolution, "diagnose": run_diagnose,
            "given-routing": run_given_routing}


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), COMMANDS, argv)
