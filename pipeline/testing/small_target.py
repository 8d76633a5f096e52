"""A small Qwen2-Audio target trained on melody transcription, so that a draft has something real to predict.

The random tiny target (pipeline.testing.tiny_target) has learned nothing, so its answers carry no structure a
draft could pick up. This one starts from the same builder (tokenizer, processor, chat template, config layout) and
trains the whole model (audio encoder, projector, language model) with teacher forcing on the assistant tokens of
synthetic melodies (pipeline.testing.tone_data), in under 5 minutes on one CPU core. Its answers are long (6-16
notes, one token each), deterministic and depend on the audio.

Where the time goes: the Whisper-style encoder insists on 3000 mel frames (30 s); on a <= 4 s clip that was ~80% of
a training step. The encoder never lets a real frame see a padded one (padded keys are masked, and convolution,
pooling and norms are local), so training runs it on the first frames only (`encode_audio`), which gives the
same numbers as the full-length forward (checked by the tests). What remains is the language model's matmuls.
Evaluation uses the stock processor and `generate`, i.e. the full 3000 frames, so the saved model is scored
exactly as the pipeline will use it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from pipeline.inputs.conversation import Message, text_of
from pipeline.inputs.prompt import build_prompt, render_chat
from pipeline.settings import setting
from pipeline.targets.qwen2_audio import AUDIO_TOKEN, audio_token_count
from pipeline.testing.tiny_target import TinyTargetConfig, build_tiny_target, default_corpus
from pipeline.testing.tone_data import DEFAULT_TONES, ToneClip, ToneConfig, make_tone_clip, transcription

RECORD = "small_target.json"
# Zero samples kept after the longest clip of a batch when its features are cropped: more than the STFT's half
# window (200 samples, so the last real frames see the same zeros as at full length) plus a few frames for the
# convolutions' receptive field.
CROP_MARGIN_SAMPLES = 1600
MAX_PROMPT_TOKENS = 4096


@dataclass(frozen=True)
class SmallTargetConfig:
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
    # Data: clips 0 .. train_clips - 1 of the seed's tone stream train, the next eval_clips are held out.
    train_clips: int = setting(2000, "training clips")
    eval_clips: int = setting(100, "held-out clips for the greedy evaluation")
    tones: ToneConfig = setting(DEFAULT_TONES, flag=None)
    # Short melodies first teach the decoder where the audio is and how a pitch sounds, before it has to find the
    # k-th of 16 notes (held-out melodies start at tones.min_notes).
    train_min_notes: int = setting(1, "training melodies start at this many notes")
    curriculum_steps: int = setting(120, "step s draws melodies of at most 1 + (max - 1) * s / curriculum_steps notes")
    # Optimisation.
    steps: int = setting(500, "optimizer steps")
    batch_size: int = setting(16, "clips per step")
    lr: float = setting(2e-3, "peak AdamW learning rate")
    min_lr_ratio: float = setting(0.05, "final learning rate as a share of the peak")
    warmup_steps: int = setting(30, "linear warm-up steps")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip")
    # On a shared 2-core machine two threads that wait on each other were up to 40x slower than one.
    threads: int = setting(1, "torch CPU threads (results are reproducible for a fixed count)")
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
        if not 1 <= self.train_min_notes <= self.tones.max_notes:
            raise ValueError(f"train_min_notes must be in [1, {self.tones.max_notes}], got {self.train_min_notes}")
        if min(self.curriculum_steps, self.warmup_steps, self.monitor_every, self.monitor_clips) < 0:
            raise ValueError("curriculum_steps, warmup_steps, monitor_every and monitor_clips must not be negative")

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


@dataclass
class _Example:
    wave: np.ndarray
    input_ids: torch.Tensor  # [T], audio placeholder expanded
    loss_mask: torch.Tensor  # [T] bool, assistant tokens
    notes: int


# ---------------------------------------------------------------------------------------------
# Forward pass on cropped audio features
# ---------------------------------------------------------------------------------------------


def crop_features(feature_extractor, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Whisper features of a batch, only as many frames as the longest clip needs: the same values as the first
    frames of the 3000-frame features (the tail is all zeros either way, and the log-mel floor is set by the
    clip's maximum, which lies in the real part)."""
    length = max(len(w) for w in waves) + CROP_MARGIN_SAMPLES
    hop = feature_extractor.hop_length
    length = min(-(-length // (2 * hop)) * 2 * hop, feature_extractor.n_samples)  # even frame count for the conv stride
    out = feature_extractor(
        waves,
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        max_length=length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}


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


def merged_embeds(
    model: Qwen2AudioForConditionalGeneration, input_ids: torch.Tensor, features: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Token embeddings with the audio placeholders filled by the encoder, as the model's own forward does."""
    embeds = model.get_input_embeddings()(input_ids)
    audio = encode_audio(model, features["input_features"], features["feature_attention_mask"])
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
    hidden = model.model(
        inputs_embeds=merged_embeds(model, input_ids, features), attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    predict = loss_mask[:, 1:]  # the state at t predicts token t + 1
    logits = model.lm_head(hidden[:, :-1][predict])
    return F.cross_entropy(logits.float(), input_ids[:, 1:][predict])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _example(processor, clip: ToneClip) -> _Example:
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
    return _Example(clip.wave, prompt.input_ids, prompt.loss_mask, len(clip.notes))


def _normalised(messages: list[Message]) -> list[Message]:
    # build_prompt takes content as a list of items (the parsed conversation's form); tone data writes plain strings.
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in messages
    ]


def _collate(processor, batch: list[_Example], pad_id: int) -> dict[str, torch.Tensor]:
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
        "features": crop_features(processor.feature_extractor, [e.wave for e in batch]),
    }


def tokenizer_corpus(train: list[ToneClip]) -> list[str]:
    """The tiny target's built-in text plus every training conversation, so that prompts, answers and each note
    name (with its leading space) are single tokens or short merges."""
    return default_corpus(None) + [text_of(_normalised(c.conversations)) for c in train]


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def _lr_factor(step: int, cfg: SmallTargetConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def _batch_order(examples: list[_Example], cfg: SmallTargetConfig) -> Iterator[list[int]]:
    """Endless batches of example indices in an order that depends on the seed alone.

    The first `curriculum_steps` batches are drawn from the melodies of at most m notes, m growing from 1 to the
    longest: with one note the pitch is all there is to hear, so the decoder learns to listen within a few dozen
    steps, then to find the k-th note as k grows. Without it the alignment emerged after 150 to over 500 steps
    depending on the seed. Then epochs of a random permutation, not bucketed by length (equal-length batches
    slowed learning down in a trial).
    """
    order = torch.Generator().manual_seed(cfg.seed)
    easiest = sorted(range(len(examples)), key=lambda i: examples[i].notes)
    counts = [examples[i].notes for i in easiest]
    for step in range(cfg.curriculum_steps):
        limit = 1 + (counts[-1] - 1) * step / cfg.curriculum_steps
        eligible = max(bisect.bisect_right(counts, limit), min(cfg.batch_size, len(counts)))
        yield [easiest[int(i)] for i in torch.randint(eligible, (cfg.batch_size,), generator=order)]
    while True:
        epoch = torch.randperm(len(examples), generator=order).tolist()
        for lo in range(0, len(epoch) - cfg.batch_size + 1, cfg.batch_size):
            yield epoch[lo : lo + cfg.batch_size]


def _train(
    model, processor, examples: list[_Example], cfg: SmallTargetConfig, progress: bool, monitor: list[_Example]
) -> tuple[list[float], list[tuple[int, float]]]:
    pad_id = model.generation_config.pad_token_id
    # No weight decay on norms and biases, as usual.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    batches = _batch_order(examples, cfg)
    losses: list[float] = []
    accuracy: list[tuple[int, float]] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train small target", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = _collate(processor, [examples[i] for i in next(batches)], pad_id)
        loss = assistant_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch["features"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if monitor and cfg.monitor_every and ((step + 1) % cfg.monitor_every == 0 or step + 1 == cfg.steps):
            accuracy.append((step + 1, teacher_forced_accuracy(model, processor, monitor, cfg.eval_batch_size)))
        postfix = {"loss": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}"}
        if accuracy:
            postfix["held_out_tf_acc"] = f"{accuracy[-1][1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
    model.eval()
    return losses, accuracy


@torch.no_grad()
def evaluate_transcription(
    model: Qwen2AudioForConditionalGeneration,
    processor,
    clips: list[ToneClip],
    batch_size: int = 25,
    max_new_tokens: int = 24,
) -> dict:
    """Greedy answers to each clip's first question through the stock processor and `generate` (3000 frames):
    exact-match rate against the true notes, per-note accuracy, and every (expected, generated) pair."""
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
                audio=[c.wave for c in chunk],
                sampling_rate=processor.feature_extractor.sampling_rate,
                return_tensors="pt",
                padding=True,
            )
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    expected = [transcription(c.notes) for c in clips]
    exact = [a == e for a, e in zip(answers, expected, strict=True)]
    per_note = [
        sum(x == y for x, y in zip(a.split(), c.notes, strict=False)) / len(c.notes)
        for a, c in zip(answers, clips, strict=True)
    ]
    return {
        "clips": len(clips),
        "exact_match": sum(exact) / len(clips),
        "note_accuracy": sum(per_note) / len(clips),
        "answers": [{"expected": e, "generated": a} for e, a in zip(expected, answers, strict=True)],
    }


def train_small_target(out_dir: Path, cfg: SmallTargetConfig = SmallTargetConfig(), progress: bool = True) -> Path:
    """Build the tiny target's layout at `cfg`'s sizes, train it on tone data, evaluate it on held-out clips and
    save model, processor and `small_target.json` (config, timings, figures) to `out_dir`.

    Runs on `cfg.threads` torch threads (restored afterwards). Deterministic for a fixed `cfg`, thread count
    included: the same seed gives byte-identical weights. Written
    to a temp directory renamed into place, so `out_dir` is either absent or complete. Raises FileExistsError if
    `out_dir` exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start = time.perf_counter()
        train_tones = dataclasses.replace(cfg.tones, min_notes=cfg.train_min_notes)
        train = [make_tone_clip(cfg.seed, i, train_tones) for i in range(cfg.train_clips)]
        held_out = [
            make_tone_clip(cfg.seed, i, cfg.tones) for i in range(cfg.train_clips, cfg.train_clips + cfg.eval_clips)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            init = build_tiny_target(Path(tmp) / "init", tokenizer_corpus(train), cfg.tiny_config())
            processor = AutoProcessor.from_pretrained(init)
            model = Qwen2AudioForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        examples = [_example(processor, clip) for clip in train]
        monitor = [_example(processor, clip) for clip in held_out[: cfg.monitor_clips]]
        # Nothing in training draws from the global RNG today (no dropout, the data order has its own generator);
        # seeded anyway so that anything that does stays reproducible.
        torch.manual_seed(cfg.seed)
        prepared = time.perf_counter()
        losses, accuracy = _train(model, processor, examples, cfg, progress, monitor)
        trained = time.perf_counter()
        result = evaluate_transcription(model, processor, held_out, cfg.eval_batch_size, cfg.max_new_tokens)
        evaluated = time.perf_counter()

        stage.mkdir()
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
        record = {
            "config": asdict(cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {
                "prepare": round(prepared - start, 2),
                "train": round(trained - prepared, 2),
                "eval": round(evaluated - trained, 2),
                "total": round(evaluated - start, 2),
            },
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "held_out_teacher_forced_accuracy": accuracy,
            "eval": result,
        }
        (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(stage, out_dir)  # atomic on one filesystem
        except OSError as err:
            raise FileExistsError(f"{out_dir} appeared during training") from err
    finally:
        torch.set_num_threads(threads)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir
