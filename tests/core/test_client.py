"""The headless client against a small stand-in for ComfyUI's HTTP and websocket API (stdlib, in a thread)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from instruct_core import client

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "api" / "subject.json"
PNG = io.BytesIO()
Image.new("RGB", (4, 4), "red").save(PNG, format="PNG")


class FakeComfy(ThreadingHTTPServer):
    """Answers /prompt, /history, /view and /ws the way ComfyUI 0.8 does, from a scripted outcome."""

    daemon_threads = True

    def __init__(self, outcome: str, websocket: bool):
        super().__init__(("127.0.0.1", 0), Handler)
        self.outcome, self.websocket = outcome, websocket
        self.posted = threading.Event()
        self.prompts: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def history(self) -> dict:
        if self.outcome == "error":
            status = {"status_str": "error", "completed": False, "messages": [
                ["execution_start", {"prompt_id": "p1"}],
                ["execution_error", {"prompt_id": "p1", "node_id": "6", "node_type": "InstructSampler",
                                     "exception_message": "width: 30 must be a positive multiple of 4"}]]}
            return {"p1": {"outputs": {}, "status": status}}
        outputs = {"7": {"images": [{"filename": "subject_00001_.png", "subfolder": "instruct_imagen",
                                     "type": "output"}]}}
        return {"p1": {"outputs": outputs, "status": {"status_str": "success", "completed": True, "messages": []}}}


class Handler(BaseHTTPRequestHandler):
    server: FakeComfy

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: bytes, kind: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.prompts.append(prompt)
        if self.server.outcome == "rejected":
            answer = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                                "details": "", "extra_info": {}},
                      "node_errors": {"4": {"errors": [{"type": "custom_validation_failed",
                                                        "message": "Custom validation failed for node",
                                                        "details": "instruction - instruction: [ref#2] has no context"}],
                                            "dependent_outputs": ["7"], "class_type": "InstructionBuilder"}}}
            return self.reply(400, json.dumps(answer).encode())
        self.server.posted.set()
        self.reply(200, json.dumps({"prompt_id": "p1", "number": 0, "node_errors": {}}).encode())

    def do_GET(self):
        if self.path.startswith("/ws"):
            return self.websocket() if self.server.websocket else self.reply(404, b"no websocket here", "text/plain")
        if self.path == "/history/p1":
            return self.reply(200, json.dumps(self.server.history() if self.server.posted.is_set() else {}).encode())
        if self.path.startswith("/view?"):
            assert "filename=subject_00001_.png" in self.path and "subfolder=instruct_imagen" in self.path
            return self.reply(200, PNG.getvalue(), "image/png")
        self.reply(404, b"{}")

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] +
                                                "258EAFA5-E914-47DA-95CA-C5AB0DC11B85").encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.frame(1, json.dumps({"type": "status", "data": {"status": {}}}))
        self.server.posted.wait(5)
        self.frame(1, json.dumps({"type": "executing", "data": {"node": "6", "prompt_id": "p1"}}))
        self.frame(2, b"\x00\x00\x00\x01" + b"x" * 300)  # a binary preview, long enough for a 16-bit length
        for step in (1, 2):
            self.frame(1, json.dumps({"type": "progress", "data": {"value": step, "max": 2, "node": "6",
                                                                  "prompt_id": "p1"}}))
        if self.server.outcome == "error":
            self.frame(1, json.dumps({"type": "execution_error", "data": {
                "prompt_id": "p1", "node_id": "6", "node_type": "InstructSampler",
                "exception_message": "width: 30 must be a positive multiple of 4"}}))
        self.frame(1, json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "p1"}}))
        self.frame(8, b"")

    def frame(self, opcode: int, payload):
        payload = payload.encode() if isinstance(payload, str) else payload
        length = bytes([len(payload)]) if len(payload) < 126 else b"\x7e" + struct.pack(">H", len(payload))
        self.wfile.write(bytes([0x80 | opcode]) + length + payload)
        self.wfile.flush()


@pytest.fixture(params=[True, False], ids=["websocket", "polling"])
def serve(request):
    servers = []

    def start(outcome: str) -> FakeComfy:
        server = FakeComfy(outcome, websocket=request.param)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_run_follows_progress_and_saves_outputs(serve, tmp_path, capsys):
    server = serve("success")
    code = client.main(["run", str(WORKFLOW), "--server", server.url, "--out", str(tmp_path),
                        "--set", "6.seed=7", "--set", "InstructionBuilder.instruction=A toy [ref#1] in snow"])
    assert code == 0
    saved = tmp_path / "7_subject_00001_.png"
    assert saved.read_bytes() == PNG.getvalue()
    prompt = server.prompts[0]["prompt"]
    assert prompt["6"]["inputs"]["seed"] == 7
    assert prompt["4"]["inputs"]["instruction"] == "A toy [ref#1] in snow"
    out = capsys.readouterr().out
    assert f"saved {saved}" in out
    if server.websocket:
        assert "node 6 (InstructSampler): 2/2" in out
    else:
        assert "polling /history" in out


def test_node_errors_are_printed_readably_with_exit_2(serve, tmp_path, capsys):
    server = serve("rejected")
    assert client.main(["run", str(WORKFLOW), "--server", server.url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: Prompt outputs failed validation" in err
    assert "node 4 (InstructionBuilder): Custom validation failed for node: instruction - instruction: " \
           "[ref#2] has no context" in err


def test_a_failed_run_names_the_node_with_exit_1(serve, tmp_path, capsys):
    server = serve("error")
    assert client.main(["run", str(WORKFLOW), "--server", server.url, "--out", str(tmp_path)]) == 1
    assert "node 6 (InstructSampler) failed: width: 30 must be a positive multiple of 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_command_lines_and_files_exit_2(tmp_path, capsys):
    ui = ROOT / "example_workflows" / "subject.json"
    assert client.main(["run", str(ui), "--out", str(tmp_path)]) == 2
    assert "editor (UI) workflow" in capsys.readouterr().err
    assert client.main(["run", str(tmp_path / "missing.json")]) == 2
    assert client.main(["run", str(WORKFLOW), "--set", "seed=3"]) == 2
    assert "NODE.INPUT=VALUE" in capsys.readouterr().err
    two_images = ROOT / "workflows" / "api" / "subject_style.json"
    assert client.main(["run", str(two_images), "--set", "LoadImage.image=x.png"]) == 2
    assert "matches 2 nodes" in capsys.readouterr().err


def test_an_unreachable_server_exits_1(tmp_path, capsys):
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as unused:
        port = unused.server_address[1]
    assert client.main(["run", str(WORKFLOW), "--server", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "cannot reach" in capsys.readouterr().err
