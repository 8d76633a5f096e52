"""A small Qwen2-Audio target trained to transcribe, so that a draft has something real to predict.

The random tiny target (pipeline.testing.tiny_target) has learned nothing, so its answers carry no structure a
draft could pick up. This one starts from the same builder (tokenizer, processor, chat template, config layout) and
trains the whole model (audio encoder, projector, language model) with teacher forcing on the assistant tokens of
a task's clips. One training loop serves every task; a task (`Task`) says where the clips and the tokenizer's
corpus come from and how answers are scored:

- melody (this module, `SmallTargetConfig`): synthetic melodies (pipeline.testing.tone_data), in under 5 minutes
  on one CPU core. Its answers are long (6-16 notes, one token each), deterministic and depend on the audio.
- speech (pipeline.testing.speech_target, `SpeechTargetConfig`): English sentences spoken by espeak-ng.

Where the time goes: the Whisper-style encoder insists on 3000 mel frames (30 s); on a <= 4 s clip that was ~80% of
a training step. The encoder never lets a real frame see a padded one (padded keys are masked, and convolution,
pooling and norms are local), so training runs it on the first frames only (`encode_audio`), which gives the
same numbers as the full-length forward (checked by the tests). What remains is the language model's matmuls.
Evaluation uses the stock processor and `generate`, i.e. the full 3000 frames, so the saved model is scored
exactly as the pipeline will use it.

Training is resumable: every `checkpoint_every` steps the model, optimizer, schedule and history go to
`.OUT.partial/checkpoint.pt` next to OUT, and a later call with the same config continues from there, with the
same weights as an uninterrupted run (the data order is a function of the seed, replayed up to the step).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from pipeline.errors import ConfigError
from pipeline.inputs.conversation import Message, text_of
from pipeline.inputs.prompt import build_prompt, render_chat
from pipeline.settings import setting
from pipeline.targets.qwen2_audio import AUDIO_TOKEN, audio_token_count
from pipeline.testing.error_rates import error_rate
from pipeline.testing.tiny_target import TinyTargetConfig, build_tiny_target, default_corpus
from pipeline.testing.tone_data import DEFAULT_TONES, ToneConfig, make_tone_clip, transcription

RECORD = "small_target.json"
CHECKPOINT = "checkpoint.pt"
# Zero samples kept after the longest clip of a batch when its features are cropped: more than the STFT's half
# window (200 samples, so the last real frames see the same zeros as at full length) plus a few frames for the
# convolutions' receptive field.
CROP_MARGIN_SAMPLES = 1600
MAX_PROMPT_TOKENS = 4096
TRIM_EVERY = 25  # steps between heap trims (`_return_freed_memory`)
# The CTC loss's classes after the blank (0): characters, not the tokenizer's tokens. Encoder-only CTC on espeak
# speech left its blank plateau within 100 steps on characters (held-out CER 0.40 at step 300), while token CTC (1024
# classes, each rare) still emitted only blanks after 400 joint steps.
CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"


@dataclass(frozen=True, eq=False)
class Clip:
    """One example of a task: audio, its conversation, the reference answer to its first question and its
    difficulty (the curriculum's key: notes in a melody, words in a sentence)."""

    wave: np.ndarray  # 16 kHz mono: float32 in [-1, 1], or int16 PCM (half the memory for hours of speech)
    conversations: list[Message]
    answer: str
    difficulty: int


class AudioConversation(Protocol):
    """What `_example` reads: a `Clip` or a tone_data.ToneClip."""

    wave: np.ndarray
    conversations: list[Message]


class Task(Protocol):
    """Where a small target's clips and tokenizer corpus come from, and how its answers are scored."""

    name: str

    def clips(self) -> tuple[list[Clip], list[Clip]]:
        """(training clips, held-out clips), determined by the config's seed."""
        ...

    def tokenizer_corpus(self, train: list[Clip]) -> list[str]: ...

    def score(self, held_out: list[Clip], answers: list[str]) -> dict[str, Any]:
        """Figures for the greedy answers to each held-out clip's first question (and the answers themselves)."""
        ...


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16, Linux flags). There bf16 matmuls ran 4-5x
    faster than float32; elsewhere they are emulated: on an AVX2-only AMD EPYC (Zen 3) a [2048, 128] x [128, 384]
    matmul ran at 1.9 GFLOPS in bf16 against 72 in float32, and the speech target's step took 4 s instead of ~1."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class TrainerConfig:
    """What training shares across tasks (sizes, optimisation, evaluation); a task's config adds its data and
    may change the defaults. The defaults are the melody target's."""

    seed: int = setting(0, "initialisation, data and data order")
    # Text model (Qwen2): 8 layers so EAGLE-3's default aux layers 2, L//2, L-3 = 2, 4, 5 are distinct.
    hidden_size: int = setting(128, "text model width")
    num_hidden_layers: int = setting(8, "text model layers")
    num_attention_heads: int = setting(4, "text model attention heads")
    num_key_value_heads: int = setting(2, "text model key/value heads")
    intermediate_size: int = setting(256, "text model MLP width")
    # Audio encoder (Whisper-style).
    d_model: int = setting(128, "audio encoder width")
    encoder_layers: int = setting(2, "audio encoder layers")
    encoder_attention_heads: int = setting(4, "audio encoder attention heads")
    encoder_ffn_dim: int = setting(256, "audio encoder MLP width")
    vocab_size: int = setting(1000, "tokenizer size (the builder pads the embedding table past it)")
    train_clips: int = setting(2000, "training clips")
    eval_clips: int = setting(100, "held-out clips for the greedy evaluation")
    # Easy examples first teach the decoder where the audio is before it has to find the k-th of many notes or
    # words.
    curriculum_steps: int = setting(
        120, "step s draws examples of difficulty (notes, words) at most 1 + (max - 1) * s / curriculum_steps"
    )
    # Optimisation.
    steps: int = setting(500, "optimizer steps")
    batch_size: int = setting(16, "clips per step")
    lr: float = setting(2e-3, "peak AdamW learning rate")
    min_lr_ratio: float = setting(0.05, "final learning rate as a share of the peak")
    warmup_steps: int = setting(30, "linear warm-up steps")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip")
    # On CPUs with AMX or avx512_bf16, bf16 matmuls ran 4-5x faster than float32 here.
    bf16: bool = setting(False, "train under bfloat16 autocast (weights, optimizer and evaluation stay float32)")
    # Measured on this CPU at width 128: eager 0.8 s a step, sdpa 1.6 s (its bf16 backward is slow). Not saved: the
    # model directory keeps transformers' default.
    attention: Literal["sdpa", "eager"] = setting("sdpa", "attention kernel while training")
    # Speech clips of 1-15 s in random batches were ~40% padding.
    bucket_batches: int = setting(
        0, "after the curriculum, batch clips of similar length from pools of this many batches (0: off)"
    )
    # Hybrid CTC/attention training (Watanabe et al. 2017): a CTC loss on the audio embeddings makes the encoder
    # learn to tell tokens apart long before the decoder has learned where to look. The head is not saved.
    ctc_weight: float = setting(0.0, "weight of an auxiliary CTC loss on the audio embeddings (0: off)")
    # Two phases instead (the speech target's): the encoder and projector learn characters by CTC alone (~3x cheaper
    # steps: no decoder), then stay frozen while the decoder learns to read them. On espeak speech the decoder was at
    # a held-out teacher-forced accuracy of 0.236 after 300 steps on a pre-trained encoder against 0.170 jointly.
    encoder_pretrain_steps: int = setting(
        0, "steps of CTC on the audio encoder alone before `steps` steps of the decoder on it, frozen (0: joint)"
    )
    # On a shared 2-core machine two threads that wait on each other were up to 40x slower than one.
    threads: int = setting(1, "torch CPU threads (results are reproducible for a fixed count)")
    checkpoint_every: int = setting(100, "steps between resumable checkpoints in .OUT.partial (0: none)")
    # Held-out greedy evaluation.
    eval_batch_size: int = setting(25, "clips generated together in the evaluation")
    max_new_tokens: int = setting(24, "longest generated answer in the evaluation")
    monitor_every: int = setting(50, "steps between teacher-forced accuracy checks on held-out clips (0: off)")
    monitor_clips: int = setting(50, "held-out clips in those checks")

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_clips, self.threads) < 1 or not self.lr > 0:
            raise ValueError("steps, batch_size, eval_clips, threads and lr must be positive")
        if self.train_clips < self.batch_size:
            raise ValueError(f"train_clips ({self.train_clips}) must be at least batch_size ({self.batch_size})")
        counts = (self.curriculum_steps, self.warmup_steps, self.monitor_every, self.monitor_clips)
        if min(*counts, self.checkpoint_every, self.bucket_batches, self.ctc_weight, self.encoder_pretrain_steps) < 0:
            raise ValueError(
                "curriculum_steps, warmup_steps, monitor_every, monitor_clips, checkpoint_every, bucket_batches, "
                "ctc_weight and encoder_pretrain_steps must not be negative"
            )
        if self.encoder_pretrain_steps and self.ctc_weight:
            raise ValueError(
                "ctc_weight is the weight of CTC in joint training; after encoder_pretrain_steps the encoder is frozen "
                "and CTC would teach nothing: set one of them to 0"
            )

    @property
    def total_steps(self) -> int:
        return self.encoder_pretrain_steps + self.steps

    @property
    def uses_ctc(self) -> bool:
        return bool(self.ctc_weight or self.encoder_pretrain_steps)

    def task(self) -> Task:
        raise NotImplementedError(f"{type(self).__name__} names no task")

    def tiny_config(self) -> TinyTargetConfig:
        return TinyTargetConfig(
            seed=self.seed,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            encoder_attention_heads=self.encoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            vocab_size=self.vocab_size,
        )


