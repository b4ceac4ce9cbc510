"""Instruct-Imagen as a patch on ComfyUI's own MODEL, in a real ComfyUI: ApplyInstructImagen with the stock
samplers, on a random single-file SD1.5 checkpoint (the architecture and file format of a real one).
Runs when COMFYUI_PATH and COMFYUI_PYTHON are set, as tests/nodes/test_comfyui_integration.py does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from instruct_core import client
from test_comfyui_integration import ROOT, Server, pytestmark, run  # noqa: F401  (pytestmark: skip without ComfyUI)

CHECKPOINT = "random_sd15.safetensors"
SIZE = 64
CFG = 5.0
TEXT = "Generate an image of [ref#1] in the style of [ref#2]"


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_sd15_file):
    running = Server(tmp_path_factory.mktemp("comfyui_patch"))
    folder = running.base / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHECKPOINT).symlink_to(random_sd15_file)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def random_adapter(server) -> str:
    """An adapter for the SD1.5 layout whose every parameter is non-zero, so contexts change the picture."""
    script = ("import sys; from pathlib import Path; from test_comfyui_patch import write_random_adapter;"
              "write_random_adapter(Path(sys.argv[1]))")
    path = server.base / "models" / "instruct_imagen" / "random_sd15_adapter.safetensors"
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(__file__).resolve().parent, check=True,
                   timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return path.name


def write_random_adapter(path, seed: int = 0) -> None:
    """Random non-zero context layers for the full SD1.5 layout (tests/nodes/comfyui_files.py)."""
    from comfyui_files import write_random_adapter as write_adapter_for
    from diffusers import UNet2DConditionModel

    from instruct_core.loading import shipped_config_dir

    folder = shipped_config_dir("sd1", "epsilon") / "unet"
    with torch.device("meta"):  # the layout only: no 3 GB of base weights
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))
    write_adapter_for(Path(path), unet, seed)


# -- graphs ----------------------------------------------------------------------------------------------

def instruction_nodes(contexts: int) -> dict:
    """LoadImage + ContextImage for `contexts` contexts (subject, style) and an InstructionBuilder as node "i"."""
    sources = [("instruct_imagen/subject_toy.png", "subject", "[ref#1] a red plush toy"),
               ("instruct_imagen/style_dots.png", "style", "[ref#2] a dotted painting")][:contexts]
    text = TEXT if contexts == 2 else "Generate an image of [ref#1] on a beach" if contexts else "a red cube"
    graph = {"i": {"class_type": "InstructionBuilder", "inputs": {"instruction": text, "negative": "blurry"}}}
    for k, (image, modality, marker) in enumerate(sources, start=1):
        graph[f"load{k}"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        graph[f"ctx{k}"] = {"class_type": "ContextImage", "inputs": {
            "image": [f"load{k}", 0], "modality": modality, "text": marker, "weight": 1.0}}
        graph["i"]["inputs"][f"contexts.ref_{k}"] = [f"ctx{k}", 0]
    return graph


def ksampler_graph(contexts: int, adapter: str, cfg: float, seed: int = 5, steps: int = 4) -> dict:
    """CheckpointLoaderSimple -> ApplyInstructImagen -> KSampler (euler, normal) -> VAEDecode -> SaveImage,
    the latent also saved."""
    graph = instruction_nodes(contexts)
    graph.update({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "apply": {"class_type": "ApplyInstructImagen", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "adapter": adapter,
            "instruction": ["i", 0], "strength": 1.0, "context_width": SIZE, "context_height": SIZE,
            "resize_policy": "crop"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["apply", 1], "negative": ["apply", 2], "latent_image": ["empty", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
    })
    return with_outputs(graph, ["sample", 0], "ksampler")


def plain_graph(text: str, negative: str, cfg: float, seed: int = 5, steps: int = 4) -> dict:
    """The stock graph: CLIPTextEncode x2 -> KSampler, without Instruct-Imagen."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
    }
    return with_outputs(graph, ["sample", 0], "plain")


