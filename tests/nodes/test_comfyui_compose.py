"""Instruct-Imagen among ComfyUI's own nodes, in a real ComfyUI: a LoRA before it, a ControlNet after it,
low-VRAM servers, another model after it. On small random files that ComfyUI loads as its own
(tests/nodes/comfyui_files.py). Runs when COMFYUI_PATH and COMFYUI_PYTHON are set, as
tests/nodes/test_comfyui_integration.py does."""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from comfyui_files import small_unet, write_random_adapter, write_random_controlnet, write_random_lora, write_small_sd15
from instruct_core import client
from test_comfyui_integration import (  # noqa: F401  (pytestmark: skip without ComfyUI)
    COMFYUI_PYTHON, USER_CHECKPOINT, WORKFLOWS, Server, assert_images, load, pytestmark, run)

CHECKPOINT = "small_sd15.safetensors"
LORA = "random_lora.safetensors"
CONTROLNET = "random_controlnet.safetensors"
ADAPTER = "random_small_adapter.safetensors"
OTHER_CHECKPOINT = "other_small_sd15.safetensors"
FULL_CHECKPOINT = "random_sd15.safetensors"
# The workflows for the user's own checkpoint. The training pair runs in order and on a full-size
# checkpoint: training loads it through the library, which knows the standard SD1.5 shape only.
TRAINING_PAIR = ("train_adapter", "ksampler_trained_adapter")
CHECKPOINT_WORKFLOWS = [path for path in WORKFLOWS
                        if USER_CHECKPOINT in path.read_text() and path.stem not in TRAINING_PAIR]
SIZE = 64
TEXT = "a red cube on a wooden table"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The small checkpoint, its LoRA and its ControlNet, under models/ of a base directory."""
    models = tmp_path_factory.mktemp("compose_models")
    checkpoint = write_small_sd15(models / "checkpoints" / CHECKPOINT)
    shutil.copyfile(checkpoint, models / "checkpoints" / OTHER_CHECKPOINT)  # another file: another model to ComfyUI
    write_random_lora(checkpoint, models / "loras" / LORA)
    write_random_controlnet(checkpoint, models / "controlnet" / CONTROLNET)
    write_random_adapter(models / "instruct_imagen" / ADAPTER, small_unet())
    return models


def start_server(base, model_files, *flags: str) -> Server:
    (base / "models").mkdir(parents=True)
    for folder in model_files.iterdir():
        (base / "models" / folder.name).symlink_to(folder, target_is_directory=True)
    return Server(base, *flags)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_files):
    running = start_server(tmp_path_factory.mktemp("comfyui_compose"), model_files)
    yield running
    running.stop()


def stock_graph(seed: int = 3, lora: float = 0.0, control: float = 0.0, checkpoint: str = CHECKPOINT) -> dict:
    """CheckpointLoaderSimple (-> LoraLoader) -> CLIPTextEncode x2 (-> ControlNetApplyAdvanced) -> KSampler
    -> VAEDecode -> SaveImage."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": TEXT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "compose"}},
    }
    if lora:
        with_lora(graph, "ckpt", lora)
    if control:
        with_controlnet(graph, control)
    return graph


def instruct_graph(seed: int = 3, strength: float = 1.0, lora: float = 0.0, control: float = 0.0,
                   checkpoint: str = CHECKPOINT) -> dict:
    """The stock graph with ApplyInstructImagen between the checkpoint and KSampler, on two contexts (a
    subject and a style) and the random adapter."""
    graph = stock_graph(seed, checkpoint=checkpoint)
    del graph["pos"], graph["neg"]
    graph["i"] = {"class_type": "InstructionBuilder", "inputs": {
        "instruction": "Generate an image of [ref#1] in the style of [ref#2]", "negative": "blurry"}}
    sources = [("subject_toy.png", "subject", "[ref#1] a red plush toy"),
               ("style_dots.png", "style", "[ref#2] a dotted painting")]
    for n, (image, modality, text) in enumerate(sources, start=1):
        graph[f"load{n}"] = {"class_type": "LoadImage", "inputs": {"image": f"instruct_imagen/{image}"}}
        graph[f"ctx{n}"] = {"class_type": "ContextImage", "inputs": {
            "image": [f"load{n}", 0], "modality": modality, "text": text, "weight": 1.0}}
        graph["i"]["inputs"][f"contexts.ref_{n}"] = [f"ctx{n}", 0]
    graph["apply"] = {"class_type": "ApplyInstructImagen", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "adapter": ADAPTER,
        "instruction": ["i", 0], "strength": strength, "context_width": SIZE, "context_height": SIZE,
        "resize_policy": "crop"}}
    graph["sample"]["inputs"].update(model=["apply", 0], positive=["apply", 1], negative=["apply", 2])
    if lora:
        with_lora(graph, "ckpt", lora)
    if control:
        with_controlnet(graph, control)
    return graph


def with_lora(graph: dict, loader: str, strength: float) -> dict:
    """A LoraLoader between the checkpoint loader and every node that took its model or CLIP."""
    graph["lora"] = {"class_type": "LoraLoader", "inputs": {
        "model": [loader, 0], "clip": [loader, 1], "lora_name": LORA, "strength_model": strength,
        "strength_clip": strength}}
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if node_id != "lora" and value in ([loader, 0], [loader, 1]):
                node["inputs"][name] = ["lora", value[1]]
    return graph


def with_controlnet(graph: dict, strength: float) -> dict:
    """ControlNetApplyAdvanced on the sampler's positive and negative, with an edge map as its hint."""
    sampler = graph["sample"]["inputs"]
    graph["hint"] = {"class_type": "LoadImage", "inputs": {"image": "instruct_imagen/edge_house.png"}}
    graph["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    graph["control"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": sampler["positive"], "negative": sampler["negative"], "control_net": ["cnet", 0],
        "image": ["hint", 0], "strength": strength, "start_percent": 0.0, "end_percent": 1.0,
        "vae": ["ckpt", 2]}}
    sampler.update(positive=["control", 0], negative=["control", 1])
    return graph


