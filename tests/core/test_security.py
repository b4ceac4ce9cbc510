"""Hostile input and faults: fuzzed adapter and checkpoint files, instruction documents, paths that leave their
root, disk-full and interrupted writes, requests too large to fit, and no loader that can run code.

Every fuzz target holds one property: the call succeeds or raises the library's own error with a message
naming the file or field, never another exception, a hang or an unbounded allocation. Allocations are held
under a ceiling (`memory_ceiling`), so an input that makes a loader reach for gigabytes fails the test
instead of taking the machine down. docs/SECURITY.md lists the figures these settings give.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import errno
import importlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from instruct_core import adapter_io
from instruct_core.train import checkpointing
from instruct_core import pipeline as pipeline_module
from instruct_core.adapter_io import (
    LORA_TARGETS,
    MAX_HEADER_BYTES,
    AdapterError,
    base_lora_tensors,
    load_adapter,
    save_adapter,
)
from instruct_core.train.checkpointing import list_checkpoints, load_checkpoint
from instruct_core.cli import main
from instruct_core.context_unet import ContextAugmentedUNet
from instruct_core.train.data import DataReport, read_dataset
from instruct_core.instruction import (
    MAX_DOCUMENT_BYTES,
    MAX_IMAGE_PIXELS,
    InstructionError,
    InstructionWarning,
    MultiModalInstruction,
    load_instruction,
)
from instruct_core.loading import ModelLoadError, load_base, read_checkpoint
from instruct_core.pipeline import MAX_PIXELS, InstructImagen
from instruct_core.tiny import build_tiny_base, tiny_unet
from instruct_core.train.config import ConfigError, config_from_dict, load_config
from instruct_core.train.trainer import Trainer, TrainingError

try:
    import resource
except ImportError:  # not POSIX: no limits to lower; the tests that need them skip
    resource = None

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLUE, RED = (20, 40, 200), (220, 30, 30)  # inside a root, and the secret outside it


class Fixture(SimpleNamespace):
    def __repr__(self):  # hypothesis prints the arguments of a failing example; tensors make that unreadable
        return f"<{', '.join(vars(self))}>"


# -- fault injection --------------------------------------------------------------------------------------

def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def memory_ceiling(headroom: int = 2 * 2**30):
    """Allow the process `headroom` bytes of address space beyond what it maps now."""
    if resource is None or not os.path.exists("/proc/self/status"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + headroom
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def disk_full(limit: int = 64 * 1024):
    """Writes past `limit` bytes of any file fail (EFBIG), as they would on a full disk. SIGXFSZ is ignored
    so that the write returns the error instead of the signal killing the process."""
    if resource is None:
        pytest.skip("needs POSIX file-size limits")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# == 1. adapter and checkpoint files =======================================================================

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A valid adapter file, one carrying base LoRA weights, and their tensors and metadata to craft from."""
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    unet = tiny_unet()
    valid = save_adapter(ContextAugmentedUNet(unet), folder / "valid.safetensors")
    torch.manual_seed(1)
    lora_unet = tiny_unet()
    model = ContextAugmentedUNet(lora_unet)
    from peft import LoraConfig

    lora_unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    lora = save_adapter(model, folder / "lora.safetensors")
    with safe_open(str(valid), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with safe_open(str(lora), framework="pt") as handle:
        lora_metadata = handle.metadata()
        lora_tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    data = valid.read_bytes()
    return Fixture(folder=folder, unet=unet, data=data, header_end=8 + int.from_bytes(data[:8], "little"),
                   metadata=metadata, tensors=tensors, lora_metadata=lora_metadata, lora_tensors=lora_tensors)


def load_or_refuse(adapters, data: bytes, unet=None) -> AdapterError | None:
    """Load `data` as an adapter: None if it loaded, else the AdapterError; anything else fails the test."""
    path = adapters.folder / "fuzzed.safetensors"
    path.write_bytes(data)
    with memory_ceiling():
        try:
            model = load_adapter(path, adapters.unet if unet is None else unet)
        except AdapterError as error:
            assert str(error).startswith("adapter: fuzzed.safetensors"), error
            return error
    assert all(torch.isfinite(p).all() for p in model.adapter.parameters())
    return None


def crafted(tensors: dict, metadata: dict) -> bytes:
    """The bytes of a .safetensors file holding `tensors` and `metadata`, whatever they say."""
    return safetensors_bytes(tensors, metadata=metadata)


def test_the_unmodified_adapter_loads(adapters):
    assert load_or_refuse(adapters, adapters.data) is None


@FUZZ
@given(data=st.data())
def test_truncated_adapter_is_refused(adapters, data):
    size = data.draw(st.integers(0, len(adapters.data) - 1))
    assert load_or_refuse(adapters, adapters.data[:size]) is not None


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_flipped_bytes_load_or_are_refused(adapters, data):
    """Flips land in the header (JSON, offsets, dtypes, metadata) half the time, in tensor data otherwise."""
    where = st.one_of(st.integers(0, adapters.header_end - 1), st.integers(0, len(adapters.data) - 1))
    flips = data.draw(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=8))
    mutated = bytearray(adapters.data)
    for offset, value in flips:
        mutated[offset] = value
    load_or_refuse(adapters, bytes(mutated))


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(MAX_HEADER_BYTES - 8, MAX_HEADER_BYTES + 8),
                         st.integers(0, 4096)))
