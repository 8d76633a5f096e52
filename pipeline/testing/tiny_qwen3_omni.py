"""A tiny, seeded, randomly initialised Qwen3-Omni (thinker) that stands in for Qwen3-Omni-30B-A3B-Instruct.

Saved as the real checkpoint is: a ``Qwen3OmniMoeForConditionalGeneration`` directory (``model_type``
``qwen3_omni_moe``, weights under ``thinker.``), so the adapter loads it exactly as it loads the real one. It keeps
the real model's interfaces (a Whisper feature extractor with 128 mel bins, the ``<|audio_start|><|audio_pad|>
<|audio_end|>`` placeholder, an MoE text model with interleaved multimodal RoPE, an untied ``lm_head``, a vocab
padded past the tokenizer) and shrinks only the sizes. The talker (speech output) is left out
(``enable_audio_output`` false): EAGLE-3 drafts the thinker's text only, and the engines load the thinker alone.

No ``Qwen3OmniMoeProcessor`` is saved: its video processor needs torchvision, which the audio path never uses.
The directory holds what the adapter reads: the tokenizer (with the chat template) and the feature extractor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    WhisperFeatureExtractor,
)

from pipeline.testing.tiny_target import DEFAULT_MANIFEST, _train_tokenizer, default_corpus, default_root

logger = logging.getLogger(__name__)

# The model alias (entry point "audio_eagle.model_aliases" in pyproject.toml): `--model tiny-qwen3-omni`.
TINY_MODEL_NAME = "tiny-qwen3-omni"
BUILD_VERSION = 1

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_START, AUDIO_END, AUDIO_PAD, VISION_START, VISION_END, IMAGE_PAD)
SPECIAL_TOKENS += (VIDEO_PAD,)
# The named special tokens Qwen3-Omni's tokenizer carries (its processor reads them as attributes).
NAMED_TOKENS = {
    "audio_token": AUDIO_PAD,
    "audio_bos_token": AUDIO_START,
    "audio_eos_token": AUDIO_END,
    "image_token": IMAGE_PAD,
    "video_token": VIDEO_PAD,
    "vision_bos_token": VISION_START,
    "vision_eos_token": VISION_END,
}

# Qwen3-Omni-30B-A3B-Instruct's chat template, reduced to what audio conversations use: no default system prompt,
# an audio item renders as <|audio_start|><|audio_pad|><|audio_end|> (the processor expands the pad), items follow
# each other without separators, and the generation prompt is the bare assistant header (the Instruct model does
# not think). A bare {"type": "audio"} item counts as audio, as in the tiny Qwen2-Audio's template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass(frozen=True)
class TinyQwen3OmniConfig:
    """Sizes of the tiny Qwen3-Omni thinker. Frozen: hashed into the build directory's name."""

    seed: int = 0
    # Text model (Qwen3 MoE): 8 layers so EAGLE-3's default aux layers 2, 4, 5 are distinct.
    hidden_size: int = 64
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_experts: int = 4
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # sums to head_dim / 2, as [24, 20, 20] does for 128
    # Audio encoder (chunked Whisper-style, conv downsampling), 128 mel bins.
    d_model: int = 64
    encoder_layers: int = 2
    encoder_attention_heads: int = 2
    encoder_ffn_dim: int = 128
    downsample_hidden_size: int = 32
    num_mel_bins: int = 128
    # Vision encoder: built by the model class, never used by audio prompts; as small as it goes.
    vision_hidden_size: int = 32
    # Wider than the real model's 0.02: a random 64-wide MoE at 0.02 has near-flat logits and greedy repeats one
    # token, which would make drafting trivial and batched decoding tie-prone.
    initializer_range: float = 0.2
    vocab_size: int = 1000
    vocab_multiple: int = 64


DEFAULT_CONFIG = TinyQwen3OmniConfig()


