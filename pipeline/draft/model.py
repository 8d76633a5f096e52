"""The EAGLE-3 draft head (arXiv 2503.01840), as SGLang and vLLM serve it.

    aux [B, T, k*H_t] --fc--> hidden [B, T, H] --+----------------------------+
    embeds [B, T, H] --input_layernorm--+        |                            | residual
                      hidden_norm(hidden) -cat-> [2H] -> self_attn (q/k/v 2H -> heads) -> o_proj -> + -> out
    out -> post_attention_layernorm -> mlp -> + out -> hidden_out -> norm -> lm_head -> draft logits

Row t pairs the target's aux states of token t with the embedding of token t+1 and predicts token t+2 (the caller
shifts ids; this module only sees aligned rows). ``hidden_out`` (before ``norm``) is what the next draft step takes
as its hidden, at serving time and in the training-time test (TTT).

Module and buffer names are those of SpecForge's ``LlamaForCausalLMEagle3`` and SGLang's loader (``fc``,
``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), so the SGLang export is ``state_dict()`` as is; see
``pipeline/draft/export.py`` for the formats and where each convention comes from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.draft.rows import take

# transformers' initializer_range for Llama/Qwen2, which SpecForge's draft inherits through post_init().
INIT_STD = 0.02


@dataclass
class DraftConfig:
    target_hidden_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's; embeddings come from the target, logits cover the draft vocab only
    draft_vocab_size: int
    aux_layers: list[int]  # HF hidden_states indices (input of 0-based layer i), as cached, e.g. [2, 16, 29]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 8192

    @classmethod
    def from_target(
        cls,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        vocab_size: int,
        aux_layers: list[int],
        draft_vocab_size: int = 32000,
        *,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 8192,
    ) -> DraftConfig:
        """A draft layer shaped like one layer of the target (the paper's choice); pass the target's norm eps
        and RoPE base to match it (a 7B Qwen2 text config says 1e-5 and 10000)."""
        return cls(
            target_hidden_size=hidden_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim or hidden_size // num_heads,
            vocab_size=vocab_size,
            draft_vocab_size=draft_vocab_size,
            aux_layers=list(aux_layers),
            rms_norm_eps=rms_norm_eps,
            rope_theta=rope_theta,
            max_position_embeddings=max_position_embeddings,
        )

    @classmethod
    def from_text_config(cls, text: dict, aux_layers: list[int], draft_vocab_size: int = 32000) -> DraftConfig:
        """From a Llama-style layer config as a dict: the ``draft_defaults`` a target adapter records in the cache
        manifest (``cache.target["draft_defaults"]``), or any HF text config."""
        rope = text.get("rope_parameters") or {}
        return cls.from_target(
            text["hidden_size"],
            text["num_attention_heads"],
            text.get("num_key_value_heads") or text["num_attention_heads"],
            text["intermediate_size"],
            text["vocab_size"],
            aux_layers,
            draft_vocab_size,
            head_dim=text.get("head_dim"),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
            max_position_embeddings=text.get("max_position_embeddings", 8192),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DraftConfig:
        return cls(**{**d, "aux_layers": list(d["aux_layers"])})


@dataclass
class TTTCache:
    """Keys and values of the draft steps run so far (step 0 first): rotated, repeated to every query head."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 as Llama/Qwen2 do, so bf16 training matches the servers' fused kernels.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Llama/Qwen2 RoPE (default type, no scaling): rotate the two halves of each head by position * inv_freq."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived from config, never exported

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, head_dim], broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def ttt_attention(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Step k's queries ([B, heads, R, d]) see step 0's keys causally and each later step's key at their own
    row only: row t at step j stands for the token j positions after t, drafted from row t's own chain.
    One softmax over all of them, as SpecForge's TTT attention (and a served draft's tree path) does.

    ``keys[0]`` covers every row (T); the later steps may run on a subset of rows, ``rows`` [B, R] (default: all
    T), whose keys ``keys[1:]`` hold: a chain needs only its own row's keys beyond step 0's.
    """
    T = keys[0].shape[-2]
    if rows is None:
        rows = torch.arange(T, device=q.device)[None]
    scale = q.shape[-1] ** -0.5
    future = torch.arange(T, device=q.device) > rows[:, None, :, None]  # [B, 1, R, T]: keys after the row
    scores0 = (q @ keys[0].transpose(-1, -2) * scale).masked_fill(future, float("-inf"))  # [B, h, R, T]
    if len(keys) == 1:  # step 0 on some rows: causal attention of those rows
        return scores0.float().softmax(dim=-1).to(q.dtype) @ values[0]
    diag = torch.stack([(q * k).sum(-1) for k in keys[1:]], dim=-1) * scale  # [B, h, R, steps-1]
    probs = torch.cat([scores0, diag], dim=-1).float().softmax(dim=-1).to(q.dtype)
    out = probs[..., :T] @ values[0]
    return out + (probs[..., T:, None] * torch.stack(values[1:], dim=-2)).sum(dim=-2)


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read [norm(embed); norm(hidden)] (2H wide); o_proj maps back to H."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: TTTCache | None = None,
        rows: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries`` [B, R] (step 0 only): the rows whose output is wanted; every row gives keys and values."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if queries is not None:
            # Rotations are [B, 1, T, d] (broadcast over heads): pick the query rows' along T.
            cos, sin = (take(r[:, 0], queries)[:, None] for r in (cos, sin))
            x, rows = take(x, queries), queries
        q = self.q_proj(x).view(B, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        # Grouped-query attention: kv head j serves query heads j*rep .. (j+1)*rep-1, as HF's repeat_kv.
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cache is not None:
            cache.keys.append(k)
            cache.values.append(v)
        if queries is None and (cache is None or len(cache) == 1):
            # Right padding needs no mask: causality keeps every real row from seeing the pads after it.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = (cache.keys, cache.values) if cache is not None else ([k], [v])
            out = ttt_attention(q, keys, values, rows)
        return self.o_proj(out.transpose(1, 2).reshape(B, q.shape[2], -1))


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: TTTCache | None = None,
        rows: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The residual is the un-normalised hidden (speculators/vLLM `norm_before_residual: false`).
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        residual = hidden if queries is None else take(hidden, queries)
        h = residual + self.self_attn(x, cos, sin, cache, rows, queries)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(len(cfg.aux_layers) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # Draft id i is target id i + d2t[i]; t2d marks the target ids the draft can emit. Identity until set.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)

    def set_draft_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"draft vocab shapes {tuple(d2t.shape)}, {tuple(t2d.shape)} do not fit this draft")
        target_ids = d2t + torch.arange(len(d2t))
        if int(t2d.sum()) != len(d2t) or not t2d[target_ids].all():
            raise ValueError("d2t and t2d name different target ids")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def start_head_from_target(self, lm_head: torch.Tensor) -> None:
        """Start ``lm_head`` from the target's rows [V, H] of the draft's tokens (as vLLM speculators does).

        The draft then only has to learn to say, in its hidden state, what the target's final state says; a random
        head must also learn the output geometry of every draft token, which speech-sized data cannot teach it."""
        target_ids = self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)
        with torch.no_grad():
            self.lm_head.weight.copy_(lm_head[target_ids].to(self.lm_head.weight.dtype))

    def project(self, aux: torch.Tensor) -> torch.Tensor:
        """The concatenated aux states [B, T, k*H_t] (in ``aux_layers`` order) -> the draft's hidden [B, T, H]."""
        return self.fc(aux)

    def forward(self, *step_args, **step_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step (``step``'s arguments) -> (hidden_out [B, T, H] before the final norm, logits)."""
        hidden = self.step(*step_args, **step_kwargs)
        return hidden, self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden_out [..., H] -> draft-vocab logits (final norm, lm_head)."""
        return self.lm_head(self.norm(hidden))

    def step(
        self,
        inputs_embeds: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: TTTCache | None = None,
        rows: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft step without the head -> hidden_out [B, T, H] (training scores only some rows' logits).

        ``hidden`` is either already projected (H wide, e.g. the previous step's ``hidden_out``) or the raw
        concatenated aux states, projected here (SGLang tells them apart by width the same way).
        ``position_ids`` are step 0's positions (default 0..T-1); for TTT pass one ``TTTCache`` to every step:
        step k then rotates with ``position_ids + k`` (its rows stand k tokens later) and attends as in
        ``ttt_attention``; steps after the first may run on a subset of rows, ``rows`` [B, R] (their indices into
        step 0's rows; ``position_ids`` are then theirs). Without a cache the step is plain causal attention.
        ``queries`` [B, R] (step 0): only these rows' hidden_out is computed ([B, R, H]); every row still gives its
        key and value, which is all the rows no step scores and no later step starts from contribute.
        """
        if hidden.shape[-1] != self.config.hidden_size:
            hidden = self.project(hidden)
        B, T, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=hidden.device).expand(B, T)
        step = len(cache) if cache is not None else 0
        cos, sin = self.rotary(position_ids + step, hidden.dtype)
        return self.midlayer(inputs_embeds, hidden, cos, sin, cache, rows, queries)


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` most frequent target ids (ties and unseen ids in id order) -> (d2t [size] int64, t2d [V] bool).

    Draft ids are the chosen target ids in increasing order, so d2t[i] = target_id(i) - i is non-negative.
    """
    if not 0 < size <= counts.numel():
        raise ValueError(f"draft vocab size {size} must be in 1..{counts.numel()} (the target vocab)")
    # A stable descending sort keeps equal counts (zeros included) in increasing id order.
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    chosen = order[:size].sort().values
    t2d = torch.zeros(counts.numel(), dtype=torch.bool)
    t2d[chosen] = True
    return chosen - torch.arange(size), t2d
