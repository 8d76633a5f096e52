"""Qwen3-Omni (transformers' ``Qwen3OmniMoeForConditionalGeneration``, its thinker) as an EAGLE-3 target.

What the serving engines do with this family, and so what the cache and the exports hold (read from their code):

- **Aux states**: the thinker's language model. SGLang's ``Qwen3OmniMoeForConditionalGeneration``
  (``srt/models/qwen3_omni_moe.py``, PR 33051) serves the thinker only (no talker) and delegates
  ``set_eagle3_layers_to_capture`` and ``get_embed_and_head`` to it: the captured layers are the thinker's MoE
  decoder layers, the draft shares the thinker's ``embed_tokens`` and the verifier's head is the thinker's
  ``lm_head``. So the adapter is the thinker: HF ``hidden_states`` of ``thinker.model`` (0 = merged embeddings,
  i = output of decoder layer i), ``head_weights`` from ``thinker.model.language_model`` and ``thinker.lm_head``.
- **Audio embeddings**: the thinker merges the audio encoder's output into the token embeddings at
  ``<|audio_pad|>`` positions (``masked_scatter``, no deepstack for audio: deepstack adds only visual features);
  SGLang feeds the draft these merged embeddings, vLLM the placeholder's, exactly as for any audio target
  (``pipeline/draft/serving.py`` holds the engine rules; nothing here is family-specific).
- **Positions**: the thinker uses interleaved multimodal RoPE (3 axes). Audio is one-dimensional in time: an
  audio span gets consecutive positions on all three axes (``get_rope_index``: ``arange(audio_len)`` per axis),
  and with no image or video the model computes ``cumsum(attention_mask) - 1`` on every axis, so the mRoPE delta is
  0 and every axis holds the token index. The engines give an EAGLE-3 draft (a Llama layer with 1-D RoPE) the
  target's temporal position per token (vLLM ``v1/spec_decode/eagle.py``: "spec tokens are text tokens; all 3
  M-RoPE dims are equal", ``target_positions[0]``; SGLang draft-extend: one mRoPE position per extended token,
  PR 34154), i.e. the token index here: the same positions training and ``eval-draft`` use. ``forward_step``
  passes these positions explicitly (the model's own incremental path keeps its delta on the module, shared by
  every sequence) and refuses a prompt whose delta is not 0 (a vision input), for which it would not hold.

The checkpoint's ``Qwen3OmniMoeProcessor`` is not used: its video processor needs torchvision, and the audio path
is the tokenizer, the chat template and the Whisper feature extractor, which are loaded on their own. Audio
features are not padded to 30 s (the encoder runs 100-frame windows over the real frames only), so a clip of L mel
frames becomes ``_get_feat_extract_output_lengths(L, n_window)`` audio tokens, as the processor expands them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoTokenizer,
    DynamicCache,
    Qwen3OmniMoeForConditionalGeneration,
)
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

from pipeline.errors import TargetError
from pipeline.inputs.conversation import BadSample, Message
from pipeline.inputs.prompt import build_prompt
from pipeline.targets.base import AudioTarget, DraftDefaults, Sampling, StepOutput, TargetInputs, TargetStates
from pipeline.targets.hf_generation import (
    HFDecoding,
    draft_defaults_of,
    end_token_ids,
    generate_batch,
    generation_prompt,
    hidden_states_of,
    pad_token_id,
)
from pipeline.targets.model_files import model_directory, tokenizer_digest, weights_digest

AUDIO_TOKEN = "<|audio_pad|>"
MROPE_AXES = 3


def load_chat_template(directory: Path, tokenizer) -> str:
    """The chat template: the tokenizer's, else the processor's file (``chat_template.jinja`` or ``.json``)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").exists():
        return json.loads((directory / "chat_template.json").read_text())["chat_template"]
    raise TargetError(f"{directory} has no chat template (tokenizer, chat_template.jinja or chat_template.json)")


