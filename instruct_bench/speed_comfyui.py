"""InstructSampler with no contexts against ComfyUI's own KSampler, on the same checkpoint, in one live server.

Both graphs sample with Euler on the Karras schedule and classifier-free guidance, at the same size, batch and
step count. Per-step time is the median interval between the sampler node's progress events, stamped as they
arrive on the server's websocket (both nodes report every step), so loading, text encoding and decoding do
not enter it; the node's whole execution time is reported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from instruct_core.client import ClientError, ComfyClient, describe_failure

PROMPT = "a red cube on a wooden table"
INSTRUCT_SAMPLER = "InstructSampler"
COMFY_SAMPLER = "KSampler"


@dataclass
class ComfySpeedSettings:
    server: str
    checkpoint: str  # a file name in the server's models/checkpoints
    size: int = 512
    batch: int = 1
    steps: int = 20
    repeats: int = 3
    cfg: float = 5.0
    timeout: float = 1800.0
    command: str = ""


# --random-kind: (model family, shape as named in messages)
RANDOM_KINDS = {"sd15": ("sd1", "SD1.5"), "sdxl": ("sdxl", "SDXL")}


def write_random_checkpoint(path: Path, kind: str = "sd15", seed: int = 0, config_dir: Path | None = None) -> Path:
    """A single file with random weights (fp16) in the shape of `kind` (sd15: about 2 GB, sdxl: about 7 GB;
    `config_dir`: a diffusers config folder instead of the shipped one): the same architecture and file
    format as a real checkpoint, for timing without downloading anything. Never replaces an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} exists; the random checkpoint is written only under a new name")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from instruct_core.loading import (TEXT_ENCODER_NAMES, TOKENIZER_NAMES, BaseModel, export_single_file,
                                       load_tokenizer, model_components, shipped_config_dir, text_encoder_class)

    family, shape = RANDOM_KINDS[kind]
    folder = Path(config_dir) if config_dir is not None else shipped_config_dir(family, "epsilon")
    components = model_components(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    text_encoders = []
    for name in (n for n in TEXT_ENCODER_NAMES if n in components):
        cls = text_encoder_class(components[name], folder)
        text_encoders.append(cls(cls.config_class.from_pretrained(str(folder / name), local_files_only=True)))
    base = BaseModel(unet=unet, vae=vae, text_encoders=text_encoders,
                     tokenizers=[load_tokenizer(folder / n) for n in TOKENIZER_NAMES if n in components],
                     scheduler_config={}, prediction_type="epsilon", kind=family, source=f"random {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_single_file(base, path, dtype="fp16")


def comfyui_graph(settings: ComfySpeedSettings, seed: int) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> PreviewImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": settings.checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": settings.size, "height": settings.size, "batch_size": settings.batch}},
        "5": {"class_type": COMFY_SAMPLER,
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": seed, "steps": settings.steps, "cfg": settings.cfg, "sampler_name": "euler",
                         "scheduler": "karras", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def instruct_graph(settings: ComfySpeedSettings, seed: int) -> dict:
    """InstructImagenLoader -> InstructionBuilder (no contexts) -> MultiModalEncode -> InstructSampler -> preview.
    With no contexts, text guidance alone: the same two rows per image per step as KSampler's CFG."""
    return {
        "11": {"class_type": "InstructImagenLoader",
               "inputs": {"model": settings.checkpoint, "adapter": "none", "dtype": "auto"}},
        "12": {"class_type": "InstructionBuilder", "inputs": {"instruction": PROMPT, "negative": ""}},
        "13": {"class_type": "MultiModalEncode",
               "inputs": {"model": ["11", 0], "instruction": ["12", 0], "context_width": 0, "context_height": 0,
                          "resize_policy": "crop"}},
        "14": {"class_type": INSTRUCT_SAMPLER,
               "inputs": {"model": ["11", 0], "conditioning": ["13", 0], "seed": seed, "steps": settings.steps,
                          "sampler": "euler", "schedule": "karras", "cfg_text": settings.cfg,
                          "cfg_context": 1.0, "guidance": "dual", "width": settings.size,
                          "height": settings.size, "batch_size": settings.batch, "denoise": 1.0}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 1]}},
    }


def round_graph(settings: ComfySpeedSettings, seed: int) -> dict:
    """Both chains in one prompt (distinct node ids): from one round to the next only the seeds change, so
    ComfyUI's cache keeps both loaders' outputs and no round reloads a model."""
    return {**comfyui_graph(settings, seed), **instruct_graph(settings, seed)}


