"""Qwen2-Audio (transformers' ``Qwen2AudioForConditionalGeneration``) as an EAGLE-3 target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoProcessor, DynamicCache, Qwen2AudioForConditionalGeneration

from pipeline.errors import TargetError
from pipeline.inputs.conversation import BadSample, Message
from pipeline.inputs.prompt import build_prompt, render_chat
from pipeline.targets.base import AudioTarget, DraftDefaults, Sampling, StepOutput, TargetInputs, TargetStates
from pipeline.targets.hf_generation import end_token_ids, generate_batch, pad_token_id
from pipeline.targets.model_files import model_directory, tokenizer_digest, weights_digest

AUDIO_TOKEN = "<|AUDIO|>"


def audio_token_count(mel_frames: int) -> int:
    """Audio tokens the encoder yields for a clip of ``mel_frames`` real frames (conv stride 2, pool 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2AudioTarget(AudioTarget):
    model_type = "qwen2_audio"

    def __init__(self, path: str, name_or_path: str, dtype: torch.dtype, device: torch.device):
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as err:
            raise TargetError(f"cannot load Qwen2-Audio from {name_or_path!r}: {err}") from None
        self.tokenizer = self.processor.tokenizer
        text = self.model.config.text_config
        self.name_or_path = name_or_path
        self.path = path
        self._identity: dict | None = None
        self.num_layers = text.num_hidden_layers
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.audio_token_id = self.model.config.audio_token_id
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.dtype = dtype
        self.device = device
        self.eos_token_ids = end_token_ids(self.model, self.tokenizer)
        self.pad_token_id = pad_token_id(self.model, self.tokenizer, self.eos_token_ids)

    # -- stage one ---------------------------------------------------------------------------------------------

    def _audio_inputs(self, wave: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """-> (the encoder's inputs, the number of audio tokens the clip becomes)."""
        features = self.processor.feature_extractor(
            wave,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",  # the encoder insists on 3000 frames (30 s); the mask marks the real ones
            return_tensors="pt",
        )
        count = audio_token_count(int(features["attention_mask"].sum()))
        if count < 1:
            raise BadSample(f"audio too short: {len(wave)} samples give no audio token")
        model_inputs = {
            "input_features": features["input_features"].to(self.dtype),
            "feature_attention_mask": features["attention_mask"],
        }
        return model_inputs, count

    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        model_inputs, count = self._audio_inputs(wave)
        prompt = build_prompt(self.tokenizer, self.processor.chat_template, messages, AUDIO_TOKEN, count, max_length)
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

    def draft_defaults(self) -> DraftDefaults:
        """One decoder layer of the language model, as a Llama layer config."""
        text = self.model.config.text_config
        rope = getattr(text, "rope_parameters", None) or {}
        return DraftDefaults(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            rms_norm_eps=float(text.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            max_position_embeddings=text.max_position_embeddings,
            vocab_size=text.vocab_size,
        )

    def identity(self) -> dict:
        """What the target is, by content: a copy of the model elsewhere is the same target, any change of its
        weights, tokenizer, chat template or audio features another one. Computed once (it hashes the weights)."""
        if self._identity is None:
            self._identity = self._describe()
        return self._identity

    def _describe(self) -> dict:
        config = self.model.config.to_dict()
        config.pop("_name_or_path", None)  # where it was loaded from, not what it is
        return {
            "name_or_path": self.name_or_path,
            "model_type": self.model.config.model_type,
            "architectures": [type(self.model).__name__],
            "config": config,
            "weights": weights_digest(model_directory(self.path)),
            "draft_defaults": dict(self.draft_defaults()),
            "tokenizer": type(self.tokenizer).__name__,
            "tokenizer_vocab_size": len(self.tokenizer),
            "tokenizer_sha256": tokenizer_digest(self.tokenizer),
            "chat_template": self.processor.chat_template,
            "feature_extractor": self.processor.feature_extractor.to_dict(),
            "audio_token": AUDIO_TOKEN,
            "audio_token_id": self.audio_token_id,
            "sampling_rate": self.sampling_rate,
        }

    # -- generation --------------------------------------------------------------------------------------------

    def generation_inputs(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        text = render_chat(self.tokenizer, self.processor.chat_template, messages, generation_prompt=True)
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        where = (ids == self.audio_token_id).nonzero().flatten()
        if len(where) > 1:
            raise BadSample(f"rendered prompt holds {len(where)} audio placeholders; expected at most 1")
        model_inputs = {}
        if len(where) == 1:  # else the clip comes in a later user turn: this prompt is text only
            model_inputs, count = self._audio_inputs(wave)
            at = int(where[0])
            audio = torch.full((count,), self.audio_token_id, dtype=ids.dtype)
            ids = torch.cat([ids[:at], audio, ids[at + 1 :]])
        if len(ids) >= max_length:
            raise BadSample(
                f"over the length limit: the prompt has {len(ids)} tokens, no room for an answer within "
                f"--max-length {max_length}"
            )
        return TargetInputs(ids, torch.zeros(len(ids), dtype=torch.bool), model_inputs)

    def generate(
        self,
        prompts: Sequence[TargetInputs],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        eos_token_ids: Sequence[int] | None = None,
        checkpoint_settings: bool = True,
    ) -> list[list[int]]:
        # Audio inputs only of the prompts that hold the clip: the model fills audio positions in row order.
        with_audio = [p.model_inputs for p in prompts if bool((p.input_ids == self.audio_token_id).any())]
        model_inputs = {name: torch.cat([m[name] for m in with_audio]) for name in with_audio[0]} if with_audio else {}
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        ids = [p.input_ids for p in prompts]
        return generate_batch(
            self.model, ids, model_inputs, max_new_tokens, eos, self.pad_token_id, sampling, checkpoint_settings
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    # -- step by step decoding ---------------------------------------------------------------------------------

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

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
            **{k: v.to(self.device) for k, v in (model_inputs or {}).items()},
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=True,
        )
        states = out.hidden_states  # [0] the merged input embeddings (audio features scattered in)
        return StepOutput(out.logits[0], {i: states[i][0] for i in layers}, states[0][0])

    def crop_cache(self, cache: DynamicCache, length: int) -> None:
        cache.crop(length - cache.get_seq_length())  # transformers 5: a negative count removes that many tokens

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))
