"""Tests for pipeline.testing.speech_data: the fortune-sentence text, the espeak-ng clips, the saved HF dataset.

The text tests run on a fortune file written here; the corpus test needs Debian's fortunes and the speech tests
espeak-ng (both skip with the reason when the package is missing).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile as sf

from pipeline.inputs.hf_dataset import HfColumns, write_hf_shards
from pipeline.inputs.shards import iter_raw_samples
from pipeline.testing.speech_data import (
    FORTUNE_DIR,
    FORTUNE_FILES,
    SAMPLING_RATE,
    VARIANTS,
    VOICES,
    Sentence,
    SpeechConfig,
    clean_sentence,
    espeak_available,
    fortune_entries,
    load_sentences,
    make_speech_clip,
    make_speech_clips,
    sentence_split,
    speak,
    split_order,
    split_sentences,
    write_speech_dataset,
)

needs_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng): no speech to test"
)
needs_fortunes = pytest.mark.skipif(
    not all((FORTUNE_DIR / name).is_file() for name in FORTUNE_FILES),
    reason=f"Debian's fortunes are not installed in {FORTUNE_DIR} (apt-get install fortunes)",
)

FORTUNE_FILE = """\
The early bird gets the worm.  But the second mouse gets the cheese.
		-- Anonymous
