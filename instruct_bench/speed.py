"""Performance benchmarks: `python -m instruct_bench speed sample` and `speed train`.

Both run our path and a plain diffusers loop side by side in one process, on the same UNet weights, inputs
and dtype, on random-weight UNets of the tiny, SD1.5 or SDXL shape (built from the shipped configs, nothing
downloaded). FLOPs come from torch's FlopCounterMode; MFU divides achieved FLOP/s by a peak measured in the same
run with a large matmul. Figures, targets and how to read them: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from instruct_core.context_attention import ContextState
from instruct_core.context_unet import ContextAugmentedUNet
from instruct_core.errors import InstructImagenError
from instruct_core.guidance import Conditioning, GuidanceConfig, GuidedDenoiser
from instruct_core.instruction import DEFAULT_MODALITIES
from instruct_core.loading import BaseModel, resolve_device, shipped_config_dir
from instruct_core.pipeline import InstructImagen
from instruct_core.samplers import prepare_noise, sample_euler
from instruct_core.schedules import get_sigmas

SIZES = ("tiny", "sd15", "sdxl")
DEFAULT_SAMPLE_STEPS = {"tiny": 8, "sd15": 10, "sdxl": 10}
DEFAULT_TRAIN_STEPS = {"tiny": 8, "sd15": 6, "sdxl": 6}
TRAIN_MODES = ("adapter", "full")
BENCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Targets of the performance spec (see docs/BENCHMARKS.md).
FLOP_PROPORTIONALITY = 1.15      # time overhead of K contexts <= 1.15 x their FLOP overhead
SD15_K1_STEP_OVERHEAD = 0.20     # SD1.5 512^2, K=1: <= +20% per step over text-to-image
ENCODE_COST_PER_CONTEXT = 0.35   # encoding <= 0.35 x K UNet forwards
STEP_N_VS_STEP_2 = 1.10          # step N costs the same as step 2 (10% allowed for noise)
OURS_VS_DIFFUSERS_SAMPLE = 1.05  # our K=0 step <= 1.05 x raw diffusers'
SDXL_SAMPLE_MFU = 0.35           # GPU bf16, SDXL 1024^2
COMPILE_SPEEDUP = 1.5            # compiled >= 1.5 x eager
OURS_VS_DIFFUSERS_TRAIN = 0.90   # training images/s >= 0.9 x the diffusers-style loop
FULL_FINETUNE_MFU = 0.25         # GPU, full fine-tuning


# CPU attention runs these kernels, which FlopCounterMode does not know; their FLOPs are those of any SDPA.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}

CONTEXT_SEED_OFFSET = 7919  # context latents draw from their own stream, not the prompt's


class SpeedSettingsError(InstructImagenError, ValueError):
    """Settings that cannot be benchmarked on this machine."""


# -- settings -----------------------------------------------------------------------------------------------

@dataclass
class SampleSpeedSettings:
    size: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    batches: tuple[int, ...] = (1, 8)
    contexts: tuple[int, ...] = (0, 1, 2, 4)
    steps: int | None = None       # default: DEFAULT_SAMPLE_STEPS[size]
    warmup: int = 1                # untimed generations per configuration
    repeats: int = 2               # timed generations per configuration, interleaved across configurations
    guidance_scale: float = 5.0
    dual_context_scale: float = 2.0
    compile: bool = False
    profile: bool = False
    seed: int = 0
    command: str = ""


@dataclass
class TrainSpeedSettings:
    size: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    batch: int = 4
    steps: int | None = None       # timed optimizer steps; default: DEFAULT_TRAIN_STEPS[size]
    warmup: int = 2                # untimed steps first (optimizer state, allocator)
    modes: tuple[str, ...] = TRAIN_MODES
    contexts: int = 1
    seed: int = 0
    command: str = ""


# -- the model under test -----------------------------------------------------------------------------------

@dataclass
class SpeedSetup:
    """A random-weight UNet of one size wrapped with a fresh context adapter, and the shapes it takes."""

    size: str
    pipe: InstructImagen
    text_tokens: int
    pooled_dim: int | None  # SDXL's pooled text width; None when the UNet takes no added conditioning
    pixel_size: int         # the image side its latents stand for (SDXL's size conditioning)

    @property
    def model(self) -> ContextAugmentedUNet:
        return self.pipe.model

    @property
    def unet(self):
        return self.pipe.model.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.unet.config
        return config.in_channels, config.sample_size, config.sample_size

    @property
    def text_dim(self) -> int:
        return self.unet.config.cross_attention_dim


def speed_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as error:
        raise SpeedSettingsError(f"--device: {error}") from None


def speed_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA by default (the MFU targets are bf16 figures), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in BENCH_DTYPES:
        raise SpeedSettingsError(f"--dtype: {name!r} is not one of auto, {', '.join(BENCH_DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise SpeedSettingsError("--dtype: fp16 is not benchmarked on the CPU (many of its kernels are missing); "
                             "use fp32 or bf16")
    return BENCH_DTYPES[name]


def build_unet(size: str, seed: int = 0):
    """A random-weight UNet2DConditionModel of the named shape; SD1.5 and SDXL from the shipped configs."""
    from diffusers import UNet2DConditionModel

    from instruct_core.tiny import tiny_unet

    torch.manual_seed(seed)
    if size == "tiny":
        return tiny_unet(in_channels=4, sample_size=32, channels=(32, 64, 64))
    kind = {"sd15": "sd1", "sdxl": "sdxl"}.get(size)
    if kind is None:
        raise SpeedSettingsError(f"--size: {size!r} is not one of {', '.join(SIZES)}")
    folder = shipped_config_dir(kind, "epsilon")
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))


def scheduler_config(size: str) -> dict:
    from instruct_core.tiny import TINY_SCHEDULER

    if size == "tiny":
        return dict(TINY_SCHEDULER)
    kind = "sd1" if size == "sd15" else "sdxl"
    path = shipped_config_dir(kind, "epsilon") / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


def pooled_text_dim(unet) -> int | None:
    """Width of SDXL's pooled text embedding: what the added-conditioning projection takes besides time ids."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        return None
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def build_setup(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                max_contexts: int = 8) -> SpeedSetup:
    from instruct_core.context_unet import ContextAdapterConfig

    unet = build_unet(size, seed).eval()
    config = scheduler_config(size)
    base = BaseModel(unet=unet, vae=None, scheduler_config=config,
                     prediction_type=config.get("prediction_type", "epsilon"), kind="custom",
                     source=f"random {size}")
    adapter_config = ContextAdapterConfig(max_contexts=max(8, max_contexts))
    model = ContextAugmentedUNet(unet, adapter_config).to(device=device, dtype=dtype).eval()
    pixel_size = unet.config.sample_size * (1 if size == "tiny" else 8)
    return SpeedSetup(size, InstructImagen(base, model), text_tokens=32 if size == "tiny" else 77,
                      pooled_dim=pooled_text_dim(unet), pixel_size=pixel_size)