def sampler_node(graph: dict, class_type: str) -> str:
    return next(node for node, spec in graph.items() if spec["class_type"] == class_type)


def step_intervals(events: list[tuple[float, dict]], node: str) -> list[float]:
    """Seconds between successive progress events of `node` (one per step), from (arrival time, event) pairs.
    The first step's interval is measured from the node's start, so it is left out: it includes setup."""
    stamps = [t for t, event in events
              if event.get("type") == "progress" and str((event.get("data") or {}).get("node")) == node]
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


def node_seconds(events: list[tuple[float, dict]], node: str) -> float | None:
    """From the node's `executing` event to the next `executing` event (the next node, or the end)."""
    executing = [(t, str((event.get("data") or {}).get("node"))) for t, event in events
                 if event.get("type") == "executing"]
    for (start, name), (end, _) in zip(executing, executing[1:]):
        if name == node:
            return end - start
    return None


def timed_prompt(client: ComfyClient, graph: dict, timeout: float) -> list[tuple[float, dict]]:
    """Queue `graph` and return every websocket event of its run with its arrival time."""
    events = client.open_events(timeout)
    stamped: list[tuple[float, dict]] = []
    try:
        prompt_id = client.queue(graph)
        deadline = time.monotonic() + timeout
        for event in events.messages():
            data = event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            stamped.append((time.perf_counter(), event))
            kind = event.get("type")
            if kind in ("execution_error", "execution_interrupted"):
                raise ClientError(describe_failure(kind, data))
            if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                break
            if time.monotonic() > deadline:
                raise ClientError(f"timed out after {timeout:.0f} s")
    finally:
        events.close()
    return stamped


def summarize(class_type: str, steps: list[float], nodes: list[float | None]) -> dict:
    timed_nodes = [n for n in nodes if n is not None]
    return {"node": class_type, "step_ms_median": statistics.median(steps) * 1e3,
            "step_ms_quartiles": [q * 1e3 for q in statistics.quantiles(steps, n=4)] if len(steps) > 1 else None,
            "node_seconds_median": statistics.median(timed_nodes) if timed_nodes else float("nan"),
            "steps_timed": len(steps)}


def server_stats(client: ComfyClient) -> dict:
    """The server's /system_stats; raises ClientError when it cannot be reached."""
    return json.loads(client.request("/system_stats"))


def comfyui_speed(settings: ComfySpeedSettings, log: Callable[[str], None] = print) -> dict:
    client = ComfyClient(settings.server)
    stats = server_stats(client)
    log(f"ComfyUI {stats.get('system', {}).get('comfyui_version', '?')} at {client.base}: "
        f"{', '.join(d.get('name', '?') for d in stats.get('devices', []))}")
    samplers = (COMFY_SAMPLER, INSTRUCT_SAMPLER)
    steps = {name: [] for name in samplers}
    nodes = {name: [] for name in samplers}
    # One untimed round (loading, first calls), then timed rounds with new seeds. Each round runs both
    # samplers, so a drift in the machine's speed affects both alike.
    for repeat in range(settings.repeats + 1):
        graph = round_graph(settings, seed=1000 + repeat)
        events = timed_prompt(client, graph, settings.timeout)
        for class_type in samplers:
            node = sampler_node(graph, class_type)
            intervals = step_intervals(events, node)
            if len(intervals) < settings.steps - 1:
                raise ClientError(f"{class_type}: got {len(intervals) + 1} progress events for "
                                  f"{settings.steps} steps")
            if repeat:
                steps[class_type].extend(intervals)
                nodes[class_type].append(node_seconds(events, node))
            log(f"  {class_type} round {repeat}{' (warm-up)' if not repeat else ''}: "
                f"median step {statistics.median(intervals) * 1e3:.1f} ms")
    comfy = summarize(COMFY_SAMPLER, steps[COMFY_SAMPLER], nodes[COMFY_SAMPLER])
    ours = summarize(INSTRUCT_SAMPLER, steps[INSTRUCT_SAMPLER], nodes[INSTRUCT_SAMPLER])
    ratio = ours["step_ms_median"] / comfy["step_ms_median"]
    return {"settings": asdict(settings), "system": stats, "comfyui": comfy, "instruct": ours,
            "per_step_ratio": ratio,
            "check": {"name": "InstructSampler K=0 per step vs KSampler", "value": round(ratio, 3),
                      "target": "<= 1.05", "passed": ratio <= 1.05}}


