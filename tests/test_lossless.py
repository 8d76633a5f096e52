"""What lossless means per dtype (pipeline/evaluate/lossless.py) and eval-draft's use of it, on the tiny target:
float32 exact; in bf16 a near-tie within the dtype's resolution is reported as a tie, anything beyond it fails, and
the check goes on past a tie."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.draft.export import export_sglang
from pipeline.draft.model import DraftConfig, Eagle3Draft, draft_vocab_from_counts
from pipeline.errors import PipelineError
from pipeline.evaluate import eval_draft
from pipeline.evaluate.eval_draft import EvalConfig, iter_prompts, run_eval
from pipeline.evaluate.lossless import check_output, check_tokens, teacher_forced_logits, tie_tolerance, ulp
from pipeline.evaluate.speculative import plain_greedy
from pipeline.targets import load_target
from tests.conftest import SAMPLE_SHARDS

NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request, tiny_dir):
    """(target, prompt, plain greedy tokens) in each dtype."""
    target = load_target("tiny", request.param, "cpu")
    _, prompt = next(iter_prompts(target, EvalConfig(draft="", shards=SAMPLE_SHARDS, limit=1), None, []))
    return target, prompt, plain_greedy(target, prompt, NEW).tokens


def test_the_resolution_of_each_dtype():
    assert ulp(torch.bfloat16, 5.3) == 2**-5 and ulp(torch.bfloat16, -5.3) == 2**-5  # 8 significant bits
    assert ulp(torch.float16, 5.3) == 2**-8 and ulp(torch.float32, 1.0) == 2**-23
    assert tie_tolerance(torch.bfloat16, 5.3, 4) == 0.125 and tie_tolerance(torch.bfloat16, 0.7, 2) == 2**-7
    assert tie_tolerance(torch.float32, 5.3, 4) == 0.0  # float32 is exact: no tie is tolerated


def test_plain_greedy_passes_its_own_check(case):
    target, prompt, plain = case
    assert len(plain) == NEW
    assert check_output(target, prompt, plain).deviations == []


def forced(target, prompt, prefix: list[int], n: int) -> list[int]:
    """``prefix`` followed by the target's one-token greedy continuation, ``n`` tokens in all."""
    out = list(prefix)
    while len(out) < n:  # re-runs the prefix for each token: n is small
        *_, logits = teacher_forced_logits(target, prompt, [*out, 0])
        out.append(int(logits.argmax()))
    return out


def test_a_near_tie_is_a_tie_a_real_mismatch_fails_and_the_check_goes_on(case):
    target, prompt, plain = case
    i = 2
    reference = [x.float().clone() for x in teacher_forced_logits(target, prompt, plain)]
    runner_up = int(reference[i].topk(2).indices[1])
    # The output takes the runner-up at i, then the target's greedy continuation of that prefix.
    output = forced(target, prompt, [*plain[:i], runner_up], NEW)
    logits = [x.float().clone() for x in teacher_forced_logits(target, prompt, output)]
    top = float(logits[i].max())
    delta = ulp(torch.bfloat16, top) / 2  # half an ulp of bf16 at the top logit: a near-tie
    logits[i][runner_up] = top - delta
    # and, four tokens on, a token far below the argmax: a real error
    j = i + 4
    wrong = int(logits[j].argmin())
    output[j] = wrong

    check = check_tokens(iter(logits), output, target.dtype)
    assert [(d.index, d.token, d.tie) for d in check.deviations] == [
        (i, runner_up, target.dtype == torch.bfloat16),
        (j, wrong, False),
    ]
    tie = check.deviations[0]
    assert tie.greedy == plain[i] and tie.gap == delta and tie.top_logit == top
    assert tie.tolerance == (0.0 if target.dtype == torch.float32 else 4 * 2 * delta)
    assert len(check.errors) == (2 if target.dtype == torch.float32 else 1)


# --- eval-draft: the rule applied to whole outputs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tiny_dir):
    target = load_target("tiny", "float32", "cpu")
    torch.manual_seed(0)
    config = DraftConfig.from_text_config(target.identity()["draft_defaults"], target.default_layers(), 256)
    draft = Eagle3Draft(config).eval()
    counts = torch.randint(0, 1000, (target.vocab_size,), generator=torch.Generator().manual_seed(0))
    draft.set_draft_vocab(*draft_vocab_from_counts(counts, 256))
    return export_sglang(draft, config, tmp_path_factory.mktemp("export") / "draft", "tiny")


def altered_at(index: int, monkeypatch) -> None:
    """eval-draft's speculative output gets another token at ``index`` (the rest as decoded)."""
    real = eval_draft.speculative_generate

    def altered(*args, **kwargs):
        result = real(*args, **kwargs)
        if len(result.tokens) > index:
            result.tokens[index] = (result.tokens[index] + 1) % 1000
        return result

    monkeypatch.setattr(eval_draft, "speculative_generate", altered)


def run(draft_dir, tmp_path, dtype: str, tie_ulps: float) -> dict:
    cfg = EvalConfig(str(draft_dir), SAMPLE_SHARDS, limit=1, k=3, max_new_tokens=6, out=str(tmp_path),
                     dtype=dtype, tie_ulps=tie_ulps)  # fmt: skip
    return run_eval(cfg)


@pytest.mark.slow
def test_eval_reports_exact_outputs_as_exact(draft_dir, tmp_path):
    report = run(draft_dir, tmp_path, "bfloat16", 4.0)
    assert report["lossless"] and report["exact_samples"] == 1 and report["ties"] == [] and report["mismatches"] == []
    assert report["lossless_rule"].startswith("bfloat16: every emitted token")


@pytest.mark.slow
def test_eval_in_bf16_lists_deviations_within_the_tolerance_as_ties(draft_dir, tmp_path, monkeypatch):
    altered_at(2, monkeypatch)
    report = run(draft_dir, tmp_path, "bfloat16", 1e9)  # every gap within tolerance: ties only
    assert report["lossless"] and report["exact_samples"] == 0 and report["mismatches"] == []
    (tie,) = report["ties"]
    assert tie["index"] == 2 and tie["deviations"][0]["index"] == 2 and all(d["tie"] for d in tie["deviations"])
    assert report["per_sample"][0]["lossless"] and not report["per_sample"][0]["exact"]
    # the acceptance figures still cover the whole output
    assert sum(report["per_sample"][0]["accepted_lengths"]) + 1 == report["generated_tokens"]


@pytest.mark.slow
def test_eval_fails_beyond_the_tolerance_and_in_float32_on_any_difference(draft_dir, tmp_path, monkeypatch):
    altered_at(2, monkeypatch)
    for dtype, tie_ulps in (("bfloat16", 0.0), ("float32", 1e9)):
        with pytest.raises(PipelineError, match="differs from plain greedy on 1 sample"):
            run(draft_dir, tmp_path, dtype, tie_ulps)
        report = json.loads((tmp_path / "eval.json").read_text())
        (mismatch,) = report["mismatches"]
        assert not report["lossless"] and report["ties"] == [] and mismatch["index"] == 2
        assert mismatch["deviations"][0]["index"] == 2 and not mismatch["deviations"][0]["tie"]


def test_a_negative_tie_tolerance_is_refused():
    with pytest.raises(ValueError, match="tie_ulps must be >= 0"):
        EvalConfig(draft="runs/x", shards="shards.tar", tie_ulps=-1)
