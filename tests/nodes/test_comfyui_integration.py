"""The pack inside a real ComfyUI: loading, /object_info, templates, every example workflow, errors, /free,
interrupt. Runs when COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its interpreter) are set; see
docs/COMFYUI.md. The server gets its own base directory and a free loopback port."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from instruct_core import client

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")
PACK = "comfyui-instruct-imagen"  # the folder every documented install uses (docs/COMFYUI.md)
VRAM_MODES = {"--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram"}
NODE_IDS = {"InstructImagenLoader", "ContextImage", "InstructionBuilder", "MultiModalEncode", "InstructSampler",
            "InstructionFromJSON", "InstructionToJSON", "AdapterSaver", "FineTuneStage", "ApplyInstructImagen",
            "InstructGuider"}
WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
# Workflows for the user's own SD1.5 checkpoint run in tests/nodes/test_comfyui_compose.py, on random ones.
USER_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
RUN_ALONE = [path for path in WORKFLOWS if USER_CHECKPOINT not in path.read_text()]

# CI sets INSTRUCT_IMAGEN_REQUIRE_COMFYUI=1: there a missing ComfyUI fails these tests instead of skipping them.
COMFYUI_REQUIRED = os.environ.get("INSTRUCT_IMAGEN_REQUIRE_COMFYUI") == "1"
COMFYUI_MISSING = "set COMFYUI_PATH and COMFYUI_PYTHON to run against a real ComfyUI"

# With pytest-xdist (`-n 2 --dist loadgroup`, as CI runs) the real-ComfyUI modules share one worker: one server
# and one full-size checkpoint in memory at a time, while the other worker runs the rest of the suite.
pytestmark = [pytest.mark.skipif(not (COMFYUI_PATH and COMFYUI_PYTHON) and not COMFYUI_REQUIRED,
                                 reason=COMFYUI_MISSING),
              pytest.mark.xdist_group("real_comfyui")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, base: Path, *flags: str):
        if not (COMFYUI_PATH and COMFYUI_PYTHON):
            pytest.fail(f"INSTRUCT_IMAGEN_REQUIRE_COMFYUI=1: {COMFYUI_MISSING}")
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
        (base / "extra" / "adapters").mkdir(parents=True)
        (base / "extra" / "adapters" / "from_extra_paths.safetensors").write_bytes(b"listed, never loaded")
        (base / "extra_model_paths.yaml").write_text(
            f"tests:\n  base_path: {base / 'extra'}\n  instruct_imagen: adapters/\n")
        device = [] if VRAM_MODES & set(flags) else ["--cpu"]  # ComfyUI takes a VRAM mode for a GPU only
        command = [COMFYUI_PYTHON, "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(base), "--disable-auto-launch",
                   "--extra-model-paths-config", str(base / "extra_model_paths.yaml"), *flags]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in {timeout} s:\n{self.log_text()[-3000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: dict) -> None:
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("comfyui"))
    yield running
    running.stop()


def run(server: Server, graph: dict, timeout: float = 600) -> dict:
    comfy = client.ComfyClient(server.url)
    events = comfy.open_events(timeout)
    try:
        prompt_id = comfy.queue(graph)
        return client.follow(comfy, events, prompt_id, graph, timeout, say=lambda line: None)
    finally:
        events.close()


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def test_pack_loads_and_its_nodes_are_served(server):
    timing = [line for line in server.log_text().split("Import times for custom nodes")[1].splitlines()
              if line.rstrip().endswith(f"custom_nodes/{PACK}") or f"custom_nodes/{PACK} " in line]
    assert timing and "IMPORT FAILED" not in timing[0], timing
    info = server.get("/object_info")
    assert NODE_IDS <= set(info)
    assert {info[n]["category"] for n in NODE_IDS} == {"Instruct-Imagen"}
    contexts = info["InstructionBuilder"]["input"]["required"]["contexts"]
    assert contexts[0] == "COMFY_AUTOGROW_V3"
    assert contexts[1]["template"]["names"] == [f"ref_{n}" for n in range(1, 17)]
    assert info["InstructSampler"]["output"] == ["LATENT", "IMAGE"]
    adapters = info["InstructImagenLoader"]["input"]["required"]["adapter"][1]["options"]
    assert "from_extra_paths.safetensors" in adapters  # the folder is registered for extra_model_paths.yaml
    assert (server.base / "input" / "instruct_imagen" / "subject_toy.png").is_file()


def test_templates_and_frontend_extension_are_served(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == sorted(p.stem for p in WORKFLOWS)
    served = server.get(f"/api/workflow_templates/{PACK}/subject.json")
    assert served == json.loads((ROOT / "example_workflows" / "subject.json").read_text())
    assert server.get(f"/api/workflow_templates/{PACK}/subject.jpg")[:2] == b"\xff\xd8"
    assert any(url.endswith("instruct_imagen.js") for url in server.get("/extensions"))


def test_help_pages_and_english_strings_are_served(server):
    # Where ComfyUI's frontend looks: /extensions/<pack>/docs/<node>.md for help, /i18n for strings.
    for node in NODE_IDS:
        page = server.get(f"/extensions/{PACK}/docs/{node}.md").decode()
        assert page == (ROOT / "web" / "docs" / f"{node}.md").read_text(encoding="utf-8")
    english = server.get("/i18n")["en"]
    info = server.get("/object_info")
    for node in NODE_IDS:
        assert english["nodeDefs"][node]["display_name"] == info[node]["display_name"]
        assert english["nodeDefs"][node]["description"] == info[node]["description"]
        outputs = english["nodeDefs"][node]["outputs"]
        assert [outputs[str(i)]["name"] for i in range(len(outputs))] == info[node]["output_name"]
    assert english["nodeCategories"]["Instruct-Imagen"] == "Instruct-Imagen"


def assert_images(server: Server, entry: dict, name: str) -> None:
    images = [item for outputs in entry["outputs"].values() for item in outputs.get("images", [])]
    assert images, f"{name}: no images"
    comfy = client.ComfyClient(server.url)
    for item in images:
        picture = Image.open(io.BytesIO(comfy.download(item)))
        assert picture.size[0] > 0


@pytest.mark.parametrize("path", RUN_ALONE, ids=[p.stem for p in RUN_ALONE])
def test_every_example_workflow_returns_images(server, path):
    assert_images(server, run(server, json.loads(path.read_text())), path.stem)
    if path.stem == "training":
        assert (server.base / "models" / "instruct_imagen" / "example_adapter.safetensors").is_file()


def _edited(name: str, node: str, **inputs) -> dict:
    graph = load(name)
    graph[node]["inputs"].update(inputs)
    return graph


def _from_json(document: str) -> dict:
    """text_to_image with its InstructionBuilder swapped for an InstructionFromJSON node."""
    graph = load("text_to_image")
    graph["2"] = {"class_type": "InstructionFromJSON", "inputs": {"json": document}}
    return graph


# Refused before anything runs: (graph, node id, words the node error must hold)
REJECTED = [
    (_edited("subject", "4", instruction="Put [ref#1] next to [ref#2]"), "4", "[ref#2] has no context"),
    (_edited("text_to_image", "4", sampler="nope"), "4", "Value not in list"),
    (_edited("text_to_image", "4", steps=0), "4", "smaller than min"),
    (_edited("text_to_image", "4", cfg_text="strong"), "4", "convert"),
    (_edited("text_to_image", "4", width=999999), "4", "bigger than max"),
    (_edited("text_to_image", "1", model="../../../etc/passwd"), "1", "Value not in list"),
    (_edited("subject", "2", image="../../../../etc/passwd"), "2", "Invalid image file"),
    (_edited("subject", "4", instruction="Put [ref#01] on a beach"), "4", "no leading zeros (write [ref#1])"),
    (_edited("subject", "4", instruction="Put <image1> next to @image2"), "4", "[ref#2] has no context"),
]


def _img2img(**sampler_inputs) -> dict:
    """subject, with its loaded image also the sampler's init image."""
    graph = load("subject")
    graph["6"]["inputs"].update(init_image=["2", 0], **sampler_inputs)
    return graph


