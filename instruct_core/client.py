"""A headless client for a ComfyUI server: queue an API-format workflow, follow it, save what it made.

    python -m instruct_core.client run workflows/api/subject.json --server http://127.0.0.1:8188 --out out/ \
        --set 8.seed=7 --set InstructionBuilder.instruction="A photo of [ref#1] in the snow"

Progress comes over ComfyUI's websocket (/ws), read with the small client below; if the websocket cannot be
opened, /history is polled instead. Exit codes: 0 done, 1 the run failed or was interrupted (or the server
could not be reached), 2 the server refused the workflow (its node errors are printed) or the command line
or workflow file is wrong. Standard library only: no ComfyUI import, nothing to install.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .errors import InstructImagenError


class ClientError(InstructImagenError):
    """The run could not be done; `code` is the exit status to report."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class PromptRejected(ClientError):
    """POST /prompt answered with errors: the workflow never ran."""

    def __init__(self, message: str, response: dict):
        super().__init__(message, code=2)
        self.response = response


# -- the workflow -------------------------------------------------------------------------------------------

def load_workflow(path: str | os.PathLike) -> dict:
    try:
        graph = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClientError(f"workflow: file not found: {path}", code=2) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError(f"workflow: cannot read {path}: {error}", code=2) from None
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
        raise ClientError(f"workflow: {path} is an editor (UI) workflow; queue its API form (in ComfyUI: "
                          f"Workflow > Export (API)), e.g. workflows/api/", code=2)
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise ClientError(f"workflow: {path} is not an API-format workflow ({{id: {{class_type, inputs}}}})",
                          code=2)
    return graph


def apply_setting(graph: dict, setting: str) -> None:
    """Apply "NODE.INPUT=VALUE": NODE is a node id, title or class type (unique); VALUE is JSON or text."""
    target, sep, raw = setting.partition("=")
    node_ref, dot, name = target.rpartition(".")
    if not sep or not dot or not node_ref or not name:
        raise ClientError(f"--set: {setting!r} must look like NODE.INPUT=VALUE", code=2)
    node_id = find_node(graph, node_ref)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    graph[node_id].setdefault("inputs", {})[name] = value


def find_node(graph: dict, ref: str) -> str:
    if ref in graph:
        return ref
    matches = [i for i, n in graph.items() if ref in (n.get("_meta", {}).get("title"), n.get("class_type"))]
    if len(matches) != 1:
        found = "no node" if not matches else f"{len(matches)} nodes ({', '.join(matches)})"
        raise ClientError(f"--set: {ref!r} matches {found}; use a node id", code=2)
    return matches[0]


def describe_rejection(response: dict, graph: dict) -> str:
    """POST /prompt's error answer as readable lines, one per node error."""
    lines = []
    error = response.get("error")
    if isinstance(error, dict):
        lines.append(f"error: {error.get('message', 'prompt rejected')}"
                     + (f": {error['details']}" if error.get("details") else ""))
    elif error:
        lines.append(f"error: {error}")
    for node_id, info in sorted((response.get("node_errors") or {}).items(), key=lambda item: str(item[0])):
        class_type = info.get("class_type") or graph.get(str(node_id), {}).get("class_type", "?")
        for item in info.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            lines.append(f"  node {node_id} ({class_type}): {item.get('message', 'error')}{detail}")
    return "\n".join(lines) or "error: the server refused the workflow"


# -- the server ---------------------------------------------------------------------------------------------