@dataclass(frozen=True)
class SmallTargetConfig(TrainerConfig):
    """The melody target: clips 0 .. train_clips - 1 of the seed's tone stream train, the next eval_clips are
    held out."""

    tones: ToneConfig = setting(DEFAULT_TONES, flag=None)
    # Short melodies first teach the decoder where the audio is and how a pitch sounds, before it has to find the
    # k-th of 16 notes (held-out melodies start at tones.min_notes).
    train_min_notes: int = setting(1, "training melodies start at this many notes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.train_min_notes <= self.tones.max_notes:
            raise ValueError(f"train_min_notes must be in [1, {self.tones.max_notes}], got {self.train_min_notes}")

    def task(self) -> Task:
        return MelodyTask(self)


@dataclass(frozen=True)
class ClipFeatures:
    """One clip's Whisper features [mel, frames] and feature attention mask [frames], cropped to its own frames."""

    features: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Example:
    wave: np.ndarray
    input_ids: torch.Tensor  # [T], audio placeholder expanded
    loss_mask: torch.Tensor  # [T] bool, assistant tokens
    difficulty: int
    transcript_ids: torch.Tensor | None = None  # [n] the answer's characters (`ctc_labels`), the CTC target


# ---------------------------------------------------------------------------------------------
# Forward pass on cropped audio features
# ---------------------------------------------------------------------------------------------


def float_wave(wave: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1]: int16 PCM scaled as soundfile decodes it, so a clip read back from a shard's
    wav is the same numbers."""
    return wave.astype(np.float32) / 32768 if wave.dtype == np.int16 else wave


def crop_features(feature_extractor, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Whisper features of a batch, only as many frames as the longest clip needs: the same values as the first
    frames of the 3000-frame features (past its samples a clip's frames hold its log-mel floor either way, and the
    floor is set by the clip's maximum, which lies in the real part)."""
    length = _crop_samples(feature_extractor, max(len(w) for w in waves))
    out = feature_extractor(
        [float_wave(w) for w in waves],
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        max_length=length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}


def clip_features(feature_extractor, waves: list[np.ndarray], batch_size: int = 25) -> list[ClipFeatures]:
    """Each clip's features and mask as `crop_features` computes them in any batch, cropped to the clip's own
    frames. Computed in batches of similar length (a clip's frames are the same in any batch: `crop_features`)."""
    out: list[ClipFeatures] = [None] * len(waves)  # type: ignore[list-item]
    by_length = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    for lo in range(0, len(by_length), batch_size):
        chunk = by_length[lo : lo + batch_size]
        batch = crop_features(feature_extractor, [waves[i] for i in chunk])
        for row, i in enumerate(chunk):
            frames = _crop_samples(feature_extractor, len(waves[i])) // feature_extractor.hop_length
            out[i] = ClipFeatures(
                batch["input_features"][row, :, :frames].clone(), batch["feature_attention_mask"][row, :frames].clone()
            )
    return out


def stack_features(clips: list[ClipFeatures]) -> dict[str, torch.Tensor]:
    """`crop_features` of a batch, from its clips' own features: each is padded with its log-mel floor (its
    minimum, what the extractor writes past a clip's samples) to the longest clip's frames."""
    frames = max(c.features.shape[-1] for c in clips)
    return {
        "input_features": torch.stack(
            [F.pad(c.features, (0, frames - c.features.shape[-1]), value=float(c.features.min())) for c in clips]
        ),
        "feature_attention_mask": torch.stack([F.pad(c.mask, (0, frames - c.mask.shape[-1])) for c in clips]),
    }


def _crop_samples(feature_extractor, samples: int) -> int:
    """The samples `crop_features` extracts for a batch whose longest clip has this many: the margin added, an even
    number of frames (for the conv stride), at most the extractor's 30 s."""
    hop = feature_extractor.hop_length
    return min(-(-(samples + CROP_MARGIN_SAMPLES) // (2 * hop)) * 2 * hop, feature_extractor.n_samples)


def encode_audio(
    model: Qwen2AudioForConditionalGeneration, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
) -> torch.Tensor:
    """Projected audio embeddings [total audio tokens, hidden], row-major over the batch, as Qwen2AudioModel
    computes them, but over however many mel frames `input_features` holds instead of exactly 3000."""
    tower = model.model.audio_tower
    feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
    x = F.gelu(tower.conv1(input_features.to(tower.conv1.weight.dtype)))
    x = F.gelu(tower.conv2(x)).permute(0, 2, 1)
    positions = x.shape[1]
    if positions > tower.config.max_source_positions or bool((2 * feat_lengths + 1 > input_features.shape[-1]).any()):
        raise ValueError(f"{input_features.shape[-1]} mel frames do not cover the real frames plus the conv margin")
    x = x + tower.embed_positions.weight[:positions]
    real = torch.arange(positions, device=x.device)[None] < feat_lengths[:, None]
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=x, attention_mask=real.long())
    for layer in tower.layers:
        x = layer(x, mask)
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    x = model.model.multi_modal_projector(tower.layer_norm(x))
    keep = torch.arange(x.shape[1], device=x.device)[None] < out_lengths[:, None]
    return x[keep]


def audio_lengths(model: Qwen2AudioForConditionalGeneration, feature_attention_mask: torch.Tensor) -> torch.Tensor:
    """Each clip's rows in `encode_audio`'s output (its audio tokens), from its feature attention mask."""
    return model.model.audio_tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))[1]


