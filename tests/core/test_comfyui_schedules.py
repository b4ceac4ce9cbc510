"""Schedules and timesteps against ComfyUI's own functions, run from a ComfyUI checkout.

Runs when COMFYUI_PATH (the checkout) and COMFYUI_PYTHON (its interpreter) are set, as the integration suite
does; skipped otherwise. ComfyUI's functions run in that interpreter, with the checkout on its sys.path, and
hand back their results as JSON: this process never imports ComfyUI. Every schedule name ComfyUI's KSampler
offers must give its sigmas, and a discrete model must receive the timesteps ComfyUI feeds it.
"""

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

from instruct_core.denoiser import DiscreteDenoiser
from instruct_core.schedules import COMFYUI_SCHEDULES, DiscreteSchedule, get_sigmas, sigmas_for_denoise

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")
pytestmark = pytest.mark.skipif(not (COMFYUI_PATH and COMFYUI_PYTHON),
                                reason="set COMFYUI_PATH and COMFYUI_PYTHON to compare with a real ComfyUI")

# (our scheduler config, ComfyUI's sampling_settings) for the same table
TABLES = {
    "sd15": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
             {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "cosine"}),  # the bundled model's
}
STEPS = (1, 2, 7, 10, 12, 30, 40)

# Runs in ComfyUI's interpreter: its own table for the settings, then its schedule and timestep functions on
# our table (so that only the functions are compared), for every request read from stdin.
COMFYUI_SIDE = """
import json, sys
from types import SimpleNamespace
sys.path.insert(0, ".")
import torch
import comfy.cli_args
comfy.cli_args.args.cpu = True  # as main.py --cpu: no device probing
import comfy.model_sampling, comfy.samplers
request, answer = json.load(sys.stdin), {}
for name, table in request["tables"].items():
    ms = comfy.model_sampling.ModelSamplingDiscrete(SimpleNamespace(sampling_settings=table["settings"]))
    own = ms.sigmas.tolist()
    ms.set_sigmas(torch.tensor(table["sigmas"], dtype=torch.float64).float())
    answer[name] = {
        "table": own,
        "schedules": {f"{n}/{k}": comfy.samplers.calculate_sigmas(ms, n, k).tolist()
                      for n in request["names"] for k in request["steps"]},
        "timesteps": ms.timestep(torch.tensor(table["probes"])).float().tolist(),
    }
print(json.dumps(answer))
"""


def probe_sigmas(ours: DiscreteSchedule) -> torch.Tensor:
    """Table entries, points between them, and points beyond both ends."""
    generator = torch.Generator().manual_seed(0)
    return torch.cat([ours.sigmas.float()[::37], (torch.rand(200, generator=generator) * 12 - 6).exp() * 20,
                      torch.tensor([ours.sigma_min / 2, ours.sigma_max * 2])])


@pytest.fixture(scope="module")
def comfy():
    tables = {name: DiscreteSchedule.from_scheduler_config(ours) for name, (ours, _) in TABLES.items()}
    request = {"names": list(COMFYUI_SCHEDULES), "steps": list(STEPS),
               "tables": {name: {"settings": TABLES[name][1], "sigmas": table.sigmas.tolist(),
                                 "probes": probe_sigmas(table).tolist()} for name, table in tables.items()}}
    done = subprocess.run([COMFYUI_PYTHON, "-c", COMFYUI_SIDE], cwd=COMFYUI_PATH, input=json.dumps(request),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return SimpleNamespace(tables=tables, answer=answer)


def comfy_sigmas(comfy, table: str, name: str, steps: int) -> torch.Tensor:
    return torch.tensor(comfy.answer[table]["schedules"][f"{name}/{steps}"])


@pytest.mark.parametrize("table", list(TABLES))
def test_the_sigma_tables_are_comfyuis(comfy, table):
    theirs = torch.tensor(comfy.answer[table]["table"])
    # diffusers' table (ours) takes float32 betas and cumprod where ComfyUI's takes float64: up to 2.6e-4 apart,
    # at the smallest beta of the cosine table
    assert torch.allclose(comfy.tables[table].sigmas.float(), theirs, rtol=5e-4)


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("name", COMFYUI_SCHEDULES)
@pytest.mark.parametrize("steps", STEPS)
def test_every_comfyui_schedule_name_gives_comfyuis_sigmas(comfy, table, name, steps):
    expected = comfy_sigmas(comfy, table, name, steps)
    got = get_sigmas(comfy.tables[table], steps, name)
    assert got.shape == expected.shape, f"{name}: {len(got)} sigmas, ComfyUI gives {len(expected)}"
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got - expected).abs().max()


def test_ddim_uniform_is_comfyuis_31_steps_at_30_ending_at_zero(comfy):
    sigmas = get_sigmas(comfy.tables["sd15"], 30, "ddim_uniform")
    assert len(sigmas) == 32 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(float(comfy.tables["sd15"].sigmas[991]))
    assert torch.allclose(sigmas, comfy_sigmas(comfy, "sd15", "ddim_uniform", 30), rtol=1e-6)


def test_sgm_uniform_keeps_comfyuis_fractional_timesteps(comfy):
    got = get_sigmas(comfy.tables["sd15"], 30, "sgm_uniform")
    rounded = get_sigmas(comfy.tables["sd15"], 30, "sgm_uniform_rounded")
    expected = comfy_sigmas(comfy, "sd15", "sgm_uniform", 30)
    assert ((rounded - expected).abs() / expected.clamp(min=1e-9))[:-1].max() > 1e-3  # the variant differs
    assert torch.allclose(got, expected, rtol=1e-5)


def test_karras_on_the_cosine_table_starts_where_comfyui_starts(comfy):
    expected = comfy_sigmas(comfy, "cosine", "karras", 12)
    assert float(expected[0]) > 20000
    assert torch.allclose(get_sigmas(comfy.tables["cosine"], 12, "karras"), expected, rtol=1e-5)
    assert float(get_sigmas(comfy.tables["cosine"], 12, "karras_capped")[0]) == pytest.approx(80.0)


@pytest.mark.parametrize("denoise, steps", [(0.3, 12), (0.175, 7), (0.7, 7), (1 / 3, 10)])
def test_denoise_cuts_the_schedule_as_ksampler_does(comfy, denoise, steps):
    # KSampler.set_steps: the schedule of int(steps / denoise) steps, its last steps + 1 sigmas
    length = int(steps / denoise)
    assert length in STEPS
    expected = comfy_sigmas(comfy, "sd15", "normal", length)[-(steps + 1):]
    got = sigmas_for_denoise(lambda n: get_sigmas(comfy.tables["sd15"], n, "normal"), steps, denoise)
    assert torch.allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("table", list(TABLES))
def test_a_discrete_model_receives_the_timesteps_comfyui_feeds(comfy, table):
    ours = comfy.tables[table]
    sigmas = probe_sigmas(ours)
    received = []
    denoiser = DiscreteDenoiser(lambda x_in, t: received.append((x_in, t)) or x_in, ours)  # the default
    x = torch.randn(len(sigmas), 2, 3, 3, generator=torch.Generator().manual_seed(1))
    denoiser(x, sigmas)
    x_in, t = received[0]
    # what comfy.model_base.BaseModel._apply_model hands the UNet: model_sampling.timestep(sigma)
    assert torch.equal(t, torch.tensor(comfy.answer[table]["timesteps"]))
    # and the input is ComfyUI's EPS.calculate_input, x / sqrt(sigma^2 + 1)
    assert torch.allclose(x_in, x / (sigmas.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5, rtol=1e-6)
