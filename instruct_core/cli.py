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

from .errors import InstructImagenError
from .progress import Progress

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# torch generators take seeds in [-2**63, 2**64 - 1]; generation also uses seed + 1
SEED_RANGE = (-(2**63), 2**64 - 2)


class UsageError(InstructImagenError, ValueError):
    """A command-line value that cannot be used."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="base model: a single-file .safetensors checkpoint, a diffusers folder, 'default' "
                             "(the bundled model) or 'tiny' (small, random weights)")
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
    add_model_arguments(gen)
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
    gen.add_argument("--no-upscale", dest="upscale", action="store_false",
                     help="skip the model's super-resolution stage (the bundled model: write its 32x32 base images "
                          "instead of 128x128 ones)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    train = commands.add_parser("train", help="train the context layers (stage 1 or 2) from a YAML config")
    train.add_argument("--config", required=True, help="training YAML (keys: instruct_core/train/config.py)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=100 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser("demo", help="the bundled example instructions, each generated beside its "
                                            "contexts, and a contact sheet")
    demo.add_argument("--out", required=True, help="output folder")
    add_model_arguments(demo)
    demo.add_argument("--tasks", default="all", help="comma-separated example names (one per task), or all")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--no-upscale", dest="upscale", action="store_false",
                      help="skip the model's super-resolution stage")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    return parser


def _load_init_image(path: str, width: int, height: int):
    from .instruction import prepare_context_image, read_image_file
    from .pipeline import pil_to_tensor

    # as instruction images are read: a regular file, bounded in bytes, its header checked before decoding
    image = read_image_file(path, "--init-image")
    return pil_to_tensor(prepare_context_image(image, (width, height)))[None]


def check_seed(seed: int) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}")


def check_guidance_scales(args) -> None:
    from .instruction import InstructionError
    from .limits import check_guidance_scale

    for flag, value in (("--cfg-text", args.cfg_text), ("--cfg-context", args.cfg_context)):
        try:
            check_guidance_scale(flag, value)
        except InstructionError as error:
            raise UsageError(str(error)) from None


def _check_generation_arguments(args) -> None:
    """Every number of `generate` before a model is loaded: one line naming the flag, exit 2."""
    from .instruction import InstructionError
    from .limits import LIMITS, require_int, require_number

    try:
        require_int("--batch", args.batch, 1, LIMITS.max_batch)
        require_int("--steps", args.steps, 1, LIMITS.max_steps)
        for flag, value in (("--width", args.width), ("--height", args.height)):
            if value:  # 0 or none: the model's native size
                require_int(flag, value, 1, LIMITS.max_side)
        require_number("--denoise", args.denoise, 0.0, 1.0, low_open=True)
    except InstructionError as error:
        raise UsageError(str(error)) from None
    check_seed(args.seed)
    check_guidance_scales(args)
    if args.root is not None and not os.path.isdir(args.root):
        raise UsageError(f"--root: {args.root} is not a folder")
    if args.init_image is None and args.denoise != 1.0:
        raise UsageError("--denoise: needs --init-image")


def run_generate(args) -> int:
    from .guidance import GuidanceConfig
    from .instruction import load_instruction
    from .models import load_pipeline
    from .pipeline import save_images

    _check_generation_arguments(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: {out} must end in .png")
    pipe = load_pipeline(args.model, args.adapter, args.device, args.dtype)
    instruction = load_instruction(args.instruction, root=args.root, known_modalities=pipe.known_modalities,
                                   max_contexts=pipe.max_contexts)
    width = args.width or pipe.native_size
    height = args.height or pipe.native_size
    pipe.check_size(width, height, args.batch)
    contexts = len(instruction.contexts)
    pipe.check_memory(width, height, args.batch, 4 if contexts else 2, contexts, field="--batch")
    init = _load_init_image(args.init_image, width, height) if args.init_image else None
    guidance = GuidanceConfig(text_scale=args.cfg_text, context_scale=args.cfg_context, mode=args.guidance)
    with Progress(args.steps, "generate", enabled=not args.quiet) as progress:
        result = pipe.generate(instruction, seed=args.seed, steps=args.steps, sampler=args.sampler,
                               schedule=args.schedule, guidance=guidance, width=width, height=height,
                               batch_size=args.batch, init_image=init, denoise=args.denoise,
                               callback=lambda info: progress.update(), upscale=args.upscale)
    for path in save_images(result.images, out):
        print(path)
    return 0


def run_train(args) -> int:
    import signal

    from .train.stages import run_training
    from .train.config import load_config

    config = load_config(args.config, args.overrides)
    stop = {"requested": False}

    def request_stop(signum, frame):  # finish the step, write a checkpoint, exit
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Progress(config.train.steps, "train", enabled=not args.quiet) as progress:
            result = run_training(config, progress=progress.trainer_callback, cancel=lambda: stop["requested"],
                                  resume=args.resume, device=args.device)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    state = "stopped early" if result.cancelled else "done"
    print(f"{state} at step {result.step}: {result.adapter_path}")
    return 130 if result.cancelled else 0


def run_demo(args) -> int:
    from .demo import run_demo as write_demo
    from .demo import shipped_example_names, shipped_examples
    from .models import load_pipeline

    names = chosen_names("--tasks", args.tasks, shipped_example_names())
    check_at_least("--steps", args.steps, 1)
    check_seed(args.seed)
    pipe = load_pipeline(args.model, args.adapter, args.device, args.dtype)
    with Progress(len(names), "demo", "image", enabled=not args.quiet) as progress:
        sheet = write_demo(pipe, Path(args.out), shipped_examples(names), seed=args.seed, steps=args.steps,
                           log=progress.write, progress=progress.follow, upscale=args.upscale)
    print(sheet)
    return 0


def chosen_names(flag: str, text: str, known: list[str]) -> list[str]:
    """A comma-separated choice among `known` names ("all": every one)."""
    names = list(known) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(f"{flag}: unknown name {unknown[0] if unknown else text!r} (known: {', '.join(known)})")
    return names


def check_at_least(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag}: {value} must be at least {minimum}")


def check_at_most(flag: str, value: int | None, maximum: int) -> None:
    if value is not None and value > maximum:
        raise UsageError(f"{flag}: {value} must be at most {maximum}")


COMMANDS = {"generate": run_generate, "train": run_train, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), COMMANDS, argv)


def run_command(parser: argparse.ArgumentParser, commands: dict, argv: list[str] | None = None) -> int:
    """Parse `argv` and run its command; bad input ends with exit code 2 and one line, no traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, whatever a library defaults to
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except InstructImagenError as error:  # bad input, an unusable or missing file: the library says which
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the machine, not the input: a full disk, a permission, a lost mount
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
