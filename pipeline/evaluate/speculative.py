"""Greedy EAGLE-3 speculative decoding with a target adapter (batch size 1), for evaluating a draft.

One round: a proposer drafts up to K tokens as a chain; the target verifies them all in ONE forward over its KV
cache and keeps the longest prefix that agrees with its own greedy argmax, plus its own next token (the "bonus");
the KV cache is cropped back to what was kept. The output is therefore exactly the target's greedy output (up to
floating-point ties between batched and one-token forwards), whatever the proposer does.

Bookkeeping, with n = tokens the target has processed so far:
    tokens[0..n]  prompt + generated ids; tokens[n] is the pending token (the target's choice, not yet fed to it)
    aux[0..n-1]   the target's concatenated aux hidden states (layers ``aux_layers``, HF hidden_states indices)
    embeds[1..n]  the draft's input embeddings: embeds[t+1] is what the draft's row t reads, as the serving
                  engine builds it (``serving.draft_prefill_embeds``: at audio positions the merged audio features
                  for SGLang, the placeholder's embedding for vLLM); ``embed_tokens`` of the generated tokens
The EAGLE-3 draft reads row t = (aux[t], embeds[t+1]) and predicts token t+2, as in training (``ttt_loss``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.draft.model import Eagle3Draft, TTTCache, apply_rotary
from pipeline.draft.serving import Engine, check_engine, draft_prefill_embeds
from pipeline.draft.ttt_loss import shift_left
from pipeline.targets.base import AudioTarget, StepOutput, TargetInputs


@dataclass
class SpecConfig:
    num_draft_tokens: int = 7  # K: draft tokens proposed per round (the chain length)
    max_new_tokens: int = 64
    eos_token_ids: list[int] | None = None  # None: the target's
    serve: Engine = "sglang"  # the engine whose draft inputs are emulated (``serving``)

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 0 or self.max_new_tokens < 1:
            raise ValueError(f"need num_draft_tokens >= 0 and max_new_tokens >= 1, got {self}")
        check_engine(self.serve)


@dataclass
class DraftContext:
    """What a proposer may read at the start of a round (views into the generator's buffers; do not modify)."""

    tokens: torch.Tensor  # [n+1] prompt + generated ids; the last is pending (not yet fed to the target)
    prompt_len: int
    aux: torch.Tensor  # [n, k*H] the target's aux states of the n processed tokens
    embeds: torch.Tensor  # [n+1, H] the draft's input embedding of every token
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]  # the target's token embeddings (of drafted tokens)
    round: int  # 0 on the first round of a generation: stateful proposers reset there


# A proposer returns up to ``k`` target token ids continuing ``ctx.tokens``.
Proposer = Callable[[DraftContext, int], Sequence[int]]


