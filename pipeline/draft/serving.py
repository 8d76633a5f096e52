"""What each serving engine feeds an EAGLE-3 draft at audio positions, and what a draft was trained to read there.

Both engines run the draft's prefill on the target's prompt rows shifted left by one: draft row t reads the target's
aux states of token t and the *embedding of token t+1*; the last row of each request reads the token the target has
just sampled. They differ in what "the embedding" is where token t+1 is audio (read from their code, late 2026):

``sglang``: the target's merged input embeddings (audio features at audio positions). ``general_mm_embed_routine``
    (``srt/managers/mm_utils.py``) keeps them as ``forward_batch.mm_input_embeds``; the draft's prefill shifts them
    left by one within each request, copies the row before into each request's last row and then overwrites that row
    with the embedding of the newly sampled token (``_shift_mm_input_embeds_for_draft_prefill`` in
    ``srt/speculative/eagle_worker_v2.py``; its unit test expects rows e1,e1,e2,e4,e5,e5 for request lengths [2,1,3]
    before the overwrite; the alignment was fixed in issue 35440 / PR 35465). Decode steps embed the drafted tokens
    with ``embed_tokens``, which ``set_embed`` takes from the target.
``vllm``: the placeholder token's embedding. ``v1/spec_decode/eagle.py`` shifts the token ids left by one over the
    flat batch (``input_ids[:n-1] = target_token_ids[1:]``) and writes each request's sampled token into its last
    slot (``input_ids[last_token_indices] = next_token_ids``); it passes the multimodal embeddings on, but
    ``Eagle3LlamaForCausalLM.embed_input_ids`` (``model_executor/models/llama_eagle3.py``) ignores them and embeds
    the ids: at audio positions the audio placeholder id. The drafter shares the target's ``embed_tokens`` when the
    checkpoint has none (ours never has one: ``export``), so that is the target's placeholder embedding.

``draft_prefill_embeds`` builds those rows for a flat batch of requests, for either engine; ``eval-draft --serve``
decodes with them. Training reads the same rows (``ttt_loss``: row t takes the embedding of token t+1) with the
audio positions chosen by ``--audio-embeds``: ``merged`` (SGLang's), ``placeholder`` (vLLM's) or ``mixed`` (per
sample, seeded, so that one draft serves under both).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Engine = Literal["sglang", "vllm"]
ENGINES: tuple[Engine, ...] = ("sglang", "vllm")
AudioEmbeds = Literal["merged", "placeholder", "mixed"]
AUDIO_EMBEDS: tuple[AudioEmbeds, ...] = ("merged", "placeholder", "mixed")

# What each engine's draft reads at audio positions, named as training's ``--audio-embeds`` names it.
ENGINE_AUDIO_EMBEDS: dict[Engine, str] = {"sglang": "merged", "vllm": "placeholder"}
ENGINE_NAMES: dict[Engine, str] = {"sglang": "SGLang", "vllm": "vLLM"}

# The measured price of serving a draft on the engine it was not trained for (results/quality/QUALITY.md, melody
# task, K=7, the same 41 held-out clips), quoted by the warnings below.
MISMATCH_COST: dict[tuple[str, Engine], str] = {
    ("merged", "vllm"): "tau 1.76 against 3.99 for a draft trained for vLLM, 0.87x the speed of plain greedy",
    ("placeholder", "sglang"): "tau 3.24 against 4.14 for a draft trained for SGLang",
}


def check_engine(engine: str) -> Engine:
    if engine not in ENGINES:
        raise ValueError(f"serving engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    return engine  # type: ignore[return-value]


def check_audio_embeds(audio_embeds: str, placeholder_share: float = 0.5) -> None:
    if audio_embeds not in AUDIO_EMBEDS:
        raise ValueError(f"audio_embeds must be one of {', '.join(AUDIO_EMBEDS)}, not {audio_embeds!r}")
    if not 0.0 <= placeholder_share <= 1.0:
        raise ValueError(f"placeholder_share must lie in [0, 1], not {placeholder_share}")


# ------------------------------------------------------------------------------------------- the engines' rule


def draft_prefill_embeds(
    engine: Engine,
    merged: torch.Tensor,
    placeholder: torch.Tensor,
    request_lengths: Sequence[int],
    sampled: torch.Tensor,
) -> torch.Tensor:
    """The input embedding of every draft prefill row of a flat batch of requests, as ``engine`` builds it.

    ``merged`` [N, H]: the target's input embeddings of the N prompt tokens with the audio features merged in;
    ``placeholder`` [N, H]: the token embeddings of the same ids (the audio placeholder's at audio positions);
    ``request_lengths``: tokens per request, summing to N; ``sampled`` [R, H]: the embedding of each request's newly
    sampled token. Row t of a request gets its token t+1's embedding, its last row ``sampled``."""
    if sum(request_lengths) != len(merged) or len(sampled) != len(request_lengths):
        raise ValueError(f"request lengths {list(request_lengths)} do not match {len(merged)} rows / {len(sampled)}")
    source = merged if ENGINE_AUDIO_EMBEDS[check_engine(engine)] == "merged" else placeholder
    rows, start = torch.empty_like(source), 0
    for r, length in enumerate(request_lengths):
        stop = start + length
        rows[start : stop - 1] = source[start + 1 : stop]  # shifted left within the request
        rows[stop - 1] = sampled[r]  # the last row: the newly sampled token
        start = stop
    return rows


def as_served(batch: dict, engine: Engine, audio_token_id: int, placeholder_embedding: torch.Tensor) -> dict:
    """A training batch read with merged audio embeddings, as ``engine`` would feed the draft (a copy for vLLM)."""
    if ENGINE_AUDIO_EMBEDS[check_engine(engine)] == "merged":
        return batch
    embeds = batch["inputs_embeds"].clone()
    audio = batch["input_ids"] == audio_token_id
    embeds[audio] = placeholder_embedding.to(embeds.device, embeds.dtype)
    return {**batch, "inputs_embeds": embeds}


# ------------------------------------------------------------------------------------- what a draft learned


def reads_merged(audio_embeds: AudioEmbeds, key: str, seed: int, epoch: int, placeholder_share: float) -> bool:
    """Whether a training sample's audio positions get the merged embeddings (else the placeholder's).

    ``mixed`` decides per (seed, epoch, sample key) by a stable hash, so runs are reproducible, every rank and
    worker agrees, and a sample is seen both ways over the epochs."""
    if audio_embeds != "mixed":
        return audio_embeds == "merged"
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()  # not CRC: it is linear
    draw = int.from_bytes(digest, "big") / 2**64
    return draw >= placeholder_share


@dataclass(frozen=True)
class ServingRecord:
    """What a draft was trained on at audio positions, written into both exports' configs under ``KEY`` (a field
    no server reads) and used to warn before a draft is exported or evaluated for an engine it was not trained for."""

    audio_embeds: str
    placeholder_share: float | None = None  # under ``mixed``

    KEY = "audio_eagle"

    @property
    def engines(self) -> list[Engine]:
        """The engines this draft was trained for, the best-matched first."""
        if self.audio_embeds == "mixed":
            return list(ENGINES)
        return [e for e in ENGINES if ENGINE_AUDIO_EMBEDS[e] == self.audio_embeds]

    def to_config(self) -> dict:
        record = {"trained_audio_embeds": self.audio_embeds, "serve": self.engines}
        if self.audio_embeds == "mixed":
            record["placeholder_share"] = self.placeholder_share
        return {self.KEY: record}

    @classmethod
    def from_config(cls, config: dict) -> ServingRecord | None:
        """The record in an export's config, or None for an export written before drafts recorded it."""
        record = config.get(cls.KEY)
        if record is None:
            return None
        return cls(record["trained_audio_embeds"], record.get("placeholder_share"))

    def warning(self, engine: Engine) -> str | None:
        """A warning when ``engine`` is not one this draft was trained for, with the measured price; else None."""
        if engine in self.engines:
            return None
        cost = MISMATCH_COST.get((self.audio_embeds, engine))
        measured = f" (measured on the melody benchmark: {cost})" if cost else ""
        return (
            f"warning: this draft was trained on {self.audio_embeds} audio embeddings, but {ENGINE_NAMES[engine]} "
            f"feeds a draft {ENGINE_AUDIO_EMBEDS[engine]} embeddings at audio positions{measured}. Train with "
            f"--audio-embeds {ENGINE_AUDIO_EMBEDS[engine]} for {ENGINE_NAMES[engine]}, or --audio-embeds mixed for "
            "both."
        )
