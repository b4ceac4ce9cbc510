"""The context-augmented UNet: exact zero-init identity, masks, mixed K, caching and adapter files."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from instruct_core.adapter_io import AdapterError, load_adapter, read_adapter_metadata, save_adapter
from instruct_core.context_attention import ContextState
from instruct_core.context_unet import ContextAdapterConfig, ContextAugmentedUNet, levels_with_attention
from instruct_core.tiny import tiny_unet


def sdxl_like_unet():
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        use_linear_projection=True,
    )


def sdxl_added(batch):
    g = torch.Generator().manual_seed(batch)
    return {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch)}


CASES = {
    "sd_latent": lambda: tiny_unet(in_channels=4, sample_size=16, channels=(32, 64, 64)),
    "pixel_space": lambda: tiny_unet(in_channels=3, sample_size=16, channels=(32, 64)),
    "sdxl_like": sdxl_like_unet,
}


def _model(case, levels=None, seed=0):
    torch.manual_seed(seed)
    unet = CASES[case]().eval()
    return unet, ContextAugmentedUNet(unet, ContextAdapterConfig(levels=levels)).eval()


def _inputs(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    channels = unet.config.in_channels
    x = torch.randn(batch, channels, 16, 16, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    added = sdxl_added(batch) if unet.config.addition_embed_type == "text_time" else None
    return x, torch.tensor([10, 700][:batch]), text, added


def _encode(model, unet, count=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(count, unet.config.in_channels, 16, 16, generator=g)
    added = sdxl_added(count) if unet.config.addition_embed_type == "text_time" else None
    modalities = ["subject", "style", "edge", "depth"][:count]
    return model.encode_contexts(images, torch.randn(count, 7, 32, generator=g), modalities, added)


def _randomise(adapter, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("all_levels", [False, True])
def test_untrained_adapter_reproduces_base_exactly(case, all_levels):
    unet, model = _model(case)
    if all_levels:
        unet, model = _model(case, levels=tuple(levels_with_attention(unet)))
    x, t, text, added = _inputs(unet)
    with torch.no_grad():
        reference = unet(x, t, text, added_cond_kwargs=added).sample
        state = ContextState.from_encoded(_encode(model, unet), [[0, 1], [2]])
        without = model(x, t, text, None, added)
        with_contexts = model(x, t, text, state, added)
    assert (without - reference).abs().max().item() == 0.0
    assert (with_contexts - reference).abs().max().item() == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_trained_adapter_changes_only_rows_with_contexts(case):
    unet, model = _model(case)
    _randomise(model.adapter)
    x, t, text, added = _inputs(unet)
    with torch.no_grad():
        reference = unet(x, t, text, added_cond_kwargs=added).sample
        state = ContextState.from_encoded(_encode(model, unet), [[0, 1], []])  # mixed K: 2 and 0
        out = model(x, t, text, state, added)
    assert (out[0] - reference[0]).abs().max() > 1e-3
    assert (out[1] - reference[1]).abs().max().item() == 0.0


def test_default_levels_are_the_two_lowest_with_attention():
    unet, model = _model("sd_latent")
    assert levels_with_attention(unet) == [0, 1, 2]
    assert model.adapter.levels == (1, 2)
    assert all(level in (1, 2) for level in model.adapter.layer_levels.values())


def test_unknown_level_is_refused():
    unet = tiny_unet(channels=(32, 64))
    with pytest.raises(ValueError, match="levels"):
        ContextAugmentedUNet(unet, ContextAdapterConfig(levels=(5,)))


def test_features_per_level_have_level_shapes():
    unet, model = _model("sd_latent", levels=(0, 1, 2))
    features = _encode(model, unet, count=2)
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        0: (2, 32, 16, 16), 1: (2, 64, 8, 8), 2: (2, 64, 4, 4)}


def test_modality_embedding_changes_features_once_trained():
    unet, model = _model("sd_latent")
    images = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    text = torch.randn(1, 7, 32).repeat(2, 1, 1)
    with torch.no_grad():
        same = model.encode_contexts(images, text, ["subject", "edge"])
        assert all((f[0] - f[1]).abs().max() == 0 for f in same.values())
        model.adapter.modality_embedding.weight.normal_()
        different = model.encode_contexts(images, text, ["subject", "edge"])
    assert all((f[0] - f[1]).abs().max() > 0 for f in different.values())


def test_unknown_modality_is_named():
    unet, model = _model("sd_latent")
    with pytest.raises(ValueError, match="'hologram'"):
        model.encode_contexts(torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32), ["hologram"])


def test_weight_zero_and_region_mask_outside_remove_the_context():
    unet, model = _model("sd_latent")
    _randomise(model.adapter)
    x, t, text, _ = _inputs(unet, batch=1)
    features = _encode(model, unet, count=1)
    with torch.no_grad():
        reference = unet(x, t, text).sample
        zero_weight = model(x, t, text, ContextState.from_encoded(features, [[0]], weights=torch.zeros(1)))
        nowhere = model(x, t, text, ContextState.from_encoded(features, [[0]], region_masks=torch.zeros(1, 16, 16)))
        everywhere = model(x, t, text, ContextState.from_encoded(features, [[0]], region_masks=torch.ones(1, 16, 16)))
        plain = model(x, t, text, ContextState.from_encoded(features, [[0]]))
    assert (zero_weight - reference).abs().max().item() == 0.0
    assert (nowhere - reference).abs().max().item() == 0.0
    assert torch.allclose(everywhere, plain, atol=1e-6)
    assert (plain - reference).abs().max() > 1e-3


def test_region_mask_limits_where_a_context_acts():
    # With only the top-level adapter layer at full resolution, the effect stays out of the masked-off half
    # before the first downsampling mixes positions; we check the attention mask itself.
    unet, model = _model("sd_latent", levels=(0,))
    features = _encode(model, unet, count=2)
    region = torch.zeros(2, 16, 16)
    region[0, :, :8] = 1  # context 0: left half
    region[1, :, 8:] = 1  # context 1: right half
    state = ContextState.from_encoded(features, [[0, 1]], region_masks=region)
    rows = state.active_rows()
    mask = state.attend_mask(0, rows, (16, 16))[0, 0]  # (Nq, 1 + 2*256)
    left_query, right_query = 0, 15  # first row: x = 0 and x = 15
    assert mask[:, 0].all()  # the null token is always available
    assert mask[left_query, 1:257].all() and not mask[left_query, 257:].any()
    assert mask[right_query, 257:].all() and not mask[right_query, 1:257].any()


def test_key_values_are_cached_per_state():
    unet, model = _model("sd_latent")
    _randomise(model.adapter)
    x, t, text, _ = _inputs(unet, batch=1)
    state = ContextState.from_encoded(_encode(model, unet, count=1), [[0]])
    calls = []
    for layer in model.adapter.layers.values():
        layer.to_k.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        first = model(x, t, text, state)
        after_first = len(calls)
        second = model(x, t, text, state)
    assert after_first == len(model.adapter.layers)
    assert len(calls) == after_first  # the second step reused every projection
    assert torch.equal(first, second)


def test_gradients_reach_every_adapter_parameter_and_not_the_base():
    unet, model = _model("sd_latent")
    unet.requires_grad_(False)
    _randomise(model.adapter)
    x, t, text, _ = _inputs(unet, batch=2)
    state = ContextState.from_encoded(_encode(model, unet, count=2), [[0], [1]])
    model(x, t, text, state).square().mean().backward()
    missing = [n for n, p in model.adapter.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for p in unet.parameters())


def test_adapter_state_dict_holds_only_new_parameters():
    unet, model = _model("sd_latent")
    base_keys = set(unet.state_dict())
    assert not any("context" in k or "processor" in k for k in base_keys)
    assert set(model.adapter.state_dict()).isdisjoint(base_keys)


# -- adapter files ---------------------------------------------------------------------------------------

def test_adapter_round_trip(tmp_path):
    unet, model = _model("sdxl_like")
    _randomise(model.adapter)
    path = save_adapter(model, tmp_path / "adapter.safetensors", {"trained_steps": 12})
    meta = read_adapter_metadata(path)
    assert meta["levels"] == "[1]" and "subject" in meta["modalities"] and meta["trained_steps"] == "12"
    fresh_unet = sdxl_like_unet()
    fresh_unet.load_state_dict(unet.state_dict())
    loaded = load_adapter(path, fresh_unet)
    for (name, a), (_, b) in zip(model.adapter.state_dict().items(), loaded.adapter.state_dict().items()):
        assert torch.equal(a, b), name
    x, t, text, added = _inputs(unet)
    with torch.no_grad():
        state_a = ContextState.from_encoded(_encode(model, unet), [[0, 1], [2]])
        state_b = ContextState.from_encoded(_encode(loaded, fresh_unet), [[0, 1], [2]])
        assert torch.equal(model(x, t, text, state_a, added), loaded(x, t, text, state_b, added))
    assert not (tmp_path / "adapter.safetensors.tmp").exists()


def test_adapter_for_another_base_is_refused_naming_the_difference(tmp_path):
    _, model = _model("sd_latent")
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = tiny_unet(channels=(32, 48, 64))
    with pytest.raises(AdapterError, match="block_out_channels"):
        load_adapter(path, other)


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors"),
    (b"\xff" * 8 + b"junk", "not a safetensors"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", "unreadable"),
])
def test_corrupt_adapter_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, tiny_unet())


def test_truncated_adapter_is_refused(tmp_path):
    _, model = _model("sd_latent")
    path = save_adapter(model, tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="a.safetensors"):
        load_adapter(path, tiny_unet(channels=(32, 64, 64)))


def test_foreign_safetensors_and_pickle_are_refused(tmp_path):
    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterError, match="format"):
        load_adapter(plain, tiny_unet())
    pickle = tmp_path / "adapter.ckpt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(AdapterError, match="only .safetensors"):
        load_adapter(pickle, tiny_unet())


def test_adapter_with_nan_is_refused(tmp_path):
    unet, model = _model("sd_latent")
    with torch.no_grad():
        next(model.adapter.parameters()).fill_(float("nan"))
    path = save_adapter(model, tmp_path / "nan.safetensors")
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(path, tiny_unet(channels=(32, 64, 64)))


def test_a_full_batch_attends_without_a_mask_and_gets_the_masked_result():
    from instruct_core.context_attention import ContextAttention

    torch.manual_seed(0)
    layer = ContextAttention(query_dim=8, context_dim=6, inner_dim=8, out_dim=8, heads=2, num_freqs=2)
    torch.nn.init.normal_(layer.to_out.weight)
    features = {0: torch.randn(2, 2, 6, 3, 3)}
    state = ContextState(features, valid=torch.ones(2, 2, dtype=torch.bool), weights=torch.ones(2, 2))
    rows = torch.arange(2)
    assert state.attend_mask(0, rows, (4, 4)) is None
    tokens = features[0].permute(0, 1, 3, 4, 2).reshape(2, 18, 6)
    keys, values = layer.context_keys_values(tokens, (3, 3), torch.ones(2, 18))
    hidden = torch.randn(2, 16, 8)
    everywhere = torch.ones(2, 1, 1, 19, dtype=torch.bool)
    assert torch.allclose(layer(hidden, (4, 4), keys, values, None),
                          layer(hidden, (4, 4), keys, values, everywhere), atol=1e-6)
    padded = ContextState(features, valid=torch.tensor([[True, True], [True, False]]), weights=torch.ones(2, 2))
    mask = padded.attend_mask(0, rows, (4, 4))
    assert mask is not None and not mask[1, 0, 0, 10:].any()  # the empty slot stays hidden


def test_head_dim_sets_the_context_heads_independently_of_the_base():
    torch.manual_seed(0)
    unet = tiny_unet(in_channels=4, sample_size=16, channels=(32, 64, 64))
    base_heads = {name.replace(".", "_"): unet.get_submodule(name[: -len(".processor")]).heads
                  for name in unet.attn_processors}
    default = ContextAugmentedUNet(unet, ContextAdapterConfig()).adapter
    assert all(layer.heads == base_heads[key] for key, layer in default.layers.items())
    wide = ContextAugmentedUNet(unet, ContextAdapterConfig(head_dim=32)).adapter
    assert sorted({layer.heads for layer in wide.layers.values()}) == [2]  # 64 channels, 32 per head
    with pytest.raises(ValueError, match="head_dim: 48 does not divide"):
        ContextAugmentedUNet(unet, ContextAdapterConfig(head_dim=48))


def test_adapter_files_keep_their_head_dim_and_refuse_a_bad_one(tmp_path):
    import json

    from safetensors import safe_open

    torch.manual_seed(0)
    unet = tiny_unet(in_channels=4, sample_size=16, channels=(32, 64, 64))
    model = ContextAugmentedUNet(unet, ContextAdapterConfig(head_dim=32))
    path = save_adapter(model, tmp_path / "wide.safetensors")
    loaded = load_adapter(path, unet)
    assert loaded.adapter.config.head_dim == 32
    assert [layer.heads for layer in loaded.adapter.layers.values()] == [
        layer.heads for layer in model.adapter.layers.values()]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["adapter_config"])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=dict(metadata, adapter_config=json.dumps(dict(config, head_dim=0))))
    with pytest.raises(AdapterError, match="adapter_config.head_dim"):
        load_adapter(bad, unet)
    negative = tmp_path / "negative.safetensors"
    save_file(tensors, str(negative),
              metadata=dict(metadata, adapter_config=json.dumps(dict(config, content_heads=-1))))
    with pytest.raises(AdapterError, match="adapter_config.content_heads is -1"):
        load_adapter(negative, unet)


@pytest.mark.parametrize("head_dim, num_freqs", [(32, 8), (16, 8), (40, 4)])
def test_an_untrained_layer_attends_to_the_context_token_at_its_own_place(head_dim, num_freqs):
    from instruct_core.context_attention import ContextAttention, fourier_positions

    torch.manual_seed(0)
    layer = ContextAttention(query_dim=8, context_dim=6, inner_dim=2 * head_dim, out_dim=8, heads=2,
                             num_freqs=num_freqs)
    positions = fourier_positions(8, 8, num_freqs, "cpu", torch.float32)
    with torch.no_grad():
        query = layer._split_heads(layer.pos_q(positions)[None])
        key = layer._split_heads(layer.pos_k(positions)[None])
        logits = query @ key.transpose(-1, -2)  # (1, heads, 64, 64): the positional part of each head's logits
    own_place = torch.arange(64)
    assert torch.equal(logits.argmax(dim=-1), own_place.expand(1, 2, 64))
    # Sharp: the own place wins by a wide margin over its nearest neighbour.
    second = logits.topk(2, dim=-1).values
    assert float((second[..., 0] - second[..., 1]).min()) * head_dim ** -0.5 > 1.0


def test_content_heads_start_without_the_positional_prior_and_travel_with_the_adapter(tmp_path):
    from instruct_core.context_attention import fourier_positions

    torch.manual_seed(0)
    unet = tiny_unet(in_channels=4, sample_size=16, channels=(32, 64, 64))
    model = ContextAugmentedUNet(unet, ContextAdapterConfig(head_dim=32, content_heads=1))
    positions = fourier_positions(4, 4, model.adapter.config.num_freqs, "cpu", torch.float32)
    for layer in model.adapter.layers.values():
        with torch.no_grad():
            query = layer._split_heads(layer.pos_q(positions)[None])
            key = layer._split_heads(layer.pos_k(positions)[None])
            logits = query @ key.transpose(-1, -2)
        assert torch.equal(logits[0, 0].argmax(dim=-1), torch.arange(16))  # the positional head
        assert float(logits[0, -1].abs().max()) == 0.0  # the content head: every place alike
    loaded = load_adapter(save_adapter(model, tmp_path / "content.safetensors"), unet)
    assert loaded.adapter.config.content_heads == 1
    for key, layer in loaded.adapter.layers.items():
        assert torch.equal(layer.pos_q.weight, model.adapter.layers[key].pos_q.weight)
    with pytest.raises(ValueError, match="content_heads: 3 is more than .* 2 heads"):
        ContextAugmentedUNet(unet, ContextAdapterConfig(head_dim=32, content_heads=3))
