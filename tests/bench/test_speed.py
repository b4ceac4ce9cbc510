"""The performance benchmarks on the tiny UNet: report contents, FLOP counts, the one-time context encoding,
our K=0 path against raw diffusers, and the command line. No timing is asserted: this machine is shared."""

import json
import sys
from pathlib import Path

import pytest
import torch

from instruct_bench import speed, speed_comfyui
from instruct_bench.cli import main

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared CPU, a second intra-op thread that gets descheduled stalls every kernel.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    return speed.build_setup("tiny", CPU, torch.float32)


@pytest.fixture(scope="module")
def sample_report():
    settings = speed.SampleSpeedSettings(device="cpu", batches=(1,), contexts=(0, 1), steps=2, warmup=0,
                                             repeats=1)
    return speed.sample_speed(settings, log=lambda line: None)


def _row(report, **match):
    return speed.find_row(report["rows"], **match)


def test_sample_report_has_a_row_per_path_and_guidance(sample_report):
    keys = [(r["path"], r["contexts"], r["guidance"], r["rows_per_unet_call"]) for r in sample_report["rows"]]
    assert keys == [("diffusers", 0, "cfg", 2), ("ours", 0, "cfg", 2), ("ours", 1, "cfg", 2), ("ours", 1, "dual", 3)]
    for row in sample_report["rows"]:
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert 0 < row["mfu"] < float("inf")
    assert all(r["unet_calls_per_step"] == 1 for r in sample_report["rows"])
    assert sample_report["peak"]["flops_per_s"] > 0
    assert {c["status"] for c in sample_report["checks"]} <= {"PASS", "FAIL", "n/a"}
    text = speed.format_sample_report(sample_report)
    assert "diffusers" in text and "Checks:" in text and sample_report["environment"]["torch"] in text


def test_flops_grow_with_contexts_and_match_diffusers_without(sample_report):
    theirs = _row(sample_report, path="diffusers")["flops_per_step"]
    plain = _row(sample_report, path="ours", contexts=0)["flops_per_step"]
    with_context = _row(sample_report, path="ours", contexts=1, guidance="cfg")
    dual = _row(sample_report, path="ours", contexts=1, guidance="dual")["flops_per_step"]
    assert plain > 0 and plain == theirs
    assert with_context["flops_per_step"] > plain
    assert dual > with_context["flops_per_step"]  # a third branch
    assert with_context["flop_overhead"] == pytest.approx(with_context["flops_per_step"] / plain - 1)
    encoding = sample_report["encoding"][0]
    assert encoding["contexts"] == 1 and 0 < encoding["flop_cost_in_unet_forwards"] < 1


def test_contexts_are_encoded_once_per_generation(setup):
    settings = speed.SampleSpeedSettings()
    inputs = speed.sample_inputs(setup, batch=2, seed=0)
    contexts = speed.context_inputs(setup, batch=2, contexts=2, seed=0)
    before = setup.model.encoder_calls
    run = speed.run_ours(setup, inputs, contexts, speed.guidance_config("dual", settings), steps=3)
    assert setup.model.encoder_calls == before + 1
    assert run.unet_rows == [2 * 3] * 3  # every branch of a step in one UNet call
    assert len(run.step_s) == 3 and run.encode_s > 0


def test_our_k0_path_and_raw_diffusers_reach_the_same_latents(setup):
    settings = speed.SampleSpeedSettings()
    inputs = speed.sample_inputs(setup, batch=2, seed=3)
    ours = speed.run_ours(setup, inputs, None, speed.guidance_config("cfg", settings), steps=4)
    theirs = speed.run_diffusers(setup, inputs, settings.guidance_scale, steps=4)
    assert ours.unet_rows == theirs.unet_rows == [4] * 4
    scale = theirs.latents.abs().max()
    assert (ours.latents - theirs.latents).abs().max() <= 1e-5 * scale
    # the diffusers run hands the context processors back
    assert all(type(p).__name__ in ("PassThroughProcessor", "ContextAttnProcessor")
               for p in setup.unet.attn_processors.values())