def _build_tokenizer(corpus: list[str], config: TinyQwen3OmniConfig) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus, config.vocab_size, SPECIAL_TOKENS),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=config.max_position_embeddings,
        extra_special_tokens=NAMED_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_config(tokenizer: PreTrainedTokenizerFast, config: TinyQwen3OmniConfig) -> Qwen3OmniMoeConfig:
    ids = tokenizer.convert_tokens_to_ids
    text_vocab = (len(tokenizer) + config.vocab_multiple - 1) // config.vocab_multiple * config.vocab_multiple
    text_config = {
        "vocab_size": text_vocab,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "mrope_section": list(config.mrope_section),
            "interleaved": True,
        },
        "pad_token_id": ids(ENDOFTEXT),
        "eos_token_id": ids(IM_END),
        "initializer_range": config.initializer_range,
    }
    audio_config = {
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "encoder_attention_heads": config.encoder_attention_heads,
        "encoder_ffn_dim": config.encoder_ffn_dim,
        "num_mel_bins": config.num_mel_bins,
        "downsample_hidden_size": config.downsample_hidden_size,
        "output_dim": config.hidden_size,
    }
    vision_config = {
        "depth": 1,
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": 2 * config.vision_hidden_size,
        "num_heads": 2,
        "out_hidden_size": config.hidden_size,
        "deepstack_visual_indexes": [0],
    }
    thinker = {
        "text_config": text_config,
        "audio_config": audio_config,
        "vision_config": vision_config,
        "audio_token_id": ids(AUDIO_PAD),
        "audio_start_token_id": ids(AUDIO_START),
        "image_token_id": ids(IMAGE_PAD),
        "video_token_id": ids(VIDEO_PAD),
        "vision_start_token_id": ids(VISION_START),
        "initializer_range": config.initializer_range,
    }
    return Qwen3OmniMoeConfig(
        thinker_config=thinker,
        enable_audio_output=False,
        im_start_token_id=ids(IM_START),
        im_end_token_id=ids(IM_END),
    )


def _build_model(
    tokenizer: PreTrainedTokenizerFast, config: TinyQwen3OmniConfig
) -> Qwen3OmniMoeForConditionalGeneration:
    model_config = _model_config(tokenizer, config)
    torch.manual_seed(config.seed)  # initialisation is the RNG's only consumer: weights follow seed and config
    model = Qwen3OmniMoeForConditionalGeneration(model_config).to(torch.float32).eval()
    end, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config.eos_token_id = [end, pad]  # stop on either end marker, as the Instruct model does
    model.generation_config.pad_token_id = pad
    return model


def build_tiny_qwen3_omni(out_dir: Path, corpus: list[str], config: TinyQwen3OmniConfig = DEFAULT_CONFIG) -> Path:
    """Build the tiny thinker and its tokenizer/feature extractor into ``out_dir`` (atomically: a temp directory
    renamed at the end). Deterministic for a given config and corpus. FileExistsError if ``out_dir`` exists."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        tokenizer = _build_tokenizer([t for t in corpus if t], config)
        _build_model(tokenizer, config).save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp_dir)
        record = {"build_version": BUILD_VERSION, "config": asdict(config)}
        (tmp_dir / "tiny_target.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp_dir, out_dir)
        except OSError as err:
            raise FileExistsError(f"{out_dir} appeared during the build") from err
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def tiny_qwen3_omni_dirname(config: TinyQwen3OmniConfig, corpus: list[str]) -> str:
    """Seed plus a fingerprint of config, corpus and recipe (a changed one gets a fresh build)."""
    import hashlib

    digest = hashlib.sha256(json.dumps({"v": BUILD_VERSION, "config": asdict(config)}, sort_keys=True).encode())
    for text in corpus:
        digest.update(b"\0" + text.encode("utf-8"))
    return f"qwen3-omni-tiny-seed{config.seed}-{digest.hexdigest()[:10]}"


def ensure_tiny_qwen3_omni(
    root: Path | None = None, config: TinyQwen3OmniConfig = DEFAULT_CONFIG, manifest: Path | None = DEFAULT_MANIFEST
) -> Path:
    """Directory of the tiny Qwen3-Omni for ``config`` and ``manifest``, built on first use (safe to call from
    several processes at once: the first rename wins, the builds are identical)."""
    corpus = default_corpus(manifest)
    root = Path(root) if root is not None else default_root()
    out_dir = root / tiny_qwen3_omni_dirname(config, corpus)
    if not out_dir.exists():
        logger.info("building tiny Qwen3-Omni target in %s", out_dir)
        try:
            build_tiny_qwen3_omni(out_dir, corpus, config)
        except FileExistsError:
            pass
    return out_dir
