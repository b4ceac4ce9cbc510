"""Training folders are owned by one trainer, and replacing a checkpoint never leaves it without a complete one.

The kill tests fork a child that saves a checkpoint and dies (os._exit, no cleanup, as kill -9) just before
its N-th filesystem step, for every N until the save completes; the parent then checks what a reader, a resume
and the next save find.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from instruct_core.train import checkpointing
from instruct_core.train.checkpointing import list_checkpoints, load_checkpoint, recover_checkpoints, save_checkpoint
from instruct_core.train.trainer import LOCK_NAME, TrainingError, training_folder_lock

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")


def state(step: int, version: int) -> dict:
    return {"weights": torch.full((4, 3), float(step * 10 + version)), "note": f"{step}/{version}"}


def version_of(path) -> tuple[int, int]:
    step, loaded = load_checkpoint(path)
    value = int(loaded["weights"][0, 0].item())
    assert loaded["note"] == f"{value // 10}/{value % 10}" and torch.equal(loaded["weights"], state(step, value % 10)["weights"])
    return step, value % 10


def save_killed_before_step(folder, kill_at: int, step: int, version: int) -> bool:
    """Save in a child that dies just before its `kill_at`-th filesystem step; True if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: count filesystem steps, die at the chosen one
        count = [0]

        def fatal(function):
            def step_then_maybe_die(*args, **kwargs):
                count[0] += 1
                if count[0] == kill_at:
                    os._exit(137)
                return function(*args, **kwargs)
            return step_then_maybe_die

        os.replace, os.mkdir, os.fsync = fatal(os.replace), fatal(os.mkdir), fatal(os.fsync)
        shutil.rmtree = fatal(shutil.rmtree)
        checkpointing.save_file = fatal(checkpointing.save_file)
        try:
            save_checkpoint(folder, step, state(step, version), keep=2)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 137), code
    return code == 0


@pytest.mark.parametrize("same_step", [False, True], ids=["next step", "same step again"])
def test_a_kill_at_any_step_of_a_save_leaves_a_complete_newest_checkpoint(tmp_path, same_step):
    new_step = 2 if same_step else 3
    kill_at, finished = 1, False
    while not finished:
        folder = tmp_path / f"kill_{kill_at}"
        save_checkpoint(folder, 1, state(1, 0), keep=2)
        save_checkpoint(folder, 2, state(2, 0), keep=2)
        finished = save_killed_before_step(folder, kill_at, new_step, 1)
        allowed = {(2, 0), (new_step, 1)}
        # a reader (read-only listing) sees a complete newest checkpoint at every moment
        assert version_of(list_checkpoints(folder)[-1]) in allowed, kill_at
        # the trainer's next start finishes the interrupted save's bookkeeping, and finds the same
        recover_checkpoints(folder)
        names = sorted(p.name for p in folder.iterdir())
        assert all(not name.endswith((".tmp", ".old")) for name in names), names
        newest = version_of(list_checkpoints(folder)[-1])
        assert newest in allowed and (newest == (new_step, 1) or not finished), kill_at
        # and the next save works
        save_checkpoint(folder, 4, state(4, 2), keep=2)
        assert version_of(list_checkpoints(folder)[-1]) == (4, 2)
        kill_at += 1
    assert kill_at > 6  # the save has that many filesystem steps, each one killed once


def test_pruning_never_leaves_a_half_deleted_checkpoint_listed(tmp_path, monkeypatch):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, state(step, 0), keep=2)
    deleted = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: deleted.append(str(path)) or real_rmtree(path, **kw))
    save_checkpoint(tmp_path, 3, state(3, 0), keep=2)
    assert deleted and all(path.endswith(".tmp") for path in deleted)  # renamed away before any file goes
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000002", "step_000000003"]


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_a_second_trainer_is_refused_while_the_first_runs(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, sleeper.pid)
        with pytest.raises(TrainingError, match=rf"^output_dir: .* is in use by another trainer \(pid {sleeper.pid} "
                                                rf"on host {socket.gethostname()}"):
            with training_folder_lock(tmp_path):
                pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_in_this_process_refuses_another_process_and_is_released(tmp_path):
    with training_folder_lock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with training_folder_lock(tmp_path):  # the same process nesting (run_training, then Trainer.run)
            pass
        assert (tmp_path / LOCK_NAME).exists()
        probe = ("import sys; from instruct_core.train.trainer import training_folder_lock, TrainingError\n"
                 "try:\n    training_folder_lock(sys.argv[1]).__enter__()\nexcept TrainingError as e:\n"
                 "    print(e); sys.exit(2)\n")
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                              cwd=os.getcwd(), timeout=120)
        assert done.returncode == 2 and f"pid {os.getpid()}" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, gone.pid)
    said = []
    with training_folder_lock(tmp_path, log=said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"removed a stale lock of pid {gone.pid}" in said[0] and "no longer runs" in said[0]


@pytest.mark.parametrize("content", ["host", "garbage"])
def test_a_lock_that_cannot_be_checked_is_refused_with_how_to_clear_it(tmp_path, content):
    if content == "host":
        write_lock(tmp_path, 12345, host="another-machine")
        expected = r"in use by a trainer on another host \(pid 12345 on host another-machine"
    else:
        (tmp_path / LOCK_NAME).write_text("{not json")
        expected = "cannot be read"
    with pytest.raises(TrainingError, match=rf"{expected}.*if no trainer is running there, delete .*{LOCK_NAME}"):
        with training_folder_lock(tmp_path):
            pass


def test_a_training_step_over_the_memory_budget_is_refused_before_the_folder_is_touched(tmp_path):
    from instruct_core import limits
    from instruct_core.pipeline import InstructImagen
    from instruct_core.tiny import build_tiny_base
    from instruct_core.train.config import config_from_dict
    from instruct_core.train.stages import run_training

    config = config_from_dict({"stage": 2, "base_model": "tiny", "output_dir": str(tmp_path / "run"),
                               "data": {"source": str(tmp_path / "no-data"), "resolution": 512},
                               "train": {"steps": 1, "batch_size": 64}})
    pipe = InstructImagen.from_base(build_tiny_base(seed=0))
    with pytest.raises(limits.InstructionError, match=r"^train\.batch_size: a step of 64 examples at 512x512 "
                                                      r"with up to \d+ contexts needs about .* GiB, over the limit"):
        run_training(config, pipe=pipe)
    assert not (tmp_path / "run").exists()  # refused before the lock, the config or any data