def test_any_header_length_but_the_true_one_is_refused(adapters, length):
    true_length = adapters.header_end - 8
    error = load_or_refuse(adapters, struct.pack("<Q", length) + adapters.data[8:])
    assert (error is None) == (length == true_length)
    if length > MAX_HEADER_BYTES:  # refused from the 8 bytes alone: nothing that size is read
        assert "oversized header" in str(error)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
hostile_strings = st.one_of(
    st.text(max_size=40),
    st.integers(0, 2**21).map(lambda n: "x" * n),  # up to 2 MiB, inside the header bound
    json_values.map(lambda v: json.dumps(v)),
    st.sampled_from(["", "null", "[]", "{}", "[1]", "NaN", "1e999", '"instruct-imagen-adapter"', "2", "0"]),
)
METADATA_KEYS = ("format", "format_version", "base_fingerprint", "base_architecture", "levels", "modalities",
                 "adapter_config")


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # values of megabytes, by design
@FUZZ
@given(replaced=st.dictionaries(st.sampled_from(METADATA_KEYS + ("extra",)), hostile_strings, max_size=4),
       dropped=st.sets(st.sampled_from(METADATA_KEYS), max_size=2))
def test_hostile_metadata_values_load_or_are_refused(adapters, replaced, dropped):
    metadata = {k: v for k, v in {**adapters.metadata, **replaced}.items() if k not in dropped}
    error = load_or_refuse(adapters, crafted(adapters.tensors, metadata))
    changed = [key for key in ("format", "format_version") if metadata.get(key) != adapters.metadata[key]]
    if changed:  # checked in this order; the first one wrong is the one named
        assert error is not None and f"{changed[0]} " in str(error).replace("'", " "), error


CONFIG_VALUES = {
    "num_freqs": st.integers(-2**40, 2**40),
    "max_contexts": st.integers(-5, 2**40),
    "encode_timestep": st.integers(-2**40, 2**40),
    "levels": st.lists(st.integers(-3, 5), max_size=4),
    "modalities": st.integers(0, 300_000).map(lambda n: [f"m{i}" for i in range(n)])
    | st.lists(st.text(max_size=5), max_size=8),
}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # values of megabytes, by design
@FUZZ
@given(data=st.data())
def test_adapter_config_sizes_are_bounded_before_anything_is_built(adapters, data):
    """The config decides how many parameters a load allocates; hostile sizes are refused, naming the key."""
    config = json.loads(adapters.metadata["adapter_config"])
    changed = data.draw(st.sets(st.sampled_from(sorted(CONFIG_VALUES)), min_size=1, max_size=2))
    for key in changed:
        config[key] = data.draw(st.one_of(CONFIG_VALUES[key], json_values))
    whole = data.draw(st.none() | json_values)  # sometimes the whole document is something else
    document = json.dumps(config if whole is None else whole)
    error = load_or_refuse(adapters, crafted(adapters.tensors, dict(adapters.metadata, adapter_config=document)))
    if whole is not None and not isinstance(whole, dict):
        assert error is not None and "adapter_config" in str(error)
    too_big = [key for key in changed if key != "levels" and _too_big(config[key])]
    if whole is None and too_big:
        assert error is not None and "adapter_config" in str(error), error
        if len(changed) == 1:  # with one key changed, that key is the one named
            assert f"adapter_config.{too_big[0]}" in str(error), error


def _too_big(value) -> bool:
    if isinstance(value, list):
        return len(value) > 1000
    return isinstance(value, int) and not isinstance(value, bool) and value > 10**6


TENSOR_CHANGES = ("nan", "inf", "shape", "int8", "bool", "float16", "bfloat16", "float64", "float8", "drop", "extra")


@FUZZ
@given(changes=st.dictionaries(st.integers(0, 36), st.sampled_from(TENSOR_CHANGES), min_size=1, max_size=4))
def test_tensor_values_shapes_and_dtypes(adapters, changes):
    """NaN or infinite weights, wrong shapes, integer dtypes, missing or extra tensors are refused; other
    float dtypes load (and are cast)."""
    keys = sorted(adapters.tensors)
    tensors = dict(adapters.tensors)
    for index, change in changes.items():
        key = keys[index % len(keys)]
        if key not in tensors:
            continue
        value = tensors[key].clone()
        if change in ("nan", "inf"):
            value.view(-1)[0] = float(change)
        elif change == "shape":
            value = torch.zeros(value.numel() + 1)
        elif change == "drop":
            del tensors[key]
            continue
        elif change == "extra":
            tensors[key + ".extra"] = value
            continue
        else:
            value = value.to({"float8": torch.float8_e5m2}.get(change) or getattr(torch, change))
        tensors[key] = value
    error = load_or_refuse(adapters, crafted(tensors, adapters.metadata))
    harmless = {"float16", "bfloat16", "float64", "float8"}
    assert (error is None) == (set(changes.values()) <= harmless), error


@FUZZ
@given(blob=st.binary(max_size=4096) | json_values.map(
    lambda v: (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 16)(json.dumps(v).encode())))
def test_random_files_are_refused(adapters, blob):
    assert load_or_refuse(adapters, blob) is not None


