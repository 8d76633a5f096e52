"""The target model behind a small adapter, so that other audio LLMs plug in without touching the stages.

An adapter turns (conversation, waveform) into model inputs, runs one forward, and hands back exactly what an
EAGLE-3 head learns from. Everything model-specific (processor, audio placeholder, where the merged input
embeddings come from) lives in the adapter; the dump stage only sees the types below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.errors import TargetError
from pipeline.inputs.conversation import Message

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class TargetInputs:
    """One sample, ready for the target: ids and loss mask plus whatever tensors the model needs."""

    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TargetStates:
    """What one forward yields for one sample, on the CPU."""

    hidden_states: dict[int, torch.Tensor]  # HF hidden_states index -> [T, H]
    final_hidden: torch.Tensor  # [T, H], post final norm (the lm_head input)
    audio_embeds: torch.Tensor  # [A, H], merged input embeddings at the audio positions, in order


class AudioTarget(ABC):
    """A transformers audio LLM seen as an EAGLE-3 target."""

    name_or_path: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    audio_token_id: int
    sampling_rate: int
    dtype: torch.dtype

    @abstractmethod
    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        """Tokenize and mask a conversation, extract audio features; raises BadSample with a reason."""

    @abstractmethod
    def forward(self, inputs: TargetInputs, layers: list[int]) -> TargetStates:
        """Run the target once and return the states of the requested HF hidden_states indices."""

    @abstractmethod
    def head_weights(self) -> dict[str, torch.Tensor]:
        """``embed_tokens``, ``norm`` and ``lm_head`` weights: all stage two ever needs of the target."""

    @abstractmethod
    def identity(self) -> dict:
        """Model id, config, tokenizer and chat template, recorded in the cache manifest."""

    def default_layers(self) -> list[int]:
        """EAGLE-3's auxiliary layers (2, L//2, L-3) as HF hidden_states indices."""
        n = self.num_layers
        return sorted({2, n // 2, n - 3})


def load_target(model: str, dtype: str, device: str | torch.device) -> AudioTarget:
    """Load the adapter that matches the checkpoint's ``model_type``."""
    from transformers import AutoConfig

    from pipeline.targets.qwen2_audio import Qwen2AudioTarget
    from pipeline.testing.tiny_target import resolve_model_path

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise TargetError(
            f"cannot read a model config from {model!r}: {err}\n"
            "Pass --model tiny, an HF model id already in your HF cache, or a local model directory."
        ) from None
    adapters = {"qwen2_audio": Qwen2AudioTarget}
    if config.model_type not in adapters:
        raise TargetError(f"no adapter for model_type {config.model_type!r}; supported: {sorted(adapters)}")
    return adapters[config.model_type](path, model, DTYPES[dtype], torch.device(device))
