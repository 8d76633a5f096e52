"""Synthetic melody-transcription data: clips of pure tones and conversations that name the notes in order.

It exists to give a small Qwen2-Audio target something audio-dependent to learn with long, deterministic
answers (one token per note), so that a draft's acceptance length can be measured against a target that is
not random. Pure numpy: no speech synthesiser, no downloads.

Every clip is seeded from ``(seed, index)`` alone, so clip ``i`` is the same whatever ``n`` is asked for, and
held-out clips are simply the indices after the training ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.inputs.conversation import Message
from pipeline.inputs.shards import write_shards

NOTE_NAMES: tuple[str, ...] = ("C", "D", "E", "F", "G", "A", "B")
# MIDI numbers of C6..B6. Octave 6 because Whisper's 25 ms window resolves ~40 Hz: a semitone there is 62 Hz
# or more (E6-F6), whereas at octave 4 E and F are 20 Hz apart and blur into one mel bin.
NOTE_MIDI: tuple[int, ...] = (84, 86, 88, 89, 91, 93, 95)

TRANSCRIBE_PROMPTS: tuple[str, ...] = (
    "Transcribe the melody.",
    "Which notes are played?",
    "Write down the notes you hear.",
    "Name the notes in order.",
)
COUNT_PROMPT = "How many notes?"


def note_frequency(name: str) -> float:
    return 440.0 * 2.0 ** ((NOTE_MIDI[NOTE_NAMES.index(name)] - 69) / 12)


def transcription(notes: list[str]) -> str:
    """The assistant's answer: note names separated by spaces (Qwen2's pre-tokenizer makes each one token)."""
    return " ".join(notes)


def count_answer(notes: list[str]) -> str:
    return "There is 1 note." if len(notes) == 1 else f"There are {len(notes)} notes."


@dataclass(frozen=True)
class ToneConfig:
    """Shape of the clips: at most 0.08 + 16 * 0.16 + 15 * 0.04 + 0.08 = 3.32 s (83 audio tokens of 40 ms).

    The tempo is fixed, so note k always starts 0.08 + 0.2 k s into the clip (audio token 2 + 5 k). With note and
    gap lengths drawn at random (0.12-0.18 s and 0.03-0.05 s) the model must count onsets to find note k; a 2M
    parameter target did not learn that in 5 CPU minutes (24% of notes right, no melody exact), while at a fixed
    tempo it learns the alignment in ~300 steps.
    """

    sampling_rate: int = 16000
    min_notes: int = 6
    max_notes: int = 16
    note_seconds: float = 0.16  # 4 audio tokens
    gap_seconds: float = 0.04  # silence between notes, so repeated notes stay separable
    edge_seconds: float = 0.08  # silence before the first and after the last note
    amplitude: tuple[float, float] = (0.2, 0.7)  # per note
    fade_seconds: float = 0.005  # linear ramps: a hard onset is a broadband click that smears the spectrum
    noise_std: float = 0.005
    count_fraction: float = 0.2  # share of two-turn conversations (transcribe, then "How many notes?")
    # The chance that each note after the first climbs a third from the one before (C E G B D F A C ...), else it
    # is drawn at random. 0: random notes, which only the audio can tell. Above 0 the answers follow a "language"
    # a draft can learn from the text, as transcripts of speech do, and the audio still decides every deviation.
    thirds: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_notes <= self.max_notes:
            raise ValueError(f"need 1 <= min_notes <= max_notes, got {self.min_notes}, {self.max_notes}")
        if not 0.0 <= self.count_fraction <= 1.0:
            raise ValueError(f"count_fraction must be in [0, 1], got {self.count_fraction}")
        if not 0.0 <= self.thirds <= 1.0:
            raise ValueError(f"thirds must be in [0, 1], got {self.thirds}")


DEFAULT_TONES = ToneConfig()
# A draft's data (`just pipeline`, `just quality`): transcriptions only (the answers eval-draft generates), long
# melodies that mostly climb in thirds: a "language" the draft can learn, with the audio deciding every deviation.
DRAFT_TONES = ToneConfig(min_notes=12, max_notes=16, count_fraction=0.0, thirds=0.85)


@dataclass(frozen=True)
class ToneClip:
    wave: np.ndarray  # [samples] float32 at cfg.sampling_rate, on the int16 grid (exactly what a PCM_16 wav decodes to)
    conversations: list[Message]
    notes: list[str]


def _samples(seconds: float, cfg: ToneConfig) -> int:
    return round(seconds * cfg.sampling_rate)


def _tone(rng: np.random.Generator, freq: float, cfg: ToneConfig) -> np.ndarray:
    t = np.arange(_samples(cfg.note_seconds, cfg)) / cfg.sampling_rate
    wave = rng.uniform(*cfg.amplitude) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    ramp = min(_samples(cfg.fade_seconds, cfg), len(t) // 2)
    envelope = np.ones(len(t))
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
    envelope[len(t) - ramp :] = envelope[:ramp][::-1]
    return wave * envelope


def _clip_notes(rng: np.random.Generator, cfg: ToneConfig) -> list[str]:
    count = int(rng.integers(cfg.min_notes, cfg.max_notes + 1))
    drawn = rng.integers(0, len(NOTE_NAMES), count)
    if cfg.thirds:  # drawn after the notes, so thirds=0 keeps every stream exactly as before the option existed
        climbs = rng.random(count) < cfg.thirds
        for i in range(1, count):
            if climbs[i]:
                drawn[i] = (drawn[i - 1] + 2) % len(NOTE_NAMES)
    return [NOTE_NAMES[i] for i in drawn]


def make_tone_clip(seed: int, index: int, cfg: ToneConfig = DEFAULT_TONES) -> ToneClip:
    """Clip ``index`` of the stream for ``seed``: depends on these two numbers and ``cfg`` only."""
    rng = np.random.default_rng([seed, index])
    notes = _clip_notes(rng, cfg)
    edge, gap = np.zeros(_samples(cfg.edge_seconds, cfg)), np.zeros(_samples(cfg.gap_seconds, cfg))
    parts = [edge]
    for i, name in enumerate(notes):
        if i:
            parts.append(gap)
        parts.append(_tone(rng, note_frequency(name), cfg))
    wave = np.concatenate([*parts, edge])
    wave = wave + rng.normal(0.0, cfg.noise_std, len(wave))
    # Quantised to int16 so the in-memory clip and the one decoded from a shard's wav are bit-identical.
    pcm = np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)

    turns: list[Message] = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": str(rng.choice(TRANSCRIBE_PROMPTS))}]},
        {"role": "assistant", "content": transcription(notes)},
    ]
    if rng.random() < cfg.count_fraction:
        turns.append({"role": "user", "content": COUNT_PROMPT})
        turns.append({"role": "assistant", "content": count_answer(notes)})
    return ToneClip(pcm.astype(np.float32) / 32768, turns, notes)


def make_tone_clips(
    n: int, seed: int, cfg: ToneConfig = DEFAULT_TONES, first: int = 0
) -> list[tuple[np.ndarray, list[Message]]]:
    """Clips ``first .. first + n - 1`` as (16 kHz mono float32 wave, conversations)."""
    clips = [make_tone_clip(seed, i, cfg) for i in range(first, first + n)]
    return [(clip.wave, clip.conversations) for clip in clips]


def write_tone_shards(
    out_dir: Path, n: int, seed: int, per_shard: int = 100, cfg: ToneConfig = DEFAULT_TONES, first: int = 0
) -> list[str]:
    """Write clips ``first .. first + n - 1`` as webdataset shards ``out_dir/tones-%06d.tar`` (16-bit wav + json
    with the conversations and the notes); return the shard paths. Byte-identical for the same arguments."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        # Through a manifest so the shards are validated and laid out exactly as make-shards would write them.
        manifest = Path(tmp) / "manifest.jsonl"
        with manifest.open("w", encoding="utf-8") as f:
            for i in range(first, first + n):
                clip = make_tone_clip(seed, i, cfg)
                key = f"tone-{seed}-{i:07d}"
                pcm = np.round(clip.wave * 32768).astype(np.int16)
                sf.write(Path(tmp) / f"{key}.wav", pcm, cfg.sampling_rate, subtype="PCM_16")
                record = {"key": key, "audio": f"{key}.wav", "conversations": clip.conversations, "notes": clip.notes}
                f.write(json.dumps(record) + "\n")
        return write_shards(manifest, str(out_dir / "tones-%06d.tar"), max_count=per_shard)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write melody clips (a draft's data, DRAFT_TONES) as webdataset shards.")
    p.add_argument("out", type=Path, help="directory for tones-%%06d.tar")
    p.add_argument("--count", type=int, default=480)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--thirds", type=float, default=DRAFT_TONES.thirds, help="0: random notes")
    a = p.parse_args(argv)
    if a.count < 1 or a.per_shard < 1 or not 0 <= a.thirds <= 1:
        p.error("--count and --per-shard must be at least 1, --thirds within [0, 1]")
    shards = write_tone_shards(a.out, a.count, a.seed, a.per_shard, dataclasses.replace(DRAFT_TONES, thirds=a.thirds))
    print(f"{a.count} melody clips in {len(shards)} shards under {a.out}")


if __name__ == "__main__":
    main()
