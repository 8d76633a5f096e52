"""The speech task of the small target (pipeline.testing.speech_target): error rates on exact examples, the clips it
trains on, and a CI-sized training that saves a model directory the pipeline loads, reproducible from its seed.

The clip and training tests need espeak-ng and Debian's fortunes; each skips with the reason when one is missing
(CI has neither). The error-rate tests need nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import soundfile as sf
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.targets import load_target
from pipeline.testing.error_rates import edit_distance, error_rate
from pipeline.testing.small_target import RECORD, _normalised, float_wave, partial_dir, train_small_target
from pipeline.testing.speech_data import FORTUNE_DIR, FORTUNE_FILES, espeak_available, make_speech_clips
from pipeline.testing.speech_target import (
    SPEECH_PROMPTS,
    SpeechTargetConfig,
    character_error_rate,
    normalise_transcript,
    speech_clip,
    transcription_scores,
    word_error_rate,
)

needs_speech = pytest.mark.skipif(
    not espeak_available() or not all((FORTUNE_DIR / name).is_file() for name in FORTUNE_FILES),
    reason="espeak-ng or Debian's fortunes is not installed (apt-get install espeak-ng fortunes): no speech corpus",
)

# CI size: tiny widths, a handful of clips and steps; the speech defaults (bf16, eager attention, length buckets,
# encoder pre-training then the frozen-encoder decoder phase, checkpoints) stay on so that their paths run.
CI = SpeechTargetConfig(
    hidden_size=32,
    intermediate_size=64,
    d_model=32,
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    vocab_size=400,
    train_clips=8,
    eval_clips=2,
    curriculum_steps=2,
    encoder_pretrain_steps=2,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    bucket_batches=2,
    checkpoint_every=2,
    monitor_every=2,
    monitor_clips=2,
    max_new_tokens=6,
    threads=1,  # a pytest worker per core
)


def test_edit_distance_and_error_rates_on_exact_examples():
    assert edit_distance("kitten", "sitting") == 3  # two substitutions, one insertion
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    # Corpus rates: edits summed over sentences / reference length summed (3 + 1) / (6 + 4).
    assert error_rate(["kitten", "abcd"], ["sitting", "abce"]) == pytest.approx(0.4)
    assert error_rate(["ab"], ["abxyz"]) == pytest.approx(1.5)  # insertions can push it past 1
    with pytest.raises(ValueError, match="empty"):
        error_rate([""], ["x"])


def test_transcripts_are_scored_without_case_and_punctuation():
    assert normalise_transcript("  Don't PANIC, it's  fine! ") == "don't panic it's fine"
    assert normalise_transcript("well-known; 42.") == "well known 42"
    references = ["The cat sat.", "Hello, world!"]
    assert character_error_rate(references, ["the cat sat", "hello world"]) == 0.0
    assert word_error_rate(references, ["the cat sat", "hello world"]) == 0.0
    # "the bat sat" vs "the cat sat": 1 of 11 + 11 characters ("the cat sat", "hello world"), 1 of 5 words.
    assert character_error_rate(references, ["The bat sat.", "Hello world."]) == pytest.approx(1 / 22)
    assert word_error_rate(references, ["The bat sat.", "Hello world."]) == pytest.approx(1 / 5)
    scores = transcription_scores(references, ["the cat sat", "Hello world"])
    assert (scores["cer"], scores["wer"], scores["exact_match"], scores["clips"]) == (0.0, 0.0, 1.0, 2)
    assert scores["cer_raw"] == pytest.approx(4 / 25)  # "T" and "." of the first, "," and "!" of the second
    assert scores["answers"][0] == {"expected": "The cat sat.", "generated": "the cat sat"}


@needs_speech
def test_speech_clips_ask_for_a_transcript_and_answer_with_the_sentence():
    made = list(make_speech_clips(6, seed=2, split="train"))
    clips = [speech_clip(c, seed=2) for c in made]
    again = [speech_clip(c, seed=2) for c in make_speech_clips(6, seed=2, split="train")]
    for source, clip, twin in zip(made, clips, again, strict=True):
        assert clip.wave.dtype == np.int16 and np.array_equal(clip.wave, twin.wave)
        assert np.array_equal(clip.wave, sf.read(io.BytesIO(source.audio), dtype="int16")[0])
        user, answer = clip.conversations
        assert user["content"][0] == {"type": "audio"} and user["content"][1]["text"] in SPEECH_PROMPTS
        assert user == twin.conversations[0]  # the instruction is drawn from (seed, split, index) too
        assert answer == {"role": "assistant", "content": source.text} and clip.answer == source.text
        assert clip.difficulty == len(source.text.split())
    # The same scale soundfile decodes a shard's 16-bit wav with.
    assert np.array_equal(float_wave(clips[0].wave), sf.read(io.BytesIO(made[0].audio), dtype="float32")[0])


@pytest.mark.slow
@needs_speech
def test_ci_sized_speech_training_saves_a_loadable_reproducible_target(tmp_path):
    first = train_small_target(tmp_path / "first", CI, progress=False)
    second = train_small_target(tmp_path / "second", CI, progress=False)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    other = train_small_target(tmp_path / "other", dataclasses.replace(CI, seed=1), progress=False)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert not partial_dir(first).exists()

    record = json.loads((first / RECORD).read_text())
    assert record["task"] == "speech" and record["config"]["steps"] == CI.steps
    assert record["eval"]["clips"] == CI.eval_clips and record["eval"]["cer"] >= 0.0 and record["eval"]["wer"] >= 0.0
    # Checked every 2 steps of the decoder's phase, counted from the start of training (none in the encoder's).
    assert [step for step, _ in record["held_out_teacher_forced_accuracy"]] == [4, 6]
    assert [step for step, _ in record["held_out_encoder_ctc_cer"]] == [2]  # the encoder's CTC, at its phase's end

    model = Qwen2AudioForConditionalGeneration.from_pretrained(first)
    assert model.config.text_config.num_hidden_layers == 8 and model.config.text_config.hidden_size == 32
    assert len(AutoProcessor.from_pretrained(first).tokenizer) <= CI.vocab_size
    target = load_target(str(first), "float32", "cpu")
    assert target.default_layers() == [2, 4, 5]
    clip = speech_clip(next(iter(make_speech_clips(1, seed=0, split="heldout"))), seed=0)
    prompt = target.generation_inputs(_normalised(clip.conversations[:1]), float_wave(clip.wave), 4096)
    (answer,) = target.generate([prompt], max_new_tokens=4)
    assert 1 <= len(answer) <= 4 and isinstance(target.decode(answer), str)