def instruct_sampler_graph(contexts: int, adapter: str, cfg: float, seed: int = 5, steps: int = 4,
                           cfg_context: float | None = None, mode: str = "dual") -> dict:
    """The library's own path on the same file: InstructImagenLoader -> MultiModalEncode -> InstructSampler."""
    graph = instruction_nodes(contexts)
    graph.update({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},  # its VAE decodes
        "loader": {"class_type": "InstructImagenLoader",
                   "inputs": {"model": CHECKPOINT, "adapter": adapter, "dtype": "fp32"}},
        "encode": {"class_type": "MultiModalEncode", "inputs": {
            "model": ["loader", 0], "instruction": ["i", 0], "context_width": SIZE, "context_height": SIZE,
            "resize_policy": "crop"}},
        "sample": {"class_type": "InstructSampler", "inputs": {
            "model": ["loader", 0], "conditioning": ["encode", 0], "seed": seed, "steps": steps,
            "sampler": "euler", "schedule": "normal", "cfg_text": cfg,
            "cfg_context": cfg if cfg_context is None else cfg_context, "guidance": mode,
            "width": SIZE, "height": SIZE, "batch_size": 1, "denoise": 1.0}},
    })
    return with_outputs(graph, ["sample", 0], "instruct")


def guider_graph(contexts: int, adapter: str, cfg_text: float, cfg_context: float, mode: str, seed: int = 5,
                 steps: int = 4) -> dict:
    """ApplyInstructImagen -> InstructGuider -> SamplerCustomAdvanced (euler, normal)."""
    graph = ksampler_graph(contexts, adapter, CFG, seed, steps)
    del graph["sample"]
    graph.update({
        "guider": {"class_type": "InstructGuider", "inputs": {
            "model": ["apply", 0], "positive": ["apply", 1], "negative": ["apply", 2], "cfg_text": cfg_text,
            "cfg_context": cfg_context, "guidance": mode}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {
            "model": ["apply", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })
    return with_outputs(graph, ["sample", 0], "guider")


def with_outputs(graph: dict, latent: list, prefix: str) -> dict:
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["ckpt", 2]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    graph["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": prefix}}
    return graph


_RESULTS: dict = {}  # each distinct graph runs once per server: several tests compare against the same run


def outputs(server: Server, graph: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The run's image (uint8 HxWx3) and latent."""
    key = (server.url, json.dumps(graph, sort_keys=True))
    if key not in _RESULTS:
        _RESULTS[key] = _run_outputs(server, graph)
    return _RESULTS[key]


def _run_outputs(server: Server, graph: dict) -> tuple[np.ndarray, torch.Tensor]:
    entry = run(server, graph)
    comfy = client.ComfyClient(server.url)
    item = entry["outputs"]["save"]["images"][0]
    image = np.asarray(Image.open(io.BytesIO(comfy.download(item))).convert("RGB"))
    saved = entry["outputs"]["save_latent"]["latents"][0]
    path = server.base / "output" / saved.get("subfolder", "") / saved["filename"]
    return image, load_file(str(path))["latent_tensor"]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0)


# -- tests -----------------------------------------------------------------------------------------------

def test_fresh_adapter_leaves_the_picture_bit_for_bit_unchanged(server):
    """adapter 'none': the contexts are encoded and attended to, through zero-initialised outputs."""
    image, latent = outputs(server, ksampler_graph(2, "none", cfg=CFG))
    plain_image, plain_latent = outputs(server, plain_graph(TEXT, "blurry", cfg=CFG))
    assert torch.equal(latent, plain_latent)
    assert np.array_equal(image, plain_image)


def test_contexts_change_the_picture_and_the_node_is_served(server, random_adapter):
    info = server.get("/object_info/ApplyInstructImagen")["ApplyInstructImagen"]
    assert info["output"] == ["MODEL", "CONDITIONING", "CONDITIONING"]
    assert random_adapter in info["input"]["required"]["adapter"][1]["options"]
    _, latent = outputs(server, ksampler_graph(2, random_adapter, cfg=CFG))
    _, plain = outputs(server, plain_graph(TEXT, "blurry", cfg=CFG))
    assert (latent - plain).abs().mean() > 1e-3


@pytest.mark.parametrize("contexts", [0, 1, 2])
def test_ksampler_on_the_patch_matches_instruct_sampler(server, random_adapter, contexts):
    """Same checkpoint, same adapter, fp32 on the CPU, euler + normal, 4 steps: KSampler with cfg c on
    ApplyInstructImagen's outputs and InstructSampler with cfg_text = cfg_context = c (dual) agree."""
    image, _ = outputs(server, ksampler_graph(contexts, random_adapter, cfg=CFG))
    reference, _ = outputs(server, instruct_sampler_graph(contexts, random_adapter, cfg=CFG))
    assert mean_abs_diff(image, reference) <= 1 / 255


def test_instruct_guider_with_equal_scales_is_ksampler_cfg(server, random_adapter):
    image, latent = outputs(server, guider_graph(2, random_adapter, CFG, CFG, "dual"))
    reference, reference_latent = outputs(server, ksampler_graph(2, random_adapter, cfg=CFG))
    assert torch.allclose(latent, reference_latent, atol=1e-3)
    assert mean_abs_diff(image, reference) <= 1 / 255


@pytest.mark.parametrize("mode", ["dual", "interleaved"])
def test_instruct_guider_matches_instruct_sampler_guidance(server, random_adapter, mode):
    """Separate text and context scales: three branches (dual) or the context-only branch (interleaved)."""
    image, _ = outputs(server, guider_graph(2, random_adapter, 5.0, 2.0, mode))
    reference, _ = outputs(server, instruct_sampler_graph(2, random_adapter, 5.0, cfg_context=2.0, mode=mode))
    joint, _ = outputs(server, ksampler_graph(2, random_adapter, cfg=CFG))
    assert mean_abs_diff(image, reference) <= 1 / 255
    assert mean_abs_diff(image, joint) > 1 / 255  # the scales made a difference


def _swap_sampler(graph: dict, node: dict) -> dict:
    graph = json.loads(json.dumps(graph))
    graph["sample"] = node
    return graph


def test_ksampler_advanced_and_sampler_custom_run_the_patch_alike(server, random_adapter):
    """The same sampling through KSamplerAdvanced and SamplerCustom gives KSampler's latent."""
    graph = ksampler_graph(1, random_adapter, cfg=CFG)
    _, reference = outputs(server, graph)
    common = {"model": ["apply", 0], "positive": ["apply", 1], "negative": ["apply", 2], "cfg": CFG,
              "latent_image": ["empty", 0]}
    advanced = _swap_sampler(graph, {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "noise_seed": 5, "steps": 4, "sampler_name": "euler", "scheduler": "normal",
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}})
    graph["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["apply", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    custom = _swap_sampler(graph, {"class_type": "SamplerCustom", "inputs": {
        **common, "add_noise": True, "noise_seed": 5, "sampler": ["sampler", 0], "sigmas": ["sigmas", 0]}})
    for other in (advanced, custom):
        _, latent = outputs(server, other)
        assert torch.allclose(latent, reference, atol=1e-4)


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m_sde", "karras"), ("uni_pc", "sgm_uniform")])
def test_other_samplers_and_schedulers_run_the_patch(server, random_adapter, sampler, scheduler):
    graph = ksampler_graph(2, random_adapter, cfg=CFG, steps=3)
    graph["sample"]["inputs"].update(sampler_name=sampler, scheduler=scheduler)
    _, latent = outputs(server, graph)
    _, fresh = outputs(server, _with_adapter(graph, "none"))
    assert torch.isfinite(latent).all() and (latent - fresh).abs().mean() > 1e-3


def _with_adapter(graph: dict, adapter: str) -> dict:
    graph = json.loads(json.dumps(graph))
    graph["apply"]["inputs"]["adapter"] = adapter
    return graph