@contextlib.contextmanager
def plain_processors(model: ContextAugmentedUNet):
    """The UNet with diffusers' own attention processors for the duration: raw diffusers, same weights."""
    installed = model.unet.attn_processors
    model.remove_processors()
    try:
        yield model.unet
    finally:
        model.unet.set_attn_processor(installed)


# -- inputs -------------------------------------------------------------------------------------------------

@dataclass
class SampleInputs:
    """One batch's random prompt embeddings and starting noise, shared by every path."""

    text: torch.Tensor
    null_text: torch.Tensor
    added_text: dict | None
    added_null: dict | None
    noise: torch.Tensor  # (B, C, h, w) float32 on the CPU

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def conditioning(self) -> Conditioning:
        return Conditioning(self.text, self.null_text, None, self.added_text, self.added_null)


def random_text(setup: SpeedSetup, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, dict | None]:
    """Random prompt embeddings (rows, L, D) and, for SDXL shapes, the added conditioning of `rows`."""
    text = torch.randn(rows, setup.text_tokens, setup.text_dim, generator=generator)
    text = text.to(setup.device, setup.dtype)
    if setup.pooled_dim is None:
        return text, None
    pooled = torch.randn(rows, setup.pooled_dim, generator=generator).to(setup.device, setup.dtype)
    return text, setup.pipe.added_cond(pooled, setup.pixel_size, setup.pixel_size)


def sample_inputs(setup: SpeedSetup, batch: int, seed: int) -> SampleInputs:
    generator = torch.Generator().manual_seed(seed)
    text, added_text = random_text(setup, batch, generator)
    null_text, added_null = random_text(setup, batch, generator)
    noise = prepare_noise((batch, *setup.latent_shape), seed)
    return SampleInputs(text, null_text, added_text, added_null, noise)


@dataclass
class ContextInputs:
    """K random context latents per batch row (B*K in all), with their marker embeddings and modalities."""

    images: torch.Tensor
    marker_text: torch.Tensor
    added: dict | None
    modalities: list[str]
    layout: list[list[int]]

    @property
    def count(self) -> int:
        return self.images.shape[0]


def context_inputs(setup: SpeedSetup, batch: int, contexts: int, seed: int) -> ContextInputs:
    generator = torch.Generator().manual_seed(seed + CONTEXT_SEED_OFFSET)
    count = batch * contexts
    images = torch.randn(count, *setup.latent_shape, generator=generator).to(setup.device, setup.dtype)
    marker_text, added = random_text(setup, count, generator)
    modalities = [DEFAULT_MODALITIES[i % len(DEFAULT_MODALITIES)] for i in range(count)]
    layout = [list(range(row * contexts, (row + 1) * contexts)) for row in range(batch)]
    return ContextInputs(images, marker_text, added, modalities, layout)


def encode_context_state(model: ContextAugmentedUNet, contexts: ContextInputs) -> ContextState:
    features = model.encode_contexts(contexts.images, contexts.marker_text, contexts.modalities, contexts.added)
    return ContextState.from_encoded(features, contexts.layout)


# -- measuring ----------------------------------------------------------------------------------------------

