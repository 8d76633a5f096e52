"""The speech task of the small target: transcribe English sentences spoken by espeak-ng.

Clips come from pipeline.testing.speech_data, synthesised in memory (the same audio its HF dataset would hold for
the same seed, split and index): the first `train_clips` of the train split train, the first `eval_clips` of the
held-out split (other sentences, by a hash of their text) are scored. The user turn is the audio and one of a few
instructions, "Transcribe the audio." (what `make-shards --hf-dataset` writes for a transcript column) among them;
the answer is the sentence as written. The tokenizer is a byte-level BPE trained on the tiny target's built-in text
plus the training conversations, so frequent words are one token.

Scored by character and word error rates on normalised text (lower case, punctuation dropped: what the audio can
tell), plus the raw character error rate and exact matches. `python -m stages.bench.train_small_target OUT --task
speech` trains it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import soundfile as sf

from pipeline.inputs.hf_dataset import DEFAULT_INSTRUCTION
from pipeline.settings import setting
from pipeline.testing.error_rates import error_rate
from pipeline.testing.small_target import Clip, Task, TrainerConfig, cpu_has_native_bf16, tokenizer_corpus
from pipeline.testing.speech_data import (
    SPLITS,
    SpeechClip,
    SpeechConfig,
    Split,
    load_sentences,
    make_speech_clips,
)

SPEECH_PROMPTS: tuple[str, ...] = (
    DEFAULT_INSTRUCTION,  # "Transcribe the audio.": the instruction of shards made from a transcript column
    "What does the speaker say?",
    "Write down what is said.",
    "Transcribe this recording.",
)
# Published EAGLE-3 acceptance lengths on real audio LLMs (7B-class targets; not comparable to a 3M-parameter one).
PUBLISHED_ANCHORS = (
    "3.51 on LibriSpeech (Qwen2-Audio-7B-Instruct, AngelSlim's EAGLE-3 draft, served by vLLM)",
    "3.37 on AISHELL (SGLang PR 33051)",
    "3.12 on LibriSpeech test-clean (Qwen3-Omni, SGLang PR 33051)",
)
_PROMPT_STREAM = 7  # salt: the prompt's draw is independent of speech_data's voice, rate and pitch draws
# The target's speech: still several voices (three of espeak-ng's English accents, each also as its female variant),
# rates and pitches, but narrower than the corpus's defaults and at most 8 s (~4% of the sentences are longer), so a
# from-scratch model can learn it within 30 CPU minutes. On the full variety (8 voices x 6 variants, 130-200 wpm,
# pitch 30-70, up to 15 s) 1300 steps reached a held-out teacher-forced accuracy of only 0.285; on this one the
# same model was at 0.169 after 300 steps (the full variety: ~0.13 at 250) and at 0.30 after 1000 joint steps
# (26 CPU minutes; held-out greedy CER 0.66, WER 0.93). Pre-training the encoder by CTC and then freezing it (the
# defaults below) reached 0.42 in the same time (CER 0.54, WER 0.78): the decoder learns to read an encoder that
# already tells characters apart much faster than both learn together. Its 800 decoder steps were far from done (the
# accuracy still rising, the cosine schedule spent): 2000 reached 0.755 (CER 0.22, WER 0.41) in 45 CPU minutes on an
# AVX2-only CPU, against 0.42 (CER 0.52) in 34 - over the 30-minute goal, for a target whose answers say what was
# spoken and are confident enough for a draft to follow (BENCHMARKS.md, 2026-12-03). Encoding each clip once for the
# decoder phase (the encoder is frozen) brought the training to 38.5 CPU minutes (CER 0.23; results/speech-target/).
# On two threads (the default since) 2400 decoder steps took 26 minutes, 28.6 from nothing (CER 0.21, WER 0.39),
# but the teacher-forced accuracy ended where 2000 steps had (0.76): more decoder steps no longer raise it, the frozen
# encoder is the next lever.
TARGET_SPEECH = SpeechConfig(
    max_seconds=8.0,
    voices=("en-us", "en", "en-gb-scotland"),
    variants=("", "+f1"),
    rate_wpm=(150, 190),
    pitch=(40, 60),
)


@dataclass(frozen=True)
class SpeechTargetConfig(TrainerConfig):
    """The speech target's sizes and schedule (see the module docstring for the data)."""

    # Sizes and schedule: see the README's speech target section for what was measured.
    intermediate_size: int = setting(384, "text model MLP width")
    encoder_layers: int = setting(3, "audio encoder layers")
    encoder_ffn_dim: int = setting(512, "audio encoder MLP width")
    vocab_size: int = setting(1024, "tokenizer size (the builder pads the embedding table past it)")
    train_clips: int = setting(6000, "training clips (the first of the seed's train split; ~6800 are at most 8 s)")
    eval_clips: int = setting(200, "held-out clips for the greedy evaluation (the split has ~800)")
    curriculum_steps: int = setting(300, "step s draws sentences of at most 1 + (max - 1) * s / curriculum_steps words")
    encoder_pretrain_steps: int = setting(
        1200, "steps of CTC on the audio encoder alone before `steps` steps of the decoder on it, frozen (0: joint)"
    )
    steps: int = setting(2400, "decoder steps (after the encoder's)")
    warmup_steps: int = setting(60, "linear warm-up steps")
    bf16: bool = setting(
        cpu_has_native_bf16(),
        "train under bfloat16 autocast (weights, optimizer and evaluation stay float32; default: where the CPU has "
        "native bf16, AMX or AVX512-BF16)",
    )
    attention: Literal["sdpa", "eager"] = setting("eager", "attention kernel while training")
    bucket_batches: int = setting(
        8, "after the curriculum, batch clips of similar length from pools of this many batches (0: off)"
    )
    ctc_weight: float = setting(0.0, "weight of CTC on the audio embeddings in joint training (no pre-training)")
    max_new_tokens: int = setting(64, "longest generated answer in the evaluation")
    monitor_every: int = setting(100, "steps between teacher-forced accuracy checks on held-out clips (0: off)")
    # Trained alone, the target has the machine: on the idle 2-core VM two threads made a decoder step 1.76x faster
    # than one (0.54 s against 0.95, batch of 16); eager and sdpa attention were level (0.95 / 0.93 s).
    threads: int = setting(min(2, os.cpu_count() or 1), "torch CPU threads (default: the cores, at most 2)")
    speech: SpeechConfig = setting(TARGET_SPEECH, flag=None)

    def task(self) -> Task:
        return SpeechTask(self)


