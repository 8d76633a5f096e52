"""Export a trained ``Eagle3Draft`` in the two layouts the servers load, and read the SGLang one back.

Both layouts hold the same tensors (safetensors, no embeddings: servers share the target's ``embed_tokens``) and the
same semantics: ``fc`` (3*H_t -> H) over the aux states, the un-normalised ``fc`` output as the residual, the final
``norm`` before ``lm_head``, ``d2t`` (int64 [N], draft id i -> target id i + d2t[i]) and ``t2d`` (bool [V]).
Where each convention comes from (sources read 2026-08):

SGLang (``--speculative-algorithm EAGLE3 --speculative-draft-model-path DIR``), i.e. SpecForge's export:
  - sglang ``python/sglang/srt/models/llama_eagle3.py``: ``LlamaForCausalLMEagle3`` owns ``fc`` (in =
    3 * ``target_hidden_size`` if the config has it, else 3 * ``hidden_size``; three aux layers, hard-coded),
    ``midlayer`` (``hidden_norm``, ``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` with q/k/v 2H wide,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``), ``norm``, ``lm_head`` of ``draft_vocab_size`` rows;
    its loader reads ``d2t`` as ``hot_token_id = d2t + arange`` and skips ``t2d``; the final fused norm returns
    the pre-norm sum as the hidden of the next draft step.
  - sglang model runner: the target captures ``config.eagle_config["eagle_aux_hidden_state_layer_ids"]``;
    ``set_eagle3_layers_to_capture`` stores ``[i + 1 for i in ids]`` and the decoder appends the residual stream
    *before* layer ``i + 1``, i.e. the output of layer i = HF ``hidden_states[i + 1]``. So SGLang id = HF index - 1.
  - SpecForge ``specforge/modeling/draft/llama3_eagle.py`` (module names, ``t2d`` bool / ``d2t`` int64 buffers),
    ``specforge/export/to_sglang.py`` (state dict as is, embeddings dropped, ``model.safetensors``),
    its example draft configs ``configs/*-eagle3.json`` (the fields: a Llama config with ``architectures``
    ``["LlamaForCausalLMEagle3"]``, ``num_hidden_layers`` 1, ``draft_vocab_size``, ``tie_word_embeddings`` false).

vLLM speculators format (``vllm serve DIR`` or ``--speculative-config '{"model": DIR}'``):
  - speculators ``src/speculators/models/eagle3/config.py`` (``Eagle3SpeculatorConfig``: ``speculators_model_type``
    "eagle3", ``architectures`` ["Eagle3Speculator"], ``transformer_layer_config`` (a LlamaConfig dict),
    ``draft_vocab_size``, ``norm_before_residual``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``),
    ``src/speculators/config.py`` (``speculators_config``: ``algorithm``, ``proposal_methods``,
    ``default_proposal_method``, ``verifier{name_or_path, architectures}``), ``src/speculators/proposals/greedy.py``
    (``proposal_type`` "greedy", ``speculative_tokens``, ``verifier_accept_k`` 1, ``accept_tolerance`` 0.0),
    ``convert/eagle/eagle3_converter.py`` (weights: SpecForge's with ``midlayer.`` renamed ``layers.0.``),
    ``models/utils.py`` (default ids ``[2, L // 2, L - 3]``).
  - vllm ``transformers_utils/configs/speculators/{base,algos}.py``: requires ``speculators_config.
    proposal_methods[0].speculative_tokens``, ``speculators_config.verifier.name_or_path`` and
    ``transformer_layer_config``; builds the draft's HF config from ``transformer_layer_config`` plus
    ``draft_vocab_size``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids`` and ``norm_before_residual``,
    which defaults to **true** when absent, so we write ``false`` explicitly.
  - vllm ``model_executor/models/llama_eagle3.py``: loads ``layers.0.*`` (and ``midlayer.*``), ``fc`` (in =
    3 * ``target_hidden_size``), ``d2t`` as ``draft_id_to_target_id``, skips ``t2d``.
  - vllm ``model_executor/models/llama.py`` and its other decoders: ``if idx in aux_hidden_state_layers:
    aux.append(hidden_states + residual)`` *before* layer ``idx`` runs, i.e. HF ``hidden_states[idx]``.
    So speculators id = HF index (= SGLang id + 1).

Both configs carry the legacy ``rope_theta``/``rope_scaling`` (transformers 4, SGLang) and ``rope_parameters``
(transformers 5); transformers 5 reads either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.draft.model import DraftConfig, Eagle3Draft
from pipeline.draft.serving import ServingRecord

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _llama_fields(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    """The Llama config of the one draft layer, as both servers parse it."""
    return {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(dtype),
    }


def _check_servable(cfg: DraftConfig) -> None:
    if len(cfg.aux_layers) != 3:
        raise ValueError(f"SGLang and vLLM build fc for exactly 3 aux layers; this draft has {cfg.aux_layers}")
    if min(cfg.aux_layers) < 1:
        raise ValueError("HF hidden_states[0] (the embeddings) has no SGLang layer id; aux layers must be >= 1")


def _save(state: dict[str, torch.Tensor], config: dict, out_dir: str | Path, dtype: torch.dtype) -> Path:
    # An embed_tokens in the checkpoint would be what the draft embeds with: SGLang replaces it with the target's
    # (set_embed), vLLM keeps it unless identical to the target's, so the two engines would serve different drafts.
    shipped = [k for k in state if "embed_tokens" in k]
    if shipped:
        raise ValueError(f"a draft export must not ship token embeddings (the servers use the target's): {shipped}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Float weights in the serving dtype; d2t (int64) and t2d (bool) keep theirs.
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})  # transformers' loaders check the format tag
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_sglang(
    model: Eagle3Draft,
    config: DraftConfig,
    out_dir: str | Path,
    target_name_or_path: str,
    record: ServingRecord | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """SpecForge/SGLang layout: ``config.json`` (LlamaForCausalLMEagle3) + ``model.safetensors`` (midlayer.*).

    ``record``: what the draft was trained on at audio positions, kept in the config (no server reads it)."""
    _check_servable(config)
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        **_llama_fields(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in config.aux_layers]},
        "target_name_or_path": target_name_or_path,  # provenance only; no server reads it
        **(record.to_config() if record else {}),
    }
    return _save(model.state_dict(), cfg, out_dir, dtype)


def export_speculators(
    model: Eagle3Draft,
    config: DraftConfig,
    out_dir: str | Path,
    target_name_or_path: str,
    target_architectures: list[str],
    speculative_tokens: int,
    record: ServingRecord | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """vLLM speculators layout: ``config.json`` (speculators eagle3) + ``model.safetensors`` (layers.0.*).

    ``target_architectures``: the target's HF architectures (its config's ``architectures``), recorded as the
    verifier's.
    """
    _check_servable(config)
    cfg = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": _llama_fields(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "norm_before_residual": False,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layers),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target_name_or_path, "architectures": list(target_architectures)},
        },
        "torch_dtype": _dtype_name(dtype),
        **(record.to_config() if record else {}),
    }
    state = {k.replace("midlayer.", "layers.0.", 1): v for k, v in model.state_dict().items()}
    return _save(state, cfg, out_dir, dtype)


def load_sglang_export(path: str | Path) -> Eagle3Draft:
    """An ``export_sglang`` directory -> a float32 ``Eagle3Draft`` (safetensors only; every key must match)."""
    path = Path(path)
    c = json.loads((path / CONFIG).read_text())
    rope = c.get("rope_parameters") or {}
    config = DraftConfig(
        target_hidden_size=c.get("target_hidden_size", c["hidden_size"]),
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        vocab_size=c["vocab_size"],
        draft_vocab_size=c["draft_vocab_size"],
        aux_layers=[i + 1 for i in c["eagle_config"]["eagle_aux_hidden_state_layer_ids"]],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        max_position_embeddings=c["max_position_embeddings"],
    )
    model = Eagle3Draft(config)
    with safe_open(path / WEIGHTS, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=True)
    return model