# Accepted, then stopped by the node that meets the bad value: (graph, words the execution error must hold)
FAILED = [
    (_edited("text_to_image", "4", width=30), "InstructSampler.*width: 30 must be a positive multiple of 4"),
    (_edited("text_to_image", "4", cfg_text=float("nan")), "InstructSampler.*text_scale: nan is not a finite"),
    (_from_json('{"version": 1, "text": "a cat", "contexts": ['), "InstructionFromJSON.*JSON"),
    (_from_json('{"version": 7, "text": "a cat", "contexts": []}'), "InstructionFromJSON.*version"),
    (_from_json(json.dumps({"version": 1, "text": "[ref#1]", "contexts": [
        {"id": 1, "modality": "subject", "text": "[ref#1]", "image": "../../secret.png"}]})),
     "InstructionFromJSON.*contexts\\[0\\]\\.image"),
    # ComfyUI's steps / denoise arithmetic would build a schedule of 100,000 steps here
    (_img2img(denoise=0.01, steps=1000),
     "InstructSampler.*denoise: 0.01 with 1000 steps needs a schedule of 1e\\+05"),
    (_edited("text_to_image", "4", sampler="heun", schedule="normal", steps=4),
     "InstructSampler.*sampler: heun is unstable on this schedule"),
]


def test_a_batch_of_bad_prompts_gets_errors_and_the_server_keeps_serving(server):
    for graph, node, words in REJECTED:
        with pytest.raises(client.PromptRejected) as rejected:
            client.ComfyClient(server.url).queue(graph)
        errors = rejected.value.response["node_errors"][node]
        details = " ".join(f"{e.get('message', '')} {e.get('details', '')}" for e in errors["errors"])
        assert words in details, (node, details)
    for graph, pattern in FAILED:
        with pytest.raises(client.ClientError, match=pattern):
            run(server, graph)
    assert server.get("/system_stats")["system"]
    assert run(server, load("text_to_image"))["outputs"]