class StepTimer:
    """Wall time between marks; on CUDA from events, so timing adds no synchronisation inside the loop."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, *_):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between successive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    timer = StepTimer(device)
    timer.mark()
    result = fn()
    timer.mark()
    return result, timer.intervals()[0]


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def measure_peak_flops(device: torch.device) -> dict:
    """Best FLOP/s of a large square matmul, the MFU denominator: bf16 on CUDA, fp32 on the CPU. A 3x3
    convolution's rate is reported beside it: on some CPUs the convolution library outruns the BLAS matmul."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (1536, torch.float32, 6)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = best_time(device, lambda: a @ b, reps)
    channels, side = (1280, 64) if cuda else (320, 64)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype)
    x = torch.randn(1, channels, side, side, device=device, dtype=dtype)
    with torch.no_grad():
        conv_s = best_time(device, lambda: conv(x), max(3, reps // 2))
    conv_flops = 2 * channels * channels * 9 * side * side
    return {"flops_per_s": 2 * n**3 / matmul_s, "conv3x3_flops_per_s": conv_flops / conv_s,
            "method": f"{dtype_name(dtype)} matmul {n}x{n}x{n}, best of {reps}"}


def best_time(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        fn()
    return min(timed(device, fn)[1] for _ in range(reps))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS (monotone over the whole run)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated per run"
    return "process peak RSS (CPU; monotone over the whole run, not per row)"


class RowCounter:
    """Counts UNet forward calls and the batch rows of each (a forward pre-hook on the diffusers UNet)."""

    def __init__(self, unet):
        self.rows: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows.append(int(sample.shape[0]))

    def close(self):
        self._handle.remove()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def relative_spread(values: list[float]) -> float:
    """Half the interquartile range over the median: the +/- a single step time moves by (NaN under 4 values)."""
    if len(values) < 4:
        return float("nan")
    low, _, high = statistics.quantiles(values, n=4)
    return (high - low) / 2 / median(values)


def steady_steps(steps: list[float]) -> list[float]:
    """Steps 2..N: step 1 also builds the per-generation caches (the contexts' keys and values)."""
    return steps[1:] if len(steps) > 1 else steps


# -- sampling: our path and raw diffusers -------------------------------------------------------------------

@dataclass
class GenerationRun:
    latents: torch.Tensor      # final sample, float32 on the CPU
    step_s: list[float]        # one wall time per step
    encode_s: float            # contexts encoded once, before step 1 (0 without contexts)
    total_s: float
    unet_rows: list[int]       # rows of each UNet call


def guidance_config(name: str, settings: SampleSpeedSettings) -> GuidanceConfig:
    """The guidance of a row. cfg: one scale for text and contexts, so two branches (full vs null) as in
    text-to-image CFG. dual: separate text and context scales, three branches when contexts are present."""
    scale = settings.guidance_scale
    context_scale = scale if name == "cfg" else settings.dual_context_scale
    return GuidanceConfig(text_scale=scale, context_scale=context_scale, mode="dual")


def bench_sigmas(setup: SpeedSetup, steps: int) -> torch.Tensor:
    return get_sigmas(setup.pipe.schedule, steps, "normal")


def euler_scheduler(setup: SpeedSetup, sigmas: torch.Tensor):
    """diffusers' EulerDiscreteScheduler on exactly our sigmas (linspace spacing: starts at noise * sigma_max)."""
    from diffusers import EulerDiscreteScheduler

    config = setup.pipe.base.scheduler_config
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000), beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02), beta_schedule=config.get("beta_schedule", "linear"),
        prediction_type=setup.pipe.base.prediction_type, timestep_spacing="linspace")
    with warnings.catch_warnings():  # diffusers' own numpy conversion warns under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(sigmas=sigmas.tolist(), device=setup.device)
    return scheduler


@torch.no_grad()
def run_ours(setup: SpeedSetup, inputs: SampleInputs, contexts: ContextInputs | None, guidance: GuidanceConfig,
             steps: int) -> GenerationRun:
    """One generation the way InstructImagen.sample runs it: contexts encoded once, then Euler over
    GuidedDenoiser, every guidance branch in one UNet call per step."""
    device = setup.device
    counter = RowCounter(setup.unet)
    timer = StepTimer(device)
    try:
        timer.mark()
        cond = inputs.conditioning()
        if contexts is not None:
            cond.context_state = encode_context_state(setup.model, contexts)
        timer.mark()
        sigmas = bench_sigmas(setup, steps)
        x = inputs.noise.to(device) * sigmas[0]
        guided = GuidedDenoiser(setup.pipe.denoiser(), cond, guidance, sigmas)
        x = sample_euler(guided, x, sigmas.to(device), callback=timer.mark)
        timer.mark()
    finally:
        counter.close()
    intervals = timer.intervals()
    return GenerationRun(x.float().cpu(), merge_last_update(intervals[1:]), intervals[0] if contexts else 0.0,
                         sum(intervals), counter.rows)


def cfg_conditioning(inputs: SampleInputs) -> tuple[torch.Tensor, dict | None]:
    """diffusers' CFG batch: negative rows first, then the prompt's."""
    text = torch.cat([inputs.null_text, inputs.text])
    if inputs.added_text is None:
        return text, None
    return text, {key: torch.cat([inputs.added_null[key], inputs.added_text[key]]) for key in inputs.added_text}


@torch.no_grad()
def run_diffusers(setup: SpeedSetup, inputs: SampleInputs, guidance_scale: float, steps: int) -> GenerationRun:
    """The classic diffusers CFG loop on the plain UNet: cat([x] * 2), scale_model_input, unet, guidance,
    scheduler.step, with latents in the UNet's dtype as diffusers' pipelines keep them."""
    device = setup.device
    sigmas = bench_sigmas(setup, steps)
    scheduler = euler_scheduler(setup, sigmas)
    text, added = cfg_conditioning(inputs)
    with plain_processors(setup.model) as unet:
        counter = RowCounter(unet)
        timer = StepTimer(device)
        try:
            timer.mark()
            latents = (inputs.noise.to(device) * scheduler.init_noise_sigma).to(setup.dtype)
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred = unet(model_input, t, encoder_hidden_states=text, added_cond_kwargs=added,
                                  return_dict=False)[0]
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
                timer.mark()
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.mark()
        finally:
            counter.close()
    intervals = timer.intervals()
    return GenerationRun(latents.float().cpu(), merge_last_update(intervals), 0.0, sum(intervals), counter.rows)


def merge_last_update(intervals: list[float]) -> list[float]:
    """Marks fall after each step's model call; the final state update joins the last step."""
    if len(intervals) < 2:
        return intervals
    return intervals[:-2] + [intervals[-2] + intervals[-1]]


def denoiser_call_flops(setup: SpeedSetup, inputs: SampleInputs, contexts: ContextInputs | None,
                        guidance: GuidanceConfig, steps: int) -> int:
    """FLOPs of one steady-state step of our path (the second call: context keys/values already cached)."""
    with torch.no_grad():
        cond = inputs.conditioning()
        if contexts is not None:
            cond.context_state = encode_context_state(setup.model, contexts)
        sigmas = bench_sigmas(setup, steps)
        guided = GuidedDenoiser(setup.pipe.denoiser(), cond, guidance, sigmas)
        x = inputs.noise.to(setup.device) * sigmas[0]
        sigma = sigmas[:1].to(setup.device).expand(x.shape[0])
        if contexts is not None:
            guided(x, sigma)
        return count_flops(lambda: guided(x, sigma))


