"""The interface of a target model: everything the stages may ask of an audio LLM, and nothing model-specific.

An adapter (one per model family, registered by HF ``model_type`` in ``pipeline.targets``) hides the processor,
the chat template, the audio placeholder, the HF model classes and where the merged input embeddings come from.
The stages see only the types below:

- stage one (dump): ``prepare`` a conversation (or hand a ``preparer`` to worker processes), ``forward`` it once
  or ``forward_batch`` several samples together, record ``identity`` and ``head_weights``;
- regenerate and eval: ``generation_inputs`` (a prompt ending in the assistant header), batched ``generate``,
  ``decode``;
- speculative decoding: ``forward_step`` over a KV cache (``new_cache``, ``crop_cache``) returning logits, the
  requested hidden states and the merged input embeddings, and ``embed_tokens`` for drafted tokens.

Hidden-state layers are numbered as HF ``hidden_states``: 0 is the merged input embeddings, i the output of
decoder layer i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, TypedDict

import numpy as np
import torch

# What one forward yields for one sample, on the CPU: the cache's record of it (the cache owns its format).
from pipeline.cache.format import SampleStates as TargetStates
from pipeline.errors import TargetError
from pipeline.inputs.conversation import Message

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The KV cache of one sequence: made by ``new_cache`` and read only by the adapter that made it.
KVCache: TypeAlias = object


@dataclass
class TargetInputs:
    """One sample, ready for the target: ids and loss mask plus whatever tensors the model needs."""

    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class Preparer(Protocol):
    """What ``AudioTarget.prepare`` does, without the model: picklable, so worker processes can prepare samples
    ahead of the forward. Raises BadSample (or AudioError) with a reason, as ``prepare`` does."""

    def __call__(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs: ...


@dataclass
class StepOutput:
    """One forward of a single sequence over its new tokens, left on the target's device."""

    logits: torch.Tensor  # [T, V]
    hidden_states: dict[int, torch.Tensor]  # requested layer -> [T, H]
    input_embeds: torch.Tensor  # [T, H] merged input embeddings: audio features at audio positions


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy decoding; prompt r draws its noise from a generator seeded ``seeds[r]``, so its
    answer does not depend on what else is in the batch."""

    seeds: tuple[int, ...]
    temperature: float = 1.0
    top_p: float = 1.0


class DraftDefaults(TypedDict):
    """The Llama layer config an EAGLE-3 draft of this target defaults to (one layer shaped like the target's)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int


class AudioTarget(ABC):
    """An audio LLM seen as an EAGLE-3 target."""

    name_or_path: str  # as the user named it (model id or directory)
    model_type: str  # HF model_type: the key the adapter is registered under
    num_layers: int
    hidden_size: int
    vocab_size: int  # rows of the lm_head (may exceed the tokenizer's size)
    audio_token_id: int
    sampling_rate: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]  # the ids that end an answer

    # -- stage one ---------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        """Tokenize and mask a whole conversation, extract audio features; raises BadSample with a reason."""

    def preparer(self) -> Preparer:
        """``prepare`` as a callable that holds no model (processor, tokenizer, template only), for the dump's worker
        processes. The default is ``prepare`` bound to the whole adapter: forked workers share it copy-on-write, but
        where workers are spawned it would be pickled with the weights, so an adapter that holds a model overrides
        it."""
        return self.prepare

    @abstractmethod
    def forward(self, inputs: TargetInputs, layers: list[int]) -> TargetStates:
        """Run the target once over a prepared sample and return the requested hidden states, on the CPU."""

    def forward_batch(
        self, inputs: Sequence[TargetInputs], layers: list[int], trim_audio_padding: bool = False
    ) -> list[TargetStates]:
        """Several prepared samples in one forward (padded, masked); each sample's states as ``forward`` gives them,
        padding removed. One sample without ``trim_audio_padding`` is ``forward`` itself (bit-exact); a batch equals
        it within the reduction-order noise of batched kernels (the dump's tests state the tolerance).

        ``trim_audio_padding``: run the audio encoder over the clip's real frames (plus the margin its convolutions
        read) instead of the fixed length the checkpoint pads every clip to; only for encoders that never let a real
        frame attend to a padded one. The default implementation runs one sample at a time and cannot trim."""
        if trim_audio_padding:
            raise TargetError(f"{type(self).__name__} cannot trim audio padding; run without --trim-audio-padding")
        return [self.forward(x, layers) for x in inputs]

    def audio_encoder(self) -> torch.nn.Module | None:
        """The module that turns audio features into embeddings, for benchmarks that time it (None: not known)."""
        return None

    @abstractmethod
    def head_weights(self) -> dict[str, torch.Tensor]:
        """``embed_tokens``, ``norm`` and ``lm_head`` weights: all stage two ever needs of the target."""

    @abstractmethod
    def identity(self) -> dict:
        """What the cache manifest records (JSON). Stage two reads these keys and treats the rest as opaque:
        ``name_or_path``, ``model_type``, ``config`` (the model's own, to refuse mixing two targets in a cache),
        ``audio_token_id``, ``draft_defaults`` (a ``DraftDefaults``) and ``architectures`` (the verifier
        architectures the servers' draft exports name)."""

    def default_layers(self) -> list[int]:
        """EAGLE-3's auxiliary layers (2, L//2, L-3) as HF hidden_states indices."""
        n = self.num_layers
        return sorted({2, n // 2, n - 3})

    # -- generation (regenerate, eval) ---------------------------------------------------------------------------

    @abstractmethod
    def generation_inputs(self, messages: list[Message], wave: np.ndarray, max_length: int) -> TargetInputs:
        """The conversation so far (ending before an assistant turn) rendered with the chat template's assistant
        header, the audio inputs included if it holds the clip; the loss mask is empty. Raises BadSample when the
        prompt leaves no room for an answer within ``max_length`` tokens."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[TargetInputs],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        eos_token_ids: Sequence[int] | None = None,
        checkpoint_settings: bool = True,
    ) -> list[list[int]]:
        """The new tokens of each prompt, generated together (greedy unless ``sampling``), each cut after its first
        end token (``eos_token_ids``, default the target's). ``checkpoint_settings``: apply the checkpoint's own
        generation settings (repetition penalty, top-k, ...) under these; False gives the pure argmax that
        speculative decoding must reproduce."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids as text."""

    # -- step by step decoding (speculative decoding) ------------------------------------------------------------

    @abstractmethod
    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""

    @abstractmethod
    def forward_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None,
        layers: list[int],
        model_inputs: dict[str, torch.Tensor] | None = None,
    ) -> StepOutput:
        """Feed ``input_ids`` [T] after the tokens ``cache`` holds (and append them to it); ``model_inputs``
        (the audio inputs) with the prompt only. ``cache=None``: one forward over a whole sequence, kept nowhere."""

    @abstractmethod
    def crop_cache(self, cache: KVCache, length: int) -> None:
        """Keep the first ``length`` tokens of ``cache`` (drop rejected draft tokens)."""

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's token embeddings of ``ids`` (any shape, any device) -> [*ids.shape, H] on its device."""
