"""The ComfyUI nodes called directly, over tests/nodes/comfy_stub/ (no ComfyUI installed)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from load_pack import ROOT, load_pack  # noqa: E402

pack = load_pack()

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

N = {cls.GET_SCHEMA().node_id: cls for cls in pack.nodes.NODES}
INPUTS = ROOT / "workflows" / "inputs"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Fresh input, output and model folders, as ComfyUI would have them."""
    for name in ("input", "output", "models/instruct_imagen", "models/checkpoints"):
        (tmp_path / name).mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "instruct_imagen",
                        ([str(tmp_path / "models/instruct_imagen")], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints",
                        ([str(tmp_path / "models/checkpoints")], folder_paths.supported_pt_extensions))
    return tmp_path


@pytest.fixture(scope="module")
def model():
    return N["InstructImagenLoader"].execute("tiny", "none", "fp32")[0]


def comfy_image(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(INPUTS / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def context(name="subject_toy.png", modality="subject", text="a red toy", **kwargs):
    return N["ContextImage"].execute(comfy_image(name), modality, text, kwargs.pop("weight", 1.0), **kwargs)[0]


def build(text, negative="", **slots):
    return N["InstructionBuilder"].execute(text, negative, contexts=slots or None)[0]


def sample(model, cond, **overrides):
    args = dict(seed=1, steps=2, sampler="euler", schedule="karras", cfg_text=5.0, cfg_context=2.0,
                guidance="dual", width=32, height=32, batch_size=1, denoise=1.0)
    args.update(overrides)
    return N["InstructSampler"].execute(model, cond, **args)


# -- the extension ----------------------------------------------------------------------------------------

def test_entrypoint_lists_every_node_with_a_valid_schema(dirs):
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert [n.GET_SCHEMA().node_id for n in nodes] == [
        "InstructImagenLoader", "ContextImage", "InstructionBuilder", "MultiModalEncode", "InstructSampler",
        "InstructionFromJSON", "InstructionToJSON", "AdapterSaver", "FineTuneStage", "ApplyInstructImagen",
        "InstructGuider"]
    assert {n.GET_SCHEMA().category for n in nodes} == {"Instruct-Imagen"}
    assert (ROOT / pack.WEB_DIRECTORY).is_dir()
    # The example inputs were copied where the example workflows look for them.
    assert (dirs / "input/instruct_imagen/subject_toy.png").is_file()


def test_adapter_folder_is_registered_and_listed(dirs):
    (dirs / "models/instruct_imagen/a.safetensors").write_bytes(b"x")
    (dirs / "models/instruct_imagen/notes.txt").write_text("not an adapter")
    loader = N["InstructImagenLoader"].GET_SCHEMA()
    options = {i.id: i.options for i in loader.inputs}
    assert options["adapter"] == ["none", "a.safetensors"]
    assert options["model"][:2] == ["default", "tiny"]


# -- contexts and instructions --------------------------------------------------------------------------

def test_context_image_converts_image_and_mask():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0
    ctx = context(mask=mask, weight=0.5)
    assert ctx.image.size == (64, 64) and ctx.image.mode == "RGB"
    assert ctx.mask.size == (64, 64)
    assert ctx.mask.getpixel((4, 32)) == 255 and ctx.mask.getpixel((60, 32)) == 0
    assert ctx.weight == 0.5 and ctx.modality == "subject"


def test_context_image_refuses_a_batch_and_a_malformed_marker():
    with pytest.raises(ValueError, match="batch of 2"):
        N["ContextImage"].execute(comfy_image("subject_toy.png").repeat(2, 1, 1, 1), "subject", "", 1.0)
    with pytest.raises(ValueError, match=r"malformed marker"):
        context(text="[Ref# 1] a toy")


def test_builder_reports_dangling_references_before_execution():
    validate = N["InstructionBuilder"].validate_inputs
    # Before execution linked inputs arrive as None: only which slots are plugged is known.
    assert validate("[ref#1] with [ref#2]", "", contexts={"ref_1": None, "ref_2": None}) is True
    message = validate("[ref#1] with [ref#2]", "", contexts={"ref_1": None})
    assert "[ref#2] has no context" in message and "ref_2" in message
    assert "malformed marker" in validate("an image of [ref #1]", "", contexts={"ref_1": None})
    assert "negative" in validate("a cat", "no [ref#1]", contexts={"ref_1": None})
    assert "only 16 slots" in validate("[ref#17]", "")
    # The same names as flat inputs (ComfyUI without Autogrow).
    assert validate("[ref#1]", "", **{"contexts.ref_1": None}) is True


def test_builder_gives_each_context_its_slot_id():
    instruction = build("[ref#2] in the style of [ref#1]", ref_1=context(modality="style", text="stripes"),
                        ref_2=context(text="[ref#2] a toy"))
    assert [(c.id, c.modality) for c in instruction.contexts] == [(1, "style"), (2, "subject")]
    assert instruction.contexts[0].marker_text == "[ref#1] stripes"


def test_builder_takes_sixteen_contexts_in_a_growing_list_of_slots():
    template = next(i for i in N["InstructionBuilder"].GET_SCHEMA().inputs if i.id == "contexts").template
    assert template.names == [f"ref_{n}" for n in range(1, 17)] and template.min == 1
    slots = {f"ref_{n}": context(text=f"toy number {n}") for n in range(1, 17)}
    instruction = build(" and ".join(f"[ref#{n}]" for n in range(16, 0, -1)), **slots)
    assert [c.id for c in instruction.contexts] == list(range(1, 17))
    assert instruction.contexts[15].marker_text == "[ref#16] toy number 16"


def test_builder_refuses_a_context_naming_another_slot():
    # Two contexts both claiming [ref#1]: the one in slot ref_2 is a duplicate.
    with pytest.raises(ValueError, match=r"contains \[ref#1\] but this context's id is 2"):
        build("[ref#1] and [ref#2]", ref_1=context(text="[ref#1] a toy"), ref_2=context(text="[ref#1] a cube"))
    with pytest.raises(ValueError, match=r"\[ref#3\] has no context"):
        build("[ref#3]", ref_1=context())


def test_json_round_trip_and_saved_file(dirs):
    instruction = build("an image of [ref#1]", "blurry", ref_1=context(mask=torch.ones(1, 64, 64)))
    out = N["InstructionToJSON"].execute(instruction, "instruct_imagen/test")
    text = out[0]
    assert json.loads(text)["version"] == 1
    saved = dirs / "output/instruct_imagen/test_00001.json"
    assert saved.read_text().strip() == text
    again = N["InstructionFromJSON"].execute(text)[0]
    assert again == instruction


def test_json_paths_stay_inside_the_input_directory(dirs, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    document = {"version": 1, "text": "[ref#1]", "contexts": [
        {"id": 1, "modality": "subject", "image": str(outside / "secret.png")}]}
    with pytest.raises(ValueError, match="escapes the allowed root"):
        N["InstructionFromJSON"].execute(json.dumps(document))
    Image.new("RGB", (8, 8)).save(dirs / "input/inside.png")
    document["contexts"][0]["image"] = "inside.png"
    assert N["InstructionFromJSON"].execute(json.dumps(document))[0].contexts[0].image.size == (8, 8)
    with pytest.raises(ValueError, match="invalid JSON"):
        N["InstructionFromJSON"].execute("{")


# -- models, encoding, sampling ---------------------------------------------------------------------------

def test_loader_shares_one_copy_and_names_a_missing_adapter(dirs, model):
    assert N["InstructImagenLoader"].execute("tiny", "none", "fp32")[0] is model
    with pytest.raises(ValueError, match="not found"):
        N["InstructImagenLoader"].execute("tiny", "missing.safetensors", "fp32")
    (dirs / "models/instruct_imagen/broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="adapter: broken.safetensors"):
        N["InstructImagenLoader"].execute("tiny", "broken.safetensors", "fp32")


def test_the_model_is_placed_through_comfyui_model_management(model, caplog):
    weights = model.patcher.model
    assert set(weights) == {"model", "text_encoder_0"}  # the pixel-space tiny model has no VAE
    assert weights["model"] is model.pipe.model
    assert model.patcher.model_size() == sum(t.nbytes for t in weights.state_dict().values())
    comfy.model_management.unload_all_models()
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    assert comfy.model_management.current_loaded_models[0] is model.patcher  # loaded before use
    with caplog.at_level("INFO"):
        comfy.model_management.unload_all_models()
    assert "[Instruct-Imagen] offloaded model tiny" in caplog.text
    sample(model, cond, seed=1)
    assert comfy.model_management.current_loaded_models[0] is model.patcher  # loaded again to sample


def test_unload_without_unpatching_is_not_logged_as_offloaded(model, caplog):
    with caplog.at_level("INFO"):
        model.patcher.detach(unpatch_all=False)  # what a patcher's finalizer does; nothing is offloaded
    assert "offloaded" not in caplog.text


def test_the_sampler_asks_room_for_its_activations(model, monkeypatch):
    asked = []
    load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, memory_required=0, **kw: asked.append(memory_required) or load(models, **kw))
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    sample(model, cond, batch_size=1)
    sample(model, cond, batch_size=4)
    assert asked[0] == 0 and asked[1] > 0 and asked[2] == pytest.approx(4 * asked[1])  # encode, then samples


def test_weights_left_off_the_device_are_moved_there(monkeypatch):
    """--novram loads none of a model's weights on a full load; these modules cannot be streamed, so the
    handle moves them itself and records the load."""
    from instruct_core.models import load_pipeline

    handle = pack.nodes.common.ModelHandle(load_pipeline("tiny", device="cpu", dtype="fp32"), "tiny")
    handle.patcher.load_device = torch.device("meta")
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models, **kw: None)
    pipe = handle.on_compute_device()
    assert pipe.device == torch.device("meta") and pipe.base.text_encoders[0].device == torch.device("meta")
    assert handle.patcher.model.model_loaded_weight_memory == handle.patcher.model_size()


def test_encode_once_and_sample_many(model, monkeypatch):
    calls = []
    original = model.pipe.encode_instruction
    monkeypatch.setattr(model.pipe, "encode_instruction", lambda *a, **k: calls.append(1) or original(*a, **k))
    instruction = build("an image of [ref#1]", ref_1=context())
    cond = N["MultiModalEncode"].execute(model, instruction, 0, 0, "crop")[0]
    first = sample(model, cond, seed=3, batch_size=2, width=48, height=32)
    second = sample(model, cond, seed=4)
    assert len(calls) == 1
    latent, image = first
    assert image.shape == (2, 32, 48, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # A pixel-space model's LATENT holds its pixels in [-1, 1]-space, channels first.
    assert latent["samples"].shape == (2, 3, 32, 48)
    assert torch.allclose(((latent["samples"] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), image, atol=1e-5)
    assert second[1].shape == (1, 32, 32, 3)
    assert not torch.equal(first[1][:1, :, :32], second[1])


def test_sampling_is_seeded_and_img2img_follows_the_latent(model):
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    a, b = sample(model, cond, seed=5), sample(model, cond, seed=5)
    assert torch.equal(a[1], b[1])
    again = sample(model, cond, seed=6, latent=a[0], denoise=0.3, width=0, height=0)
    fresh = sample(model, cond, seed=6)
    assert again[1].shape == a[1].shape
    assert (again[1] - a[1]).abs().mean() < (fresh[1] - a[1]).abs().mean()
    init = sample(model, cond, seed=6, init_image=a[1], denoise=0.3)
    assert init[1].shape == (1, 32, 32, 3)


def test_the_bundled_cascade_gives_128_pixel_images_and_a_base_size_latent():
    default = N["InstructImagenLoader"].execute("default", "none", "fp32")[0]
    cond = N["MultiModalEncode"].execute(default, build("a large red circle in the center"), 0, 0, "crop")[0]
    latent, image = sample(default, cond, steps=3, width=0, height=0)
    assert image.shape == (1, 128, 128, 3) and latent["samples"].shape == (1, 3, 32, 32)
    base_latent, base_image = sample(default, cond, steps=3, width=0, height=0, upscale=False)
    assert base_image.shape == (1, 32, 32, 3) and torch.equal(base_latent["samples"], latent["samples"])
    # the large image is the base image, drawn sharper: averaged down, it is close to it
    pooled = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    assert float((pooled - base_image).abs().mean()) < 0.08


def test_a_latent_noise_mask_keeps_what_it_does_not_cover(model):
    """SetLatentNoiseMask's convention: the mask (any resolution, 1 = regenerate) rides in the LATENT."""
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    first = sample(model, cond, seed=5)
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0
    masked = sample(model, cond, seed=7, latent={**first[0], "noise_mask": left}, width=0, height=0)
    kept, redrawn = masked[1][:, :, 20:], masked[1][:, :, :12]
    assert torch.allclose(kept, first[1][:, :, 20:], atol=1e-5)
    assert (redrawn - first[1][:, :, :12]).abs().mean() > 1e-2
    with pytest.raises(ValueError, match="noise_mask of shape"):
        sample(model, cond, latent={**first[0], "noise_mask": torch.zeros(1, 2, 16, 16)})


def test_sampler_errors_are_node_errors(model):
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    with pytest.raises(ValueError, match="width: 30 must be a positive multiple of 4"):
        sample(model, cond, width=30)
    other = pack.nodes.common.ModelHandle(model.pipe, "other")
    with pytest.raises(ValueError, match="encoded by another model"):
        sample(other, cond)
    with pytest.raises(ValueError, match="latent: expected samples of shape"):
        sample(model, cond, latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="guidance text_scale: nan is not a finite number"):
        sample(model, cond, cfg_text=float("nan"))  # NaN passes a FLOAT input's min/max check
    with pytest.raises(ValueError, match="unknown modality"):
        bad = build("[ref#1]", ref_1=context(modality="subject"))
        bad.contexts[0].modality = "smell"
        N["MultiModalEncode"].execute(model, bad, 0, 0, "crop")


def test_progress_has_previews_and_interrupt_stops_within_a_step(model, monkeypatch):
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total, preview)))
    cond = N["MultiModalEncode"].execute(model, build("a cat"), 0, 0, "crop")[0]
    sample(model, cond, steps=3)
    assert [(v, t) for v, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    kind, preview, size = seen[0][2]
    assert kind == "JPEG" and preview.size == (32, 32) and size > 0

    seen.clear()
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(model, cond, steps=50)
    assert seen == []  # stopped at the first step's callback
    assert not comfy.model_management.processing_interrupted()


def test_adapter_saver_writes_a_loadable_adapter(dirs, model):
    assert N["AdapterSaver"].execute(model, "mine", False)[0] == "mine.safetensors"
    with pytest.raises(ValueError, match="already exists"):
        N["AdapterSaver"].execute(model, "mine", False)
    with pytest.raises(ValueError, match="plain file name"):
        N["AdapterSaver"].execute(model, "../escape", True)
    loaded = N["InstructImagenLoader"].execute("tiny", "mine.safetensors", "fp32")[0]
    assert loaded.adapter == "mine.safetensors"


# -- training -------------------------------------------------------------------------------------------

def train(dataset="instruct_imagen/train_set", **overrides):
    args = dict(base_model="tiny", adapter="none", stage=2, dataset=dataset, steps=2, learning_rate=1e-4,
                batch_size=1, resolution=32, seed=0, adapter_name="trained", resume=False)
    args.update(overrides)
    return N["FineTuneStage"].execute(**args)


@pytest.mark.parametrize("dataset, message", [
    ("../outside", "must not contain '..'"),
    ("train/../../outside", "must not contain '..'"),
    ("/etc", "relative to the input directory"),
    ("missing", "does not exist"),
    ("link", "outside the input directory"),
])
def test_training_dataset_is_confined_to_the_input_directory(dirs, tmp_path_factory, dataset, message):
    os.symlink(tmp_path_factory.mktemp("elsewhere"), dirs / "input/link")
    with pytest.raises(ValueError, match=message):
        train(dataset)


def test_training_refuses_files_linked_from_outside(dirs, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (32, 32), "red").save(outside / "secret.png")
    data = dirs / "input/data"
    data.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32), "blue").save(data / f"{k}.png")
        (data / f"{k}.txt").write_text("a blue square")
    os.symlink(outside / "secret.png", data / "leak.png")
    (data / "leak.txt").write_text("a red square")
    with pytest.raises(ValueError, match="1 files lead outside the input directory"):
        train("data")


def test_a_two_step_run_writes_an_adapter_and_a_loss_curve(dirs):
    asyncio.run(pack.comfy_entrypoint())  # copies the example training set into input/instruct_imagen/
    trained, name, curve = train()[:3]
    assert name == "trained.safetensors"
    assert (dirs / "models/instruct_imagen/trained.safetensors").is_file()
    assert (dirs / "output/instruct_imagen_runs/trained/loss_curve.png").is_file()
    assert curve.dim() == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert not any(p.requires_grad for p in trained.pipe.model.parameters())
    cond = N["MultiModalEncode"].execute(trained, build("a toy"), 0, 0, "crop")[0]
    assert sample(trained, cond)[1].shape == (1, 32, 32, 3)
    assert N["InstructImagenLoader"].execute("tiny", name, "fp32")[0].adapter == name


def test_interrupted_training_keeps_its_checkpoint_and_installs_nothing(dirs):
    asyncio.run(pack.comfy_entrypoint())
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(steps=50, adapter_name="stopped")
    assert not (dirs / "models/instruct_imagen/stopped.safetensors").exists()
    assert any((dirs / "output/instruct_imagen_runs/stopped/checkpoints").iterdir())
