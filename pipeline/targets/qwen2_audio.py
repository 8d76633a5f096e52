"""Qwen2-Audio (transformers' ``Qwen2AudioForConditionalGeneration``) as an EAGLE-3 target."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.errors import TargetError
from pipeline.inputs.conversation import BadSample, Message
from pipeline.inputs.prompt import build_prompt
from pipeline.targets.base import AudioTarget, TargetInputs, TargetStates

AUDIO_TOKEN = "<|AUDIO|>"


def audio_token_count(mel_frames: int) -> int:
    """Audio tokens the encoder yields for a clip of ``mel_frames`` real frames (conv stride 2, pool 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2AudioTarget(AudioTarget):
    def __init__(self, path: str, name_or_path: str, dtype: torch.dtype, device: torch.device):
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as err:
            raise TargetError(f"cannot load Qwen2-Audio from {name_or_path!r}: {err}") from None
        text = self.model.config.text_config
        self.name_or_path = name_or_path
        self.num_layers = text.num_hidden_layers
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.audio_token_id = self.model.config.audio_token_id
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.dtype = dtype
        self.device = device

    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        features = self.processor.feature_extractor(
            wave,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",  # the encoder insists on 3000 frames (30 s); the mask marks the real ones
            return_tensors="pt",
        )
        frames = int(features["attention_mask"].sum())
        if audio_token_count(frames) < 1:
            raise BadSample(f"audio too short: {len(wave)} samples give no audio token")
        prompt = build_prompt(
            self.processor.tokenizer,
            self.processor.chat_template,
            messages,
            AUDIO_TOKEN,
            audio_token_count(frames),
            max_length,
        )
        model_inputs = {
            "input_features": features["input_features"].to(self.dtype),
            "feature_attention_mask": features["attention_mask"],
        }
        return TargetInputs(prompt.input_ids, prompt.loss_mask, model_inputs)

    @torch.no_grad()
    def forward(self, inputs: TargetInputs, layers: list[int]) -> TargetStates:
        ids = inputs.input_ids[None].to(self.device)
        # The inner model skips the lm_head: logits over a 156k vocabulary are not cached, only its input.
        out = self.model.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{k: v.to(self.device) for k, v in inputs.model_inputs.items()},
            output_hidden_states=True,
            use_cache=False,
        )
        states = out.hidden_states  # [0] merged input embeddings, [i] output of decoder layer i
        audio_positions = (ids[0] == self.audio_token_id).to(states[0].device)
        return TargetStates(
            hidden_states={i: states[i][0].cpu() for i in layers},
            final_hidden=out.last_hidden_state[0].cpu(),  # after the final norm: the lm_head input
            audio_embeds=states[0][0, audio_positions].cpu(),
        )

    def head_weights(self) -> dict[str, torch.Tensor]:
        language_model = self.model.model.language_model
        return {
            "embed_tokens": language_model.embed_tokens.weight.detach().cpu(),
            "norm": language_model.norm.weight.detach().cpu(),
            "lm_head": self.model.lm_head.weight.detach().cpu(),
        }

    def identity(self) -> dict:
        return {
            "name_or_path": self.name_or_path,
            "model_type": self.model.config.model_type,
            "architecture": type(self.model).__name__,
            "config": self.model.config.to_dict(),
            "tokenizer": type(self.processor.tokenizer).__name__,
            "tokenizer_vocab_size": len(self.processor.tokenizer),
            "chat_template": self.processor.chat_template,
            "audio_token": AUDIO_TOKEN,
            "audio_token_id": self.audio_token_id,
            "sampling_rate": self.sampling_rate,
        }