@settings(FUZZ, max_examples=40)
@given(rank=st.one_of(st.just(2), st.integers(-2, 2**40), json_values),
       targets=st.one_of(st.just(LORA_TARGETS), st.lists(st.sampled_from(["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                                         "attn1", "", "nothing"]), max_size=4),
                         json_values),
       drop=st.sets(st.integers(0, 63), max_size=2), nan=st.booleans())
def test_base_lora_metadata_is_checked_before_the_base_is_touched(adapters, rank, targets, drop, nan):
    tensors = dict(adapters.lora_tensors)
    lora_keys = sorted(k for k in tensors if k.startswith(adapter_io.LORA_PREFIX))
    for index in drop:
        tensors.pop(lora_keys[index % len(lora_keys)], None)
    if nan:
        key = [k for k in lora_keys if k in tensors][-1]
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    metadata = dict(adapters.lora_metadata, base_lora=json.dumps({"rank": rank, "target_modules": targets}))
    torch.manual_seed(1)
    unet = tiny_unet()
    error = load_or_refuse(adapters, crafted(tensors, metadata), unet)
    if error is not None:  # a refused file leaves the base UNet as it was: no LoRA layers added
        assert not base_lora_tensors(unet)
    else:
        loaded = base_lora_tensors(unet)
        assert all(torch.equal(loaded[k[len(adapter_io.LORA_PREFIX):]], tensors[k]) for k in lora_keys)


def test_a_file_in_the_lora_format_loads_exactly(adapters):
    torch.manual_seed(1)
    unet = tiny_unet()
    assert load_or_refuse(adapters, adapters.folder.joinpath("lora.safetensors").read_bytes(), unet) is None
    assert len(base_lora_tensors(unet)) == sum(k.startswith(adapter_io.LORA_PREFIX) for k in adapters.lora_tensors)


def test_an_adapter_for_another_base_names_what_differs(adapters):
    other = tiny_unet(channels=(32, 32))
    error = load_or_refuse(adapters, adapters.data, other)
    assert error is not None and "another base UNet" in str(error) and "block_out_channels" in str(error)


LDM_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight", "cond_stage_model.model.positional_embedding",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.text_projection", "conditioner.embedders.0.model.ln_final.weight",
    "first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.bias",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias", "v_pred", "ztsnr", "junk",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn((4, 4, 3, 3) if "weight" in key else (8,), generator=generator)
               for key in LDM_KEYS[:4] + LDM_KEYS[9:11]}
    return Fixture(folder=folder, data=crafted(tensors, {"modelspec.prediction_type": "epsilon"}))


def read_or_refuse(folder: Path, data: bytes):
    path = folder / "fuzzed.safetensors"
    path.write_bytes(data)
    with memory_ceiling():
        try:
            state, _ = read_checkpoint(path)
        except ModelLoadError as error:
            assert "fuzzed.safetensors" in str(error)
            return error
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    return None


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_corrupt_checkpoints_raise_model_load_error(checkpoint, data):
    blob = checkpoint.data
    kind = data.draw(st.sampled_from(["truncate", "flip", "length", "random"]))
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        mutated = bytearray(blob)
        for offset, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                                                min_size=1, max_size=8)):
            mutated[offset] = value
        blob = bytes(mutated)
    elif kind == "length":
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
    else:
        blob = data.draw(st.binary(max_size=2048))
    error = read_or_refuse(checkpoint.folder, blob)
    if kind == "truncate":
        assert error is not None