def test_cli_speed_sample_writes_the_json(tmp_path, capsys):
    out = tmp_path / "sample.json"
    code = main(["speed", "sample", "--device", "cpu", "--batch", "1", "--contexts", "0", "--steps", "1",
                 "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "sample" and [r["path"] for r in report["rows"]] == ["diffusers", "ours"]
    captured = capsys.readouterr()
    assert "Instruct-Imagen sampling benchmark" in captured.out
    assert "speed sample: 2/2 run" in captured.err  # piped: plain progress lines


def test_cli_speed_train_writes_the_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = main(["speed", "train", "--device", "cpu", "--batch", "1", "--steps", "1", "--warmup", "0",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["mode"], r["contexts"]) for r in rows] == [
        ("ours", "adapter", 1), ("diffusers", "full", 0), ("ours", "full", 0), ("ours", "full", 1)]
    assert all(r["flops_per_step"] > 0 and r["images_per_s"] > 0 for r in rows)
    adapter, _, full, _ = rows
    assert adapter["trainable_params"] < full["trainable_params"]
    assert "speed train: 4/4 run" in capsys.readouterr().err


COMFY = ["--server", "http://127.0.0.1:1", "--checkpoint", "x.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["sample", "--batch", "0"], "--batch"),
    (["sample", "--contexts", "1,x"], "--contexts"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--repeats", "0"], "--repeats"),
    (["sample", "--device", "cpu", "--dtype", "fp16"], "fp16"),
    (["train", "--modes", "lora"], "--modes"),
    (["train", "--batch", "0"], "--batch"),
    (["comfyui", *COMFY, "--steps", "1"], "--steps"),
    (["comfyui", *COMFY, "--size", "100"], "--size"),
    (["comfyui", *COMFY, "--size", "200"], "--size"),
    (["comfyui", *COMFY, "--cfg", "nan"], "--cfg"),
    (["comfyui", *COMFY, "--cfg", "40"], "--cfg"),
    (["comfyui", "--server", "http://127.0.0.1:1", "--checkpoint", "../x.safetensors"], "--checkpoint"),
    (["comfyui", "--server", "ftp://host", "--checkpoint", "x.safetensors"], "--server"),
    (["comfyui", *COMFY, "--patch-contexts", "1,two"], "--patch-contexts"),
    (["comfyui", *COMFY, "--patch-contexts", "0,9"], "--patch-contexts"),
])
def test_bad_speed_values_exit_2_with_a_message(args, message, capsys):
    assert main(["speed", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


@pytest.mark.parametrize("args", [[], ["profile"], ["sample", "--size", "huge"], ["train", "--device", "tpu"]])
def test_malformed_speed_arguments_exit_2(args):
    with pytest.raises(SystemExit) as raised:
        main(["speed", *args])
    assert raised.value.code == 2


def test_comfyui_speed_times_steps_from_progress_events():
    def event(kind, **data):
        return {"type": kind, "data": {"prompt_id": "p", **data}}

    stamped = [(0.0, event("executing", node="1")), (1.0, event("executing", node="5")),
               (1.5, event("progress", node="5", value=1, max=3)), (1.7, event("progress", node="5", value=2, max=3)),
               (1.8, event("progress", node="6", value=1, max=1)), (2.0, event("progress", node="5", value=3, max=3)),
               (2.5, event("executing", node="6")), (3.0, event("executing", node=None))]
    # the first step's interval (from the node's start) is not a step: it holds the sampler's setup
    assert speed_comfyui.step_intervals(stamped, "5") == pytest.approx([0.2, 0.3])
    assert speed_comfyui.node_seconds(stamped, "5") == pytest.approx(1.5)
    assert speed_comfyui.node_seconds(stamped, "6") == pytest.approx(0.5)
    assert speed_comfyui.node_seconds(stamped, "9") is None


def test_comfyui_speed_graphs_sample_alike():
    settings = speed_comfyui.ComfySpeedSettings(server="http://x", checkpoint="m.safetensors", size=256, batch=2,
                                                steps=7, cfg=4.5)
    graph = speed_comfyui.round_graph(settings, seed=3)
    comfy = graph[speed_comfyui.sampler_node(graph, "KSampler")]["inputs"]
    ours = graph[speed_comfyui.sampler_node(graph, "InstructSampler")]["inputs"]
    assert (comfy["steps"], comfy["cfg"], comfy["sampler_name"], comfy["scheduler"], comfy["seed"]) == \
        (ours["steps"], ours["cfg_text"], ours["sampler"], ours["schedule"], ours["seed"])
    assert ours["cfg_context"] == 1.0  # no contexts: text guidance alone, two rows per image like KSampler
    # both chains in one prompt, each wired to its own nodes
    assert len(graph) == len(speed_comfyui.comfyui_graph(settings, 3)) + len(speed_comfyui.instruct_graph(settings, 3))
    for spec in graph.values():
        for value in spec["inputs"].values():
            assert not isinstance(value, list) or value[0] in graph


def test_the_random_checkpoint_never_replaces_a_file(tmp_path, capsys):
    existing = tmp_path / "real.safetensors"
    existing.write_bytes(b"a real model")
    code = main(["speed", "comfyui", "--server", "http://127.0.0.1:1", "--checkpoint", "real.safetensors",
                 "--write-random-checkpoint", str(tmp_path)])
    assert code == 2 and "exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"a real model"
    with pytest.raises(FileExistsError):
        speed_comfyui.write_random_checkpoint(existing)
    assert existing.read_bytes() == b"a real model"
    # the server is asked first: an unreachable one costs no gigabytes of writing
    assert main(["speed", "comfyui", "--server", "http://127.0.0.1:1", "--checkpoint", "new.safetensors",
                 "--write-random-checkpoint", str(tmp_path)]) == 1
    assert not (tmp_path / "new.safetensors").exists()


def test_comfyui_speed_says_when_the_server_is_unreachable(capsys):
    assert main(["speed", "comfyui", *COMFY]) == 1
    assert "cannot reach http://127.0.0.1:1" in capsys.readouterr().err
    # a checkpoint in a subfolder is a name the server lists; nothing is written for an unreachable server
    assert main(["speed", "comfyui", "--server", "http://127.0.0.1:1", "--checkpoint", "sd/m.safetensors"]) == 1


def test_the_random_checkpoint_has_the_shape_asked_for_and_loads_like_a_real_one(tmp_path):
    from safetensors import safe_open

    from instruct_core.loading import load_base

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # the loader tests' small bases
    from test_loading import tiny_base, write_config_dir

    config_dir = write_config_dir(tmp_path / "config", tiny_base("sdxl"))
    path = speed_comfyui.write_random_checkpoint(tmp_path / "random_sdxl.safetensors", "sdxl", config_dir=config_dir)
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F16"}
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)  # OpenCLIP-bigG's place
    loaded = load_base(path, config_dir=config_dir, dtype="fp32", device="cpu")
    assert loaded.kind == "sdxl" and len(loaded.text_encoders) == 2
    assert loaded.unet.config.addition_embed_type == "text_time"
    assert [type(e).__name__ for e in loaded.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    with pytest.raises(FileExistsError):
        speed_comfyui.write_random_checkpoint(path, "sdxl", config_dir=config_dir)


def test_the_patch_bench_graph_puts_apply_instruct_imagen_before_ksampler():
    settings = speed_comfyui.ComfySpeedSettings(server="http://x", checkpoint="m.safetensors", size=256, steps=4)
    plain = speed_comfyui.comfyui_graph(settings, seed=3)
    for contexts in (0, 3):
        graph = speed_comfyui.patch_graph(settings, 3, contexts)
        apply = next(node for node, spec in graph.items() if spec["class_type"] == "ApplyInstructImagen")
        sampler = graph[speed_comfyui.sampler_node(graph, "KSampler")]["inputs"]
        assert [sampler[k] for k in ("model", "positive", "negative")] == [[apply, 0], [apply, 1], [apply, 2]]
        assert {k: v for k, v in sampler.items() if k not in ("model", "positive", "negative")} == \
            {k: v for k, v in plain["5"]["inputs"].items() if k not in ("model", "positive", "negative")}
        builder = next(spec for spec in graph.values() if spec["class_type"] == "InstructionBuilder")["inputs"]
        assert [builder["instruction"].count(f"[ref#{k}]") for k in range(1, contexts + 1)] == [1] * contexts
        assert sum(spec["class_type"] == "ContextImage" for spec in graph.values()) == contexts


def test_peak_memory_is_read_from_the_process_found_by_its_port():
    import os
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert speed_comfyui.server_pid(f"http://127.0.0.1:{port}") == os.getpid()
    resident = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                            if line.startswith("VmRSS:"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed: the high-water mark stays up
    del block
    with speed_comfyui.PeakMemory(os.getpid(), client=None, cuda=False) as memory:
        before = resident()  # the mark was reset to what is resident now
        assert memory.peak_bytes() < before + 16 * 2**20
        block = torch.ones(64 * 2**20 // 4)
        del block
        assert memory.peak_bytes() >= before + 60 * 2**20
    assert memory.vram_peak_bytes is None