def diffusers_step_flops(setup: SpeedSetup, inputs: SampleInputs) -> int:
    text, added = cfg_conditioning(inputs)
    latents = torch.cat([inputs.noise] * 2).to(setup.device, setup.dtype)
    with torch.no_grad(), plain_processors(setup.model) as unet:
        return count_flops(lambda: unet(latents, torch.tensor(500.0, device=setup.device),
                                        encoder_hidden_states=text, added_cond_kwargs=added))


# -- sampling: the benchmark --------------------------------------------------------------------------------

@dataclass
class SampleCase:
    """One configuration measured: a path, a batch, K contexts and a guidance."""

    path: str          # "ours" | "diffusers"
    batch: int
    contexts: int
    guidance: str      # "cfg" | "dual"
    compiled: bool = False
    runs: list[GenerationRun] = field(default_factory=list)
    flops_per_step: int = 0
    peak_memory: int = 0


def sample_cases(settings: SampleSpeedSettings, batch: int, compiled: bool = False) -> list[SampleCase]:
    cases = [] if compiled else [SampleCase("diffusers", batch, 0, "cfg")]
    for k in settings.contexts:
        if compiled and k not in (0, max(settings.contexts)):
            continue
        cases.append(SampleCase("ours", batch, k, "cfg", compiled))
        if k > 0 and not compiled:
            cases.append(SampleCase("ours", batch, k, "dual"))
    return cases


def run_case(setup: SpeedSetup, case: SampleCase, inputs: SampleInputs, settings: SampleSpeedSettings,
             steps: int) -> GenerationRun:
    if case.path == "diffusers":
        return run_diffusers(setup, inputs, settings.guidance_scale, steps)
    contexts = context_inputs(setup, case.batch, case.contexts, settings.seed) if case.contexts else None
    return run_ours(setup, inputs, contexts, guidance_config(case.guidance, settings), steps)


def measure_cases(setup: SpeedSetup, cases: list[SampleCase], inputs: SampleInputs, settings: SampleSpeedSettings,
                  steps: int, log: Callable[[str], None], advance: Callable[[], None] = lambda: None) -> None:
    """Warm-up generations, then `repeats` rounds over all cases in turn, so that a slow spell of a shared
    machine spreads over every case rather than landing on one."""
    for case in cases:
        for _ in range(settings.warmup):
            run_case(setup, case, inputs, settings, steps)
            advance()
    for round_index in range(settings.repeats):
        for case in cases:
            reset_peak_memory(setup.device)
            case.runs.append(run_case(setup, case, inputs, settings, steps))
            case.peak_memory = max(case.peak_memory, peak_memory_bytes(setup.device))
            advance()
        log(f"  batch {inputs.batch}: round {round_index + 1}/{settings.repeats} done")


def count_case_flops(setup: SpeedSetup, case: SampleCase, inputs: SampleInputs, settings: SampleSpeedSettings,
                     steps: int) -> None:
    if case.path == "diffusers":
        case.flops_per_step = diffusers_step_flops(setup, inputs)
        return
    contexts = context_inputs(setup, case.batch, case.contexts, settings.seed) if case.contexts else None
    case.flops_per_step = denoiser_call_flops(setup, inputs, contexts, guidance_config(case.guidance, settings),
                                              steps)


def case_row(case: SampleCase, peak_flops: float) -> dict:
    step_lists = [run.step_s for run in case.runs]
    steady = [s for steps in step_lists for s in steady_steps(steps)]
    step_s = median(steady)
    step2 = median([steps[1] for steps in step_lists if len(steps) > 1])
    last = median([steps[-1] for steps in step_lists if len(steps) > 1])
    generation_s = median([run.total_s for run in case.runs])
    rows = case.runs[0].unet_rows if case.runs else []
    calls_per_step = len(rows) / max(len(step_lists[0]), 1) if case.runs else float("nan")
    achieved = case.flops_per_step / step_s if step_s > 0 else float("nan")
    return {
        "path": case.path, "batch": case.batch, "contexts": case.contexts, "guidance": case.guidance,
        "compiled": case.compiled, "rows_per_unet_call": rows[0] if rows else None,
        "unet_calls_per_step": calls_per_step, "step_s": step_s, "step_spread": relative_spread(steady),
        "first_step_s": median([s[0] for s in step_lists]),
        "step2_s": step2, "last_step_s": last, "last_over_step2": last / step2 if step2 > 0 else float("nan"),
        "generation_s": generation_s, "images_per_s": case.batch / generation_s,
        "encode_s": median([run.encode_s for run in case.runs]), "flops_per_step": case.flops_per_step,
        "achieved_flops_per_s": achieved, "mfu": achieved / peak_flops, "peak_memory_bytes": case.peak_memory,
    }


def measure_encoding(setup: SpeedSetup, inputs: SampleInputs, k: int, settings: SampleSpeedSettings,
                     in_generation_s: float) -> dict:
    """The one-time context encoding of B*K images against one plain UNet forward of the B images, both warm
    and timed alternately (medians); `in_generation_s` is the encoding's time inside the generations."""
    model, device = setup.model, setup.device
    contexts = context_inputs(setup, inputs.batch, k, settings.seed)
    x = inputs.noise.to(device, setup.dtype)
    t = torch.full((inputs.batch,), 500.0, device=device)
    forward = lambda: model(x, t, inputs.text, None, inputs.added_text)
    encode = lambda: model.encode_contexts(contexts.images, contexts.marker_text, contexts.modalities,
                                           contexts.added)
    forward_times, encode_times = [], []
    with torch.no_grad():
        forward()
        encode()
        for _ in range(max(3, settings.repeats)):
            forward_times.append(timed(device, forward)[1])
            encode_times.append(timed(device, encode)[1])
        forward_flops, encode_flops = count_flops(forward), count_flops(encode)
    forward_s, encode_s = median(forward_times), median(encode_times)
    cost = encode_s / forward_s
    return {"batch": inputs.batch, "contexts": k, "encode_s": encode_s, "in_generation_encode_s": in_generation_s,
            "unet_forward_s": forward_s, "cost_in_unet_forwards": cost, "cost_per_context": cost / k,
            "flop_cost_in_unet_forwards": encode_flops / forward_flops,
            "target_per_context": ENCODE_COST_PER_CONTEXT}


