"""Speculative decoding on the tiny target: lossless whatever the proposer, tau = K + 1 for an oracle, 1 for a
proposer that is always wrong, the fast draft path equal to the training code path, and the eval stage."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.draft.export import load_sglang_export
from pipeline.draft.model import DraftConfig, Eagle3Draft, draft_vocab_from_counts
from pipeline.draft.serving import as_served
from pipeline.draft.teacher import Teacher
from pipeline.draft.ttt_loss import TrainingTimeTest, replay_decoding, teacher_targets
from pipeline.errors import PipelineError
from pipeline.evaluate import eval_draft
from pipeline.evaluate.eval_draft import EvalConfig, iter_prompts, run_eval
from pipeline.evaluate.speculative import (
    DraftContext,
    Eagle3Proposer,
    SpecConfig,
    SpecResult,
    plain_greedy,
    speculative_generate,
)
from pipeline.targets import TargetInputs, load_target
from pipeline.train.loop import TrainConfig, train
from stages import eval_draft as eval_stage
from tests.conftest import SAMPLE_SHARDS

K = 7
MAX_NEW = 1 + 3 * (K + 1)  # the prefill's token, then exactly three full rounds for an oracle


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The 2 CPU cores are shared: OpenMP's spinning threads make 2 threads far slower than 1 under load.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_target("tiny", "float32", "cpu")


@pytest.fixture(scope="module")
def prompts(target) -> list[tuple[str, TargetInputs, list[int]]]:
    """(key, prompt, plain greedy tokens) for four sample prompts."""
    items = iter_prompts(target, EvalConfig(draft="", shards=SAMPLE_SHARDS, limit=4), None, [])
    return [(key, inputs, plain_greedy(target, inputs, MAX_NEW).tokens) for key, inputs in items]


@pytest.fixture(scope="module")
def trained_run(reference_cache, tmp_path_factory):
    cfg = TrainConfig(
        cache=str(reference_cache), name="spec", runs_dir=str(tmp_path_factory.mktemp("runs")), draft_vocab_size=256,
        max_tokens=1024, num_workers=0, eval_percent=20, ttt_steps=3, max_steps=20, lr=3e-3, warmup_steps=5,
        eval_every=20, log_every=10, checkpoint_every=20,
    )  # fmt: skip
    return train(cfg)


@pytest.fixture(scope="module")
def trained_draft(trained_run) -> Eagle3Draft:
    return load_sglang_export(trained_run / "draft").eval()


def random_draft(target) -> Eagle3Draft:
    torch.manual_seed(0)
    config = DraftConfig.from_text_config(target.identity()["draft_defaults"], target.default_layers(), 256)
    draft = Eagle3Draft(config).eval()
    counts = torch.randint(0, 1000, (target.vocab_size,), generator=torch.Generator().manual_seed(0))
    draft.set_draft_vocab(*draft_vocab_from_counts(counts, 256))  # a scattered draft vocab: d2t is exercised
    return draft


def check_bookkeeping(result: SpecResult) -> None:
    assert len(result.tokens) == 1 + sum(result.accepted_lengths)  # the prefill's token, then each verify pass
    assert result.target_forwards == 1 + len(result.accepted_lengths)
    assert all(1 <= n <= K + 1 for n in result.accepted_lengths)


def generated(ctx: DraftContext) -> int:
    return len(ctx.tokens) - ctx.prompt_len  # the pending token included


# --- (a) lossless with a real draft ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_eagle3_draft_is_lossless(request, target, prompts, which):
    draft = random_draft(target) if which == "untrained" else request.getfixturevalue("trained_draft")
    accepted = 0
    for key, inputs, plain in prompts:
        result = speculative_generate(target, draft, inputs, cfg=SpecConfig(K, MAX_NEW))
        assert result.tokens == plain, key
        check_bookkeeping(result)
        accepted += sum(result.accepted)
    if which == "trained":
        assert accepted > 0  # some drafts accepted: the KV-cache rollback after partial acceptance is exercised


def test_fast_draft_path_equals_the_training_code_path(target, prompts, trained_draft):
    """The incremental proposer (step-0 keys cached, one-row TTT steps) against the draft's own forward with a
    TTTCache over every row, as in training, on every round of real generations."""
    fast, reference = Eagle3Proposer(trained_draft), Eagle3Proposer(trained_draft, incremental=False)
    rounds = 0

    def compare(ctx: DraftContext, k: int) -> list[int]:
        nonlocal rounds
        tokens, logits = fast.chain(ctx, k)
        ref_tokens, ref_logits = reference.chain(ctx, k)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        assert tokens == ref_tokens
        rounds += 1
        return tokens

    for _, inputs, _ in prompts[:2]:
        assert speculative_generate(target, trained_draft, inputs, cfg=SpecConfig(K, MAX_NEW), propose=compare)
    assert rounds > 4


# --- (b) an oracle, (c) an always-wrong and a partly right proposer --------------------------------------------


def test_oracle_proposer_gives_tau_k_plus_one(target, prompts):
    for key, inputs, plain in prompts:
        oracle = lambda ctx, k, plain=plain: plain[generated(ctx) : generated(ctx) + k]  # noqa: E731
        result = speculative_generate(target, None, inputs, cfg=SpecConfig(K, MAX_NEW), propose=oracle)
        assert result.tokens == plain, key
        check_bookkeeping(result)
        assert all(n == K + 1 for n in result.accepted_lengths[:-1]), result.accepted_lengths
        if len(plain) == MAX_NEW:  # no EOS: three full rounds, each accepting everything
            assert result.accepted_lengths == [K + 1] * 3 and result.tau == K + 1
            assert result.acceptance == [1.0] * K and result.target_forwards == 4


def test_always_wrong_proposer_gives_tau_one_and_the_same_output(target, prompts):
    vocab = target.vocab_size
    for key, inputs, plain in prompts:

        def wrong(ctx, k, plain=plain):
            at = [min(generated(ctx) + j, len(plain) - 1) for j in range(k)]
            return [(plain[i] + 1) % vocab for i in at]

        result = speculative_generate(target, None, inputs, cfg=SpecConfig(K, MAX_NEW), propose=wrong)
        assert result.tokens == plain, key
        check_bookkeeping(result)
        assert result.tau == 1 and set(result.accepted_lengths) == {1} and sum(result.accepted) == 0
        assert result.target_forwards == len(plain)  # one target forward per token, like plain decoding


def test_partly_right_proposals_keep_exactly_the_agreeing_prefix(target, prompts):
    """Round r proposes r % (K+1) right tokens then a wrong one: every rollback length from 0 to K is taken."""
    _, inputs, plain = next(p for p in prompts if len(p[2]) == MAX_NEW)
    long_plain = plain_greedy(target, inputs, 3 * MAX_NEW).tokens
    max_new = len(long_plain)
    assert not set(long_plain) & set(target.eos_token_ids)  # no early stop: the rounds below are exact

    def partly(ctx: DraftContext, k: int) -> list[int]:
        g, right = generated(ctx), ctx.round % (K + 1)
        wrong = (long_plain[min(g + right, max_new - 1)] + 1) % target.vocab_size  # cut by k if past the end
        return [*long_plain[g : g + right], wrong][:k]

    result = speculative_generate(target, None, inputs, cfg=SpecConfig(K, max_new), propose=partly)
    assert result.tokens == long_plain
    expected, done = [], 1
    while done < max_new:
        k = min(K, max_new - done - 1)
        expected.append(min(len(expected) % (K + 1), k) + 1)
        done += expected[-1]
    assert result.accepted_lengths == expected


def test_eos_mid_round_stops_both_decoders_after_it(target, prompts):
    _, inputs, plain = prompts[0]
    at = next(i for i in range(2, K) if plain[i] not in plain[:i])  # first seen in the middle of round one
    eos = [plain[at]]
    expected = plain[: at + 1]
    assert plain_greedy(target, inputs, MAX_NEW, eos=eos).tokens == expected
    oracle = lambda ctx, k: plain[generated(ctx) : generated(ctx) + k]  # noqa: E731
    result = speculative_generate(target, None, inputs, cfg=SpecConfig(K, MAX_NEW, eos), propose=oracle)
    assert result.tokens == expected and result.accepted_lengths == [at]  # the round's drafts after EOS dropped
    check_bookkeeping(result)


# --- the eval stage -----------------------------------------------------------------------------------------------


def test_eval_stage_writes_metrics_and_plot(trained_run, tmp_path):
    out = tmp_path / "eval"
    args = [str(trained_run), SAMPLE_SHARDS, "--split", "all", "--limit", "2", "--max-new-tokens", "16"]
    eval_stage.main([*args, "--out", str(out)])
    report = json.loads((out / "eval.json").read_text())
    assert report["lossless"] and report["samples"] == 2 and report["model"] == "tiny"
    assert len(report["acceptance_rate"]) == K and report["tau"] >= 1
    assert sum(s["new_tokens"] for s in report["per_sample"]) == report["generated_tokens"]
    assert report["target_forwards_per_token"] <= 1 and report["tokens_per_s"]["plain"] > 0
    assert sum(report["accepted_length_histogram"].values()) == report["verify_passes"]
    assert (out / "eval.png").stat().st_size > 10_000


def test_eval_stage_fails_on_a_mismatch_and_names_the_sample(trained_run, tmp_path, monkeypatch):
    real = eval_draft.speculative_generate

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.tokens[-1] = (result.tokens[-1] + 1) % 1000
        return result

    monkeypatch.setattr(eval_draft, "speculative_generate", broken)
    cfg = EvalConfig(str(trained_run / "draft"), SAMPLE_SHARDS, limit=1, max_new_tokens=4, out=str(tmp_path))
    with pytest.raises(PipelineError, match="differs from plain greedy on 1 sample"):
        run_eval(cfg)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert not report["lossless"] and report["mismatches"][0]["index"] == 3
    assert report["mismatches"][0]["key"] == report["per_sample"][0]["key"]
    assert report["mismatches"][0]["logit_gap"] > 0


@torch.no_grad()
def teacher_forced_rows(
    target, draft: Eagle3Draft, prompt: TargetInputs, answer: list[int], serve: str = "sglang"
) -> tuple[torch.Tensor, ...]:
    """(right [1, T, K], loss mask [1, T]) of the training-time test on prompt + answer, with the inputs the
    cache would hold for it (the dump's forward: layer 0 is the merged input embeddings), as the trainer's
    evaluation feeds them for ``serve``."""
    ids = torch.cat([prompt.input_ids, torch.tensor(answer)])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[len(prompt.input_ids) :] = True
    states = target.forward(TargetInputs(ids, mask, prompt.model_inputs), [0, *draft.config.aux_layers])
    aux = torch.cat([states.hidden_states[i] for i in draft.config.aux_layers], dim=-1)
    batch = {"input_ids": ids[None], "loss_mask": mask[None], "inputs_embeds": states.hidden_states[0][None],
             "final_hidden": states.final_hidden[None], "aux": aux[None]}  # fmt: skip
    placeholder = target.embed_tokens(torch.tensor([target.audio_token_id]))[0]
    batch = as_served(batch, serve, target.audio_token_id, placeholder)
    teacher = Teacher(target.head_weights()["lm_head"].float(), draft.d2t, draft.t2d)
    _, _, right = TrainingTimeTest(draft, K)(batch, teacher_targets(teacher, batch))
    return right, mask[None]


@pytest.mark.parametrize("serve", ["sglang", "vllm"])
@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_replayed_decoding_from_teacher_forced_rows_equals_measured_decoding(request, target, prompts, which, serve):
    """The offline tau every evaluation reports (``replay_decoding``, per engine) is the measured one, pass for pass,
    where the data are the target's own greedy answers: training's per-engine inputs are the engine's rows."""
    draft = random_draft(target) if which == "untrained" else request.getfixturevalue("trained_draft")
    passes = []
    for _, inputs, _ in prompts:
        spec = speculative_generate(target, draft, inputs, cfg=SpecConfig(K, max_new_tokens=MAX_NEW, serve=serve))
        right, mask = teacher_forced_rows(target, draft, inputs, spec.tokens, serve)
        assert replay_decoding(right, mask, K) == (len(spec.tokens) - 1, len(spec.accepted_lengths))
        passes.append(spec.accepted_lengths)
    assert any(n > 1 for lengths in passes for n in lengths) or which == "untrained"  # some drafts were accepted