@dataclass
class SpecResult:
    tokens: list[int]  # generated ids (EOS included if reached), never the prompt
    accepted_lengths: list[int]  # per verify pass: tokens it produced (accepted drafts + bonus, cut at EOS/max)
    proposed: list[int]  # [K] rounds in which draft position j was proposed
    accepted: list[int]  # [K] rounds in which draft position j was accepted (agreed with the target's argmax)
    reached: list[int]  # [K] rounds in which position j was proposed and every earlier position accepted
    target_forwards: int  # prefill included
    wall_s: float
    draft_s: float  # time spent in the proposer

    @property
    def tau(self) -> float:
        """Mean acceptance length: tokens per verify pass (K + 1 at best, 1 when every draft is wrong)."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else float("nan")

    @property
    def acceptance(self) -> list[float]:
        """P(position j accepted | proposed); position j accepted implies positions < j were."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def conditional_acceptance(self) -> list[float]:
        """P(position j accepted | positions < j accepted): training's ``cond_acc_j``, measured on the chain."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class GreedyResult:
    tokens: list[int]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else float("nan")


class Eagle3Proposer:
    """The EAGLE-3 draft's greedy chain, with the training-time test's semantics (``ttt_loss``/``ttt_attention``).

    Step 0 runs row t = (aux[t], embeds[t+1]) with causal attention over the step-0 keys; step k >= 1 runs only the
    last row r, on the draft's own step k-1 hidden and the embedding of the token drafted at step k-1, at position
    r + k, attending to every step-0 key and to its own steps 1..k (the last row of ``ttt_attention``).

    ``incremental=True`` keeps the step-0 keys across rounds (row t depends on tokens <= t+1 only, all final once
    accepted), so a round costs the new rows plus K-1 one-row steps. ``incremental=False`` re-runs the draft's own
    ``forward`` with a ``TTTCache`` over every row each round, exactly the training code path (O(T) per step): the
    reference the fast path is tested against.
    """

    def __init__(self, draft: Eagle3Draft, incremental: bool = True):
        self.draft, self.incremental = draft.eval(), incremental
        self.draft_to_target = draft.d2t + torch.arange(len(draft.d2t), device=draft.d2t.device)
        self._reset()

    def _reset(self) -> None:
        self.rows = 0  # step-0 rows whose keys are cached
        self.keys: torch.Tensor | None = None  # [1, heads, rows, head_dim], rotated, repeated to every query head
        self.values: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, ctx: DraftContext, k: int) -> list[int]:
        return self.chain(ctx, k)[0]

    @torch.no_grad()
    def chain(self, ctx: DraftContext, k: int) -> tuple[list[int], torch.Tensor]:
        """-> (k drafted target ids, their draft-vocab logits [k, Vd] in float32)."""
        if ctx.round == 0:
            self._reset()
        if k <= 0:
            return [], torch.empty(0)
        return (self._incremental if self.incremental else self._reference)(ctx, k)

    # -- the shared pieces -----------------------------------------------------------------------------------

    def _inputs(self, ctx: DraftContext, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo..hi-1 as (embeds [1, R, H], projected hidden [1, R, H]) in the draft's dtype and device."""
        p = self.draft.fc.weight
        embeds = ctx.embeds[lo + 1 : hi + 1].to(p.device, p.dtype)[None]
        return embeds, self.draft.project(ctx.aux[lo:hi].to(p.device, p.dtype)[None])

    def _embed(self, ctx: DraftContext, token: int) -> torch.Tensor:
        e = ctx.embed_tokens(torch.tensor([[token]], device=ctx.tokens.device))
        return e.to(self.draft.fc.weight.device, self.draft.fc.weight.dtype)

    def _token(self, logits: torch.Tensor) -> int:
        return int(self.draft_to_target[int(logits.argmax())])

    # -- reference: the training code path ---------------------------------------------------------------------

    def _reference(self, ctx: DraftContext, k: int) -> tuple[list[int], torch.Tensor]:
        n = ctx.aux.shape[0]
        embeds, hidden = self._inputs(ctx, 0, n)
        positions = torch.arange(n, device=embeds.device)[None]
        cache, step_embeds, tokens, logits_out = TTTCache(), embeds, [], []
        for step in range(k):
            hidden, logits = self.draft(step_embeds, hidden, positions, cache)
            logits_out.append(logits[0, -1].float())
            tokens.append(self._token(logits[0, -1]))
            # Training's step+1 input: row t takes the embedding of token t+2+step; only the last row's is drafted.
            step_embeds = shift_left(embeds, step + 1).clone()
            step_embeds[:, -1] = self._embed(ctx, tokens[-1])[:, 0]
        return tokens, torch.stack(logits_out)

    # -- incremental: the same arithmetic, step-0 keys cached ---------------------------------------------------

    def _qkv(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """Eagle3Attention's q, k, v (rotated; k, v repeated to every query head) for rows at ``positions``."""
        layer, attn = self.draft.midlayer, self.draft.midlayer.self_attn
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
        key = attn.k_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        value = attn.v_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        cos, sin = self.draft.rotary(positions, hidden.dtype)
        q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        rep = attn.num_heads // attn.num_kv_heads
        return q, key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)

    def _finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of Eagle3DecoderLayer after attention: o_proj, residual, MLP -> hidden_out (before ``norm``)."""
        layer = self.draft.midlayer
        B, _, T, _ = attn_out.shape
        h = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(B, T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, hidden_row: torch.Tensor) -> torch.Tensor:
        return self.draft.lm_head(self.draft.norm(hidden_row))[0, -1]

    def _incremental(self, ctx: DraftContext, k: int) -> tuple[list[int], torch.Tensor]:
        n = ctx.aux.shape[0]
        if n <= self.rows:
            raise RuntimeError(f"the draft has {self.rows} rows cached but the context has {n}: call with round 0")
        # Step 0 on the new rows: causal over every cached and new step-0 key.
        embeds, hidden = self._inputs(ctx, self.rows, n)
        positions = torch.arange(self.rows, n, device=embeds.device)
        q, key, value = self._qkv(embeds, hidden, positions[None])
        self.keys = key if self.keys is None else torch.cat([self.keys, key], dim=2)
        self.values = value if self.values is None else torch.cat([self.values, value], dim=2)
        visible = torch.arange(n, device=embeds.device)[None] <= positions[:, None]  # [new rows, n]
        hidden = self._finish(hidden, F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=visible))
        self.rows = n
        last = hidden[:, -1:]
        logits = self._logits(last)
        tokens, logits_out = [self._token(logits)], [logits.float()]
        # Steps 1..k-1 on the last row: every step-0 key plus this chain's own keys, one softmax (ttt_attention).
        own_keys, own_values = [], []
        for step in range(1, k):
            pos = torch.tensor([[n - 1 + step]], device=last.device)
            q, key, value = self._qkv(self._embed(ctx, tokens[-1]), last, pos)
            own_keys.append(key)
            own_values.append(value)
            keys = torch.cat([self.keys, *own_keys], dim=2)
            values = torch.cat([self.values, *own_values], dim=2)
            last = self._finish(last, F.scaled_dot_product_attention(q, keys, values))
            logits = self._logits(last)
            tokens.append(self._token(logits))
            logits_out.append(logits.float())
        return tokens, torch.stack(logits_out)


@dataclass
class _Buffers:
    """Preallocated per-token storage, so a round appends in place instead of concatenating the whole history."""

    tokens: torch.Tensor
    aux: torch.Tensor
    embeds: torch.Tensor
    generated: list[int] = field(default_factory=list)


def _aux(out: StepOutput, layers: list[int], rows: int) -> torch.Tensor:
    if not layers:
        return out.input_embeds[:rows, :0]
    return torch.cat([out.hidden_states[i][:rows] for i in layers], dim=-1)


@torch.no_grad()
def speculative_generate(
    target: AudioTarget,
    draft: Eagle3Draft | None,
    prompt: TargetInputs,
    aux_layers: list[int] | None = None,
    cfg: SpecConfig | None = None,
    propose: Proposer | None = None,
) -> SpecResult:
    """Greedy speculative decoding of one prompt (``input_ids`` [T] and the audio inputs, e.g. from
    ``target.generation_inputs``).

    ``propose`` defaults to ``Eagle3Proposer(draft)``; ``aux_layers`` (HF hidden_states indices) to the draft's.
    """
    cfg = cfg or SpecConfig()
    if propose is None:
        if draft is None:
            raise ValueError("pass a draft or a proposer")
        propose = Eagle3Proposer(draft)
    if aux_layers is None:
        aux_layers = list(draft.config.aux_layers) if draft is not None else []
    if prompt.input_ids.dim() != 1:
        raise ValueError(f"one prompt only: input_ids of shape [T], got {tuple(prompt.input_ids.shape)}")
    eos = set(cfg.eos_token_ids if cfg.eos_token_ids is not None else target.eos_token_ids)
    device = target.device
    ids = prompt.input_ids.to(device)
    K, T = cfg.num_draft_tokens, len(ids)
    start = time.perf_counter()

    # Prefill: the only pass that sees the audio; its input embeddings are the merged ones.
    kv = target.new_cache()
    out = target.forward_step(ids, kv, aux_layers, prompt.model_inputs)
    forwards = 1
    aux = _aux(out, aux_layers, T)
    capacity = T + cfg.max_new_tokens + K + 1
    buf = _Buffers(
        tokens=torch.empty(capacity, dtype=torch.long, device=device),
        aux=aux.new_empty(capacity, aux.shape[-1]),
        embeds=out.input_embeds.new_empty(capacity, out.input_embeds.shape[-1]),
    )
    first = int(out.logits[-1].argmax())
    n = T  # tokens the target has processed; buf.tokens[n] is pending
    buf.tokens[:T], buf.aux[:T], buf.tokens[n] = ids, aux, first
    # The draft's prefill rows as the engine builds them: row t (buf.embeds[t + 1]) reads token t+1, the last row
    # the sampled token. buf.embeds[0] is never read.
    sampled = target.embed_tokens(buf.tokens[n : n + 1])
    buf.embeds[0] = out.input_embeds[0]
    buf.embeds[1 : T + 1] = draft_prefill_embeds(cfg.serve, out.input_embeds, target.embed_tokens(ids), [T], sampled)
    buf.generated.append(first)
    done = first in eos or cfg.max_new_tokens <= 1

    accepted_lengths, proposed, accepted, reached, draft_s = [], [0] * K, [0] * K, [0] * K, 0.0
    while not done:
        # Never propose what could not be emitted: the round emits up to k + 1 tokens.
        k = min(K, cfg.max_new_tokens - len(buf.generated) - 1)
        ctx = DraftContext(
            buf.tokens[: n + 1], T, buf.aux[:n], buf.embeds[: n + 1], target.embed_tokens, len(accepted_lengths)
        )
        t0 = time.perf_counter()
        proposal = [int(t) for t in propose(ctx, k)][:k] if k > 0 else []
        draft_s += time.perf_counter() - t0

        # Verify: feed the pending token and the proposals; logits row j is the target's choice after input j.
        verify = torch.tensor([buf.generated[-1], *proposal], device=device)  # the pending token is the last
        out = target.forward_step(verify, kv, aux_layers)
        forwards += 1
        choice = out.logits.argmax(-1).tolist()
        a = 0
        while a < len(proposal) and proposal[a] == choice[a]:
            a += 1
        for j in range(len(proposal)):
            proposed[j] += 1
            accepted[j] += j < a
            reached[j] += j <= a
        if len(proposal) > a:
            target.crop_cache(kv, n + a + 1)  # keep the pending token and the accepted drafts
        new = [*proposal[:a], choice[a]]
        # The target has now processed the pending token and the accepted drafts; the bonus is the new pending.
        buf.aux[n : n + a + 1] = _aux(out, aux_layers, a + 1)
        new_ids = torch.tensor(new, device=device)
        buf.tokens[n + 1 : n + a + 2] = new_ids
        buf.embeds[n + 1 : n + a + 2] = target.embed_tokens(new_ids)
        n += a + 1
        emitted = 0
        for t in new:
            buf.generated.append(t)
            emitted += 1
            if t in eos:
                done = True
                break
        accepted_lengths.append(emitted)
        done = done or len(buf.generated) >= cfg.max_new_tokens

    _synchronize(device)
    return SpecResult(
        tokens=buf.generated,
        accepted_lengths=accepted_lengths,
        proposed=proposed,
        accepted=accepted,
        reached=reached,
        target_forwards=forwards,
        wall_s=time.perf_counter() - start,
        draft_s=draft_s,
    )


def plain_greedy(
    target: AudioTarget, prompt: TargetInputs, max_new_tokens: int, eos: list[int] | None = None
) -> GreedyResult:
    """The target's own greedy decoding: the lossless reference and the tokens/s baseline.

    Pure argmax (``checkpoint_settings=False``): a checkpoint's generation settings (``repetition_penalty``,
    ``no_repeat_ngram_size``, suppressed tokens) would otherwise change what greedy means.
    """
    start = time.perf_counter()
    tokens = target.generate([prompt], max_new_tokens, eos_token_ids=eos, checkpoint_settings=False)[0]
    _synchronize(target.device)
    return GreedyResult(tokens, time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # wall times must include the queued GPU work
        torch.cuda.synchronize(device)