class Qwen3OmniInputs:
    """The processor side of the adapter (tokenizer, chat template, Whisper features), without the model: what
    ``prepare`` runs, picklable for the dump's preparation workers."""

    def __init__(self, tokenizer, chat_template: str, feature_extractor, n_window: int, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.feature_extractor = feature_extractor
        self.n_window = n_window
        self.dtype = dtype
        self.sampling_rate = feature_extractor.sampling_rate

    def audio_inputs(self, wave: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """-> (the encoder's inputs, the number of audio tokens the clip becomes), as ``Qwen3OmniMoeProcessor``
        makes them: features over the clip's own frames (``padding=True`` pads a batch to its longest clip only)."""
        features = self.feature_extractor(
            wave,
            sampling_rate=self.sampling_rate,
            padding=True,
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        frames = features["attention_mask"].sum(-1)
        count = int(_get_feat_extract_output_lengths(frames, self.n_window)[0])
        if count < 1:
            raise BadSample(f"audio too short: {len(wave)} samples give no audio token")
        return {
            "input_features": features["input_features"].to(self.dtype),
            "feature_attention_mask": features["attention_mask"],
        }, count

    def __call__(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        model_inputs, count = self.audio_inputs(wave)
        prompt = build_prompt(self.tokenizer, self.chat_template, messages, AUDIO_TOKEN, count, max_length)
        return TargetInputs(prompt.input_ids, prompt.loss_mask, model_inputs)


def pad_features(inputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several clips' features as one batch, padded on the right to the longest (the mask marks real frames; the
    thinker reads only those), as the processor pads a batch."""
    frames = max(m["input_features"].shape[-1] for m in inputs)
    features = [
        torch.nn.functional.pad(m["input_features"], (0, frames - m["input_features"].shape[-1])) for m in inputs
    ]
    masks = [
        torch.nn.functional.pad(m["feature_attention_mask"], (0, frames - m["feature_attention_mask"].shape[-1]))
        for m in inputs
    ]
    return {"input_features": torch.cat(features), "feature_attention_mask": torch.cat(masks)}


class Qwen3OmniTarget(HFDecoding, AudioTarget):
    model_type = "qwen3_omni_moe"

    def __init__(self, path: str, name_or_path: str, dtype: torch.dtype, device: torch.device):
        try:
            directory = model_directory(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            feature_extractor = AutoFeatureExtractor.from_pretrained(path)
            self.chat_template = load_chat_template(directory, self.tokenizer)
            # The talker (speech output) is never built: EAGLE-3 drafts the thinker's text, as the engines serve it.
            full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=dtype, enable_audio_output=False)
        except (OSError, ValueError) as err:
            raise TargetError(f"cannot load Qwen3-Omni from {name_or_path!r}: {err}") from None
        self.model = full.thinker.to(device).eval()
        self.model.generation_config = full.generation_config  # the checkpoint's end tokens and settings
        self.architectures = [type(full).__name__]  # the verifier the engines load (SGLang's EntryClass)
        self.config = full.config
        text = self.model.config.text_config
        self.name_or_path = name_or_path
        self.path = path
        self._identity: dict | None = None
        self.num_layers = text.num_hidden_layers
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.audio_token_id = self.model.config.audio_token_id
        self.sampling_rate = feature_extractor.sampling_rate
        n_window = self.model.config.audio_config.n_window
        self._preparer = Qwen3OmniInputs(self.tokenizer, self.chat_template, feature_extractor, n_window, dtype)
        self.dtype = dtype
        self.device = device
        self.eos_token_ids = end_token_ids(self.model, self.tokenizer)
        self.pad_token_id = pad_token_id(self.model, self.tokenizer, self.eos_token_ids)

    # -- stage one ---------------------------------------------------------------------------------------------

    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        return self._preparer(messages, wave, max_length)

    def preparer(self) -> Qwen3OmniInputs:
        return self._preparer

    def forward(self, inputs: TargetInputs, layers: list[int]) -> TargetStates:
        # The thinker's inner model, as SGLang captures it; the positions the forward computed are then checked.
        states = hidden_states_of(self.model.model, inputs, layers, self.audio_token_id, self.device)
        self._check_positions()
        return states

    def _check_positions(self) -> None:
        """The prompt's mRoPE delta, which the forward just computed, must be 0: every axis the token index."""
        delta = self.model.model.rope_deltas
        if delta is not None and bool((delta != 0).any()):
            raise BadSample(f"mRoPE positions differ from the token index (delta {delta.flatten().tolist()})")

    def audio_encoder(self) -> torch.nn.Module:
        return self.model.model.audio_tower

    def head_weights(self) -> dict[str, torch.Tensor]:
        language_model = self.model.model.language_model
        return {
            "embed_tokens": language_model.embed_tokens.weight.detach().cpu(),
            "norm": language_model.norm.weight.detach().cpu(),
            "lm_head": self.model.lm_head.weight.detach().cpu(),
        }

    def draft_defaults(self) -> DraftDefaults:
        """One decoder layer of the thinker's language model as a dense Llama layer (the draft has no experts):
        its width, heads and RoPE base, and the dense ``intermediate_size`` the text config declares."""
        return draft_defaults_of(self.model.config.text_config)

    def identity(self) -> dict:
        """What the target is, by content (weights, tokenizer, chat template, audio features); computed once."""
        if self._identity is None:
            self._identity = self._describe()
        return self._identity

    def _describe(self) -> dict:
        config = self.config.to_dict()
        config.pop("_name_or_path", None)  # where it was loaded from, not what it is
        return {
            "name_or_path": self.name_or_path,
            "model_type": self.config.model_type,
            "architectures": self.architectures,
            "config": config,
            "weights": weights_digest(model_directory(self.path)),
            "draft_defaults": dict(self.draft_defaults()),
            "tokenizer": type(self.tokenizer).__name__,
            "tokenizer_vocab_size": len(self.tokenizer),
            "tokenizer_sha256": tokenizer_digest(self.tokenizer),
            "chat_template": self.chat_template,
            "feature_extractor": self._preparer.feature_extractor.to_dict(),
            "audio_token": AUDIO_TOKEN,
            "audio_token_id": self.audio_token_id,
            "sampling_rate": self.sampling_rate,
            "aux_states_from": "thinker.model.language_model",
            "draft_positions": "token index (mRoPE temporal axis; audio-only prompts have delta 0)",
        }

    # -- generation --------------------------------------------------------------------------------------------

    def generation_inputs(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        audio_inputs = partial(self._preparer.audio_inputs, wave)  # called only if the prompt holds the clip
        return generation_prompt(
            self.tokenizer, self.chat_template, messages, self.audio_token_id, audio_inputs, max_length
        )

    def generate(
        self,
        prompts: Sequence[TargetInputs],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        eos_token_ids: Sequence[int] | None = None,
        checkpoint_settings: bool = True,
    ) -> list[list[int]]:
        # Audio inputs only of the prompts that hold the clip (the model fills audio positions in row order),
        # padded to the longest clip: clips keep their own lengths here, unlike a 30 s encoder's.
        with_audio = [p.model_inputs for p in prompts if bool((p.input_ids == self.audio_token_id).any())]
        model_inputs = pad_features(with_audio) if with_audio else {}
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        ids = [p.input_ids for p in prompts]
        return generate_batch(
            self.model, ids, model_inputs, max_new_tokens, eos, self.pad_token_id, sampling, checkpoint_settings
        )

    # -- step by step decoding ---------------------------------------------------------------------------------

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config.text_config)

    @torch.no_grad()
    def forward_step(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache | None,
        layers: list[int],
        model_inputs: dict[str, torch.Tensor] | None = None,
    ) -> StepOutput:
        ids = input_ids.to(self.device)[None]
        seen = cache.get_seq_length() if cache is not None else 0
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones(1, seen + ids.shape[1], dtype=torch.long, device=self.device),
            position_ids=self._positions(seen, ids.shape[1]),
            **{k: v.to(self.device) for k, v in (model_inputs or {}).items()},
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=True,
        )
        states = out.hidden_states  # [0] the merged input embeddings (audio features scattered in)
        return StepOutput(out.logits[0], {i: states[i][0] for i in layers}, states[0][0])

    def _positions(self, start: int, length: int) -> torch.Tensor:
        """mRoPE positions [3, 1, length] of tokens start.. of an audio/text sequence: the token index on every
        axis (see the module docstring), passed explicitly so no state kept on the model is read."""
        positions = torch.arange(start, start + length, device=self.device)
        return positions.view(1, 1, -1).expand(MROPE_AXES, 1, -1)
