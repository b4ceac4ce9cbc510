import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread per process is fastest, and on a busy machine two-thread kernels stall
# waiting for a descheduled partner (the suite ran 5x slower). Subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def random_sd15_file(tmp_path_factory) -> Path:
    """A full-size random SD1.5 single file (about 2 GB), written once for every real-ComfyUI test module that
    needs one, in a process of its own."""
    path = tmp_path_factory.mktemp("random_sd15") / "random_sd15.safetensors"
    script = ("import sys; from pathlib import Path; from instruct_bench.speed_comfyui import write_random_checkpoint;"
              "write_random_checkpoint(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(__file__).resolve().parent.parent,
                   check=True, timeout=900)
    return path
