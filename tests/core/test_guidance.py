"""Guidance formulas, branch batching and the step schedule of oscillating / interleaved guidance."""

import pytest
import torch

from instruct_core.context_attention import ContextState
from instruct_core.guidance import Conditioning, GuidanceConfig, GuidedDenoiser, branch_weights


def _conditioning(with_contexts=True, batch=2):
    text = torch.full((batch, 3, 4), 1.0)
    null = torch.full((batch, 3, 4), -1.0)
    state = None
    if with_contexts:
        features = {0: torch.ones(1, 4, 2, 2)}
        state = ContextState.from_encoded(features, [[0]]).repeat_rows(batch)
    return Conditioning(text=text, null_text=null, context_state=state)


class RecordingDenoiser:
    """D(x, sigma) = x * 0.5 + a(text) + b(contexts): distinct, known values for each branch."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        text_term = cond.text.mean(dim=(1, 2)).view(-1, 1, 1, 1) * 10.0  # +10 text, -10 null
        has_ctx = cond.context_state.valid.any(dim=1) if cond.context_state is not None else torch.zeros(x.shape[0])
        return x * 0.5 + text_term + has_ctx.float().view(-1, 1, 1, 1) * 3.0


def _branches(x):
    half = x * 0.5
    return {"full": half + 13.0, "text": half + 10.0, "context": half - 7.0, "null": half - 10.0}


@pytest.mark.parametrize("s_t, s_c", [(5.0, 2.0), (1.0, 3.0), (4.0, 1.0), (1.0, 1.0), (7.5, 7.5)])
def test_dual_guidance_formula_in_one_call(s_t, s_c):
    inner = RecordingDenoiser()
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    guided = GuidedDenoiser(inner, _conditioning(), GuidanceConfig(s_t, s_c, "dual"), sigmas)
    x = torch.randn(2, 3, 4, 4)
    out = guided(x, torch.tensor(10.0))
    d = _branches(x)
    expected = d["null"] + s_t * (d["text"] - d["null"]) + s_c * (d["full"] - d["text"])
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(inner.calls) == 1  # every branch of the step in a single batched call


def test_equal_scales_are_plain_cfg_on_the_whole_instruction():
    inner = RecordingDenoiser()
    guided = GuidedDenoiser(inner, _conditioning(), GuidanceConfig(6.0, 6.0), torch.tensor([1.0, 0.0]))
    x = torch.randn(2, 3, 4, 4)
    d = _branches(x)
    assert torch.allclose(guided(x, torch.tensor(1.0)), d["null"] + 6.0 * (d["full"] - d["null"]), atol=1e-5)
    assert inner.calls == [4]  # null and full only: the text-only branch cancels


def test_without_contexts_it_is_standard_cfg():
    inner = RecordingDenoiser()
    guided = GuidedDenoiser(inner, _conditioning(False), GuidanceConfig(4.0, 9.0), torch.tensor([1.0, 0.0]))
    x = torch.randn(2, 3, 4, 4)
    d = _branches(x)
    assert torch.allclose(guided(x, torch.tensor(1.0)), d["null"] + 4.0 * (d["text"] - d["null"]), atol=1e-5)
    assert inner.calls == [4]


def test_interleaved_guidance_alternates_text_and_context():
    inner = RecordingDenoiser()
    sigmas = torch.tensor([8.0, 4.0, 2.0, 0.0])
    guided = GuidedDenoiser(inner, _conditioning(), GuidanceConfig(5.0, 3.0, "interleaved"), sigmas)
    x = torch.randn(2, 3, 4, 4)
    d = _branches(x)
    even = guided(x, torch.tensor(8.0))
    odd = guided(x, torch.tensor(4.0))
    assert torch.allclose(even, d["full"] + 4.0 * (d["full"] - d["context"]), atol=1e-5)
    assert torch.allclose(odd, d["full"] + 2.0 * (d["full"] - d["text"]), atol=1e-5)
    assert inner.calls == [4, 4]  # two branches per step


def test_oscillating_guidance_switches_off_on_odd_early_steps():
    cfg = GuidanceConfig(5.0, 2.0, "oscillating", oscillate_fraction=0.5)
    steps = 10
    guided_steps = [branch_weights(cfg, i, steps, True) for i in range(steps)]
    assert guided_steps[1] == {"full": 1.0} and guided_steps[3] == {"full": 1.0}
    assert guided_steps[0] == guided_steps[2] == {"null": -4.0, "text": 3.0, "full": 2.0}
    assert all(w == {"null": -4.0, "text": 3.0, "full": 2.0} for w in guided_steps[5:])


@pytest.mark.parametrize("mode", ["dual", "oscillating", "interleaved"])
@pytest.mark.parametrize("step", range(4))
def test_branch_weights_sum_to_one(mode, step):
    weights = branch_weights(GuidanceConfig(6.0, 2.5, mode), step, 4, True)
    assert sum(weights.values()) == pytest.approx(1.0)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="guidance mode"):
        GuidanceConfig(mode="wild")


@pytest.mark.parametrize("field, value", [("text_scale", float("nan")), ("context_scale", float("inf")),
                                          ("text_scale", "5"), ("oscillate_fraction", 1.5)])
def test_non_finite_or_out_of_range_scales_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        GuidanceConfig(**{field: value})
