import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from instruct_core.loading import (  # noqa: E402
    CLIP_TOKENIZER_DIR,
    CONFIGS_DIR,
    BaseModel,
    ModelLoadError,
    detect_kind,
    export_single_file,
    infer_prediction_type,
    load_base,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    to_ldm_state_dict,
)

# --- tiny models in each family's shape ------------------------------------------------------------


def randomized(module, seed):
    """Every tensor random: zero-initialised layers would let a wrong key mapping pass unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


def tiny_text_encoder(hidden, seed, cls=CLIPTextModel, act="quick_gelu"):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act=act)
    return randomized(cls(config), seed)


def tiny_vae(seed):
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
                        sample_size=32)
    return randomized(vae, seed)


def tiny_base(kind, seed=0):
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=96, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        )
        # the two encoders differ in width, as CLIP-L and OpenCLIP-bigG do: that is how the converter tells them apart
        encoders = [tiny_text_encoder(32, seed + 1),
                    tiny_text_encoder(64, seed + 2, CLIPTextModelWithProjection, "gelu")]
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=kind == "sd2",
        )
        encoders = [tiny_text_encoder(32, seed + 1, act="gelu" if kind == "sd2" else "quick_gelu")]
    return BaseModel(unet=randomized(unet, seed), vae=tiny_vae(seed + 3), text_encoders=encoders, kind=kind,
                     prediction_type="epsilon", vae_scaling_factor=0.18215)


def write_config_dir(folder, base):
    """A diffusers config folder (no weights) describing `base`, as `config_dir=` expects."""
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    shipped = CONFIGS_DIR / "sdxl_base"
    for i, encoder in enumerate(base.text_encoders):
        suffix = f"_{i + 1}" if i else ""
        encoder.config.save_pretrained(folder / f"text_encoder{suffix}")
        shutil.copytree(shipped / f"tokenizer{suffix}", folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    shutil.copytree(shipped / "scheduler", folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def parts(model):
    return [model.unet, model.vae, *model.text_encoders]


def assert_same_weights(expected, actual):
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.fixture
def no_network(monkeypatch):
    """Refuse and record every connection; recorded because a library may swallow the error and go on."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def saved_checkpoint(tmp_path, kind, name="model.safetensors"):
    base = tiny_base(kind)
    return base, export_single_file(base, tmp_path / name), write_config_dir(tmp_path / "config", base)


# --- single-file checkpoints -----------------------------------------------------------------------