shapes = st.lists(st.integers(0, 5), max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # shapes with a 0 in them
@settings(FUZZ, max_examples=30)
@given(spec=st.dictionaries(st.sampled_from(LDM_KEYS), st.tuples(shapes, dtypes), max_size=8),
       prediction=st.sampled_from(["v", "epsilon", "junk", ""]))
def test_load_base_refuses_any_incomplete_single_file(checkpoint, spec, prediction):
    """Keys of every family with any shapes and dtypes: load_base names the file, whatever is wrong."""
    path = checkpoint.folder / "model.safetensors"
    path.write_bytes(crafted({k: torch.zeros(s, dtype=d) for k, (s, d) in spec.items()},
                             {"modelspec.prediction_type": prediction}))
    with memory_ceiling(), pytest.raises(ModelLoadError, match="model.safetensors"):
        load_base(path, device="cpu", dtype="fp32")


def test_load_base_refuses_a_one_dimensional_input_conv(checkpoint):
    path = checkpoint.folder / "flat_conv.safetensors"
    path.write_bytes(crafted({LDM_KEYS[0]: torch.zeros(4), LDM_KEYS[3]: torch.zeros(4, 4)}, {}))
    with pytest.raises(ModelLoadError, match="flat_conv.safetensors"):
        load_base(path, device="cpu", dtype="fp32")


# == 2. instruction documents ==============================================================================

def minimal_document(**context) -> dict:
    return {"version": 1, "text": "[ref#1]", "contexts": [{"id": 1, "modality": "subject", "image": "toy.png",
                                                             **context}]}


def parse(text: str | bytes, base_dir=None, root=None) -> MultiModalInstruction:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstructionWarning)
        return MultiModalInstruction.from_json(text, base_dir=base_dir, root=root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/ with an image (blue) and links in and out; secret.png (red) next to it, outside."""
    base = tmp_path_factory.mktemp("tree")
    root = base / "root"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 6), BLUE).save(root / "images" / "toy.png")
    Image.new("RGB", (8, 6), RED).save(base / "secret.png")
    os.symlink(root / "images" / "toy.png", root / "link_in.png")
    os.symlink(base / "secret.png", root / "link_out.png")
    os.symlink(base, root / "dir_out")
    os.symlink(root / "loop", root / "loop")
    return Fixture(base=base, root=root)


@settings(FUZZ, max_examples=60)
@given(depth=st.integers(1_000, 200_000), opener=st.sampled_from(["[", '{"a":', '[{"b":']),
       where=st.sampled_from(["top", "text", "contexts", "weight", "image"]))
def test_deeply_nested_json_is_refused(depth, opener, where):
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    nested = opener * depth + "1" + closer * depth
    if where == "top":
        text = nested
    elif where == "contexts":
        text = f'{{"version": 1, "text": "x", "contexts": {nested}}}'
    else:
        document = json.dumps(minimal_document()).replace('"toy.png"', "NESTED" if where == "image" else '"toy.png"')
        if where == "text":
            document = document.replace('"[ref#1]"', "NESTED")
        elif where == "weight":
            document = document.replace('"image"', '"weight": NESTED, "image"')
        text = document.replace("NESTED", nested)
    started = time.perf_counter()
    with pytest.raises(InstructionError) as caught:
        parse(text)
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert message.startswith(("instruction: JSON is nested too deeply", "text:", "contexts", "instruction:"))


def test_documents_over_the_size_limit_are_refused_before_parsing(tmp_path):
    with pytest.raises(InstructionError, match=r"^instruction: document is over the \d+ byte limit"):
        parse(" " * (MAX_DOCUMENT_BYTES + 1))
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:  # sparse: the size is real, the bytes are never written
        handle.truncate(MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(InstructionError, match=r"^instruction: file is \d+ bytes, over the \d+ byte limit"):
        load_instruction(big)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # values of megabytes, by design
@settings(FUZZ, max_examples=60)
@given(size=st.integers(1, 4 * 2**20), char=st.sampled_from(["x", "[", "[ref#", "[ ", "1", "é", " "]),
       field=st.sampled_from(["text", "negative", "modality", "context_text"]))
def test_huge_strings_inside_the_limit_load_or_name_their_field(tree, size, char, field):
    value = char * (size // len(char))
    document = minimal_document(image="images/toy.png")
    if field == "context_text":
        document["contexts"][0]["text"] = value
    elif field == "modality":
        document["contexts"][0]["modality"] = value
    else:
        document[field] = document.get(field, "") + value
    try:
        parse(json.dumps(document), base_dir=tree.root, root=tree.root)
    except InstructionError as error:
        prefix = {"context_text": "contexts[0].text", "modality": "contexts[0].modality"}.get(field, field)
        assert str(error).startswith((prefix, "text:")), error


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]


@FUZZ
@given(token=st.sampled_from(NON_FINITE),
       field=st.sampled_from(["weight", "id", "version", "text", "modality", "image", "mask"]))
def test_nan_and_infinity_in_json_text_name_the_field(tree, token, field):
    document = minimal_document(image="images/toy.png")
    if field == "version":
        document["version"] = "TOKEN"
    else:
        document["contexts"][0][field] = "TOKEN"
    text = json.dumps(document).replace('"TOKEN"', token)
    with pytest.raises(InstructionError) as caught:
        parse(text, base_dir=tree.root, root=tree.root)
    expected = "version" if field == "version" else f"contexts[0].{field}"
    assert str(caught.value).startswith(expected), caught.value


def _png(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _bmp(width, height):
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


def _gif(width, height):
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    return b"GIF89a" + screen + b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00\x08\x00;"


def _tiff(width, height):
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 0)]
    body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", 8) + body


def _jpeg(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"\xff\xc0")
    data[start + 5:start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# Headers only, no pixel data: what a file claims is all a reader may trust before decoding.
HEADERS = {"png": (_png, 2**31 - 1), "bmp": (_bmp, 2**31 - 1), "gif": (_gif, 65535), "tiff": (_tiff, 2**32 - 1),
           "jpeg": (_jpeg, 65535)}


@FUZZ
@given(data=st.data(), kind=st.sampled_from(sorted(HEADERS)), field=st.sampled_from(["image", "mask"]),
       carrier=st.sampled_from(["file", "data URI"]))
def test_images_claiming_absurd_sizes_are_refused_from_the_header(tree, data, kind, field, carrier):
    make, largest = HEADERS[kind]
    width = data.draw(st.integers(MAX_IMAGE_PIXELS // largest + 1, largest))
    height = data.draw(st.integers(MAX_IMAGE_PIXELS // width + 1, largest))
    blob = make(width, height)
    if carrier == "file":
        (tree.root / "claim").write_bytes(blob)
        source = "claim"
    else:
        source = f"data:image/{kind};base64," + base64.b64encode(blob).decode()
    document = minimal_document(image="images/toy.png")
    document["contexts"][0][field] = source
    with memory_ceiling(), pytest.raises(InstructionError) as caught:
        parse(json.dumps(document), base_dir=tree.root, root=tree.root)
    message = str(caught.value)
    assert message.startswith(f"contexts[0].{field}: "), message
    assert "over the limit" in message or "too large to decode safely" in message, message


# == 3. paths confined to roots ============================================================================

segments = st.sampled_from(["..", ".", "images", "toy.png", "link_in.png", "link_out.png", "dir_out", "secret.png",
                            "root", "loop", "", "missing"])


@st.composite
def paths(draw):
    prefix = draw(st.sampled_from(["", "ROOT/", "BASE/", "/", "ROOT/../", "ROOT/images/../../"]))
    return prefix + "/".join(draw(st.lists(segments, min_size=1, max_size=6)))


def _spell(path: str, tree) -> str:
    return path.replace("ROOT", str(tree.root)).replace("BASE", str(tree.base))


def _inside(path: str, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def _unresolvable(path: str) -> bool:
    """A symlink loop on the way: such a path is refused without asking where it would lead."""
    try:
        os.path.realpath(path, strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return False


def _colour(image: Image.Image) -> tuple:
    return tuple(np.asarray(image.convert("RGB"))[0, 0])


@settings(FUZZ, max_examples=200)
@given(path=paths())
@example(path="loop/../..")  # a loop hides where `..` leads; found by this test
def test_instruction_images_never_come_from_outside_the_root(tree, path):
    source = _spell(path, tree)
    escapes = not _inside(os.path.join(tree.root, source), tree.root)
    unresolvable = _unresolvable(os.path.join(tree.root, source))
    try:
        instruction = parse(json.dumps(minimal_document(image=source)), base_dir=tree.root, root=tree.root)
    except InstructionError as error:
        assert str(error).startswith("contexts[0].image: "), error
        if unresolvable:
            assert "cannot resolve path" in str(error), error
        else:
            assert ("escapes the allowed root" in str(error)) == escapes, error
        return
    assert not unresolvable
    assert not escapes and _colour(instruction.contexts[0].image) == BLUE


@settings(FUZZ, max_examples=100)
@given(path=paths())
@example(path="loop/../..")
def test_dataset_records_never_come_from_outside_the_root(tree, path):
    source = _spell(path, tree)
    records = [{"image": "images/toy.png", "caption": "blue", "key": "good"},
               {"image": source, "caption": "fuzzed", "key": "fuzzed"}]
    manifest = tree.root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    report = DataReport()
    items = read_dataset(manifest, root=tree.root, report=report)
    assert all(_colour(item.load()) == BLUE for item in items)
    escapes = not _inside(os.path.join(tree.root, source), tree.root)
    if _unresolvable(os.path.join(tree.root, source)):
        assert [item.key for item in items] == ["good"] and report.skipped.get("missing_image", 0) == 1
    else:
        assert (report.skipped.get("outside_root", 0) == 1) == escapes



def test_a_symlink_loop_opens_no_way_out_of_an_instruction_root(tree):
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: "):
        parse(json.dumps(minimal_document(image="loop/../link_out.png")), base_dir=tree.root, root=tree.root)


def test_a_symlink_loop_opens_no_way_out_of_a_dataset_root(tree):
    records = [{"image": "images/toy.png", "caption": "blue"}, {"image": "loop/../link_out.png", "caption": "red"}]
    manifest = tree.root / "loop_manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    assert [_colour(item.load()) for item in read_dataset(manifest, root=tree.root)] == [BLUE]


def test_dataset_source_outside_the_root_is_refused(tree):
    from instruct_core.train.data import DataError

    with pytest.raises(DataError, match="outside the allowed root"):
        read_dataset(tree.root / "dir_out", root=tree.root)


@pytest.fixture(scope="module")
def comfy(tree):
    """The pack over the ComfyUI stub, its input directory pointed at the tree's root, restored after."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes" / "comfy_stub"))
    from load_pack import PACK_NAME, load_pack

    load_pack()
    import folder_paths

    saved = folder_paths.input_directory, dict(folder_paths.folder_names_and_paths)
    folder_paths.input_directory = str(tree.root)
    models = tree.base / "models"
    for name in ("instruct_imagen", "checkpoints"):
        (models / name).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], {".safetensors"})
    paths_module = importlib.import_module(f"{PACK_NAME}.nodes.paths")
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in sys.modules[PACK_NAME].nodes.NODES}
    yield Fixture(paths=paths_module, nodes=nodes, models=models)
    folder_paths.input_directory = saved[0]
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved[1])


