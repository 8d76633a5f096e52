"""Qwen2-Audio (transformers' ``Qwen2AudioForConditionalGeneration``) as an EAGLE-3 target.

Batches (``forward_batch``) are padded on the right with an attention mask: every real token keeps its position
and attends to the same real tokens as alone, so the states at real positions equal the one-sample forward within
the reduction-order noise of batched kernels, and only real rows are copied out.

The encoder insists on 3000 mel frames (30 s) per clip, and a short clip pays for all of them. It never lets a
real frame see a padded one through attention (padded keys are masked; convolutions, pooling and norms are local),
so ``trim_audio_padding`` runs it over the longest clip's real frames plus the two padded frames its convolutions
read, sliced from the same 3000-frame features: the same values as the full-length encoder, up to reduction order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, DynamicCache, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from pipeline.errors import TargetError
from pipeline.inputs.conversation import BadSample, Message
from pipeline.inputs.prompt import build_prompt
from pipeline.targets.base import (
    AudioTarget,
    DraftDefaults,
    Sampling,
    StepOutput,
    TargetInputs,
    TargetStates,
)
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

AUDIO_TOKEN = "<|AUDIO|>"
# Zero samples computed after a clip before its features are extended to 30 s: past the STFT's half window (200),
# so every frame that sees the clip is computed as at full length, and enough for several pure padding frames.
PAD_MARGIN_SAMPLES = 1600


def audio_token_count(mel_frames: int) -> int:
    """Audio tokens the encoder yields for a clip of ``mel_frames`` real frames (conv stride 2, pool 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2AudioInputs:
    """The processor side of the adapter (tokenizer, chat template, Whisper features), without the model: what
    ``prepare`` runs, picklable for the dump's preparation workers."""

    def __init__(self, processor, dtype: torch.dtype):
        self.processor = processor
        self.dtype = dtype
        self.sampling_rate = processor.feature_extractor.sampling_rate

    def audio_inputs(self, wave: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        """-> (the encoder's inputs, the number of audio tokens the clip becomes)."""
        features = self.features(wave)
        count = audio_token_count(int(features["attention_mask"].sum()))
        if count < 1:
            raise BadSample(f"audio too short: {len(wave)} samples give no audio token")
        model_inputs = {
            "input_features": features["input_features"].to(self.dtype),
            "feature_attention_mask": features["attention_mask"],
        }
        return model_inputs, count

    def features(self, wave: np.ndarray) -> dict[str, torch.Tensor]:
        """Whisper features padded to 3000 frames (30 s: the encoder insists), the mask marking the real ones, as the
        feature extractor makes them, but computed over the clip and a margin only (a 2 s clip costs a tenth). Each
        frame depends on its own window and on the spectrum's maximum, which padding never raises: the frames past
        the margin are all the same padding frame, copied from the last one computed. Bit for bit the full-length
        result (tested); with dithering, where padding frames differ, all 30 s are computed."""
        extractor = self.processor.feature_extractor
        hop, frames = extractor.hop_length, extractor.nb_max_frames
        length = min(extractor.n_samples, -(-(len(wave) + PAD_MARGIN_SAMPLES) // hop) * hop)
        out = self._extract(wave, length)
        features, mask = out["input_features"], out["attention_mask"]
        missing = frames - features.shape[-1]
        if missing <= 0:
            return {"input_features": features, "attention_mask": mask}
        if not torch.equal(features[..., -1], features[..., -2]):  # not a constant padding frame: no shortcut
            return self._extract(wave, extractor.n_samples)
        return {
            "input_features": torch.cat([features, features[..., -1:].expand(-1, -1, missing)], dim=-1),
            "attention_mask": torch.cat([mask, mask.new_zeros(mask.shape[0], missing)], dim=-1),
        }

    def _extract(self, wave: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        return self.processor.feature_extractor(
            wave,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            max_length=length,
            return_tensors="pt",
        )

    def __call__(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        model_inputs, count = self.audio_inputs(wave)
        tokenizer, template = self.processor.tokenizer, self.processor.chat_template
        prompt = build_prompt(tokenizer, template, messages, AUDIO_TOKEN, count, max_length)
        return TargetInputs(prompt.input_ids, prompt.loss_mask, model_inputs)


class Qwen2AudioTarget(HFDecoding, AudioTarget):
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
        self._preparer = Qwen2AudioInputs(self.processor, dtype)
        self.dtype = dtype
        self.device = device
        self.eos_token_ids = end_token_ids(self.model, self.tokenizer)
        self.pad_token_id = pad_token_id(self.model, self.tokenizer, self.eos_token_ids)

    # -- stage one ---------------------------------------------------------------------------------------------

    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        return self._preparer(messages, wave, max_length)

    def preparer(self) -> Qwen2AudioInputs:
        return self._preparer

    def forward(self, inputs: TargetInputs, layers: list[int]) -> TargetStates:
        return hidden_states_of(self.model.model, inputs, layers, self.audio_token_id, self.device)

    @torch.no_grad()
    def forward_batch(
        self, inputs: Sequence[TargetInputs], layers: list[int], trim_audio_padding: bool = False
    ) -> list[TargetStates]:
        if len(inputs) == 1 and not trim_audio_padding:
            return [self.forward(inputs[0], layers)]  # the plain forward, bit-exact
        lengths = [len(x.input_ids) for x in inputs]
        ids = torch.full((len(inputs), max(lengths)), self.pad_token_id, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : lengths[row]] = x.input_ids  # right padding: every real token keeps its position
        ids = ids.to(self.device)
        real = torch.arange(ids.shape[1], device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None]
        features = torch.cat([x.model_inputs["input_features"] for x in inputs]).to(self.device)
        frames = torch.cat([x.model_inputs["feature_attention_mask"] for x in inputs]).to(self.device)
        if trim_audio_padding:
            out = self.model.model.language_model(
                inputs_embeds=self._merged_embeds(ids, features, frames),
                attention_mask=real.long(),
                output_hidden_states=True,
                use_cache=False,
            )
        else:
            out = self.model.model(
                input_ids=ids,
                attention_mask=real.long(),
                input_features=features,
                feature_attention_mask=frames,
                output_hidden_states=True,
                use_cache=False,
            )
        return self._split(out, ids, real, lengths, layers)

    def _split(self, out, ids: torch.Tensor, real: torch.Tensor, lengths: list[int], layers: list[int]) -> list:
        """Each sample's states from a padded batch: only real rows leave the device (padding never reaches the
        cache), gathered row-major so that sample b's rows are one contiguous block."""
        states = out.hidden_states
        hidden = {i: states[i][real].cpu().split(lengths) for i in layers}
        final = out.last_hidden_state[real].cpu().split(lengths)
        audio = ids == self.audio_token_id  # padding holds the pad id, never the audio id
        audio_embeds = states[0][audio].cpu().split(audio.sum(1).tolist())
        return [
            TargetStates({i: hidden[i][row] for i in layers}, final[row], audio_embeds[row])
            for row in range(len(lengths))
        ]

    def _merged_embeds(self, ids: torch.Tensor, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the audio placeholders filled by the encoder run on the real frames only."""
        embeds = self.model.get_input_embeddings()(ids)
        audio = self._trimmed_audio_embeds(features, frames)
        where = ids == self.audio_token_id
        if audio.shape[0] != int(where.sum()):
            raise BadSample(f"{audio.shape[0]} audio embeddings for {int(where.sum())} audio tokens")
        return embeds.masked_scatter(where[..., None], audio.to(embeds.dtype))

    def _trimmed_audio_embeds(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Projected audio embeddings [audio tokens of the batch, H], row-major, as the model's own forward computes
        them (``Qwen2AudioModel.forward``, ``Qwen2AudioEncoder.forward``) but over fewer mel frames."""
        tower = self.model.model.audio_tower
        conv_lengths, token_lengths = tower._get_feat_extract_output_lengths(frames.sum(-1))
        # conv2's last real output reads conv1 up to the frame just past the real ones, and conv1 reads one further:
        # two padded frames, taken from the same 3000-frame features the full-length forward sees.
        keep = min(features.shape[-1], int(frames.sum(-1).max()) + 2)
        x = F.gelu(tower.conv1(features[..., :keep].to(tower.conv1.weight.dtype)))
        x = F.gelu(tower.conv2(x)).permute(0, 2, 1)
        positions = torch.arange(x.shape[1], device=x.device)
        x = x + tower.embed_positions.weight[: x.shape[1]]
        mask = create_bidirectional_mask(
            config=tower.config, inputs_embeds=x, attention_mask=(positions[None] < conv_lengths[:, None]).long()
        )
        for layer in tower.layers:
            x = layer(x, mask)
        x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = self.model.model.multi_modal_projector(tower.layer_norm(x))
        return x[torch.arange(x.shape[1], device=x.device)[None] < token_lengths[:, None]]

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
        """One decoder layer of the language model, as a Llama layer config."""
        return draft_defaults_of(self.model.config.text_config)

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
        audio_inputs = partial(self._preparer.audio_inputs, wave)  # called only if the prompt holds the clip
        return generation_prompt(
            self.tokenizer, self.processor.chat_template, messages, self.audio_token_id, audio_inputs, max_length
        )

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