%
Mr. Smith went to Washington.  He did not return.
%
A: Because it was there.
%
NASA launched it yesterday afternoon.
%
Too short.
%
Well... maybe later tonight.
%
The early bird gets the worm.
%
The Early Bird gets the   worm.
%
Wait -- what did you say to me?
%
The year 1984 was not like the book at all.
%
Patience is a virtue, and virtue is its own reward.
%
Fortune favours the brave, said the old sailor.
%
Every cloud has a silver lining somewhere.
%
Time and tide wait for no one at all.
"""
CORPUS_SENTENCES = [
    "The early bird gets the worm.",
    "But the second mouse gets the cheese.",
    "Mr. Smith went to Washington.",
    "He did not return.",
    "Patience is a virtue, and virtue is its own reward.",
    "Fortune favours the brave, said the old sailor.",
    "Every cloud has a silver lining somewhere.",
    "Time and tide wait for no one at all.",
]
# Both splits of the small corpus have sentences at 50 %.
SMALL = SpeechConfig(heldout_percent=50.0)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    (tmp_path / "proverbs").write_text(FORTUNE_FILE, encoding="utf-8")
    return tmp_path


@pytest.fixture
def corpus(corpus_dir: Path) -> tuple[Sentence, ...]:
    return load_sentences(corpus_dir, ("proverbs",))


def test_entries_drop_attributions_and_join_lines() -> None:
    text = "One line\n  and a second.\n\t\t-- Somebody Famous\n%\nNext one.\n"
    assert list(fortune_entries(text)) == ["One line and a second.", "Next one."]


def test_sentences_split_at_stops_not_at_abbreviations() -> None:
    assert split_sentences("Dr. Jekyll sat down. R. A. Heinlein wrote it! Did he? yes.") == [
        "Dr. Jekyll sat down.",
        "R. A. Heinlein wrote it!",
        "Did he? yes.",
    ]


@pytest.mark.parametrize(
    ("sentence", "kept"),
    [
        ("The cat sat on the mat.", True),
        ("It's a well-known fact; everyone knows it!", True),
        ("Too short.", False),
        ("NASA launched it.", False),
        ("A: Because it was there.", False),
        ("It has 3 legs and a tail.", False),
        ("No stop at the end of this one", False),
        ("Wait -- what did you say?", False),
        ("Well... maybe later tonight.", False),
        ("He said 'no' to them all.", False),
        ("Caf\u00e9 society is over now.", False),
        ("the cat sat on the mat.", False),  # a capital first
        ("Word " + " ".join(["word"] * 29) + ".", True),
        ("Word " + " ".join(["word"] * 30) + ".", False),  # 31 words
        ("What the hell, said the damn fool.", False),
    ],
)
def test_clean_sentence(sentence: str, kept: bool) -> None:
    assert clean_sentence(sentence) == (sentence if kept else None)


def test_corpus_is_cleaned_and_deduplicated(corpus: tuple[Sentence, ...]) -> None:
    sentences = corpus
    assert [s.text for s in sentences] == CORPUS_SENTENCES
    assert {s.source for s in sentences} == {"proverbs"}


def test_split_is_by_sentence_disjoint_and_seeded_only_in_order(corpus: tuple[Sentence, ...]) -> None:
    sentences = corpus
    train = split_order(sentences, "train", seed=0, heldout_percent=50.0)
    heldout = split_order(sentences, "heldout", seed=0, heldout_percent=50.0)
    assert train and heldout
    assert sorted(s.text for s in train + heldout) == sorted(CORPUS_SENTENCES)
    assert all(sentence_split(s.text, 50.0) == "heldout" for s in heldout)
    # The seed shuffles the order, never the membership; the split ignores case and spacing.
    other = split_order(sentences, "train", seed=1, heldout_percent=50.0)
    assert sorted(s.text for s in other) == sorted(s.text for s in train)
    assert split_order(sentences, "train", seed=0, heldout_percent=50.0) == train
    assert sentence_split("The  EARLY bird gets the worm.", 50.0) == sentence_split(
        "The early bird gets the worm.", 50.0
    )


@needs_fortunes
def test_the_fortune_corpus() -> None:
    sentences = load_sentences()
    texts = [s.text for s in sentences]
    assert len(texts) > 5000
    assert len({t.lower() for t in texts}) == len(texts)
    assert all(t.isascii() and 3 <= len(t.split()) <= 30 and clean_sentence(t) == t for t in texts)
    train = {s.text for s in split_order(sentences, "train", 0)}
    heldout = {s.text for s in split_order(sentences, "heldout", 0)}
    assert not train & heldout and len(train) + len(heldout) == len(texts)
    assert 0.08 < len(heldout) / len(texts) < 0.12  # the default 10 %


@needs_espeak
def test_same_seed_and_index_give_identical_audio(corpus: tuple[Sentence, ...], tmp_path: Path) -> None:
    sentence = Sentence("Every cloud has a silver lining somewhere.", "proverbs")
    (tmp_path / "h1").mkdir()
    (tmp_path / "h2").mkdir()
    first = make_speech_clip(sentence, 5, "train", 3, tmp_path / "h1")
    again = make_speech_clip(sentence, 5, "train", 3, tmp_path / "h2")
    assert first is not None and again is not None
    assert first.audio == again.audio and first == again
    other_seed = make_speech_clip(sentence, 6, "train", 3, tmp_path / "h1")
    assert other_seed is not None and other_seed.audio != first.audio

    # Clip i is the same however many are asked for and from where the stream starts.
    whole = list(make_speech_clips(4, 7, "train", SMALL, corpus))
    tail = list(make_speech_clips(2, 7, "train", SMALL, corpus, first=whole[2].index))
    assert [(c.key, c.audio) for c in tail] == [(c.key, c.audio) for c in whole[2:]]
    # Spoken side by side, each is the clip spoken alone.
    order = split_order(corpus, "train", 7, SMALL.heldout_percent)
    assert whole == [make_speech_clip(order[c.index], 7, "train", c.index, tmp_path / "h1", SMALL) for c in whole]


@needs_espeak
@pytest.mark.slow
def test_every_voice_and_variant_is_repeatable_in_a_fresh_home(tmp_path: Path) -> None:
    """Each default voice with each variant speaks the same bytes in two fresh HOMEs, and every variant is heard."""
    for voice in VOICES:
        spoken = []
        for variant in VARIANTS:
            homes = [tmp_path / f"{voice}{variant}-{i}" for i in range(2)]
            for home in homes:
                home.mkdir()
            waves = [speak("Sixty six silver fish.", voice + variant, 170, 50, home).tobytes() for home in homes]
            assert waves[0] == waves[1], f"{voice}{variant} is not repeatable"
            spoken.append(waves[0])
        assert len(set(spoken)) == len(VARIANTS), f"a variant of {voice} speaks like another"


@needs_espeak
def test_clips_are_16k_mono_within_bounds(corpus: tuple[Sentence, ...]) -> None:
    cfg = SpeechConfig(heldout_percent=50.0, format="flac")
    clips = list(make_speech_clips(4, 0, "heldout", cfg, corpus))  # every held-out sentence of the small corpus
    for clip in clips:
        info = sf.info(io.BytesIO(clip.audio))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLING_RATE, 1, "PCM_16", "FLAC")
        assert info.frames / SAMPLING_RATE == pytest.approx(clip.seconds, abs=1e-3)
        assert cfg.min_seconds <= clip.seconds <= cfg.max_seconds
        assert clip.key == f"heldout-0-{clip.index:06d}"
        assert clip.voice.split("+")[0] in cfg.voices and cfg.rate_wpm[0] <= clip.rate <= cfg.rate_wpm[1]

    # A clip under the lower bound is skipped, its index consumed; the others are the same clips as before.
    shortest = min(clips, key=lambda clip: clip.seconds)
    bounded_cfg = SpeechConfig(heldout_percent=50.0, format="flac", min_seconds=shortest.seconds + 1e-3)
    bounded = list(make_speech_clips(3, 0, "heldout", bounded_cfg, corpus))
    assert [(c.index, c.audio) for c in bounded] == [(c.index, c.audio) for c in clips if c is not shortest]


@needs_espeak
def test_noise_changes_only_the_audio(corpus: tuple[Sentence, ...]) -> None:
    clean = next(make_speech_clips(1, 3, "heldout", SMALL, corpus))
    noisy = next(make_speech_clips(1, 3, "heldout", SpeechConfig(heldout_percent=50.0, noise=True), corpus))
    assert (noisy.text, noisy.voice, noisy.rate, noisy.pitch, noisy.seconds) == (
        clean.text,
        clean.voice,
        clean.rate,
        clean.pitch,
        clean.seconds,
    )
    assert clean.snr_db is None and 25.0 <= noisy.snr_db <= 40.0
    assert noisy.audio != clean.audio


@needs_espeak
def test_too_few_sentences_is_an_error(corpus: tuple[Sentence, ...]) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="the train split has .* sentences and gave .* clips from index 0, not 50"):
        list(make_speech_clips(50, 0, "train", SMALL, corpus))


@needs_espeak
@pytest.mark.slow
def test_dataset_on_disk_converts_to_shards(corpus: tuple[Sentence, ...], tmp_path: Path) -> None:
    """The saved corpus is an HF audio dataset that make-shards converts like any user's (seconds: datasets)."""
    train = write_speech_dataset(tmp_path / "train", 3, 0, "train", SMALL, corpus)
    heldout = write_speech_dataset(tmp_path / "heldout", 2, 0, "heldout", SMALL, corpus)
    assert str(train.features["audio"]) == str(heldout.features["audio"])
    assert train.features["audio"].sampling_rate == SAMPLING_RATE and not train.features["audio"].decode
    assert not set(train["text"]) & set(heldout["text"])

    clips = list(make_speech_clips(3, 0, "train", SMALL, corpus))
    assert train["key"] == [c.key for c in clips]
    assert [row["audio"]["bytes"] for row in train] == [c.audio for c in clips]

    report = write_hf_shards(tmp_path / "train", str(tmp_path / "s-%06d.tar"), HfColumns(text="text", key="key"))
    samples = [s for shard in report.shards for s in iter_raw_samples(shard)]
    assert [(s.key, s.audio_ext, s.audio) for s in samples] == [(c.key, "wav", c.audio) for c in clips]
    assert [json.loads(s.json)["conversations"][1]["content"] for s in samples] == [c.text for c in clips]