def format_comfyui_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"# ComfyUI KSampler vs InstructSampler (K = 0): {s['checkpoint']}, {s['size']}x{s['size']}, "
             f"batch {s['batch']}, {s['steps']} steps, euler/karras, cfg {s['cfg']}, {s['repeats']} timed runs",
             "", "| sampler | per step (median) | quartiles | node time (median) |", "|---|---|---|---|"]
    for key in ("comfyui", "instruct"):
        row = report[key]
        quartiles = row["step_ms_quartiles"]
        spread = f"{quartiles[0]:.1f} – {quartiles[2]:.1f} ms" if quartiles else "–"
        lines.append(f"| {row['node']} | {row['step_ms_median']:.1f} ms | {spread} | "
                     f"{row['node_seconds_median']:.2f} s |")
    check = report["check"]
    lines += ["", f"{check['name']}: {check['value']} (target {check['target']}: "
                  f"{'met' if check['passed'] else 'not met'})"]
    if s.get("command"):
        lines += ["", f"Command: `{s['command']}`"]
    return "\n".join(lines)


# -- the patch path: KSampler on ApplyInstructImagen against plain KSampler --------------------------------

PATCH_CONTEXTS = (0, 1, 2, 4, 8)
# Context images the pack installs into the server's input folder, with their modality and marker text.
CONTEXT_INPUTS = [("subject_toy.png", "subject", "a red plush toy"), ("style_dots.png", "style", "dots"),
                  ("edge_house.png", "edge", "the edges of a house"), ("depth_ball.png", "depth", "a ball's depth"),
                  ("sketch_cat.png", "sketch", "a cat"), ("subject_cube.png", "subject", "a cube"),
                  ("style_stripes.png", "style", "stripes"), ("content_house.png", "image", "a house")]


def patch_graph(settings: ComfySpeedSettings, seed: int, contexts: int) -> dict:
    """The plain graph with ApplyInstructImagen (adapter none: the same work as a trained adapter) between
    the loader and KSampler, the instruction naming `contexts` context images."""
    graph = comfyui_graph(settings, seed)
    del graph["2"], graph["3"]
    text = PROMPT + "".join(f" with [ref#{k}]" for k in range(1, contexts + 1))
    graph["20"] = {"class_type": "InstructionBuilder", "inputs": {"instruction": text, "negative": ""}}
    for k in range(1, contexts + 1):
        image, modality, marker = CONTEXT_INPUTS[(k - 1) % len(CONTEXT_INPUTS)]
        graph[f"2{k}a"] = {"class_type": "LoadImage", "inputs": {"image": f"instruct_imagen/{image}"}}
        graph[f"2{k}b"] = {"class_type": "ContextImage", "inputs": {
            "image": [f"2{k}a", 0], "modality": modality, "text": marker, "weight": 1.0}}
        graph["20"]["inputs"][f"contexts.ref_{k}"] = [f"2{k}b", 0]
    graph["30"] = {"class_type": "ApplyInstructImagen", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "adapter": "none", "instruction": ["20", 0],
        "strength": 1.0, "context_width": settings.size, "context_height": settings.size, "resize_policy": "crop"}}
    graph["5"]["inputs"].update(model=["30", 0], positive=["30", 1], negative=["30", 2])
    return graph


