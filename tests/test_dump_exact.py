"""The cache holds exactly what a direct forward of the target computes, with the right ids and loss mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.cache.reader import open_cache
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.shards import expand_shard_urls, iter_raw_samples
from tests.conftest import REPO, SAMPLE_SHARDS, run_stage


def raw_samples() -> dict:
    return {r.key: r for url in expand_shard_urls(SAMPLE_SHARDS) for r in iter_raw_samples(url)}


def direct_forward(model_dir, raw, dtype: torch.dtype):
    """The target run the plain transformers way: processor, then the full model with hidden states."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    text = processor.apply_chat_template(parse_conversations(raw.json), tokenize=False)
    wave = decode_audio(raw.audio, AudioPolicy())
    inputs = processor(text=text, audio=wave, sampling_rate=16000, return_tensors="pt")
    inputs["input_features"] = inputs["input_features"].to(dtype)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return inputs, out, model


def assert_matches_forward(cache, index: int, model_dir, dtype: torch.dtype) -> None:
    s = cache[index]
    inputs, out, model = direct_forward(model_dir, raw_samples()[s["key"]], dtype)
    assert torch.equal(s["input_ids"], inputs["input_ids"][0])
    assert set(s["hidden_states"]) == set(cache.layers)
    for layer, h in s["hidden_states"].items():
        assert h.dtype == dtype
        assert torch.equal(h, out.hidden_states[layer][0]), f"layer {layer} of {s['key']}"
    assert torch.equal(s["final_hidden"], out.hidden_states[-1][0])
    with torch.no_grad():
        assert torch.equal(model.lm_head(s["final_hidden"]), out.logits[0])
    assert torch.equal(s["inputs_embeds"], out.hidden_states[0][0])  # merged: audio positions included


@pytest.mark.parametrize("index", [0, 7, 20, 35])
def test_float32_cache_equals_direct_forward(reference_cache, tiny_dir, index):
    assert_matches_forward(open_cache(reference_cache), index, tiny_dir, torch.float32)


@pytest.mark.slow  # a dump of its own
def test_bfloat16_cache_is_bit_exact(tmp_path, tiny_dir):
    shard = str(REPO / "data/sample/shards/sample-000001.tar")
    run_stage("stages.dump_hidden", shard, str(tmp_path / "c"), "--dtype", "bfloat16", "--layers", "1,2,4,5,7")
    cache = open_cache(tmp_path / "c")
    assert cache.info["captured_layers"] == [1, 2, 4, 5, 7]
    for index in (0, len(cache) - 1):
        assert_matches_forward(cache, index, tiny_dir, torch.bfloat16)


def test_every_sample_cached_once_with_its_shard(reference_cache):
    cache = open_cache(reference_cache)
    raws = raw_samples()
    assert len(cache) == len(raws) == 36
    keys = [cache[i]["key"] for i in range(len(cache))]
    assert sorted(keys) == sorted(raws)
    assert all(cache[i]["shard"] == raws[cache[i]["key"]].shard for i in range(len(cache)))
    counts = cache.info["counts"]
    assert counts["samples"] == 36 and counts["rejected"] == 0 and counts["shards_done"] == 4
    assert counts["tokens"] == sum(len(cache[i]["input_ids"]) for i in range(len(cache)))


def test_loss_mask_covers_exactly_the_assistant_turns(reference_cache, tiny_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    cache = open_cache(reference_cache)
    raws = raw_samples()
    for i in range(len(cache)):
        s = cache[i]
        messages = parse_conversations(raws[s["key"]].json)
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        mask = s["loss_mask"]
        # the masked tokens are the assistant texts with their end-of-turn token, in order, and nothing else
        assert tokenizer.decode(s["input_ids"][mask]) == "".join(a + "<|im_end|>" for a in answers)
        runs = torch.diff(torch.cat([torch.tensor([0]), mask.int(), torch.tensor([0])])).nonzero().numel() // 2
        assert runs == len(answers)
        # every masked run starts right after "<|im_start|>assistant\n"
        starts = (torch.diff(torch.cat([torch.tensor([0]), mask.int()])) == 1).nonzero().flatten()
        for start in starts:
            assert tokenizer.decode(s["input_ids"][:start]).endswith("<|im_start|>assistant\n")


def test_ids_decode_to_the_chat_text(reference_cache, tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    cache = open_cache(reference_cache)
    raws = raw_samples()
    s = cache[3]
    ids = s["input_ids"]
    audio = ids == cache.audio_token_id
    collapsed = torch.cat([ids[~audio][: audio.int().argmax()], ids[audio][:1], ids[~audio][audio.int().argmax() :]])
    expected = processor.apply_chat_template(parse_conversations(raws[s["key"]].json), tokenize=False)
    assert processor.tokenizer.decode(collapsed) == expected
    assert int(audio.sum()) == len(s["inputs_embeds"][audio])  # audio tokens at 25 per second of clip