@settings(FUZZ, max_examples=200)
@given(path=paths())
def test_comfyui_input_paths_stay_in_the_input_directory(tree, comfy, path):
    relative = _spell(path, tree)
    try:
        resolved = comfy.paths.confined_input_path(relative, "dataset")
    except ValueError as error:
        assert str(error).startswith("dataset: "), error
        return
    assert _inside(str(resolved), tree.root) and ".." not in Path(relative).parts and not os.path.isabs(relative)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc/passwd", "C:evil", "nul\x00", "  ", "a\\b"])
def test_comfyui_names_typed_in_a_node_are_plain_file_names(comfy, name):
    with pytest.raises(ValueError, match="adapter_name"):
        comfy.paths.adapter_save_path(name)


@pytest.fixture
def example(tmp_path):
    folder = tmp_path / "example"
    folder.mkdir()
    Image.new("RGB", (32, 32), BLUE).save(folder / "toy.png")
    Image.new("RGB", (32, 32), RED).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    return folder


@pytest.mark.parametrize("source", ["../secret.png", "SECRET", "link.png"], ids=["dot-dot", "absolute", "symlink"])
def test_cli_root_refuses_images_outside_it(example, tmp_path, capsys, source):
    source = source.replace("SECRET", str(tmp_path / "secret.png"))
    path = example / "instruction.json"
    path.write_text(json.dumps(minimal_document(image=source)))
    out = tmp_path / "o.png"
    code = main(["generate", "--instruction", str(path), "--out", str(out), "--model", "tiny", "--quiet",
                 "--steps", "1", "--root", str(example)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: contexts[0].image: path escapes the allowed root folder")
    assert "Traceback" not in err and not out.exists()


# == 4. faults while writing ===============================================================================

@pytest.fixture(scope="module")
def training_pipe():
    return InstructImagen.from_base(build_tiny_base())


def make_trainer(output_dir: Path, pipe: InstructImagen) -> Trainer:
    """A trainer that is only saved and resumed here. Trainers on one pipe share its parameters, so each
    test compares against a snapshot it took itself."""
    config = config_from_dict({"stage": 2, "base_model": "tiny", "output_dir": str(output_dir),
                               "data": {"source": "unused"}, "train": {"steps": 4, "warmup_steps": 0},
                               "checkpoint": {"every": 1, "keep": 2}})
    return Trainer(config, pipe, dataset=None)


def _snapshot(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.trainable.items()}


def _fault(kind, monkeypatch):
    if kind == "tensors: disk full":
        return disk_full()
    if kind == "fsync: ENOSPC":
        monkeypatch.setattr(checkpointing.os, "fsync", _raise_enospc)
    elif kind == "rename: EIO":
        real = os.replace

        def failing(src, dst):
            if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp"):
                raise OSError(errno.EIO, "Input/output error")
            return real(src, dst)

        monkeypatch.setattr(checkpointing.os, "replace", failing)
    return contextlib.nullcontext()


FAULTS = ["tensors: disk full", "fsync: ENOSPC", "rename: EIO"]


@pytest.mark.parametrize("same_step", [False, True], ids=["next step", "same step again"])
@pytest.mark.parametrize("kind", FAULTS)
def test_a_failed_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, training_pipe, kind, same_step):
    trainer = make_trainer(tmp_path, training_pipe)
    trainer.step = 1
    good = trainer.save()
    saved = _snapshot(trainer)
    with torch.no_grad():
        for p in trainer.trainable.values():
            p.add_(1.0)
    trainer.step = 1 if same_step else 2
    with _fault(kind, monkeypatch), pytest.raises(TrainingError) as caught:
        trainer.save()
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith("checkpoint: could not write to") and "the previous checkpoint is intact" in message
    assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == [good.name]  # no .tmp left behind
    step, state = load_checkpoint(good)
    assert step == 1 and all(torch.equal(state["trainable"][n], saved[n]) for n in saved)
    resumed = make_trainer(tmp_path, training_pipe)
    assert resumed.resume() and resumed.step == 1
    assert all(torch.equal(p, saved[n]) for n, p in resumed.trainable.items())  # work lost: none past step 1


def test_an_interrupted_checkpoint_leaves_no_partial_folder(tmp_path, monkeypatch, training_pipe):
    trainer = make_trainer(tmp_path, training_pipe)
    trainer.step = 1
    good = trainer.save()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "save_file", interrupted)
    trainer.step = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == [good.name]
    assert list_checkpoints(trainer.checkpoint_dir) == [good]