class SpeechTask:
    """Sentences spoken by espeak-ng, answered with their text."""

    name = "speech"

    def __init__(self, cfg: SpeechTargetConfig) -> None:
        self.cfg = cfg

    def clips(self) -> tuple[list[Clip], list[Clip]]:
        return self._split("train", self.cfg.train_clips), self._split("heldout", self.cfg.eval_clips)

    def _split(self, split: Split, count: int) -> list[Clip]:
        sentences = load_sentences()
        made = make_speech_clips(count, self.cfg.seed, split, self.cfg.speech, sentences)
        return [speech_clip(clip, self.cfg.seed) for clip in made]

    def tokenizer_corpus(self, train: list[Clip]) -> list[str]:
        return tokenizer_corpus(train)

    def score(self, held_out: list[Clip], answers: list[str]) -> dict[str, Any]:
        return transcription_scores([c.answer for c in held_out], answers)


def speech_clip(clip: SpeechClip, seed: int) -> Clip:
    """A synthesised clip as a training example: int16 samples (half the memory of float32), a drawn instruction."""
    wave, _ = sf.read(io.BytesIO(clip.audio), dtype="int16")
    rng = np.random.default_rng([seed, SPLITS.index(clip.split), clip.index, _PROMPT_STREAM])
    prompt = SPEECH_PROMPTS[int(rng.integers(len(SPEECH_PROMPTS)))]
    conversations = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": clip.text},
    ]
    return Clip(wave, conversations, clip.text, len(clip.text.split()))


# ---------------------------------------------------------------------------------------------
# Error rates
# ---------------------------------------------------------------------------------------------


def normalise_transcript(text: str) -> str:
    """Lower case, every run of characters other than letters, digits and apostrophes one space: the form a
    transcript is scored in (case and punctuation are the text's, not the audio's)."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """CER of normalised text, spaces included."""
    return error_rate([normalise_transcript(r) for r in references], [normalise_transcript(h) for h in hypotheses])


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """WER of normalised text."""
    return error_rate(
        [normalise_transcript(r).split() for r in references], [normalise_transcript(h).split() for h in hypotheses]
    )


def transcription_scores(references: list[str], answers: list[str]) -> dict[str, Any]:
    """The speech task's figures: normalised CER and WER, raw CER (case and punctuation counted), exact matches
    of the normalised text, and every (expected, generated) pair."""
    exact = [normalise_transcript(r) == normalise_transcript(a) for r, a in zip(references, answers, strict=True)]
    return {
        "clips": len(references),
        "cer": character_error_rate(references, answers),
        "wer": word_error_rate(references, answers),
        "cer_raw": error_rate(references, answers),
        "exact_match": sum(exact) / len(references),
        "answers": [{"expected": r, "generated": a} for r, a in zip(references, answers, strict=True)],
    }