def test_the_command_line_client_against_comfyui(server, tmp_path):
    command = [sys.executable, "-m", "instruct_core.client", "run", str(ROOT / "workflows/api/text_to_image.json"),
               "--server", server.url, "--out", str(tmp_path), "--set", "4.seed=11"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("5_text_to_image_*.png"))
    command[-1] = "4.sampler=nope"
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "node 4 (InstructSampler): Value not in list" in refused.stderr


def free_until_logged(server: Server, request: dict, line: str, before: int, failure: str) -> None:
    """POST /free until `line` is logged once more. ComfyUI's prompt worker reads the flag only when its queue
    wakes it, and a wake-up that comes while it collects garbage after a prompt is lost until the next prompt,
    so the request is repeated, as a user would press the button again."""
    deadline = time.monotonic() + 60
    while server.log_text().count(line) == before:
        assert time.monotonic() < deadline, failure
        server.post("/free", request)
        for _ in range(6):
            if server.log_text().count(line) != before:
                return
            time.sleep(0.5)


def test_free_releases_the_models(server):
    run(server, load("text_to_image"))
    line = "[Instruct-Imagen] released model default"
    before = server.log_text().count(line)
    free_until_logged(server, {"unload_models": True, "free_memory": True}, line, before,
                      "the model was not released after POST /free")


def test_models_are_placed_by_comfyui_model_management(server):
    """Loaded through load_models_gpu and unloaded by it: ComfyUI can offload the pack's models for others."""
    requested = "Requested to load InstructImagenWeights"
    graph = load("text_to_image")
    run(server, graph)
    loads = server.log_text().count(requested)
    assert loads >= 1 and "loaded completely" in server.log_text()
    graph["4"]["inputs"]["seed"] += 1
    run(server, graph)
    assert server.log_text().count(requested) == loads  # still loaded: not loaded twice
    offloaded = "[Instruct-Imagen] offloaded model default"
    before = server.log_text().count(offloaded)
    # unload only: the node cache keeps the model object
    free_until_logged(server, {"unload_models": True}, offloaded, before, "POST /free did not unload the model")
    graph["4"]["inputs"]["seed"] += 1
    run(server, graph)
    assert server.log_text().count(requested) == loads + 1  # ComfyUI had unloaded it, and loaded it again


def test_interrupt_stops_sampling_within_a_step(server):
    graph = load("text_to_image")
    graph["4"]["inputs"].update(steps=400, seed=99)
    comfy = client.ComfyClient(server.url)
    events = comfy.open_events(600)
    stopped = {}

    def watch():
        for event in events.messages():
            data = event.get("data") or {}
            if event["type"] == "progress" and data.get("value") == 2:
                server.post("/interrupt", {})
                stopped["at"] = 2
            if event["type"] == "execution_interrupted":
                stopped["interrupted"] = True
                return
            if event["type"] == "progress" and "at" in stopped:
                stopped["last"] = data["value"]

    try:
        comfy.queue(graph)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        watcher.join(300)
    finally:
        events.close()
    assert stopped.get("interrupted")
    assert stopped.get("last", 2) <= 3


def test_the_ksampler_comparison_runs_on_the_same_checkpoint(server, random_sd15_file, tmp_path):
    """`bench comfyui` end to end on a random SD1.5-shaped single file that both samplers load."""
    report_path = tmp_path / "report.json"
    checkpoints = server.base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "random_sd15.safetensors").symlink_to(random_sd15_file)
    command = [sys.executable, "-m", "instruct_bench", "speed", "comfyui", "--server", server.url,
               "--checkpoint", "random_sd15.safetensors", "--size", "64", "--steps", "3", "--repeats", "1",
               "--json", str(report_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for key, node in (("comfyui", "KSampler"), ("instruct", "InstructSampler")):
        row = report[key]
        assert row["node"] == node and row["steps_timed"] == 2 and row["step_ms_median"] > 0
    assert report["per_step_ratio"] > 0 and "| KSampler |" in done.stdout