def picture(server: Server, graph: dict) -> np.ndarray:
    """The run's image as floats in [0, 1] (H, W, 3)."""
    entry = run(server, graph)
    item = entry["outputs"]["save"]["images"][0]
    data = client.ComfyClient(server.url).download(item)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# -- tests -----------------------------------------------------------------------------------------------

def test_the_small_files_load_as_comfyui_s_own_and_each_changes_the_picture(server):
    """The fixtures the other tests stand on: ComfyUI detects the checkpoint as SD1.5, and its LoRA and
    ControlNet load and act (so a test that finds them changing nothing would mean something)."""
    plain = picture(server, stock_graph())
    assert plain.std() > 0.01  # a picture, not a flat or NaN-black square
    log = server.log_text()
    assert "model_type EPS" in log and "lora key not loaded" not in log
    assert mean_abs_diff(picture(server, stock_graph(lora=1.0)), plain) > 0.01
    assert mean_abs_diff(picture(server, stock_graph(control=1.0)), plain) > 0.01
    assert "missing controlnet keys" not in server.log_text()


def test_a_lora_before_apply_changes_the_picture_and_the_contexts_still_act(server):
    with_lora_alone = picture(server, instruct_graph(lora=1.0, strength=0.0))
    with_both = picture(server, instruct_graph(lora=1.0))
    assert mean_abs_diff(with_both, picture(server, instruct_graph())) > 0.01  # the LoRA acts
    assert mean_abs_diff(with_both, with_lora_alone) > 0.01  # and so do the contexts, on the LoRA'd UNet
    assert "lora key not loaded" not in server.log_text()


def test_controlnet_on_the_returned_conditioning_runs_and_acts(server):
    controlled = picture(server, instruct_graph(control=1.0))
    assert mean_abs_diff(controlled, picture(server, instruct_graph())) > 0.01
    assert mean_abs_diff(controlled, picture(server, instruct_graph(control=1.0, strength=0.0))) > 0.01


@functools.cache
def server_has_a_gpu() -> bool:
    found = subprocess.run([COMFYUI_PYTHON, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=300)
    return found.stdout.strip() == "True"


@pytest.mark.parametrize("flag", ["--lowvram", "--novram"])
def test_low_vram_servers_finish_a_run(model_files, tmp_path, flag):
    """In these modes ComfyUI streams weights to the GPU layer by layer; the adapter's weights travel with
    the MODEL. (ComfyUI refuses them beside --cpu, so a machine without a GPU cannot run this test.)"""
    if not server_has_a_gpu():
        pytest.skip(f"needs a GPU: ComfyUI refuses {flag} together with --cpu")
    low = start_server(tmp_path / "base", model_files, flag)
    try:
        assert picture(low, instruct_graph()).std() > 0.01
        log = low.log_text()
        assert f"Set vram state to: {flag[2:].upper().replace('VRAM', '_VRAM')}" in log
        assert "loaded partially" in log or flag == "--lowvram"  # --novram always streams
    finally:
        low.stop()


def test_switching_to_another_model_frees_the_adapter(server):
    released = "[Instruct-Imagen] released context layers"
    before = server.log_text().count(released)
    picture(server, instruct_graph(seed=11))
    picture(server, stock_graph(seed=11, checkpoint=OTHER_CHECKPOINT))
    picture(server, stock_graph(seed=12, checkpoint=OTHER_CHECKPOINT))  # the next prompt collects what is dead
    log = server.log_text()
    assert log.count(released) > before
    assert "memory leak with model" not in log


# -- the example workflows for the user's checkpoint ---------------------------------------------------------

def on_checkpoint(graph: dict, checkpoint: str, size: int = SIZE, steps: int = 3) -> dict:
    """A workflow for the user's checkpoint on `checkpoint` instead, at a small size and few steps."""
    for node in graph.values():
        inputs = node["inputs"]
        for key in ("ckpt_name", "base_model"):
            if inputs.get(key) == USER_CHECKPOINT:
                inputs[key] = checkpoint
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif node["class_type"] == "ApplyInstructImagen":
            inputs.update(context_width=size, context_height=size)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return graph


@pytest.mark.parametrize("path", CHECKPOINT_WORKFLOWS, ids=[p.stem for p in CHECKPOINT_WORKFLOWS])
def test_every_checkpoint_workflow_returns_images(server, path):
    graph = json.loads(path.read_text())
    assert any(node["class_type"] == "KSampler" for node in graph.values())
    assert_images(server, run(server, on_checkpoint(graph, CHECKPOINT)), path.stem)


@pytest.fixture(scope="module")
def full_sd15(model_files, random_sd15_file) -> str:
    (model_files / "checkpoints" / FULL_CHECKPOINT).symlink_to(random_sd15_file)
    return FULL_CHECKPOINT


def test_an_adapter_trained_for_a_checkpoint_is_saved_and_sampled_by_ksampler(server, full_sd15):
    train, sample = (on_checkpoint(load(name), full_sd15) for name in TRAINING_PAIR)
    saver = next(node["inputs"] for node in train.values() if node["class_type"] == "AdapterSaver")
    saved = server.base / "models" / "instruct_imagen" / f"{saver['adapter_name']}.safetensors"
    assert not saved.exists()
    assert_images(server, run(server, train), TRAINING_PAIR[0])
    assert saved.is_file()
    assert_images(server, run(server, sample), TRAINING_PAIR[1])
