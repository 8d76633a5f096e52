"""Every target family through the whole pipeline: the cache equals a direct forward of the family's own HF model,
speculative decoding is lossless against the model's own greedy ``generate``, the exports name the family's
verifier and layers, and regenerated answers are the model's own.

Parametrised by family. The Qwen2-Audio rows reuse the session's reference dump (and the checks of
test_dump_exact, test_speculative, test_train and test_regenerate cover it in depth); each other family gets one
small dump of one shard here, so it adds about a minute to CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

from pipeline.cache.reader import open_cache
from pipeline.draft.model import DraftConfig, Eagle3Draft, draft_vocab_from_counts
from pipeline.draft.ttt_loss import replay_decoding
from pipeline.evaluate.eval_draft import EvalConfig, iter_prompts, run_eval
from pipeline.evaluate.speculative import SpecConfig, plain_greedy, speculative_generate
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.shards import iter_raw_samples
from pipeline.regenerate import RegenerateConfig, run_regenerate
from pipeline.targets import AudioTarget, TargetInputs, load_target
from pipeline.train.loop import TrainConfig, train
from tests.conftest import REPO, run_stage
from tests.test_dump_exact import assert_matches_forward, raw_samples
from tests.test_speculative import MAX_NEW, K, random_draft, teacher_forced_rows

SHARD = str(REPO / "data/sample/shards/sample-000000.tar")
# model_type -> (alias of its tiny target, the verifier architecture its exports name)
FAMILIES = {
    "qwen2_audio": ("tiny", "Qwen2AudioForConditionalGeneration"),
    "qwen3_omni_moe": ("tiny-qwen3-omni", "Qwen3OmniMoeForConditionalGeneration"),
}
NEW_FAMILIES = [f for f in FAMILIES if f != "qwen2_audio"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: OpenMP spinning makes 2 threads slower than 1
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def omni_dir(tiny_home) -> Path:
    from pipeline.testing.tiny_qwen3_omni import ensure_tiny_qwen3_omni

    return ensure_tiny_qwen3_omni()


@pytest.fixture(scope="module")
def omni_cache(tmp_path_factory, omni_dir) -> Path:
    """One shard (9 samples) dumped with the tiny Qwen3-Omni, as a user would (the stage, in its own process)."""
    out = tmp_path_factory.mktemp("omni") / "cache"
    run_stage("stages.dump_hidden", SHARD, str(out), "--model", "tiny-qwen3-omni", "--chunk-tokens", "16")
    return out


@pytest.fixture(scope="module")
def omni_target(omni_dir):
    return load_target("tiny-qwen3-omni", "float32", "cpu")


# --- the cache equals a direct forward of the family's own model ----------------------------------------------


def direct_thinker_forward(model_dir: Path, raw):
    """Qwen3-Omni run the plain transformers way: the tokenizer's chat template, Whisper features as the
    processor makes them (the clip's own frames), the audio pad expanded to the encoder's token count, the thinker
    of the full model with hidden states."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, enable_audio_output=False).eval()
    text = tokenizer.apply_chat_template(parse_conversations(raw.json), tokenize=False)
    wave = decode_audio(raw.audio, AudioPolicy())
    features = extractor(wave, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    count = int(_get_feat_extract_output_lengths(features["attention_mask"].sum(-1), 50)[0])
    text = text.replace("<|audio_pad|>", "<|audio_pad|>" * count)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": features["input_features"],
        "feature_attention_mask": features["attention_mask"],
    }
    with torch.no_grad():
        out = full.thinker(**inputs, output_hidden_states=True)
    return inputs, out, full.thinker


@pytest.mark.slow  # a dump of its own
@pytest.mark.parametrize("index", [0, 8])
def test_qwen3_omni_cache_equals_direct_forward(omni_cache, omni_dir, index):
    cache = open_cache(omni_cache)
    s = cache[index]
    inputs, out, model = direct_thinker_forward(omni_dir, raw_samples()[s["key"]])
    assert torch.equal(s["input_ids"], inputs["input_ids"][0])
    for layer, h in s["hidden_states"].items():
        assert torch.equal(h, out.hidden_states[layer][0]), f"layer {layer} of {s['key']}"
    assert torch.equal(s["final_hidden"], out.hidden_states[-1][0])
    with torch.no_grad():
        assert torch.equal(model.lm_head(s["final_hidden"]), out.logits[0])
    assert torch.equal(s["inputs_embeds"], out.hidden_states[0][0])  # merged: audio positions included


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cache_records_the_family(request, family):
    cache_dir = request.getfixturevalue("reference_cache" if family == "qwen2_audio" else "omni_cache")
    cache = open_cache(cache_dir)
    assert cache.target["model_type"] == family
    assert cache.target["architectures"] == [FAMILIES[family][1]]
    assert cache.layers == [2, 4, 5]  # EAGLE-3's defaults of an 8-layer text model
    assert cache.info["counts"]["rejected"] == 0
    if family == "qwen2_audio":
        assert_matches_forward(cache, 1, request.getfixturevalue("tiny_dir"), torch.float32)


# --- speculative decoding is lossless against the model's own generate ----------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_speculative_decoding_is_lossless_and_equals_hf_generate(omni_target, family):
    target = omni_target
    prompts = list(iter_prompts(target, EvalConfig(draft="", shards=SHARD, limit=3), None, []))
    draft = random_draft(target)
    for key, inputs in prompts:
        plain = plain_greedy(target, inputs, 12).tokens
        # HF's generate computes the mRoPE positions itself: equal tokens say the adapter's positions are the model's
        assert target.generate([inputs], 12, checkpoint_settings=False)[0][: len(plain)] == plain, key
        for serve in ("sglang", "vllm"):
            result = speculative_generate(target, draft, inputs, cfg=SpecConfig(3, 12, serve=serve))
            assert result.tokens == plain, (key, serve)


def draft_over(target: AudioTarget, tokens: list[int], size: int = 4) -> Eagle3Draft:
    """A random draft whose vocabulary is the ``size`` target tokens most frequent in ``tokens``: drafts from the
    target's own favourite tokens are accepted by chance, which a draft over tokens the target never emits
    (``random_draft``'s scattered vocab, or a sample-job draft over a random target) never is."""
    torch.manual_seed(0)
    config = DraftConfig.from_text_config(target.identity()["draft_defaults"], target.default_layers(), size)
    draft = Eagle3Draft(config).eval()
    draft.set_draft_vocab(
        *draft_vocab_from_counts(torch.bincount(torch.tensor(tokens), minlength=target.vocab_size), size)
    )
    return draft


def replay_check(target: AudioTarget, draft: Eagle3Draft, prompts: list[TargetInputs], serve: str) -> list[list[int]]:
    """Measured decoding's passes, each asserted equal to the offline replay on the dump forward's rows."""
    passes = []
    for n, inputs in enumerate(prompts):
        spec = speculative_generate(target, draft, inputs, cfg=SpecConfig(K, max_new_tokens=MAX_NEW, serve=serve))
        right, mask = teacher_forced_rows(target, draft, inputs, spec.tokens, serve)
        assert replay_decoding(right, mask, K) == (len(spec.tokens) - 1, len(spec.accepted_lengths)), (n, serve)
        passes.append(spec.accepted_lengths)
    return passes


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_replayed_decoding_equals_measured_decoding(omni_target, family):
    """Training's offline tau (``replay_decoding`` on the rows the dump's forward gives) is eval-draft's measured
    tau, pass for pass, under both engines' inputs: the aux states, positions and embeddings the draft reads while
    decoding are the cached ones (test_speculative checks the same for Qwen2-Audio)."""
    target = omni_target
    prompts = [p for _, p in iter_prompts(target, EvalConfig(draft="", shards=SHARD, limit=2), None, [])]
    greedy = [t for p in prompts for t in plain_greedy(target, p, MAX_NEW).tokens]
    draft = draft_over(target, greedy)
    passes = [
        n for serve in ("sglang", "vllm") for lengths in replay_check(target, draft, prompts, serve) for n in lengths
    ]
    assert any(n > 1 for n in passes)  # drafts were accepted: the replay's chains were exercised


# --- train, both exports, eval-draft ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_train_exports_and_eval_draft(omni_cache, tmp_path, family):
    cfg = TrainConfig(
        cache=str(omni_cache), name="omni", runs_dir=str(tmp_path), draft_vocab_size=128, max_tokens=1024,
        num_workers=0, eval_percent=20, ttt_steps=3, max_steps=8, lr=3e-3, warmup_steps=2, eval_every=8,
        log_every=4, checkpoint_every=8,
    )  # fmt: skip
    run = train(cfg)
    sglang = json.loads((run / "draft/config.json").read_text())
    assert sglang["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # HF [2, 4, 5] - 1
    assert sglang["target_hidden_size"] == 64 and sglang["target_name_or_path"] == FAMILIES[family][0]
    spec = json.loads((run / "draft-speculators/config.json").read_text())
    assert spec["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert spec["speculators_config"]["verifier"]["architectures"] == [FAMILIES[family][1]]
    report = run_eval(EvalConfig(draft=str(run), shards=SHARD, split="all", limit=2, k=3, max_new_tokens=12))
    assert report["lossless"] and report["samples"] == 2 and report["tau"] >= 1


# --- regenerate ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_regenerated_answers_are_the_models_own(omni_target, tmp_path, family):
    out = tmp_path / "regen"
    cfg = RegenerateConfig(SHARD, out, model=FAMILIES[family][0], max_new_tokens=8)
    summary = run_regenerate(cfg, omni_target)
    assert summary["complete"] and summary["counts"]["rejected"] == 0
    for raw in list(iter_raw_samples(str(out / "sample-000000.tar")))[:3]:
        messages = parse_conversations(raw.json)  # the regenerated conversation
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        wave = decode_audio(raw.audio, AudioPolicy(), raw.audio_ext)
        alone = omni_target.generate([omni_target.generation_inputs(messages[:first], wave, 2048)], 8)[0]
        assert messages[first]["content"][0]["text"] == omni_target.decode(alone), raw.key
