"""What each serving engine feeds the draft at audio positions, emulated exactly in decoding and in training, and
what the exports record about it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.draft.export import WEIGHTS, _save, export_sglang, export_speculators
from pipeline.draft.model import DraftConfig, Eagle3Draft
from pipeline.draft.serving import ServingRecord, as_served, draft_prefill_embeds, reads_merged
from pipeline.evaluate.eval_draft import EvalConfig, iter_prompts, serving_engine
from pipeline.evaluate.speculative import DraftContext, SpecConfig, speculative_generate
from pipeline.targets import load_target
from tests.conftest import SAMPLE_SHARDS


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values).repeat(2, 1).T.contiguous()  # [N, 2]: row i is (v_i, v_i)


def test_each_engine_builds_the_draft_prefill_rows_its_own_way():
    """Three requests of 2, 1 and 3 tokens (SGLang's own test case): row t reads token t+1, each request's last row
    its sampled token; at the audio positions (tokens 1 and 4) SGLang reads the merged audio features, vLLM the
    placeholder's embedding."""
    merged = rows(0, 101, 2, 3, 104, 5)  # 101 and 104: audio features
    placeholder = rows(0, 99, 2, 3, 99, 5)  # 99: the audio placeholder token's embedding
    sampled = rows(-1, -2, -3)
    sglang = draft_prefill_embeds("sglang", merged, placeholder, [2, 1, 3], sampled)
    vllm = draft_prefill_embeds("vllm", merged, placeholder, [2, 1, 3], sampled)
    assert torch.equal(sglang, rows(101, -1, -2, 104, 5, -3))  # SGLang's e1,e1,e2,e4,e5,e5, last rows replaced
    assert torch.equal(vllm, rows(99, -1, -2, 99, 5, -3))
    with pytest.raises(ValueError, match="request lengths"):
        draft_prefill_embeds("vllm", merged, placeholder, [2, 2], sampled[:2])
    with pytest.raises(ValueError, match="sglang, vllm"):
        draft_prefill_embeds("trtllm", merged, placeholder, [6], sampled[:1])


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_target("tiny", "float32", "cpu")


@pytest.mark.parametrize("serve", ["sglang", "vllm"])
def test_decoding_feeds_the_draft_what_the_engine_feeds_it(target, serve):
    (_, prompt), *_ = iter_prompts(target, EvalConfig(draft="", shards=SAMPLE_SHARDS, limit=1), None, [])
    seen: list[DraftContext] = []

    def record(ctx: DraftContext, k: int) -> list[int]:
        seen.append(DraftContext(ctx.tokens.clone(), ctx.prompt_len, ctx.aux, ctx.embeds.clone(), None, ctx.round))
        return []

    result = speculative_generate(target, None, prompt, [2], SpecConfig(3, 4, serve=serve), propose=record)
    ids, T = prompt.input_ids, len(prompt.input_ids)
    merged = target.forward_step(ids, target.new_cache(), [], prompt.model_inputs).input_embeds
    audio = ids == target.audio_token_id
    assert audio.sum() > 10
    first = seen[0].embeds  # round 0: the prefill's rows, then the first sampled token
    expected = merged.clone() if serve == "sglang" else target.embed_tokens(ids)
    assert torch.equal(first[1:T], expected[1:])  # row t reads token t+1
    assert torch.equal(first[T], target.embed_tokens(torch.tensor([result.tokens[0]]))[0])  # the sampled token
    assert not torch.equal(merged[audio], target.embed_tokens(ids)[audio])  # the engines differ there
    later = seen[-1].embeds  # generated tokens are embedded with the target's embed_tokens under both engines
    generated = seen[-1].tokens[T:]
    assert torch.equal(later[T:], target.embed_tokens(generated))


def test_training_batches_as_served_are_the_engine_rows():
    """``as_served`` (the trainer's per-engine evaluation) changes exactly the audio positions, for vLLM only."""
    ids = torch.tensor([[5, 7, 7, 9, 0]])
    batch = {"input_ids": ids, "inputs_embeds": torch.arange(10.0).view(1, 5, 2)}
    assert as_served(batch, "sglang", 7, torch.tensor([-1.0, -1.0])) is batch
    vllm = as_served(batch, "vllm", 7, torch.tensor([-1.0, -1.0]))
    assert vllm["inputs_embeds"].tolist() == [[[0, 1], [-1, -1], [-1, -1], [6, 7], [8, 9]]]
    assert batch["inputs_embeds"][0, 1].tolist() == [2, 3]  # the merged batch is untouched


def test_mixed_choice_is_seeded_per_sample_and_epoch_with_the_share_asked():
    keys = [f"clip-{i:05d}" for i in range(4000)]
    draws = [reads_merged("mixed", k, 0, 0, 0.3) for k in keys]
    assert draws == [reads_merged("mixed", k, 0, 0, 0.3) for k in keys]  # reproducible
    assert 0.67 < sum(draws) / len(draws) < 0.73  # 30% placeholder
    next_epoch = [reads_merged("mixed", k, 0, 1, 0.3) for k in keys]
    assert 0.3 < sum(a != b for a, b in zip(draws, next_epoch, strict=True)) / len(keys) < 0.5  # 2 * 0.3 * 0.7
    assert all(reads_merged("merged", k, 0, 0, 0.3) for k in keys[:10])
    assert not any(reads_merged("placeholder", k, 0, 0, 0.3) for k in keys[:10])
    assert all(reads_merged("mixed", k, 0, 0, 0.0) for k in keys[:100])
    assert not any(reads_merged("mixed", k, 0, 0, 1.0) for k in keys[:100])


def small_draft() -> Eagle3Draft:
    config = DraftConfig(target_hidden_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512, draft_vocab_size=64,
                         aux_layers=[2, 4, 5])  # fmt: skip
    return Eagle3Draft(config)


@pytest.mark.parametrize(
    "embeds, engines", [("merged", ["sglang"]), ("placeholder", ["vllm"]), ("mixed", ["sglang", "vllm"])]
)
def test_exports_record_what_the_draft_was_trained_for_and_ship_no_embeddings(tmp_path, embeds, engines):
    draft, record = small_draft(), ServingRecord(embeds, 0.5)
    for out in (
        export_sglang(draft, draft.config, tmp_path / "sglang", "tiny", record),
        export_speculators(draft, draft.config, tmp_path / "spec", "tiny", ["X"], 3, record),
    ):
        config = json.loads((out / "config.json").read_text())
        assert config["audio_eagle"]["trained_audio_embeds"] == embeds and config["audio_eagle"]["serve"] == engines
        assert ServingRecord.from_config(config) == ServingRecord(embeds, 0.5 if embeds == "mixed" else None)
        with safe_open(out / WEIGHTS, framework="pt") as f:
            assert not [k for k in f.keys() if "embed" in k]  # the servers embed with the target's embed_tokens
    with pytest.raises(ValueError, match="must not ship token embeddings"):
        _save({**draft.state_dict(), "embed_tokens.weight": torch.zeros(512, 64)}, {}, tmp_path / "x", torch.float32)


def test_evaluating_for_an_engine_the_draft_was_not_trained_for_warns_with_the_measured_cost(tmp_path, capsys):
    draft = small_draft()
    export_sglang(draft, draft.config, tmp_path / "merged", "tiny", ServingRecord("merged"))
    export_sglang(draft, draft.config, tmp_path / "mixed", "tiny", ServingRecord("mixed", 0.5))
    export_sglang(draft, draft.config, tmp_path / "old", "tiny")  # before exports recorded it
    assert serving_engine(tmp_path / "merged", None) == "sglang" and capsys.readouterr().out == ""
    assert serving_engine(tmp_path / "merged", "vllm") == "vllm"
    warning = capsys.readouterr().out
    assert "trained on merged audio embeddings, but vLLM feeds a draft placeholder embeddings" in warning
    assert "tau 1.76 against 3.99" in warning and "--audio-embeds mixed" in warning
    assert serving_engine(tmp_path / "mixed", "vllm") == "vllm" and capsys.readouterr().out == ""
    assert serving_engine(tmp_path / "old", None) == "sglang" and capsys.readouterr().out == ""
    assert ServingRecord("placeholder").warning("sglang").count("tau 3.24") == 1