LDM_KEYS = {
    "sd1": ["cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.input_blocks.2.0.op.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight"],
    "sd2": ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
            "cond_stage_model.model.positional_embedding", "cond_stage_model.model.ln_final.bias"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight",
             "conditioner.embedders.1.model.text_projection",
             "model.diffusion_model.label_emb.0.0.weight",
             "model.diffusion_model.input_blocks.3.0.op.weight",
             "model.diffusion_model.output_blocks.2.2.conv.weight"],
}
SHARED_LDM_KEYS = ["model.diffusion_model.time_embed.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                   "model.diffusion_model.out.2.bias", "first_stage_model.encoder.mid.attn_1.q.weight",
                   "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                   "first_stage_model.quant_conv.weight"]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_round_trip(tmp_path, kind, no_network):
    base, path, config_dir = saved_checkpoint(tmp_path, kind)
    state = load_file(path)
    for key in LDM_KEYS[kind] + SHARED_LDM_KEYS:
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM keeps 1x1 convs there
    # real checkpoints also carry training leftovers; they must be ignored
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.rand(1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    save_file(state, str(path), metadata={"modelspec.prediction_type": "epsilon"})

    loaded = load_base(path, config_dir=config_dir, device="cpu", dtype="fp32")

    assert (loaded.kind, loaded.prediction_type, loaded.source) == (kind, "epsilon", str(path))
    assert loaded.vae_scaling_factor == pytest.approx(0.18215)
    assert len(loaded.tokenizers) == len(base.text_encoders)
    for want, got in zip(parts(base), parts(loaded)):
        assert type(want) is type(got)
        assert_same_weights(want, got)

    torch.manual_seed(1)
    sample, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    context = torch.randn(1, 7, base.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)} if kind == "sdxl" else None
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    # identical weights; the last bit may still differ because kernels depend on memory alignment
    close = dict(rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(sample, t, context, added_cond_kwargs=added).sample,
                                   base.unet(sample, t, context, added_cond_kwargs=added).sample, **close)
        torch.testing.assert_close(loaded.vae.decode(sample).sample, base.vae.decode(sample).sample, **close)
        for want, got in zip(base.text_encoders, loaded.text_encoders):
            torch.testing.assert_close(got(ids)[0], want(ids)[0], **close)  # last state, or projection
            torch.testing.assert_close(got(ids, output_hidden_states=True).hidden_states[-2],
                                       want(ids, output_hidden_states=True).hidden_states[-2], **close)
    # exporting what was loaded gives back the same file contents
    again = to_ldm_state_dict(loaded)
    assert again.keys() == load_file(tmp_path / "model.safetensors").keys() - {
        "cond_stage_model.transformer.text_model.embeddings.position_ids", "alphas_cumprod", "model_ema.decay"}
    assert all(torch.equal(again[k], state[k]) for k in again)


def test_detect_kind():
    assert detect_kind(["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.x"]) == "sd1"
    assert detect_kind(["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_kind(["model.diffusion_model.out.2.weight", "conditioner.embedders.0.transformer.text_model.x",
                        "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    with pytest.raises(ModelLoadError, match="refiner"):
        detect_kind(["model.diffusion_model.out.2.weight", "conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(ModelLoadError, match="layout"):
        detect_kind(["lora_unet_down_blocks_0.lora_up.weight"])


def test_prediction_type_evidence():
    assert infer_prediction_type({"v_pred": torch.zeros(0)}, {}, "sdxl") == "v_prediction"
    assert infer_prediction_type({}, {"modelspec.prediction_type": "v"}, "sd1") == "v_prediction"
    assert infer_prediction_type({}, {}, "sd1") == "epsilon"
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    conv_in = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    wide, narrow = torch.linspace(-0.3, 0.3, 1280), torch.linspace(-0.05, 0.05, 1280)
    assert infer_prediction_type({**conv_in, probe: wide}, {}, "sd2") == "v_prediction"
    assert infer_prediction_type({**conv_in, probe: narrow}, {}, "sd2") == "epsilon"
    inpaint = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3), probe: wide}
    assert infer_prediction_type(inpaint, {}, "sd2") == "epsilon"


def test_v_prediction_is_recorded_and_overridable(tmp_path):
    base = tiny_base("sd1")
    base.prediction_type = "v_prediction"
    path = export_single_file(base, tmp_path / "v.safetensors")
    config_dir = write_config_dir(tmp_path / "config", base)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
        assert "v_pred" in f.keys()
    loaded = load_base(path, config_dir=config_dir, device="cpu")
    assert loaded.prediction_type == loaded.scheduler_config["prediction_type"] == "v_prediction"
    forced = load_base(path, config_dir=config_dir, device="cpu", prediction_type="eps")
    assert forced.prediction_type == forced.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        load_base(path, config_dir=config_dir, device="cpu", prediction_type="x0")


def test_fp16_keeps_vae_in_fp32(tmp_path):
    _, path, config_dir = saved_checkpoint(tmp_path, "sd1")
    loaded = load_base(path, config_dir=config_dir, device="cpu", dtype="fp16")
    assert loaded.unet.dtype == loaded.text_encoders[0].dtype == torch.float16
    assert loaded.vae.dtype == torch.float32  # force_upcast: SD VAEs overflow in fp16


def test_missing_component_weights_named(tmp_path):
    _, path, config_dir = saved_checkpoint(tmp_path, "sd1")
    state = {k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*vae"):
        load_base(path, config_dir=config_dir, device="cpu")


def test_pickle_checkpoint_is_refused_with_its_name(tmp_path):
    _, path, config_dir = saved_checkpoint(tmp_path, "sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: a pickle checkpoint \(\.ckpt\).*convert it to \.safetensors"):
        load_base(ckpt, config_dir=config_dir, device="cpu")


def test_truncated_safetensors_names_the_file(tmp_path):
    _, path, config_dir = saved_checkpoint(tmp_path, "sd1", name="broken.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors"):
        load_base(path, config_dir=config_dir, device="cpu")


def test_bad_paths_and_layouts(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_base(tmp_path / "missing.safetensors", device="cpu")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base(tmp_path, device="cpu")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelLoadError, match=r"lora\.safetensors.*layout"):
        load_base(lora, device="cpu")


# --- diffusers folders -----------------------------------------------------------------------------


def test_diffusers_folder_round_trip(tmp_path, no_network):
    base = tiny_base("sd1")
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=load_tokenizer(CLIP_TOKENIZER_DIR),
        unet=base.unet, scheduler=PNDMScheduler(prediction_type="v_prediction", steps_offset=1, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = load_base(tmp_path / "pipe", device="cpu", dtype="fp32")
    assert (loaded.kind, loaded.prediction_type) == ("sd1", "v_prediction")
    assert loaded.scheduler_config["_class_name"] == "PNDMScheduler"
    for want, got in zip(parts(base), parts(loaded)):
        assert_same_weights(want, got)
    assert loaded.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_pixel_space_folder_has_no_vae(tmp_path):
    unet = tiny_base("sd1").unet
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MyPixelPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    loaded = load_base(tmp_path, device="cpu")
    assert loaded.vae is None and loaded.is_pixel_space
    assert (loaded.kind, loaded.vae_scaling_factor, loaded.text_encoders) == ("custom", 1.0, [])
    assert_same_weights(unet, loaded.unet)


def test_folder_with_missing_weights_is_refused(tmp_path):
    unet = tiny_base("sd1").unet
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "conv_in.weight"}, str(weights),
              metadata={"format": "pt"})
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelLoadError, match="conv_in.weight"):
        load_base(tmp_path, device="cpu")


def test_pickle_only_folder_is_refused_and_its_safetensors_twin_loads(tmp_path):
    unet = tiny_base("sd1").unet
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelLoadError, match=r"unet: only pickle weights \(diffusion_pytorch_model\.bin\)"):
        load_base(tmp_path, device="cpu")
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").rename(tmp_path / "unet" / "MODEL.BIN")
    with pytest.raises(ModelLoadError, match=r"unet: only pickle weights \(MODEL\.BIN\)"):  # any case
        load_base(tmp_path, device="cpu")
    unet.save_pretrained(tmp_path / "unet")  # the same weights as safetensors beside the pickle
    assert_same_weights(unet, load_base(tmp_path, device="cpu").unet)


# --- shipped configs -------------------------------------------------------------------------------

ENCODER_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
PARAMS = {  # counts of the official models
    "sd15": (859_520_964, [123_060_480]),
    "sd2_768_v": (865_910_724, [340_387_840]),
    "sd2_512_base": (865_910_724, [340_387_840]),
    "sdxl_base": (2_567_463_684, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shipped_configs_build_the_official_architectures(name):
    folder = CONFIGS_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        encoders = [
            ENCODER_CLASSES[index[sub][1]](CLIPTextConfig.from_pretrained(folder, subfolder=sub))
            for sub in ("text_encoder", "text_encoder_2") if sub in index
        ]

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(unet), [count(e) for e in encoders]) == PARAMS[name]
    assert count(vae) == 83_653_863


@pytest.mark.parametrize("name, pads", [("sd15", [49407]), ("sd2_768_v", [0]), ("sd2_512_base", [0]),
                                        ("sdxl_base", [49407, 0])])
def test_shipped_tokenizers(name, pads):
    folder = CONFIGS_DIR / name
    tokenizers = [load_tokenizer(folder / sub) for sub in ("tokenizer", "tokenizer_2") if (folder / sub).is_dir()]
    assert [t.pad_token_id for t in tokenizers] == pads
    for tokenizer in tokenizers:
        assert (len(tokenizer), tokenizer.model_max_length) == (49408, 77)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_scheduler_prediction_types():
    def prediction(name):
        return json.loads((CONFIGS_DIR / name / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]

    assert [prediction(n) for n in ("sd15", "sd2_768_v", "sd2_512_base", "sdxl_base")] == [
        "epsilon", "v_prediction", "epsilon", "epsilon"]


# --- device and dtype ------------------------------------------------------------------------------


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
