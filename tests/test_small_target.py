"""Tone data and the small trained target: deterministic data whose answers are the notes actually played, the
cropped-audio training forward equal to the model's own, and a short training run that saves a reloadable,
seed-reproducible model directory."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.errors import ConfigError
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.shards import iter_raw_samples
from pipeline.testing import small_target
from pipeline.testing.small_target import (
    CHECKPOINT,
    CTC_ALPHABET,
    RECORD,
    SmallTargetConfig,
    _collate,
    _Example,
    _example,
    _frozen_audio,
    clip_features,
    crop_features,
    encode_audio,
    encoder_ctc_error_rate,
    merged_embeds,
    partial_dir,
    stack_features,
    tokenizer_corpus,
    train_small_target,
)
from pipeline.testing.tiny_target import build_tiny_target
from pipeline.testing.tone_data import (
    DEFAULT_TONES,
    NOTE_NAMES,
    ToneConfig,
    count_answer,
    make_tone_clip,
    make_tone_clips,
    note_frequency,
    transcription,
    write_tone_shards,
)

TINY = SmallTargetConfig(
    hidden_size=32,
    intermediate_size=64,
    d_model=32,
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    vocab_size=400,
    train_clips=8,
    eval_clips=3,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    monitor_every=2,
    monitor_clips=2,
    max_new_tokens=4,
)


def heard_notes(wave: np.ndarray) -> list[str]:
    """The note names in a clip, read from the audio: the spectral peak of each fixed-tempo note slot."""
    cfg = DEFAULT_TONES
    rate, note = cfg.sampling_rate, round(cfg.note_seconds * cfg.sampling_rate)
    step = note + round(cfg.gap_seconds * rate)
    names = []
    for start in range(round(cfg.edge_seconds * rate), len(wave) - note, step):
        spectrum = np.abs(np.fft.rfft(wave[start : start + note] * np.hanning(note), n=8 * rate))
        peak = np.argmax(spectrum) / 8  # Hz, 1/8 Hz resolution
        names.append(min(NOTE_NAMES, key=lambda n: abs(np.log2(note_frequency(n) / peak))))
    return names


def test_tone_data_is_deterministic_and_answers_name_the_notes_played():
    clips = make_tone_clips(6, seed=3)
    again = make_tone_clips(6, seed=3)
    for (wave, conv), (wave2, conv2) in zip(clips, again, strict=True):
        assert wave.dtype == np.float32 and np.array_equal(wave, wave2) and conv == conv2
    # Clip i depends on (seed, i) alone: a later slice of the stream holds the same clips.
    assert np.array_equal(make_tone_clips(2, seed=3, first=4)[1][0], clips[5][0])
    assert not np.array_equal(make_tone_clips(1, seed=4)[0][0][:1000], clips[0][0][:1000])
    for wave, conv in clips:
        assert len(wave) / DEFAULT_TONES.sampling_rate <= 4.0 and np.abs(wave).max() <= 1.0
        notes = heard_notes(wave)
        assert DEFAULT_TONES.min_notes <= len(notes) <= DEFAULT_TONES.max_notes
        assert conv[0]["content"][0] == {"type": "audio"}
        assert conv[1] == {"role": "assistant", "content": " ".join(notes)}
        if len(conv) > 2:
            assert conv[3]["content"] == count_answer(notes) == f"There are {len(notes)} notes."


def test_tone_shards_round_trip_bit_exact(tmp_path):
    shards = write_tone_shards(tmp_path / "a", n=5, seed=1, per_shard=2)
    again = write_tone_shards(tmp_path / "b", n=5, seed=1, per_shard=2)
    assert [Path(s).name for s in shards] == ["tones-000000.tar", "tones-000001.tar", "tones-000002.tar"]
    assert [Path(s).read_bytes() for s in shards] == [Path(s).read_bytes() for s in again]
    samples = [sample for shard in shards for sample in iter_raw_samples(shard)]
    for i, sample in enumerate(samples):
        clip = make_tone_clip(1, i)
        assert sample.audio_ext == "wav"
        assert np.array_equal(decode_audio(sample.audio, AudioPolicy(), "wav"), clip.wave)
        assert json.loads(sample.json)["notes"] == clip.notes
        assert parse_conversations(sample.json)[1]["content"][0]["text"] == transcription(clip.notes)


def test_cropped_training_forward_equals_the_full_length_forward():
    clips = [make_tone_clip(0, i) for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_target(Path(tmp) / "init", tokenizer_corpus(clips), TINY.tiny_config())
        processor = AutoProcessor.from_pretrained(init)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(init).eval()
    examples = [_example(processor, clip) for clip in clips]
    batch = _collate(processor, examples, pad_id=0)
    assert batch["features"]["input_features"].shape[-1] < 3000
    with torch.no_grad():
        cropped = model.model(
            inputs_embeds=merged_embeds(model, batch["input_ids"], batch["features"]),
            attention_mask=batch["attention_mask"],
        ).last_hidden_state
        for row, (example, clip) in enumerate(zip(examples, clips, strict=True)):
            full = processor.feature_extractor(
                clip.wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt"
            )
            reference = model.model(
                input_ids=example.input_ids[None],
                input_features=full["input_features"],
                feature_attention_mask=full["attention_mask"],
            ).last_hidden_state[0]
            torch.testing.assert_close(cropped[row, : len(example.input_ids)], reference, rtol=1e-5, atol=1e-5)


def test_each_clips_features_computed_once_stack_to_the_batchs_features():
    clips = [make_tone_clip(0, i) for i in range(6)]  # 1-4 notes: clips of different lengths
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_target(Path(tmp) / "init", tokenizer_corpus(clips), TINY.tiny_config())
        extractor = AutoProcessor.from_pretrained(init).feature_extractor
    waves = [clip.wave for clip in clips]
    assert len({len(w) for w in waves}) > 2
    once = clip_features(extractor, waves, batch_size=4)  # computed beside other clips than below
    for batch in ([0, 1, 2, 3, 4, 5], [5, 2], [3], [1, 4, 0]):
        stacked = stack_features([once[i] for i in batch])
        direct = crop_features(extractor, [waves[i] for i in batch])
        assert stacked.keys() == direct.keys()
        for key, value in direct.items():
            assert stacked[key].dtype == value.dtype and torch.equal(stacked[key], value), (batch, key)


def test_the_decoder_phases_audio_computed_once_equals_encoding_each_batch():
    clips = [make_tone_clip(0, i) for i in range(5)]  # 1-4 notes: clips of different lengths
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_target(Path(tmp) / "init", tokenizer_corpus(clips), TINY.tiny_config())
        processor = AutoProcessor.from_pretrained(init)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(init)
    examples = [_example(processor, clip) for clip in clips]
    assert len({len(e.wave) for e in examples}) > 2
    features = clip_features(processor.feature_extractor, [e.wave for e in examples])
    once = _frozen_audio(model, features, dataclasses.replace(TINY, eval_batch_size=2))
    batch = _collate(processor, examples[::-1], pad_id=0)  # another batch: other padding, other order
    with torch.no_grad():
        features = batch["features"]
        each = encode_audio(model, features["input_features"], features["feature_attention_mask"])
    torch.testing.assert_close(torch.cat(once[::-1]), each, rtol=1e-5, atol=1e-5)
    audio_tokens = [int((e.input_ids == model.config.audio_token_id).sum()) for e in examples]
    assert [len(a) for a in once] == audio_tokens


def test_short_training_saves_a_reloadable_reproducible_model(tmp_path):
    first = train_small_target(tmp_path / "first", TINY, progress=False)
    second = train_small_target(tmp_path / "second", TINY, progress=False)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    other = train_small_target(tmp_path / "other", dataclasses.replace(TINY, seed=1), progress=False)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()

    model = Qwen2AudioForConditionalGeneration.from_pretrained(first)
    processor = AutoProcessor.from_pretrained(first)
    assert model.config.text_config.num_hidden_layers == 8 and model.config.text_config.hidden_size == 32
    assert processor.tokenizer.tokenize(" C D") == ["ĠC", "ĠD"]  # one token per note
    record = json.loads((first / RECORD).read_text())
    assert record["config"]["seed"] == 0 and record["config"]["steps"] == 3
    assert 0.0 <= record["eval"]["exact_match"] <= 1.0 and len(record["eval"]["answers"]) == TINY.eval_clips
    assert [step for step, _ in record["held_out_teacher_forced_accuracy"]] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    with pytest.raises(FileExistsError):
        train_small_target(first, TINY, progress=False)


def test_melodies_in_thirds_climb_as_asked_and_leave_random_streams_unchanged():
    climbing = [make_tone_clip(5, i, ToneConfig(thirds=1.0)).notes for i in range(4)]
    for notes in climbing:
        steps = {(NOTE_NAMES.index(b) - NOTE_NAMES.index(a)) % 7 for a, b in zip(notes, notes[1:], strict=False)}
        assert steps == {2}, notes  # C E G B D F A C ...
    # The option draws after the notes: thirds=0 keeps every clip (and so the small target's data) as it was.
    for i in range(4):
        assert make_tone_clip(5, i, ToneConfig(thirds=0.0)).notes == make_tone_clip(5, i).notes
    mixed = [make_tone_clip(5, i, ToneConfig(thirds=0.5)).notes for i in range(40)]
    pairs = [(a, b) for notes in mixed for a, b in zip(notes, notes[1:], strict=False)]
    share = sum((NOTE_NAMES.index(b) - NOTE_NAMES.index(a)) % 7 == 2 for a, b in pairs) / len(pairs)
    assert 0.5 < share < 0.65  # 0.5 + 0.5 / 7 expected


# The options the speech target trains with (bf16 autocast, eager attention, length buckets, CTC, checkpoints),
# exercised on the melody task so that they are tested where espeak-ng is missing too (CI).
RESUMABLE = dataclasses.replace(
    TINY, steps=5, checkpoint_every=2, bf16=True, attention="eager", bucket_batches=2, ctc_weight=0.3
)


class _Stop(Exception):
    pass


# Stopped at step 2, inside the encoder's CTC phase: the resumed run crosses into the decoder's phase.
TWO_PHASES = dataclasses.replace(RESUMABLE, steps=2, ctc_weight=0.0, encoder_pretrain_steps=3)


@pytest.mark.parametrize("cfg", [RESUMABLE, TWO_PHASES], ids=["joint", "two-phase"])
def test_resumed_training_equals_uninterrupted_training(tmp_path, monkeypatch, cfg):
    whole = train_small_target(tmp_path / "whole", cfg, progress=False)

    real_save = small_target._save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Stop  # as if the process died right after its first checkpoint (step 2)

    monkeypatch.setattr(small_target, "_save_checkpoint", save_then_stop)
    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train_small_target(out, cfg, progress=False)
    assert not out.exists() and (partial_dir(out) / CHECKPOINT).is_file()
    monkeypatch.setattr(small_target, "_save_checkpoint", real_save)
    with pytest.raises(ConfigError, match="lr differ"):  # a checkpoint never continues under other settings
        train_small_target(out, dataclasses.replace(cfg, lr=1e-3), progress=False)
    train_small_target(out, cfg, progress=False)

    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    record, reference = json.loads((out / RECORD).read_text()), json.loads((whole / RECORD).read_text())
    assert record["resumed_at"] == [2] and reference["resumed_at"] == []
    for key in ("final_loss", "held_out_teacher_forced_accuracy", "held_out_encoder_ctc_cer", "eval"):
        assert record[key] == reference[key], key
    if cfg.encoder_pretrain_steps:  # checked at the monitor's steps and at the end of the encoder's phase
        assert [step for step, _ in record["held_out_encoder_ctc_cer"]] == [2, 3]
    assert not partial_dir(out).exists()


def test_the_encoders_ctc_error_rate_of_heads_that_always_say_one_thing():
    clips = [make_tone_clip(0, i) for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_target(Path(tmp) / "init", tokenizer_corpus(clips), TINY.tiny_config())
        processor = AutoProcessor.from_pretrained(init)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(init)
    examples = [_example(processor, clip, transcript=transcription(clip.notes)) for clip in clips]
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(CTC_ALPHABET) + 1)
    torch.nn.init.zeros_(head.weight)
    references = [e.transcript_ids.tolist() for e in examples]
    total = sum(len(r) for r in references)
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(0), len(CTC_ALPHABET) + 1))  # always the blank
    assert encoder_ctc_error_rate(model, head, processor, examples, batch_size=2) == 1.0  # nothing said: deletions
    a = CTC_ALPHABET.index("a") + 1
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(a), len(CTC_ALPHABET) + 1))  # always "a": one "a"
    expected = sum(len(r) - (a in r) for r in references) / total
    assert encoder_ctc_error_rate(model, head, processor, examples, batch_size=2) == pytest.approx(expected)


def test_the_decoder_phase_leaves_the_pretrained_encoder_as_it_was(tmp_path):
    """After its CTC phase the encoder is frozen: runs that differ only in decoder steps end with the same encoder
    and projector, bit for bit, and different decoders."""
    one, three = (
        Qwen2AudioForConditionalGeneration.from_pretrained(
            train_small_target(tmp_path / f"decoder-{n}", dataclasses.replace(TWO_PHASES, steps=n), progress=False)
        )
        for n in (1, 3)
    )
    a, b = one.state_dict(), three.state_dict()
    encoder = [k for k in a if ".audio_tower." in k or ".multi_modal_projector." in k]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    with pytest.raises(ValueError, match="set one of them to 0"):
        dataclasses.replace(TWO_PHASES, ctc_weight=0.5)


def test_a_second_training_into_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "target"
    partial_dir(out).mkdir()
    with open(partial_dir(out) / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another training"):
            train_small_target(out, TINY, progress=False)


def test_length_buckets_keep_every_example_once_per_epoch():
    lengths = [5, 40, 7, 33, 12, 28, 3, 50, 9, 21, 17, 45]
    examples = [_Example(np.zeros(1), torch.zeros(n), torch.zeros(n, dtype=torch.bool), 1) for n in lengths]
    cfg = dataclasses.replace(TINY, train_clips=12, batch_size=3, curriculum_steps=0, bucket_batches=2)
    order = small_target._batch_order(examples, cfg)
    epoch = [next(order) for _ in range(4)]
    assert sorted(i for batch in epoch for i in batch) == list(range(12))
    # Each batch is a run of length-sorted neighbours within its pool of 2 batches: spreads shrink.
    plain = small_target._batch_order(examples, dataclasses.replace(cfg, bucket_batches=0))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch]
    plain_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in (next(plain) for _ in range(4))]
    assert sum(spread) < sum(plain_spread)
    assert [next(small_target._batch_order(examples, cfg)) for _ in range(1)] == epoch[:1]  # a function of the seed


def test_ctc_labels_are_the_answers_characters():
    labels = small_target.ctc_labels("Well-known, isn't it?  42.")
    assert "".join(small_target.CTC_ALPHABET[i - 1] for i in labels) == "well known isn't it 42"
    assert int(labels.min()) >= 1  # 0 is the blank
    assert small_target.ctc_labels("C D E").tolist() == small_target.ctc_labels("c d e").tolist()