def merged_embeds(
    model: Qwen2AudioForConditionalGeneration, input_ids: torch.Tensor, features: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Token embeddings with the audio placeholders filled by the encoder, as the model's own forward does."""
    return _merge(model, input_ids, encode_audio(model, features["input_features"], features["feature_attention_mask"]))


def _merge(model: Qwen2AudioForConditionalGeneration, input_ids: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(input_ids)
    where = (input_ids == model.config.audio_token_id)[..., None]
    return embeds.masked_scatter(where, audio.to(embeds.dtype))


def assistant_loss(
    model: Qwen2AudioForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    features: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Teacher-forced cross-entropy on the assistant tokens only (the lm_head runs on those rows alone)."""
    audio = encode_audio(model, features["input_features"], features["feature_attention_mask"])
    return _answer_loss(model, _merge(model, input_ids, audio), attention_mask, input_ids, loss_mask)


def _answer_loss(
    model: Qwen2AudioForConditionalGeneration,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    hidden = model.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predict = loss_mask[:, 1:]  # the state at t predicts token t + 1
    logits = model.lm_head(hidden[:, :-1][predict])
    return F.cross_entropy(logits.float(), input_ids[:, 1:][predict])


def _ctc_loss(
    model: Qwen2AudioForConditionalGeneration, head: torch.nn.Linear, audio: torch.Tensor, batch: dict
) -> torch.Tensor:
    """CTC of the answer's characters against `head` over each clip's audio embeddings (25 a second: a sentence
    spoken at 200 words a minute has ~17 characters a second, so every label fits)."""
    lengths = audio_lengths(model, batch["features"]["feature_attention_mask"])
    clips = torch.nn.utils.rnn.pad_sequence(torch.split(audio, lengths.tolist()))  # [T, N, H]
    log_probs = head(clips).float().log_softmax(-1)
    targets = torch.cat(batch["transcript_ids"])
    target_lengths = torch.tensor([len(t) for t in batch["transcript_ids"]])
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=0, zero_infinity=True)


def _training_loss(
    model: Qwen2AudioForConditionalGeneration,
    batch: dict,
    cfg: TrainerConfig,
    head: torch.nn.Linear | None,
    pretraining: bool = False,
) -> torch.Tensor:
    """The answer's cross-entropy, plus the weighted CTC loss in joint training (one encoder pass); while
    ``pretraining`` the encoder, the CTC loss alone (the decoder does not run)."""
    audio = batch.get("audio")  # the frozen encoder's output, computed once for the decoder phase
    if audio is None:
        features = batch["features"]
        audio = encode_audio(model, features["input_features"], features["feature_attention_mask"])
    if pretraining:
        return _ctc_loss(model, head, audio, batch)
    embeds = _merge(model, batch["input_ids"], audio)
    loss = _answer_loss(model, embeds, batch["attention_mask"], batch["input_ids"], batch["loss_mask"])
    if not cfg.ctc_weight:
        return loss
    return loss + cfg.ctc_weight * _ctc_loss(model, head, audio, batch)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _example(processor, clip: AudioConversation, difficulty: int = 1, transcript: str | None = None) -> _Example:
    fe = processor.feature_extractor
    frames = -(-len(clip.wave) // fe.hop_length)  # what the extractor's attention mask will sum to
    prompt = build_prompt(
        processor.tokenizer,
        processor.chat_template,
        _normalised(clip.conversations),
        AUDIO_TOKEN,
        audio_token_count(frames),
        MAX_PROMPT_TOKENS,
    )
    ids = ctc_labels(transcript) if transcript is not None else None
    return _Example(clip.wave, prompt.input_ids, prompt.loss_mask, difficulty, ids)


def ctc_labels(text: str) -> torch.Tensor:
    """The CTC target of an answer: its characters in CTC_ALPHABET (lower-cased, any other a space, runs of spaces
    one), numbered from 1 (0 is the blank)."""
    kept = "".join(c if c in CTC_ALPHABET else " " for c in text.lower())
    return torch.tensor([CTC_ALPHABET.index(c) + 1 for c in " ".join(kept.split())], dtype=torch.long)


def _normalised(messages: list[Message]) -> list[Message]:
    # build_prompt takes content as a list of items (the parsed conversation's form); tone data writes plain strings.
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in messages
    ]


def _collate(processor, batch: list[_Example], pad_id: int, features: bool = True) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, e in enumerate(batch):  # right padding: padded rows come after every real token
        ids[row, : len(e.input_ids)] = e.input_ids
        attention[row, : len(e.input_ids)] = 1
        loss_mask[row, : len(e.loss_mask)] = e.loss_mask
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "features": crop_features(processor.feature_extractor, [e.wave for e in batch]) if features else None,
        "transcript_ids": [e.transcript_ids for e in batch],
    }


def _frozen_audio(model, features: list[ClipFeatures], cfg: TrainerConfig) -> list[torch.Tensor]:
    """Each clip's audio embeddings [n_i, H] from the frozen encoder and projector, computed once: the decoder
    phase sees every clip several times, and re-encoding it each time (features and encoder) was a share of
    every step. Batched by length, so little of the work is padding."""
    audio: list[torch.Tensor] = [torch.empty(0)] * len(features)
    by_length = sorted(range(len(features)), key=lambda i: features[i].features.shape[-1])
    for lo in range(0, len(by_length), cfg.eval_batch_size):
        chunk = by_length[lo : lo + cfg.eval_batch_size]
        batch = stack_features([features[i] for i in chunk])
        with torch.no_grad(), _autocast(cfg):
            rows = encode_audio(model, batch["input_features"], batch["feature_attention_mask"])
        lengths = audio_lengths(model, batch["feature_attention_mask"])
        for i, clip in zip(chunk, torch.split(rows, lengths.tolist()), strict=True):
            audio[i] = clip.clone()
    return audio


def tokenizer_corpus(train: Sequence[AudioConversation]) -> list[str]:
    """The tiny target's built-in text plus every training conversation, so that prompts, answers (each note name
    with its leading space, the frequent words of sentences) are single tokens or short merges."""
    return default_corpus(None) + [text_of(_normalised(c.conversations)) for c in train]


# ---------------------------------------------------------------------------------------------
# The melody task
# ---------------------------------------------------------------------------------------------


class MelodyTask:
    """Name the notes of synthetic tone melodies (pipeline.testing.tone_data), one token per note."""

    name = "melody"

    def __init__(self, cfg: SmallTargetConfig) -> None:
        self.cfg = cfg

    def clips(self) -> tuple[list[Clip], list[Clip]]:
        cfg = self.cfg
        train_tones = dataclasses.replace(cfg.tones, min_notes=cfg.train_min_notes)
        train = [make_tone_clip(cfg.seed, i, train_tones) for i in range(cfg.train_clips)]
        held_out = [
            make_tone_clip(cfg.seed, i, cfg.tones) for i in range(cfg.train_clips, cfg.train_clips + cfg.eval_clips)
        ]
        return [_tone_clip(c) for c in train], [_tone_clip(c) for c in held_out]

    def tokenizer_corpus(self, train: list[Clip]) -> list[str]:
        return tokenizer_corpus(train)

    def score(self, held_out: list[Clip], answers: list[str]) -> dict[str, Any]:
        """Exact-match rate against the true notes, per-note accuracy, and every (expected, generated) pair."""
        exact = [a == c.answer for a, c in zip(answers, held_out, strict=True)]
        per_note = [
            sum(x == y for x, y in zip(a.split(), c.answer.split(), strict=False)) / len(c.answer.split())
            for a, c in zip(answers, held_out, strict=True)
        ]
        return {
            "clips": len(held_out),
            "exact_match": sum(exact) / len(held_out),
            "note_accuracy": sum(per_note) / len(held_out),
            "answers": [{"expected": c.answer, "generated": a} for c, a in zip(held_out, answers, strict=True)],
        }


def _tone_clip(clip) -> Clip:
    return Clip(clip.wave, clip.conversations, transcription(clip.notes), len(clip.notes))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """What a checkpoint holds besides the weights and the optimizer: where training is and what it measured."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    accuracy: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out teacher-forced accuracy)
    encoder_cer: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out CER of the encoder's CTC)
    seconds: float = 0.0  # training time of the sessions before this one
    # CPU time of the same: on a shared machine, what the training would take on a core of its own.
    cpu_seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)  # the step each later session started from


def _lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Warm-up then cosine decay, in each phase (encoder pre-training, then the rest) over the phase's steps."""
    steps = cfg.steps
    if cfg.encoder_pretrain_steps:
        if step < cfg.encoder_pretrain_steps:
            steps = cfg.encoder_pretrain_steps
        else:
            step -= cfg.encoder_pretrain_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    path = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None  # glibc only
    return trim


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. Batches of ever-different shapes fragment glibc's arenas: under
    bf16 autocast the resident size grew ~25 MB a step without end (4 GB in 160 steps of a tiny model), with a
    trim after each step it stayed flat. Not after every step: the pages handed back fault in again (a trim per
    step made a step 30% slower, nearly all system time)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _autocast(cfg: TrainerConfig) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


@torch.no_grad()
def teacher_forced_accuracy(model, processor, examples: list[_Example], batch_size: int = 25) -> float:
    """Share of assistant tokens whose argmax prediction is right given the true prefix (cheap, cropped audio)."""
    was_training = model.training
    model.eval()
    right = total = 0
    pad_id = model.generation_config.pad_token_id
    for lo in range(0, len(examples), batch_size):
        batch = _collate(processor, examples[lo : lo + batch_size], pad_id)
        hidden = model.model(
            inputs_embeds=merged_embeds(model, batch["input_ids"], batch["features"]),
            attention_mask=batch["attention_mask"],
            use_cache=False,
        ).last_hidden_state
        predict = batch["loss_mask"][:, 1:]
        guess = model.lm_head(hidden[:, :-1][predict]).argmax(-1)
        right += int((guess == batch["input_ids"][:, 1:][predict]).sum())
        total += int(predict.sum())
    model.train(was_training)
    return right / max(1, total)


@torch.no_grad()
def encoder_ctc_error_rate(
    model, head: torch.nn.Linear, processor, examples: list[_Example], batch_size: int = 25
) -> float:
    """Character error rate of the encoder's own greedy CTC transcripts (argmax per audio position, repeats merged,
    blanks dropped) against the examples' CTC labels: how well the audio encoder alone tells the characters apart,
    before the decoder reads it."""
    was_training = model.training
    model.eval()
    references, hypotheses = [], []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        features = crop_features(processor.feature_extractor, [e.wave for e in chunk])
        audio = encode_audio(model, features["input_features"], features["feature_attention_mask"])
        lengths = audio_lengths(model, features["feature_attention_mask"])
        for best, example in zip(torch.split(head(audio).argmax(-1), lengths.tolist()), chunk, strict=True):
            merged = torch.unique_consecutive(best)
            hypotheses.append(merged[merged != 0].tolist())
            references.append(example.transcript_ids.tolist())
    model.train(was_training)
    return error_rate(references, hypotheses)


def _batch_order(examples: list[_Example], cfg: TrainerConfig) -> Iterator[list[int]]:
    """Endless batches of example indices in an order that depends on the seed alone.

    The first `curriculum_steps` batches are drawn from the examples of difficulty at most m, m growing from 1 to
    the hardest: with one note the pitch is all there is to hear, so the decoder learns to listen within a few
    dozen steps, then to find the k-th note as k grows. Without it the melody alignment emerged after 150 to over
    500 steps depending on the seed. Then epochs of a random permutation, not bucketed by length (equal-length
    batches slowed learning down in a trial).
    """
    order = torch.Generator().manual_seed(cfg.seed)
    easiest = sorted(range(len(examples)), key=lambda i: examples[i].difficulty)
    counts = [examples[i].difficulty for i in easiest]
    for step in range(cfg.curriculum_steps):
        limit = 1 + (counts[-1] - 1) * step / cfg.curriculum_steps
        eligible = max(bisect.bisect_right(counts, limit), min(cfg.batch_size, len(counts)))
        yield [easiest[int(i)] for i in torch.randint(eligible, (cfg.batch_size,), generator=order)]
    while True:
        epoch = torch.randperm(len(examples), generator=order).tolist()
        batches = [epoch[lo : lo + cfg.batch_size] for lo in range(0, len(epoch) - cfg.batch_size + 1, cfg.batch_size)]
        if cfg.bucket_batches:
            batches = _bucketed(batches, examples, cfg.bucket_batches, order)
        yield from batches


def _phase_batches(examples: list[_Example], cfg: TrainerConfig) -> Iterator[list[int]]:
    """The batches of the whole training: each phase draws the seed's order from its start (its curriculum too: the
    decoder, like the encoder before it, starts on the shortest answers)."""
    if cfg.encoder_pretrain_steps:
        yield from itertools.islice(_batch_order(examples, cfg), cfg.encoder_pretrain_steps)
    yield from _batch_order(examples, cfg)


def _freeze_encoder(model: Qwen2AudioForConditionalGeneration, frozen: bool) -> None:
    """The audio encoder and projector trainable or not (frozen ones get no gradient, so AdamW skips them)."""
    for module in (model.model.audio_tower, model.model.multi_modal_projector):
        module.requires_grad_(not frozen)


def _bucketed(batches: list[list[int]], examples: list[_Example], pool: int, order: torch.Generator) -> list[list[int]]:
    """The same examples regrouped: each run of `pool` batches sorted by length and cut again, then every batch
    of the epoch in a random order (so neither length nor position in the epoch decides when a batch comes)."""
    size = len(batches[0])
    regrouped: list[list[int]] = []
    for lo in range(0, len(batches), pool):
        chunk = sorted((i for b in batches[lo : lo + pool] for i in b), key=lambda i: len(examples[i].input_ids))
        regrouped += [chunk[j : j + size] for j in range(0, len(chunk), size)]
    return [regrouped[int(i)] for i in torch.randperm(len(regrouped), generator=order)]


def _optimizer(
    params: list[torch.nn.Parameter], cfg: TrainerConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # No weight decay on norms and biases, as usual.
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))