def compile_unet(setup: SpeedSetup, log: Callable[[str], None]) -> bool:
    if setup.device.type != "cuda":
        log("compile: skipped on the CPU (inductor's C++ build takes many minutes on a small CPU); "
            "run with --device cuda --compile")
        return False
    setup.unet.compile()
    return True


def sample_speed(settings: SampleSpeedSettings, log: Callable[[str], None] = print,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """The sampling benchmark's report; `progress(done, total)` follows its timed and warm-up generations."""
    device = speed_device(settings.device)
    dtype = speed_dtype(settings.dtype, device)
    steps = settings.steps or DEFAULT_SAMPLE_STEPS[settings.size]
    log(f"building a random-weight {settings.size} UNet on {device} ({dtype_name(dtype)})")
    setup = build_setup(settings.size, device, dtype, settings.seed, max(settings.contexts))
    peak = measure_peak_flops(device)
    rows, encoding, profiles = [], [], {}
    runs = sum(len(sample_cases(settings, batch)) for batch in settings.batches) * (settings.warmup + settings.repeats)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, runs)

    for batch in settings.batches:
        inputs = sample_inputs(setup, batch, settings.seed)
        batch_rows = measure_batch(setup, inputs, settings, steps, peak["flops_per_s"], log, advance)
        rows += batch_rows
        encoding += [measure_encoding(setup, inputs, k, settings, find_row(batch_rows, contexts=k)["encode_s"])
                     for k in settings.contexts if k > 0]
        if settings.profile and not profiles:
            profiles = profile_steps(setup, inputs, settings, steps)
    compile_note = None
    if settings.compile:
        compile_note = measure_compiled(setup, rows, settings, steps, peak["flops_per_s"], log)
    return {
        "kind": "sample", "command": settings.command, "environment": environment(device, dtype),
        "settings": {**asdict(settings), "steps": steps, "latent_shape": list(setup.latent_shape),
                     "text_shape": [setup.text_tokens, setup.text_dim], "pixel_size": setup.pixel_size},
        "peak": peak, "memory": memory_label(device), "rows": rows, "encoding": encoding,
        "checks": sample_checks(rows, encoding, settings, device), "compile": compile_note,
        "profiles": profiles,
    }


def measure_batch(setup: SpeedSetup, inputs: SampleInputs, settings: SampleSpeedSettings, steps: int,
                  peak_flops: float, log: Callable[[str], None], advance: Callable[[], None] = lambda: None
                  ) -> list[dict]:
    cases = sample_cases(settings, inputs.batch)
    measure_cases(setup, cases, inputs, settings, steps, log, advance)
    for case in cases:
        count_case_flops(setup, case, inputs, settings, steps)
    return [case_row(case, peak_flops) for case in cases]


def measure_compiled(setup: SpeedSetup, rows: list[dict], settings: SampleSpeedSettings, steps: int,
                     peak_flops: float, log: Callable[[str], None]) -> str | None:
    """Our path again with the UNet under torch.compile (its rows are added to `rows`); a note if skipped."""
    if not compile_unet(setup, log):
        return "skipped on the CPU"
    for batch in settings.batches:
        inputs = sample_inputs(setup, batch, settings.seed)
        cases = sample_cases(settings, batch, compiled=True)
        measure_cases(setup, cases, inputs, settings, steps, log)  # warm-up generations compile
        for case in cases:
            eager = find_row(rows, path="ours", batch=batch, contexts=case.contexts, guidance="cfg", compiled=False)
            case.flops_per_step = eager["flops_per_step"]
            rows.append(case_row(case, peak_flops))
    return None


