"""Long commands show a tqdm bar on a terminal and plain lines when piped."""

import fcntl
import io
import os
import struct
import subprocess
import sys
import termios

from instruct_core.progress import Progress


def open_terminal() -> tuple[int, int]:
    """A pseudo-terminal 100 columns wide (a new one has none, and a bar then has no room)."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return leader, follower


def read_terminal(leader: int) -> str:
    """Everything written to a pseudo-terminal whose other end is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: nothing more to read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_piped_progress_writes_plain_lines_throttled_and_always_the_last():
    stream = io.StringIO()
    with Progress(5, "demo", "image", stream=stream, every_s=3600) as progress:
        for _ in range(5):
            progress.update(loss="0.5")
    assert stream.getvalue().splitlines() == ["demo: 1/5 image (loss=0.5)", "demo: 5/5 image (loss=0.5)"]
    stream = io.StringIO()
    with Progress(3, "eval", "score", stream=stream, every_s=0) as progress:
        for _ in range(3):
            progress.update()
    assert stream.getvalue().splitlines() == ["eval: 1/3 score", "eval: 2/3 score", "eval: 3/3 score"]


def test_a_terminal_gets_a_bar():
    leader, follower = open_terminal()
    with os.fdopen(follower, "w") as terminal:
        with Progress(4, "train", "step", stream=terminal) as progress:
            progress.trainer_callback(2, 4, 0.25)
            assert progress.bar is not None
    drawn = read_terminal(leader)
    assert "train:" in drawn and "2/4" in drawn and "|" in drawn and "loss=0.2500" in drawn


def test_the_demo_command_shows_lines_when_piped_and_a_bar_on_a_terminal(tmp_path):
    command = [sys.executable, "-m", "instruct_core", "demo", "--model", "tiny", "--tasks", "subject,edge_to_image",
               "--steps", "1", "--out", str(tmp_path / "demo")]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0, piped.stderr
    assert "demo: 2/2 image" in piped.stderr
    assert (tmp_path / "demo" / "contact_sheet.png").is_file()
    leader, follower = open_terminal()
    on_terminal = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=600)
    os.close(follower)
    drawn = read_terminal(leader)
    assert on_terminal.returncode == 0
    assert "2/2" in drawn and "|" in drawn and "demo: 2/2 image" not in drawn
