"""Classifier-free guidance over text and context, with every branch of a step in one batched UNet call.

Notation: D(t, c) is the denoised estimate with text t and contexts c; "∅" is the null text (the negative
prompt, empty by default) or no contexts. With text scale s_t and context scale s_c:

dual (default)   D = D(∅,∅) + s_t·[D(t,∅) − D(∅,∅)] + s_c·[D(t,c) − D(t,∅)]
                 With s_t = s_c = s this is plain CFG on the whole instruction: D(∅,∅) + s·[D(t,c) − D(∅,∅)].
                 Branches whose coefficient cancels are skipped (s_t = 1 needs only D(t,∅) and D(t,c)).
oscillating      dual guidance whose scales alternate between (s_t, s_c) on even steps and 1 (no guidance)
                 on odd steps, for the first `oscillate_fraction` of the steps, as in Imagen Video and
                 Instruct-Imagen; it keeps strong guidance from saturating the image. Constant afterwards.
interleaved      Re-Imagen's interleaved guidance, two branches a step, alternating what is guided:
                 even steps  D = D(t,c) + (s_t − 1)·[D(t,c) − D(∅,c)]     (text)
                 odd steps   D = D(t,c) + (s_c − 1)·[D(t,c) − D(t,∅)]     (context)
The step index is recovered from sigma (the nearest entry of the schedule), so two-evaluation steppers
such as Heun see the parity of the sigma they evaluate. Which formula applies is decided per row: in a batch
mixing rows with and without contexts, each row is guided exactly as it would be alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import limits
from .context_attention import ContextState
from .instruction import InstructionError

GUIDANCE_MODES = ("dual", "oscillating", "interleaved")

# Branch names: (text, contexts) present or null.
FULL, TEXT_ONLY, CONTEXT_ONLY, NULL = "full", "text", "context", "null"
_BRANCH_PARTS = {FULL: (True, True), TEXT_ONLY: (True, False), CONTEXT_ONLY: (False, True), NULL: (False, False)}


@dataclass
class GuidanceConfig:
    text_scale: float = 5.0
    context_scale: float = 3.0  # chosen on the bundled model's training split (CHANGELOG.md)
    mode: str = "dual"
    oscillate_fraction: float = 0.5

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise InstructionError(f"guidance mode: {self.mode!r} is not one of {', '.join(GUIDANCE_MODES)}")
        for name in ("text_scale", "context_scale", "oscillate_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InstructionError(f"guidance {name}: {value!r} is not a finite number")
        for name in ("text_scale", "context_scale"):  # 1e308 is finite, and makes a black image
            limits.check_guidance_scale(f"guidance {name}", getattr(self, name))
        if not 0.0 <= self.oscillate_fraction <= 1.0:
            raise InstructionError(f"guidance oscillate_fraction: {self.oscillate_fraction} is not within [0, 1]")


def cat_text(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Prompt embeddings (N, L, D) stacked along the batch. A long text is several encoder windows long
    (`InstructImagen.embed_text`); shorter ones are repeated to the common length, which leaves their
    cross-attention unchanged (softmax over repeated keys is softmax over them once)."""
    lengths = [e.shape[1] for e in embeddings]
    common = math.lcm(*lengths)
    return torch.cat([e.repeat(1, common // length, 1) for e, length in zip(embeddings, lengths)])


@dataclass
class Conditioning:
    """An encoded instruction for B rows: everything the UNet needs at every step, computed once."""

    text: torch.Tensor                 # (B, L, D) prompt embeddings
    null_text: torch.Tensor            # (B, L, D) negative/empty prompt embeddings
    context_state: ContextState | None = None
    added_text: dict | None = None     # SDXL pooled text and time ids for the prompt
    added_null: dict | None = None

    @property
    def has_contexts(self) -> bool:
        return self.context_state is not None and self.context_state.max_contexts > 0

    @property
    def num_rows(self) -> int:
        return self.text.shape[0]

    def rows_with_contexts(self) -> torch.Tensor:
        """(B,) bool: which rows have at least one context."""
        if self.context_state is None:
            return torch.zeros(self.num_rows, dtype=torch.bool)
        return self.context_state.valid.any(dim=1).cpu()

    @classmethod
    def concat(cls, conds: list["Conditioning"]) -> "Conditioning":
        """Stack encoded instructions along the batch (each row may have its own contexts, K included)."""
        cat = lambda get: cat_text([get(c) for c in conds])
        states = [c.context_state for c in conds]
        if any(s is not None for s in states):
            like = next(s for s in states if s is not None)
            states = [s if s is not None else ContextState.empty(c.num_rows, like) for s, c in zip(states, conds)]
            state = ContextState.concat(states)
        else:
            state = None
        added = None
        if conds[0].added_text is not None:
            added = lambda field: {k: torch.cat([getattr(c, field)[k] for c in conds]) for k in conds[0].added_text}
        return cls(cat(lambda c: c.text), cat(lambda c: c.null_text), state,
                   None if added is None else added("added_text"), None if added is None else added("added_null"))

    def repeat_rows(self, times: int) -> "Conditioning":
        """Each row repeated `times` times (row 0, row 0, ..., row 1, ...), for a batch of samples."""
        if times == 1:
            return self
        rep = lambda t: t.repeat_interleave(times, dim=0)
        added = lambda a: None if a is None else {k: rep(v) for k, v in a.items()}
        state = None if self.context_state is None else self.context_state.repeat_rows(times)
        return Conditioning(rep(self.text), rep(self.null_text), state, added(self.added_text),
                            added(self.added_null))


@dataclass
class BatchedCondition:
    """The UNet inputs of several branches stacked along the batch."""

    text: torch.Tensor
    context_state: ContextState | None
    added_cond_kwargs: dict | None


def stack_branches(cond: Conditioning, branches: tuple[str, ...]) -> BatchedCondition:
    texts, states, added = [], [], []
    for branch in branches:
        use_text, use_contexts = _BRANCH_PARTS[branch]
        texts.append(cond.text if use_text else cond.null_text)
        added.append(cond.added_text if use_text else cond.added_null)
        if cond.context_state is not None:
            state = cond.context_state
            states.append(state if use_contexts else ContextState.empty(state.num_rows, state))
    added_kwargs = None
    if added[0] is not None:
        added_kwargs = {key: torch.cat([a[key] for a in added]) for key in added[0]}
    state = ContextState.concat(states) if states else None
    return BatchedCondition(cat_text(texts), state, added_kwargs)


def branch_parts(branch: str) -> tuple[bool, bool]:
    """(text, contexts): whether a branch's estimate sees the prompt and the contexts."""
    return _BRANCH_PARTS[branch]


def step_index(sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """The step a sigma belongs to: the nearest of the schedule's sigmas, the final zero left out."""
    value = float(sigma.flatten()[0])
    return int((sigmas.detach().float().cpu()[:-1] - value).abs().argmin())


def branch_weights(config: GuidanceConfig, step: int, num_steps: int, has_contexts: bool) -> dict[str, float]:
    """Coefficients of each branch's estimate for this step; they always sum to 1."""
    s_t, s_c = config.text_scale, config.context_scale
    if config.mode == "oscillating" and step < config.oscillate_fraction * num_steps and step % 2 == 1:
        s_t = s_c = 1.0
    if config.mode == "interleaved" and has_contexts:
        if step % 2 == 0:
            return _drop_zero({FULL: s_t, CONTEXT_ONLY: 1.0 - s_t})
        return _drop_zero({FULL: s_c, TEXT_ONLY: 1.0 - s_c})
    if not has_contexts:
        return _drop_zero({TEXT_ONLY: s_t, NULL: 1.0 - s_t})
    return _drop_zero({NULL: 1.0 - s_t, TEXT_ONLY: s_t - s_c, FULL: s_c})


def row_branch_weights(config: GuidanceConfig, step: int, num_steps: int,
                       rows_with_contexts: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
    """The branches a step evaluates for every row, and each row's coefficient per branch: (branches, (B, N)).

    A row without contexts is guided by the text-only formula. Its FULL branch equals its TEXT_ONLY branch and
    its CONTEXT_ONLY branch its NULL branch (it has no contexts to drop), so its coefficients move onto branches
    the rows with contexts need anyway, and a mixed batch costs no more branches than it must.
    """
    with_contexts = branch_weights(config, step, num_steps, True)
    without = branch_weights(config, step, num_steps, False)
    if bool(rows_with_contexts.all()):
        per_kind = {True: with_contexts}
    elif not bool(rows_with_contexts.any()):
        per_kind = {False: without}
    else:
        same = {TEXT_ONLY: FULL, NULL: CONTEXT_ONLY}
        moved: dict[str, float] = {}
        for name, weight in without.items():
            target = same[name] if same[name] in with_contexts else name
            moved[target] = moved.get(target, 0.0) + weight
        per_kind = {True: with_contexts, False: moved}
    branches = tuple(sorted({name for weights in per_kind.values() for name in weights}))
    table = {kind: [weights.get(name, 0.0) for name in branches] for kind, weights in per_kind.items()}
    rows = torch.tensor([table[bool(kind)] for kind in rows_with_contexts.tolist()], dtype=torch.float64)
    return branches, rows


def _drop_zero(weights: dict[str, float]) -> dict[str, float]:
    kept = {name: w for name, w in weights.items() if w != 0.0}
    return kept or {next(iter(weights)): 1.0}


class GuidedDenoiser:
    """Wraps a denoiser `D(x, sigma, cond=BatchedCondition)` into a guided one `D(x, sigma)` for the samplers."""

    def __init__(self, denoiser, conditioning: Conditioning, config: GuidanceConfig, sigmas: torch.Tensor):
        self.denoiser = denoiser
        self.conditioning = conditioning
        self.config = config
        self.sigmas = sigmas.detach().float().cpu()
        self._stacked: dict[tuple[str, ...], BatchedCondition] = {}
        self._rows_with_contexts = conditioning.rows_with_contexts()

    def step_index(self, sigma: torch.Tensor) -> int:
        return step_index(self.sigmas, sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        num_steps = len(self.sigmas) - 1
        # only the oscillating and interleaved weights change with the step; reading it costs a device sync
        step = self.step_index(sigma) if self.config.mode != "dual" else 0
        branches, weights = row_branch_weights(self.config, step, num_steps, self._rows_with_contexts)
        if branches not in self._stacked:  # stacked once; its context cache then lives for the generation
            self._stacked[branches] = stack_branches(self.conditioning, branches)
        count = len(branches)
        sigma_rows = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        denoised = self.denoiser(x.repeat(count, *[1] * (x.dim() - 1)), sigma_rows.repeat(count),
                                 cond=self._stacked[branches])
        parts = denoised.chunk(count)
        if bool((weights == weights[:1]).all()):  # one formula for every row: plain scalars, as before
            return sum(float(w) * part for w, part in zip(weights[0], parts))
        shape = (-1, *[1] * (x.dim() - 1))
        rows = weights.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return sum((rows[:, k].reshape(shape) * part).to(x.dtype) for k, part in enumerate(parts))