def profile_steps(setup: SpeedSetup, inputs: SampleInputs, settings: SampleSpeedSettings, steps: int) -> dict:
    """torch.profiler top operators of two-step generations: diffusers, ours K=0, ours at the largest K."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    cases = [SampleCase("diffusers", inputs.batch, 0, "cfg"), SampleCase("ours", inputs.batch, 0, "cfg")]
    if max(settings.contexts) > 0:
        cases.append(SampleCase("ours", inputs.batch, max(settings.contexts), "cfg"))
    tables = {}
    for case in cases:
        with profile(activities=activities) as prof:
            run_case(setup, case, inputs, settings, min(steps, 2))
        tables[f"{case.path} K={case.contexts}"] = prof.key_averages().table(sort_by=sort_by, row_limit=12)
    return tables


# -- checks -------------------------------------------------------------------------------------------------

def check(name: str, value, target: str, passed: bool | None) -> dict:
    status = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return {"name": name, "value": value, "target": target, "status": status}


def find_row(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def sample_checks(rows: list[dict], encoding: list[dict], settings: SampleSpeedSettings,
                  device: torch.device) -> list[dict]:
    checks = []
    for batch in settings.batches:
        theirs = find_row(rows, path="diffusers", batch=batch)
        base = find_row(rows, path="ours", batch=batch, contexts=0, guidance="cfg", compiled=False)
        if theirs and base:
            ratio = base["step_s"] / theirs["step_s"]
            checks.append(check(f"ours K=0 / diffusers per step, batch {batch}",
                                f"{ratio:.3f}{spread_note(base, theirs)}", f"<= {OURS_VS_DIFFUSERS_SAMPLE}",
                                ratio <= OURS_VS_DIFFUSERS_SAMPLE))
            checks.append(check(f"ours K=0 FLOPs = diffusers FLOPs, batch {batch}",
                                f"{base['flops_per_step']:.4g} vs {theirs['flops_per_step']:.4g}", "equal",
                                abs(base["flops_per_step"] - theirs["flops_per_step"])
                                <= 0.001 * theirs["flops_per_step"]))
        checks.extend(context_overhead_checks(rows, batch, base, settings))
    checks.extend(single_call_checks(rows))
    checks.extend(step_n_checks(rows))
    for entry in encoding:
        per_context = entry["cost_per_context"]
        checks.append(check(f"context encoding, batch {entry['batch']} K={entry['contexts']} (UNet forwards per K)",
                            round(per_context, 3), f"<= {ENCODE_COST_PER_CONTEXT}",
                            per_context <= ENCODE_COST_PER_CONTEXT))
    checks.extend(mfu_checks(rows, settings, device))
    checks.extend(compile_checks(rows))
    return checks


def overhead_figures(row: dict, base: dict) -> tuple[float, float]:
    """(time overhead, FLOP overhead) of a row with contexts over the text-to-image row of its batch."""
    return row["step_s"] / base["step_s"] - 1, row["flops_per_step"] / base["flops_per_step"] - 1


def context_overhead_checks(rows: list[dict], batch: int, base: dict | None, settings) -> list[dict]:
    if base is None:
        return []
    checks = []
    for row in rows:
        if row["path"] != "ours" or row["batch"] != batch or row["contexts"] == 0 or row["compiled"]:
            continue
        time_over, flop_over = overhead_figures(row, base)
        row["time_overhead"], row["flop_overhead"] = time_over, flop_over
        label = f"batch {batch} K={row['contexts']} {row['guidance']} ({row['rows_per_unet_call']} rows)"
        bound = FLOP_PROPORTIONALITY * flop_over
        checks.append(check(f"{label}: time overhead vs FLOP overhead",
                            f"{time_over:+.1%} vs {flop_over:+.1%}{spread_note(row, base)}", f"<= {bound:+.1%}",
                            time_over <= bound))
        if settings.size == "sd15" and row["contexts"] == 1 and row["guidance"] == "cfg":
            checks.append(check(f"SD1.5 K=1 per step over text-to-image, batch {batch}", f"{time_over:+.1%}",
                                f"<= +{SD15_K1_STEP_OVERHEAD:.0%}", time_over <= SD15_K1_STEP_OVERHEAD))
    return checks


def spread_note(row: dict, base: dict) -> str:
    """How far single steps of the two rows scatter, to tell a miss from measurement noise."""
    spread = max(row["step_spread"], base["step_spread"])
    return "" if spread != spread else f", step times +/-{spread:.1%}"


def single_call_checks(rows: list[dict]) -> list[dict]:
    ours = [row for row in rows if row["path"] == "ours" and not row["compiled"]]
    if not ours:
        return []
    calls = sorted({row["unet_calls_per_step"] for row in ours})
    shapes = sorted({f"{row['rows_per_unet_call'] // row['batch']}xB" for row in ours})
    return [check("all guidance branches in one UNet call per step (every row of ours)",
                  f"{'/'.join(f'{c:g}' for c in calls)} call(s) of {'/'.join(shapes)} rows", "1 call",
                  calls == [1])]


def step_n_checks(rows: list[dict]) -> list[dict]:
    """The worst last-step / step-2 ratio over our rows (each row's own is in the N/2 column)."""
    measured = [row for row in rows if row["path"] == "ours" and row["last_over_step2"] == row["last_over_step2"]]
    if not measured:
        return []
    worst = max(measured, key=lambda row: row["last_over_step2"])
    ratio = worst["last_over_step2"]
    where = f"batch {worst['batch']} K={worst['contexts']} {worst['guidance']}"
    return [check(f"step N / step 2, worst of {len(measured)} rows ({where})", round(ratio, 3),
                  f"<= {STEP_N_VS_STEP_2}", ratio <= STEP_N_VS_STEP_2)]


def mfu_checks(rows: list[dict], settings: SampleSpeedSettings, device: torch.device) -> list[dict]:
    applies = device.type == "cuda" and settings.size == "sdxl"
    checks = []
    for row in rows:
        if row["path"] == "ours" and row["contexts"] == 0:
            checks.append(check(f"MFU, batch {row['batch']} K=0{' compiled' if row['compiled'] else ''}",
                                f"{row['mfu']:.1%}", f">= {SDXL_SAMPLE_MFU:.0%} (GPU bf16, SDXL 1024^2)",
                                row["mfu"] >= SDXL_SAMPLE_MFU if applies else None))
    return checks


def compile_checks(rows: list[dict]) -> list[dict]:
    checks = []
    for row in rows:
        if not row["compiled"]:
            continue
        eager = find_row(rows, path="ours", batch=row["batch"], contexts=row["contexts"], guidance="cfg",
                         compiled=False)
        speedup = eager["step_s"] / row["step_s"]
        checks.append(check(f"compiled / eager speed-up, batch {row['batch']} K={row['contexts']}",
                            round(speedup, 2), f">= {COMPILE_SPEEDUP}", speedup >= COMPILE_SPEEDUP))
    return checks


# -- training -----------------------------------------------------------------------------------------------

@dataclass
class TrainInputs:
    x0: torch.Tensor
    text: torch.Tensor
    added: dict | None
    contexts: ContextInputs | None


def train_inputs(setup: SpeedSetup, batch: int, contexts: int, seed: int) -> TrainInputs:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *setup.latent_shape, generator=generator).to(setup.device, setup.dtype)
    text, added = random_text(setup, batch, generator)
    return TrainInputs(x0, text, added, context_inputs(setup, batch, contexts, seed) if contexts else None)


def select_trainable(model: ContextAugmentedUNet, mode: str) -> list[torch.nn.Parameter]:
    """As the Trainer does: the adapter always, the base UNet only in full fine-tuning; trainable weights
    kept in fp32 (mixed precision computes in the run's dtype under autocast)."""
    model.unet.requires_grad_(mode == "full")
    model.adapter.requires_grad_(True)
    params = list(model.adapter.parameters())
    if mode == "full":
        params += list(model.unet.parameters())
    for p in params:
        p.data = p.data.float()
    return params


def plain_trainable(unet) -> list[torch.nn.Parameter]:
    """Full fine-tuning of the plain UNet, weights in fp32 as for our path."""
    unet.requires_grad_(True)
    params = list(unet.parameters())
    for p in params:
        p.data = p.data.float()
    return params


