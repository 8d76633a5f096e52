"""What "lossless" means for speculative decoding, in each dtype, and the check of one output against it.

Speculative decoding verifies K+1 tokens in one forward where plain greedy decoding feeds one token at a time. In
float32 the two agree exactly on every target tested here, and the check demands it: the speculative output must
equal plain greedy's token for token. In bfloat16 or float16 they do not: the two forwards round differently,
the logits move by about one unit in the last place (ulp) of the dtype at their magnitude, and where the top two
logits are that close (a near-tie) the argmax can flip. Serving engines are not bit-exact in these dtypes either.
So in bf16/fp16 the rule is:

- every emitted token of the speculative output is checked against the target's one-token greedy logits on the
  speculative output's own prefix (teacher-forced, with a KV cache, as plain greedy computes them): it must be
  the argmax, or within ``tie_ulps`` ulps of the dtype at |top logit| of it (a near-tie); the check continues past
  a tie, so one tie does not hide a later error;
- every tie is reported with its position, both tokens, the gap and the tolerance; any deviation beyond the
  tolerance is a failure.

The acceptance figures come from the speculative run itself and cover its whole output, ties or not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from pipeline.targets.base import AudioTarget, TargetInputs

# Default tolerance of a near-tie, in units in the last place of the dtype at |top logit|. Measured at 7B
# dimensions in bf16: gaps of 1-2 ulps between a K+1-token verify forward and one-token decoding.
TIE_ULPS = 4.0
EXACT_DTYPES = (torch.float32, torch.float64)


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of ``dtype``'s representable numbers at ``magnitude`` (its eps scaled to the binade)."""
    if magnitude == 0 or not math.isfinite(magnitude):
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(magnitude)))


def tie_tolerance(dtype: torch.dtype, top_logit: float, tie_ulps: float = TIE_ULPS) -> float:
    """The largest logit gap that counts as a near-tie: 0 in float32 (exact), ``tie_ulps`` ulps otherwise."""
    return 0.0 if dtype in EXACT_DTYPES else tie_ulps * ulp(dtype, top_logit)


@dataclass
class Deviation:
    """A position where the checked output is not the target's argmax."""

    index: int  # position in the generated tokens
    token: int  # what the checked output emitted
    greedy: int  # the target's argmax there
    top_logit: float
    gap: float  # top logit - the emitted token's logit (>= 0)
    tolerance: float
    tie: bool  # gap <= tolerance: a floating-point near-tie, not an error


@dataclass
class Check:
    """Every deviation of one output from the target's one-token greedy choices."""

    dtype: str
    deviations: list[Deviation] = field(default_factory=list)

    @property
    def ties(self) -> list[Deviation]:
        return [d for d in self.deviations if d.tie]

    @property
    def errors(self) -> list[Deviation]:
        return [d for d in self.deviations if not d.tie]

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "deviations": [asdict(d) for d in self.deviations]}


def deviation(index: int, logits: torch.Tensor, token: int, dtype: torch.dtype, tie_ulps: float) -> Deviation | None:
    """None if ``token`` is the argmax of ``logits`` [V], else how far from it."""
    logits = logits.float()
    greedy = int(logits.argmax())
    if greedy == token:
        return None
    top = float(logits[greedy])
    gap = top - float(logits[token])
    tolerance = tie_tolerance(dtype, top, tie_ulps)
    return Deviation(index, token, greedy, top, gap, tolerance, gap <= tolerance)


def check_tokens(
    step_logits: Iterator[torch.Tensor], tokens: Sequence[int], dtype: torch.dtype, tie_ulps: float = TIE_ULPS
) -> Check:
    """Compare ``tokens[i]`` with the i-th logits of ``step_logits`` (the target's logits after the prompt and
    ``tokens[:i]``), for every i: the check never stops at a deviation."""
    check = Check(str(dtype).removeprefix("torch."))
    for i, (logits, token) in enumerate(zip(step_logits, tokens, strict=False)):
        found = deviation(i, logits, token, dtype, tie_ulps)
        if found is not None:
            check.deviations.append(found)
    return check


@torch.no_grad()
def teacher_forced_logits(target: AudioTarget, prompt: TargetInputs, tokens: Sequence[int]) -> Iterator[torch.Tensor]:
    """The target's next-token logits [V] after the prompt and each prefix of ``tokens``, computed as plain greedy
    decoding computes them: the prompt in one forward, then one token at a time over the KV cache."""
    cache = target.new_cache()
    out = target.forward_step(prompt.input_ids.to(target.device), cache, [], prompt.model_inputs)
    yield out.logits[-1]
    for token in tokens[:-1]:
        out = target.forward_step(torch.tensor([token], device=target.device), cache, [])
        yield out.logits[-1]


def check_output(target: AudioTarget, prompt: TargetInputs, tokens: Sequence[int], tie_ulps: float = TIE_ULPS) -> Check:
    """Every deviation of ``tokens`` (an output for ``prompt``) from the target's one-token greedy choices."""
    return check_tokens(teacher_forced_logits(target, prompt, tokens), tokens, target.dtype, tie_ulps)