class ComfyClient:
    def __init__(self, server: str, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(server if "://" in server else "http://" + server)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ClientError(f"--server: {server!r} is not an http(s) address", code=2)
        self.base = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.parsed = parsed
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def request(self, path: str, data: dict | None = None):
        body = None if data is None else json.dumps(data).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        request = urllib.request.Request(self.base + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                answer = json.loads(payload)
            except ValueError:
                answer = {"error": payload.decode(errors="replace").strip() or error.reason}
            raise PromptRejected(f"HTTP {error.code} from {path}", answer) from None
        except (urllib.error.URLError, OSError) as error:
            raise ClientError(f"cannot reach {self.base}: {getattr(error, 'reason', error)}") from None

    def queue(self, graph: dict) -> str:
        try:
            answer = json.loads(self.request("/prompt", {"prompt": graph, "client_id": self.client_id}))
        except PromptRejected as rejected:
            raise PromptRejected(describe_rejection(rejected.response, graph), rejected.response) from None
        if answer.get("node_errors"):
            raise PromptRejected(describe_rejection(answer, graph), answer)
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return json.loads(self.request(f"/history/{prompt_id}")).get(prompt_id)

    def download(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.request(f"/view?{query}")

    def open_events(self, timeout: float) -> "WebSocket":
        """The /ws connection for this client id; open it before queueing so no message is missed."""
        return WebSocket.connect(self.parsed, f"{self.parsed.path.rstrip('/')}/ws?clientId={self.client_id}",
                                 self.timeout, timeout)


class WebSocket:
    """Just enough of RFC 6455 to read a server's messages: handshake, frames, ping/pong, close."""

    def __init__(self, sock: socket.socket, buffered: bytes):
        self.sock = sock
        self.buffer = buffered

    @classmethod
    def connect(cls, url: urllib.parse.SplitResult, path: str, timeout: float, read_timeout: float) -> "WebSocket":
        port = url.port or (443 if url.scheme == "https" else 80)
        sock = socket.create_connection((url.hostname, port), timeout=timeout)
        if url.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=url.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("connection closed during the websocket handshake")
            head += chunk
        header, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            sock.close()
            raise OSError(f"websocket refused: {header.splitlines()[0].decode(errors='replace')}")
        sock.settimeout(read_timeout)
        return cls(sock, rest)

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # client frames must be masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def receive(self):
        """The next message (str for text, bytes for binary), or None once the server closes."""
        parts, kind = [], None
        try:
            while True:
                first, second = self._read(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if second & 0x80 else None
                payload = self._read(length)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x8:
                    return None
                if opcode == 0x9:
                    self._send(0xA, payload[:125])
                    continue
                if opcode in (0x1, 0x2):
                    kind = opcode
                if opcode in (0x0, 0x1, 0x2):
                    parts.append(payload)
                    if first & 0x80:
                        data = b"".join(parts)
                        return data.decode("utf-8") if kind == 0x1 else data
        except EOFError:
            return None

    def messages(self):
        """Text messages as decoded JSON; binary frames (previews) are skipped."""
        while (message := self.receive()) is not None:
            if isinstance(message, str):
                yield json.loads(message)

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# -- a run --------------------------------------------------------------------------------------------------

def follow(client: ComfyClient, events: "WebSocket | None", prompt_id: str, graph: dict, timeout: float,
           say=print) -> dict:
    """Wait for the prompt to finish, printing progress; its /history entry. Raises ClientError on failure."""
    deadline = time.monotonic() + timeout
    try:
        for event in events.messages() if events is not None else ():
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress":
                node = str(data.get("node"))
                say(f"  node {node} ({graph.get(node, {}).get('class_type', '?')}): {data['value']}/{data['max']}")
            elif kind == "executing" and data.get("node") is not None:
                node = str(data["node"])
                say(f"  node {node} ({graph.get(node, {}).get('class_type', '?')})")
            elif kind in ("execution_error", "execution_interrupted"):
                raise ClientError(describe_failure(kind, data))
            elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                 and data.get("prompt_id") == prompt_id):
                break
            if time.monotonic() > deadline:
                raise ClientError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}")
    except OSError as error:
        say(f"  (no websocket: {error}; polling /history)")
    return wait_for_history(client, prompt_id, deadline, timeout)


def wait_for_history(client: ComfyClient, prompt_id: str, deadline: float, timeout: float) -> dict:
    while True:
        entry = client.history(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            if status.get("status_str") == "error" or not status.get("completed"):
                failure = next((data for kind, data in status.get("messages", [])
                                if kind in ("execution_error", "execution_interrupted")), {})
                kind = "execution_interrupted" if "exception_message" not in failure else "execution_error"
                raise ClientError(describe_failure(kind, failure))
            return entry
        if time.monotonic() > deadline:
            raise ClientError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}")
        time.sleep(0.25)


def describe_failure(kind: str, data: dict) -> str:
    if kind == "execution_interrupted":
        return f"interrupted at node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
    return (f"node {data.get('node_id', '?')} ({data.get('node_type', '?')}) failed: "
            f"{data.get('exception_message', '').strip() or data.get('exception_type', 'error')}")


def save_outputs(client: ComfyClient, entry: dict, out_dir: Path) -> list[Path]:
    """Every image (and other file) the prompt's output nodes reported, written to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_id, outputs in sorted(entry.get("outputs", {}).items(), key=lambda item: str(item[0])):
        for key, items in outputs.items():
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                name = f"{node_id}_{Path(item['filename']).name}"
                path = out_dir / name
                path.write_bytes(client.download(item))
                saved.append(path)
    return saved


def run(args) -> int:
    graph = load_workflow(args.workflow)
    for setting in args.set:
        apply_setting(graph, setting)
    client = ComfyClient(args.server)
    try:
        events = client.open_events(args.timeout)
    except OSError as error:
        print(f"  (no websocket: {error}; polling /history)")
        events = None
    try:
        prompt_id = client.queue(graph)
        print(f"queued {args.workflow} as {prompt_id}")
        entry = follow(client, events, prompt_id, graph, args.timeout)
    finally:
        if events is not None:
            events.close()
    saved = save_outputs(client, entry, Path(args.out))
    for path in saved:
        print(f"saved {path}")
    if not saved:
        print("done (the workflow reported no output files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instruct_core.client",
                                     description="Queue an API-format workflow on a ComfyUI server and save its outputs.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="queue a workflow, follow it, save its output images")
    run_parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/subject.json)")
    run_parser.add_argument("--server", default="http://127.0.0.1:8188")
    run_parser.add_argument("--out", default="out", help="folder for the output files")
    run_parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                            help="change an input first; NODE is an id, title or class type (repeatable)")
    run_parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ClientError as error:
        print(str(error) if isinstance(error, PromptRejected) else f"error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("error: cancelled (the prompt may still run on the server)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