@pytest.fixture
def saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = ContextAugmentedUNet(tiny_unet())
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(1.0)
    return SimpleNamespace(model=model, path=path, data=path.read_bytes())


@pytest.mark.parametrize("kind", ["disk full", "rename fails", "interrupted"])
def test_a_failed_adapter_save_keeps_the_old_file(saved_adapter, monkeypatch, kind):
    fault = contextlib.nullcontext()
    expected = OSError
    if kind == "disk full":
        fault = disk_full()
    elif kind == "rename fails":
        monkeypatch.setattr(adapter_io.os, "replace", _raise_enospc)
    else:
        def interrupted(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise KeyboardInterrupt

        monkeypatch.setattr(adapter_io, "save_file", interrupted)
        expected = KeyboardInterrupt
    with fault, pytest.raises(expected):
        save_adapter(saved_adapter.model, saved_adapter.path)
    monkeypatch.undo()
    assert saved_adapter.path.read_bytes() == saved_adapter.data
    assert [p.name for p in saved_adapter.path.parent.iterdir()] == ["adapter.safetensors"]
    torch.manual_seed(0)
    load_adapter(saved_adapter.path, tiny_unet())


def test_cli_ends_a_disk_fault_with_one_line(tmp_path, monkeypatch, capsys):
    import instruct_core.train.stages as stages

    monkeypatch.setattr(stages, "run_training", lambda *a, **k: _raise_enospc())
    config = tmp_path / "train.yaml"
    config.write_text(f"stage: 2\noutput_dir: {tmp_path / 'run'}\ndata:\n  source: {tmp_path}\n")
    code = main(["train", "--config", str(config), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == "error: [Errno 28] No space left on device"


def _memory_hungry_trainer(output_dir: Path, pipe: InstructImagen) -> Trainer:
    from instruct_bench.tasks import BenchmarkTaskDataset

    config = config_from_dict({"stage": 2, "base_model": "tiny", "output_dir": str(output_dir),
                               "data": {"source": "benchmark", "resolution": 64},
                               "train": {"steps": 3, "batch_size": 192, "warmup_steps": 0},
                               "checkpoint": {"every": 1, "keep": 2}})
    return Trainer(config, pipe, BenchmarkTaskDataset({"text_to_image": 1.0}, length=1000, seed=0, size=64))


# Run in a fresh process: a long-lived one holds freed heap (and idle thread arenas) inside its mapped size,
# and that slack, not the ceiling, decided whether the step could allocate.
_OUT_OF_MEMORY_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_security import _memory_hungry_trainer, memory_ceiling
from instruct_core.pipeline import InstructImagen
from instruct_core.tiny import build_tiny_base
from instruct_core.train.trainer import TrainingError

trainer = _memory_hungry_trainer(Path(sys.argv[2]), InstructImagen.from_base(build_tiny_base()))
trainer.step = 1
good = trainer.save()
try:
    with memory_ceiling(headroom=96 * 2**20):
        trainer.run(resume=True)
except TrainingError as error:
    print(json.dumps({"message": str(error), "good": str(good)}))
else:
    print(json.dumps({"message": None, "good": str(good)}))
"""


def test_running_out_of_memory_ends_with_a_message_and_the_last_checkpoint(tmp_path):
    """A real allocation failure (an address-space ceiling makes the CPU allocator refuse) mid-training."""
    if resource is None or not os.path.exists("/proc/self/status"):
        pytest.skip("needs POSIX address-space limits")
    here = Path(__file__).resolve().parent  # where the child imports this module from
    child = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_RUN, str(here), str(tmp_path)],
                           capture_output=True, text=True, timeout=600, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # no thread pool to grow under the ceiling
    assert child.returncode == 0, child.stderr[-4000:]
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    message = outcome["message"]
    assert message is not None, "training under the ceiling did not raise TrainingError"
    assert message.startswith("out of memory at step 2") and "train.batch_size=192" in message
    good = Path(outcome["good"])
    assert list_checkpoints(good.parent) == [good]
    assert load_checkpoint(good)[0] == 1


def test_a_failed_export_names_the_folder_and_keeps_the_checkpoint(tmp_path, monkeypatch, training_pipe):
    trainer = make_trainer(tmp_path, training_pipe)
    trainer.step = 4
    good = trainer.save()
    monkeypatch.setattr(adapter_io.os, "replace", _raise_enospc)
    with pytest.raises(TrainingError) as caught:
        trainer.export()
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"export: could not write to {tmp_path}") and "No space left" in message
    assert "--resume" in message and not (tmp_path / "adapter.safetensors").exists()
    assert list_checkpoints(trainer.checkpoint_dir) == [good] and load_checkpoint(good)[0] == 4


# == 5. requests that cannot fit ===========================================================================

@pytest.fixture(scope="module")
def pipe():
    return InstructImagen.from_base(build_tiny_base())


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_oversized_requests_fail_before_anything_is_allocated(pipe, data):
    multiple = pipe.size_multiple
    width = multiple * data.draw(st.integers(1, 2**16))
    height = multiple * data.draw(st.integers(1, 2**16))
    batch = data.draw(st.integers(1, 2**40))
    assume(width * height * batch > MAX_PIXELS)
    calls = []
    original = pipeline_module.prepare_noise
    pipeline_module.prepare_noise = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        # over a side, the aspect, the batch, the pixels or the memory budget: each names its input
        with pytest.raises(InstructionError, match=r"^(batch|width|height): \d+"):
            pipe.generate(MultiModalInstruction(text="a red square", contexts=[]), width=width, height=height,
                          batch_size=batch, steps=1)
    finally:
        pipeline_module.prepare_noise = original
    assert not calls  # no noise drawn: the check ran before the sample tensor exists


@pytest.mark.parametrize("args, message", [
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(steps=-5), "steps"),
    (dict(width=30), "width"), (dict(height=-32), "height"), (dict(batch_size=0), "batch"),
    (dict(denoise=float("nan")), "denoise"), (dict(sampler="eval"), "sampler"), (dict(schedule="x"), "schedule"),
])
def test_out_of_range_generation_values_name_the_argument(pipe, args, message):
    with pytest.raises(InstructionError, match=f"^{message}: "):
        pipe.generate(MultiModalInstruction(text="a red square", contexts=[]), **args)


@pytest.mark.parametrize("extra, message", [
    (["--batch", str(10**9)], "--batch: 1000000000 must be between 1 and 4096"),
    (["--width", str(2**20), "--height", str(2**20)], "--width: 1048576 must be between 1 and 8192"),
    (["--width", "4096", "--height", "4096", "--batch", "2"], "batch: 2 images of 4096x4096 exceed the limit"),
    (["--steps", "5000"], "steps"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", str(-2**70)], "--seed"),
    (["--cfg-text", "nan"], "--cfg-text"),
    (["--cfg-context", "inf"], "--cfg-context"),
])
def test_cli_out_of_range_values_exit_2(example, tmp_path, capsys, extra, message):
    path = example / "instruction.json"
    path.write_text(json.dumps(minimal_document()))
    out = tmp_path / "o.png"
    code = main(["generate", "--instruction", str(path), "--out", str(out), "--model", "tiny", "--quiet",
                 "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("override, key", [
    ("train.steps=.nan", "train.steps"), ("train.lr=.inf", "train.lr"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm"),
    ("train.steps=" + "9" * 30, "train.steps"), ("data.resolution=1000000", "data.resolution"),
    ("train.batch_size=100000", "train.batch_size"), ("train.seed=-1", "train.seed"),
    ("train.lora_rank=0", "train.lora_rank"), ("train.steps.x=1", "override: train.steps.x"),
    ("data.num_workers=-1", "data.num_workers"), ("validation.steps=0", "validation.steps"), ("data=3", "data"),
])
def test_training_configs_that_cannot_run_name_the_key(tmp_path, override, key):
    config = tmp_path / "train.yaml"
    config.write_text("stage: 2\ndata:\n  source: somewhere\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, [override])
    assert str(caught.value).startswith(key), caught.value


@pytest.fixture(scope="module")
def hostile_adapters(comfy):
    """Adapters a ComfyUI user might drop into models/instruct_imagen, made for the loader's 'tiny' base."""
    folder = comfy.models / "instruct_imagen"
    data = save_adapter(ContextAugmentedUNet(build_tiny_base().unet), folder / "good.safetensors").read_bytes()
    with safe_open(str(folder / "good.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["adapter_config"])
    first = sorted(tensors)[0]
    files = {
        "truncated": data[: len(data) // 2],
        "huge_freqs": crafted(tensors, dict(metadata, adapter_config=json.dumps(dict(config, num_freqs=10**8)))),
        "nan": crafted(dict(tensors, **{first: torch.full_like(tensors[first], float("nan"))}), metadata),
        "version": crafted(tensors, dict(metadata, format_version="99")),
        "header": struct.pack("<Q", 2**62) + data[8:],
        "other_base": save_adapter(ContextAugmentedUNet(tiny_unet()), folder / "x.safetensors").read_bytes(),
    }
    for name, blob in files.items():
        (folder / f"{name}.safetensors").write_bytes(blob)
    return folder


@pytest.mark.parametrize("name, reason", [
    ("truncated", "unreadable safetensors file"), ("huge_freqs", "adapter_config.num_freqs"),
    ("nan", "NaN or infinite"), ("version", "format_version '99'"), ("header", "oversized header"),
    ("other_base", "another base UNet"),
])
def test_comfyui_loader_turns_hostile_adapters_into_node_errors(comfy, hostile_adapters, name, reason):
    with memory_ceiling(), pytest.raises(ValueError, match=rf"^adapter: {name}\.safetensors") as caught:
        comfy.nodes["InstructImagenLoader"].execute("tiny", f"{name}.safetensors", "fp32")
    assert reason in str(caught.value)


def test_comfyui_loader_still_loads_a_good_adapter_next_to_them(comfy, hostile_adapters):
    assert comfy.nodes["InstructImagenLoader"].execute("tiny", "good.safetensors", "fp32")[0].adapter


# == 6. nothing that runs code =============================================================================

SCANNED = [REPO / "__init__.py", *sorted((REPO / "instruct_core").rglob("*.py")),
           *sorted((REPO / "nodes").rglob("*.py"))]
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler",
                   "marshal.load", "marshal.loads", "shelve.open", "dill.load", "dill.loads", "joblib.load",
                   "yaml.load", "yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen", "tarfile.extractall"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            # a value computed at run time is neither True nor False: treated as unsafe below
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else ...
    return None


def _calls(node, function="<module>"):
    """(call, name of the function it sits in), for every call under `node`."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        function = node.name
    if isinstance(node, ast.Call):
        yield node, function
    for child in ast.iter_child_nodes(node):
        yield from _calls(child, function)


def _runs_code(call: ast.Call, name: str) -> bool:
    tail = name.split(".")[-1]
    return (name in FORBIDDEN_CALLS or tail in ("extractall", "Unpickler")
            or (name == "torch.load" and _keyword(call, "weights_only") is not True)
            or (name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is not False)
            or _keyword(call, "trust_remote_code") not in (None, False)
            or (tail in ("from_pretrained", "from_single_file") and _keyword(call, "local_files_only") is not True)
            or (name.startswith("subprocess.") and _keyword(call, "shell") not in (None, False)))


def scan(source: str, filename: str) -> list[str]:
    """Calls that can run code from data, as 'file:line: call (function)'."""
    found = []
    for call, function in _calls(ast.parse(source)):
        name = _dotted(call.func)
        if _runs_code(call, name):
            found.append(f"{filename}:{call.lineno}: {name} ({function})")
    return found


def test_the_scanner_finds_what_it_looks_for():
    planted = ("import pickle, torch, yaml, numpy as np\n"
               "def f(p):\n    torch.load(p)\n    torch.load(p, weights_only=False)\n    eval('1')\n"
               "    pickle.loads(p)\n    yaml.load(p)\n    np.load(p)\n    exec('x')\n"
               "    torch.load(p, weights_only=True)\n    np.load(p, allow_pickle=False)\n    yaml.safe_load(p)\n"
               "    model.eval()\n    M.from_pretrained(p)\n    M.from_pretrained(p, local_files_only=True)\n")
    assert [line.split(": ", 1)[1].split(" ")[0] for line in scan(planted, "x.py")] == [
        "torch.load", "torch.load", "eval", "pickle.loads", "yaml.load", "np.load", "exec", "M.from_pretrained"]


def test_no_loader_runs_code_from_data():
    found = []
    for path in SCANNED:
        found += scan(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
    assert found == []


def test_pickle_checkpoints_are_refused_without_being_read(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: a pickle checkpoint .*\.safetensors"):
        read_checkpoint(path)
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: a pickle"):
        load_base(path, device="cpu")
    assert not marker.exists()