def _config_record(cfg: TrainerConfig) -> str:
    return json.dumps({"task": cfg.task().name, "config": asdict(cfg)}, sort_keys=True)


def _ctc_head(model, cfg: TrainerConfig) -> torch.nn.Linear | None:
    """The training-only CTC projection, audio embedding -> blank or character (drawn from the global RNG, seeded
    before)."""
    if not cfg.uses_ctc:
        return None
    return torch.nn.Linear(model.config.text_config.hidden_size, len(CTC_ALPHABET) + 1)


def _save_checkpoint(path: Path, model, head, optimizer, scheduler, cfg: TrainerConfig, progress: _Progress) -> None:
    state = {
        "identity": _config_record(cfg),
        "model": model.state_dict(),
        "ctc_head": head.state_dict() if head is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "progress": asdict(progress),
    }
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-save leaves the previous checkpoint whole


def _load_checkpoint(path: Path, model, head, optimizer, scheduler, cfg: TrainerConfig) -> _Progress:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["identity"] != _config_record(cfg):
        theirs = json.loads(state["identity"])
        ours = json.loads(_config_record(cfg))
        changed = sorted(k for k in ours["config"] if ours["config"][k] != theirs["config"].get(k))
        raise ConfigError(
            f"{path} belongs to a training with other settings ({', '.join(changed) or 'task'} differ): "
            f"delete {path.parent} to start over, or train with the settings it was started with"
        )
    model.load_state_dict(state["model"])
    if head is not None:
        head.load_state_dict(state["ctc_head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    progress = _Progress(**state["progress"])
    progress.accuracy = [(int(s), float(a)) for s, a in progress.accuracy]
    progress.encoder_cer = [(int(s), float(c)) for s, c in progress.encoder_cer]
    progress.resumed_at.append(progress.step)
    return progress


def _train(
    model,
    processor,
    examples: list[_Example],
    cfg: TrainerConfig,
    progress: bool,
    monitor: list[_Example],
    checkpoint: Path | None = None,
) -> _Progress:
    """Train from the checkpoint if there is one (else from the start) to cfg.steps; the loop is the same either
    way, so a resumed run makes the same updates as an uninterrupted one."""
    pad_id = model.generation_config.pad_token_id
    head = _ctc_head(model, cfg)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer, scheduler = _optimizer(params, cfg)
    state = _Progress()
    if checkpoint is not None and checkpoint.exists():
        state = _load_checkpoint(checkpoint, model, head, optimizer, scheduler, cfg)
    batches = _phase_batches(examples, cfg)
    for _ in range(state.step):  # the order is a function of the seed: replay it up to where training stopped
        next(batches)
    started, cpu_started = time.perf_counter(), time.process_time()
    model.set_attn_implementation(cfg.attention)
    model.train()
    bar = tqdm(
        range(state.step, cfg.total_steps),
        desc=f"train small {cfg.task().name} target",
        disable=not progress,
        mininterval=2.0,
        initial=state.step,
        total=cfg.total_steps,
    )
    # Each clip's features are computed once (the extractor's STFT, on one core, was half of an encoder step), then
    # each clip's audio embeddings once the encoder is frozen (the features' memory goes back then).
    features: list[ClipFeatures] | None = None
    frozen_audio = None
    for step in bar:
        pretraining = step < cfg.encoder_pretrain_steps
        frozen = bool(cfg.encoder_pretrain_steps) and not pretraining
        _freeze_encoder(model, frozen)
        if features is None and frozen_audio is None:
            features = clip_features(processor.feature_extractor, [e.wave for e in examples], cfg.eval_batch_size)
        if frozen and frozen_audio is None:
            frozen_audio, features = _frozen_audio(model, features, cfg), None
        chosen = next(batches)
        batch = _collate(processor, [examples[i] for i in chosen], pad_id, features=False)
        if frozen_audio is not None:
            batch["audio"] = torch.cat([frozen_audio[i] for i in chosen])
        else:
            batch["features"] = stack_features([features[i] for i in chosen])
        with _autocast(cfg):
            loss = _training_loss(model, batch, cfg, head, pretraining)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        state.losses.append(loss.item())
        state.step = step + 1
        if state.step % TRIM_EVERY == 0:
            _return_freed_memory()
        due = bool(cfg.monitor_every) and (state.step % cfg.monitor_every == 0 or state.step == cfg.total_steps)
        if monitor and due and not pretraining:
            # float32, as the saved model is used (and the feature extractor's STFT has no bf16)
            state.accuracy.append((state.step, teacher_forced_accuracy(model, processor, monitor, cfg.eval_batch_size)))
        if monitor and pretraining and (due or state.step == cfg.encoder_pretrain_steps):
            cer = encoder_ctc_error_rate(model, head, processor, monitor, cfg.eval_batch_size)
            state.encoder_cer.append((state.step, cer))
        if checkpoint is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            if state.step < cfg.total_steps:
                done = dataclasses.replace(
                    state,
                    seconds=state.seconds + time.perf_counter() - started,
                    cpu_seconds=state.cpu_seconds + time.process_time() - cpu_started,
                )
                _save_checkpoint(checkpoint, model, head, optimizer, scheduler, cfg, done)
        postfix = {"loss": f"{sum(state.losses[-20:]) / len(state.losses[-20:]):.3f}"}
        if state.accuracy:
            postfix["held_out_tf_acc"] = f"{state.accuracy[-1][1]:.3f}"
        elif state.encoder_cer:
            postfix["held_out_ctc_cer"] = f"{state.encoder_cer[-1][1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
    model.eval()
    model.set_attn_implementation("sdpa")  # transformers' default, what the saved model runs with
    state.seconds += time.perf_counter() - started
    state.cpu_seconds += time.process_time() - cpu_started
    return state


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(
    model: Qwen2AudioForConditionalGeneration,
    processor,
    clips: Sequence[AudioConversation],
    batch_size: int = 25,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy answers to each clip's first question through the stock processor and `generate` (3000 frames),
    stripped of surrounding whitespace."""
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's next token in the same column
    answers: list[str] = []
    try:
        for lo in range(0, len(clips), batch_size):
            chunk = clips[lo : lo + batch_size]
            texts = [
                render_chat(
                    tokenizer, processor.chat_template, _normalised(c.conversations[:1]), generation_prompt=True
                )
                for c in chunk
            ]
            inputs = processor(
                text=texts,
                audio=[float_wave(c.wave) for c in chunk],
                sampling_rate=processor.feature_extractor.sampling_rate,
                return_tensors="pt",
                padding=True,
            )
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def partial_dir(out_dir: Path) -> Path:
    """Where training into `out_dir` keeps its checkpoint and lock until `out_dir` is complete."""
    return out_dir.parent / f".{out_dir.name}.partial"


@contextlib.contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """Hold `work`'s lock: two processes training into one directory would overwrite each other's checkpoint.
    The OS releases it however the process ends."""
    with open(work / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{work} is held by another training into the same directory") from None
        yield


def train_small_target(out_dir: Path, cfg: TrainerConfig = SmallTargetConfig(), progress: bool = True) -> Path:
    """Build the tiny target's layout at `cfg`'s sizes, train it on `cfg.task()`'s clips, evaluate it on held-out
    clips and save model, processor and `small_target.json` (task, config, timings, figures) to `out_dir`.

    Runs on `cfg.threads` torch threads (restored afterwards). Deterministic for a fixed `cfg`, thread count
    included: the same seed gives byte-identical weights, also when resumed from a checkpoint (kept in
    `partial_dir(out_dir)` when training stops early, removed once `out_dir` is complete). The model is written to
    that directory and renamed into place, so `out_dir` is either absent or complete. Raises FileExistsError if
    `out_dir` exists or another process is training into it, ConfigError if the checkpoint there is of other
    settings.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    work = partial_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    with _exclusive(work):
        torch.set_num_threads(cfg.threads)
        try:
            _train_and_save(out_dir, work, cfg, progress)
        except BaseException:
            if not (work / CHECKPOINT).exists():  # nothing to resume from: leave nothing behind
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _train_and_save(out_dir: Path, work: Path, cfg: TrainerConfig, progress: bool) -> None:
    start = time.perf_counter()
    task = cfg.task()
    train, held_out = task.clips()
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_target(Path(tmp) / "init", task.tokenizer_corpus(train), cfg.tiny_config())
        processor = AutoProcessor.from_pretrained(init)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    transcript = (lambda clip: clip.answer) if cfg.uses_ctc else (lambda clip: None)
    examples = [_example(processor, clip, clip.difficulty, transcript(clip)) for clip in train]
    monitor = [_example(processor, clip, clip.difficulty, transcript(clip)) for clip in held_out[: cfg.monitor_clips]]
    # Nothing in training draws from the global RNG today (no dropout, the data order has its own generator);
    # seeded anyway so that anything that does stays reproducible.
    torch.manual_seed(cfg.seed)
    prepared = time.perf_counter()
    state = _train(model, processor, examples, cfg, progress, monitor, work / CHECKPOINT)
    trained = time.perf_counter()
    answers = generate_answers(model, processor, held_out, cfg.eval_batch_size, cfg.max_new_tokens)
    result = task.score(held_out, answers)
    evaluated = time.perf_counter()

    stage = work / "model"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    model.save_pretrained(stage)
    processor.save_pretrained(stage)
    record = {
        "task": task.name,
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {
            "prepare": round(prepared - start, 2),
            "train": round(state.seconds, 2),  # every session's, when resumed
            "eval": round(evaluated - trained, 2),
            "total": round(prepared - start + state.seconds + evaluated - trained, 2),
            "train_cpu": round(state.cpu_seconds, 2),  # process CPU time: the train seconds on an unshared core
        },
        "resumed_at": state.resumed_at,
        "final_loss": sum(state.losses[-20:]) / max(1, len(state.losses[-20:])),
        "held_out_teacher_forced_accuracy": state.accuracy,
        "held_out_encoder_ctc_cer": state.encoder_cer,
        "eval": result,
    }
    (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    try:
        os.rename(stage, out_dir)  # atomic on one filesystem
    except OSError as err:
        raise FileExistsError(f"{out_dir} appeared during training") from err