def autocast(setup: SpeedSetup, dtype: torch.dtype):
    return torch.autocast(setup.device.type, dtype=dtype, enabled=dtype != torch.float32)


def ours_train_step(setup: SpeedSetup, loss_module, inputs: TrainInputs, step: int) -> torch.Tensor:
    """The Trainer's loss on synthetic tensors: noise and timesteps drawn inside, contexts encoded by the UNet."""
    ctx = inputs.contexts
    if ctx is None:
        return loss_module(inputs.x0, inputs.text, None, None, [], None, None, None, inputs.added, None,
                           generator_seed=step)
    return loss_module(inputs.x0, inputs.text, ctx.images, ctx.marker_text, ctx.modalities, ctx.layout, None,
                       None, inputs.added, ctx.added, generator_seed=step)


def diffusers_train_step(setup: SpeedSetup, scheduler, inputs: TrainInputs, step: int) -> torch.Tensor:
    """diffusers' train_text_to_image loop: noise, add_noise at random timesteps, UNet, MSE on the noise."""
    x0 = inputs.x0
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = setup.unet(noisy, timesteps, encoder_hidden_states=inputs.text, added_cond_kwargs=inputs.added,
                      return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def ddpm_scheduler(setup: SpeedSetup):
    from diffusers import DDPMScheduler

    config = setup.pipe.base.scheduler_config
    return DDPMScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                         beta_start=config.get("beta_start", 0.0001), beta_end=config.get("beta_end", 0.02),
                         beta_schedule=config.get("beta_schedule", "linear"))


def run_train_case(setup: SpeedSetup, loss_fn: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer,
                   dtype: torch.dtype, settings: TrainSpeedSettings, steps: int) -> dict:
    """Warm-up and timed optimizer steps (forward, backward, clip at 1.0, AdamW), then the FLOPs of one
    forward + backward."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    timer = StepTimer(setup.device)

    def train_step(step: int):
        with autocast(setup, dtype):
            loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(settings.warmup):
        train_step(step)
    reset_peak_memory(setup.device)
    timer.mark()
    for step in range(steps):
        train_step(settings.warmup + step)
        timer.mark()
    step_times = timer.intervals()
    memory = peak_memory_bytes(setup.device)

    def forward_backward():
        with autocast(setup, dtype):
            loss = loss_fn(0)
        loss.backward()

    flops = count_flops(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    return {"step_s": median(step_times), "step_times_s": step_times, "flops_per_step": flops,
            "peak_memory_bytes": memory}


def train_cases(settings: TrainSpeedSettings) -> list[tuple[str, str, int]]:
    """(path, mode, K) in run order: adapter rows first, while the frozen base is still in the run's dtype."""
    cases = []
    if "adapter" in settings.modes and settings.contexts > 0:
        cases.append(("ours", "adapter", settings.contexts))
    if "full" in settings.modes:
        cases.append(("diffusers", "full", 0))
        cases.append(("ours", "full", 0))
        if settings.contexts > 0:
            cases.append(("ours", "full", settings.contexts))
    return cases


def measure_train_case(setup: SpeedSetup, path: str, mode: str, k: int, settings: TrainSpeedSettings,
                       dtype: torch.dtype, steps: int, peak_flops: float) -> dict:
    from instruct_core.train.trainer import DiffusionLoss

    inputs = train_inputs(setup, settings.batch, k, settings.seed)
    setup.model.train()
    try:
        if path == "diffusers":
            scheduler = ddpm_scheduler(setup)
            with plain_processors(setup.model):
                params = plain_trainable(setup.unet)
                # torch's default AdamW, as diffusers' training scripts create it
                optimizer = torch.optim.AdamW(params, lr=1e-6)
                figures = run_train_case(setup, lambda s: diffusers_train_step(setup, scheduler, inputs, s),
                                         optimizer, dtype, settings, steps)
        else:
            params = select_trainable(setup.model, mode)
            loss_module = DiffusionLoss(setup.pipe).to(setup.device)
            optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=True)  # as Trainer._make_optimizer
            figures = run_train_case(setup, lambda s: ours_train_step(setup, loss_module, inputs, s), optimizer,
                                     dtype, settings, steps)
    finally:
        setup.model.eval()
    achieved = figures["flops_per_step"] / figures["step_s"]
    return {"path": path, "mode": mode, "contexts": k, "batch": settings.batch, **figures,
            "images_per_s": settings.batch / figures["step_s"], "achieved_flops_per_s": achieved,
            "mfu": achieved / peak_flops,
            "trainable_params": sum(p.numel() for p in params)}