def server_pid(url: str) -> int:
    """The process listening on the server's port on this machine (Linux /proc), for its memory figures."""
    from urllib.parse import urlparse

    port = urlparse(url).port or 80
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(Path(os.readlink(fd)).name in {f"socket:[{i}]" for i in inodes} for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    raise ClientError(f"no process on this machine listens on port {port}: memory is measured on the server's "
                      f"own machine, so run the benchmark there")


class PeakMemory:
    """A process's peak resident memory over a stretch of time: Linux's high-water mark (VmHWM), reset first
    (clear_refs 5). On CUDA, the peak of the device memory in use, sampled from /system_stats meanwhile."""

    def __init__(self, pid: int, client: ComfyClient, cuda: bool):
        self.pid, self.client, self.cuda = pid, client, cuda
        self._vram_peak, self._sampling = 0, None

    def __enter__(self):
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as error:
            raise ClientError(f"cannot reset the server's peak memory ({error}); run the benchmark as the "
                              f"server's user") from None
        if self.cuda:
            self._sampling = threading.Event()
            self._thread = threading.Thread(target=self._sample_vram, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._sampling is not None:
            self._sampling.set()
            self._thread.join()

    def _sample_vram(self):
        while not self._sampling.wait(0.05):
            device = server_stats(self.client)["devices"][0]
            self._vram_peak = max(self._vram_peak, device["torch_vram_total"] - device["torch_vram_free"])

    def peak_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise ClientError(f"/proc/{self.pid}/status has no VmHWM line")

    @property
    def vram_peak_bytes(self) -> int | None:
        return self._vram_peak if self.cuda else None


def comfyui_patch_speed(settings: ComfySpeedSettings, contexts=PATCH_CONTEXTS,
                        log: Callable[[str], None] = print) -> dict:
    """Peak memory and per-step time of plain KSampler and of KSampler on ApplyInstructImagen with K contexts,
    in one warm server: every graph runs once untimed (loading), then `repeats` times measured, in turn."""
    client = ComfyClient(settings.server)
    stats = server_stats(client)
    cuda = any(d.get("type") == "cuda" for d in stats.get("devices", []))
    pid = server_pid(settings.server)
    names = ["plain"] + [f"K={k}" for k in contexts]
    graphs = lambda seed: {"plain": comfyui_graph(settings, seed),
                           **{f"K={k}": patch_graph(settings, seed, k) for k in contexts}}
    rows = {name: {"steps": [], "peak_bytes": [], "vram_peak_bytes": []} for name in names}
    for repeat in range(settings.repeats + 1):
        for name, graph in graphs(2000 + repeat).items():
            with PeakMemory(pid, client, cuda) as memory:
                events = timed_prompt(client, graph, settings.timeout)
            intervals = step_intervals(events, sampler_node(graph, COMFY_SAMPLER))
            if len(intervals) < settings.steps - 1:
                raise ClientError(f"{name}: got {len(intervals) + 1} progress events for {settings.steps} steps")
            log(f"  {name} round {repeat}{' (warm-up)' if not repeat else ''}: median step "
                f"{statistics.median(intervals) * 1e3:.1f} ms, peak {memory.peak_bytes() / 2**30:.2f} GiB")
            if repeat:
                rows[name]["steps"] += intervals
                rows[name]["peak_bytes"].append(memory.peak_bytes())
                rows[name]["vram_peak_bytes"].append(memory.vram_peak_bytes)
    plain = rows["plain"]
    plain_step, plain_peak = statistics.median(plain["steps"]), max(plain["peak_bytes"])
    table = []
    for name in names:
        row = rows[name]
        vram = [v for v in row["vram_peak_bytes"] if v is not None]
        step, peak = statistics.median(row["steps"]), max(row["peak_bytes"])
        table.append({"graph": name, "step_ms_median": step * 1e3, "step_ratio": step / plain_step,
                      "peak_gib": peak / 2**30, "peak_ratio": peak / plain_peak,
                      "vram_peak_gib": max(vram) / 2**30 if vram else None})
    k2 = next((row for row in table if row["graph"] == "K=2"), None)
    check = None if k2 is None else {"name": "ApplyInstructImagen K=2 peak memory vs plain KSampler",
                                     "value": round(k2["peak_ratio"], 3), "target": "<= 1.15",
                                     "passed": k2["peak_ratio"] <= 1.15}
    return {"settings": asdict(settings), "system": stats, "rows": table, "check": check}


def format_patch_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"# KSampler on ApplyInstructImagen (adapter none) vs plain KSampler: {s['checkpoint']}, "
             f"{s['size']}x{s['size']}, batch {s['batch']}, {s['steps']} steps, euler/karras, cfg {s['cfg']}, "
             f"{s['repeats']} measured runs each", "",
             "| graph | per step (median) | vs plain | peak process memory | vs plain | peak VRAM |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        vram = f"{row['vram_peak_gib']:.2f} GiB" if row["vram_peak_gib"] is not None else "–"
        lines.append(f"| {row['graph']} | {row['step_ms_median']:.1f} ms | {row['step_ratio']:.3f}x | "
                     f"{row['peak_gib']:.2f} GiB | {row['peak_ratio']:.3f}x | {vram} |")
    check = report["check"]
    if check:
        lines += ["", f"{check['name']}: {check['value']} (target {check['target']}: "
                      f"{'met' if check['passed'] else 'not met'})"]
    if s.get("command"):
        lines += ["", f"Command: `{s['command']}`"]
    return "\n".join(lines)