def train_speed(settings: TrainSpeedSettings, log: Callable[[str], None] = print,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """The training benchmark's report; `progress(done, total)` follows its cases."""
    device = speed_device(settings.device)
    dtype = speed_dtype(settings.dtype, device)
    steps = settings.steps or DEFAULT_TRAIN_STEPS[settings.size]
    log(f"building a random-weight {settings.size} UNet on {device} ({dtype_name(dtype)})")
    setup = build_setup(settings.size, device, dtype, settings.seed, settings.contexts)
    peak = measure_peak_flops(device)
    rows, cases = [], train_cases(settings)
    for path, mode, k in cases:
        log(f"  training: {path} {mode} K={k}")
        rows.append(measure_train_case(setup, path, mode, k, settings, dtype, steps, peak["flops_per_s"]))
        if progress is not None:
            progress(len(rows), len(cases))
    return {
        "kind": "train", "command": settings.command, "environment": environment(device, dtype),
        "settings": {**asdict(settings), "steps": steps, "latent_shape": list(setup.latent_shape),
                     "text_shape": [setup.text_tokens, setup.text_dim]},
        "peak": peak, "memory": memory_label(device), "rows": rows,
        "checks": train_checks(rows, device),
    }


def train_checks(rows: list[dict], device: torch.device) -> list[dict]:
    checks = []
    theirs = find_row(rows, path="diffusers", mode="full")
    ours = find_row(rows, path="ours", mode="full", contexts=0)
    if theirs and ours:
        ratio = ours["images_per_s"] / theirs["images_per_s"]
        checks.append(check("ours / diffusers images/s, full fine-tuning K=0", round(ratio, 3),
                            f">= {OURS_VS_DIFFUSERS_TRAIN}", ratio >= OURS_VS_DIFFUSERS_TRAIN))
    for row in rows:
        if row["path"] == "ours" and row["mode"] == "full":
            checks.append(check(f"MFU, full fine-tuning K={row['contexts']}", f"{row['mfu']:.1%}",
                                f">= {FULL_FINETUNE_MFU:.0%} (GPU)",
                                row["mfu"] >= FULL_FINETUNE_MFU if device.type == "cuda" else None))
    return checks


# -- environment and output ---------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} " \
           f"torch threads)"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers

    return {"device": str(device), "device_name": device_name(device), "dtype": dtype_name(dtype),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


def write_json(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return path


def format_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds == seconds else "-"


def format_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def format_header(report: dict, title: str) -> list[str]:
    env = report["environment"]
    peak = report["peak"]
    return [
        title,
        f"command: {report['command'] or '(library call)'}",
        f"device: {env['device_name']} | torch {env['torch']} | diffusers {env['diffusers']} | dtype {env['dtype']}",
        f"measured peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['method']}; MFU is against this); "
        f"a 3x3 convolution ran at {peak['conv3x3_flops_per_s'] / 1e9:.1f} GFLOP/s",
    ]


def format_sample_report(report: dict) -> str:
    settings = report["settings"]
    lines = format_header(report, "Instruct-Imagen sampling benchmark")
    lines.append(f"size {settings['size']}: latents {'x'.join(map(str, settings['latent_shape']))}, text "
                 f"{'x'.join(map(str, settings['text_shape']))}; Euler, {settings['steps']} steps, warm-up "
                 f"{settings['warmup']}, {settings['repeats']} timed generation(s) per row, interleaved")
    lines.append("ms/step: median over steps 2..N; img/s: whole generations (context encoding included); "
                 f"mem: {report['memory']}")
    lines += ["", format_table(
        ["batch", "path", "K", "guidance", "rows", "ms/step", "step1", "step2", "stepN", "N/2", "img/s",
         "GFLOP/step", "MFU", "+time", "+FLOP", "mem MiB"],
        [sample_line(row) for row in report["rows"]])]
    if report["encoding"]:
        lines += ["", "Context encoding, once per generation: B*K images vs one plain UNet forward of B images, "
                  "both warm (medians); 'in gen.' is the encoding's time inside the generations above",
                  format_table(["batch", "K", "encode ms", "in gen.", "UNet fwd ms", "UNet fwds", "per K",
                                "FLOP ratio"], [encoding_line(e) for e in report["encoding"]])]
    lines += ["", "Checks:", *[check_line(c) for c in report["checks"]]]
    if report.get("compile"):
        lines.append(f"compile: {report['compile']}")
    lines += ["", "ComfyUI's KSampler vs InstructSampler: `python -m instruct_bench speed comfyui` (a running server)"]
    for name, table in report.get("profiles", {}).items():
        lines += ["", f"Profile, {name} (a 2-step generation, context encoding included):", table]
    return "\n".join(lines)


def sample_line(row: dict) -> list[str]:
    label = row["guidance"] + (" compiled" if row["compiled"] else "")
    over = lambda key: f"{row[key]:+.1%}" if key in row else ""
    return [row["batch"], row["path"], row["contexts"], label, row["rows_per_unet_call"], format_ms(row["step_s"]),
            format_ms(row["first_step_s"]), format_ms(row["step2_s"]), format_ms(row["last_step_s"]),
            f"{row['last_over_step2']:.2f}", f"{row['images_per_s']:.2f}", f"{row['flops_per_step'] / 1e9:.2f}",
            f"{row['mfu']:.1%}", over("time_overhead"), over("flop_overhead"),
            f"{row['peak_memory_bytes'] / 2**20:.0f}"]


def encoding_line(entry: dict) -> list[str]:
    return [entry["batch"], entry["contexts"], format_ms(entry["encode_s"]),
            format_ms(entry["in_generation_encode_s"]), format_ms(entry["unet_forward_s"]),
            f"{entry['cost_in_unet_forwards']:.2f}", f"{entry['cost_per_context']:.2f}",
            f"{entry['flop_cost_in_unet_forwards']:.2f}"]


def check_line(entry: dict) -> str:
    return f"  [{entry['status']:>4}] {entry['name']}: {entry['value']} (target {entry['target']})"


def format_train_report(report: dict) -> str:
    settings = report["settings"]
    lines = format_header(report, "Instruct-Imagen training benchmark")
    lines.append(f"size {settings['size']}: latents {'x'.join(map(str, settings['latent_shape']))}, batch "
                 f"{settings['batch']}, {settings['steps']} timed steps after {settings['warmup']} warm-up; "
                 "a step = forward, backward, clip, AdamW")
    lines.append(f"GFLOP/step: forward + backward (FlopCounterMode); mem: {report['memory']}")
    lines += ["", format_table(
        ["path", "mode", "K", "batch", "ms/step", "img/s", "GFLOP/step", "MFU", "trainable", "mem MiB"],
        [[r["path"], r["mode"], r["contexts"], r["batch"], format_ms(r["step_s"]), f"{r['images_per_s']:.2f}",
          f"{r['flops_per_step'] / 1e9:.2f}", f"{r['mfu']:.1%}", f"{r['trainable_params'] / 1e6:.2f}M",
          f"{r['peak_memory_bytes'] / 2**20:.0f}"] for r in report["rows"]])]
    lines += ["", "Checks:", *[check_line(c) for c in report["checks"]]]
    return "\n".join(lines)
