"""The EAGLE-3 draft head, its draft vocabulary and its two serving exports, on tiny dims (CPU, fast)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig

from pipeline.cache.reader import open_cache
from pipeline.draft import vocab as draft_vocab
from pipeline.draft.export import export_sglang, export_speculators, load_sglang_export
from pipeline.draft.model import DraftConfig, Eagle3Draft, TTTCache, apply_rotary, draft_vocab_from_counts
from pipeline.draft.teacher import Teacher, TeacherOutput
from pipeline.draft.ttt_loss import StepStats, TrainingTimeTest, shift_left, teacher_targets

B, T = 2, 7
AUX = [2, 4, 5]


def tiny_config() -> DraftConfig:
    # target_hidden_size != hidden_size so fc's input width is checked for real
    return DraftConfig(
        target_hidden_size=48,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        draft_vocab_size=40,
        aux_layers=AUX,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
    )


@pytest.fixture
def model() -> Eagle3Draft:
    torch.manual_seed(0)
    m = Eagle3Draft(tiny_config()).eval()
    counts = torch.randint(0, 50, (100,))
    m.set_draft_vocab(*draft_vocab_from_counts(counts, 40))
    return m


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 64, generator=g), torch.randn(B, T, 3 * 48, generator=g)


# --- model -------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_target_defaults():
    cfg = tiny_config()
    assert DraftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    big = DraftConfig.from_target(4096, 32, 32, 11008, 156032, [2, 16, 29])
    assert (big.target_hidden_size, big.head_dim, big.draft_vocab_size) == (4096, 128, 32000)
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0}}  # fmt: skip
    assert DraftConfig.from_text_config(text, AUX, 40).rope_theta == 10000.0


def test_shapes_and_projection(model):
    embeds, aux = inputs()
    hidden, logits = model(embeds, aux)
    assert hidden.shape == (B, T, 64) and logits.shape == (B, T, 40)
    assert model.project(aux).shape == (B, T, 64)
    # raw aux states and already-projected hidden are the same step
    hidden2, logits2 = model(embeds, model.project(aux))
    assert torch.equal(hidden, hidden2) and torch.equal(logits, logits2)
    # logits are lm_head(norm(hidden_out)): the pre-norm hidden is what the next step takes
    assert torch.allclose(logits, model.lm_head(model.norm(hidden)))


def test_step0_is_causal(model):
    embeds, aux = inputs()
    hidden, logits = model(embeds, aux)
    embeds2, aux2 = embeds.clone(), aux.clone()
    embeds2[:, 4:] += 1.0
    aux2[:, 4:] -= 1.0
    hidden2, logits2 = model(embeds2, aux2)
    assert torch.allclose(hidden[:, :4], hidden2[:, :4], atol=1e-6)
    assert torch.allclose(logits[:, :4], logits2[:, :4], atol=1e-6)
    assert not torch.allclose(hidden[:, 4:], hidden2[:, 4:])
    # a cache holding only step 0 changes nothing
    h3, _ = model(embeds, aux, cache=TTTCache())
    assert torch.allclose(hidden, h3, atol=1e-6)


def run_steps(model, step_inputs):
    cache = TTTCache()
    return [model(e, h, cache=cache)[0] for e, h in step_inputs], cache


def step_inputs(seed: int = 2, steps: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, T, 64, generator=g), torch.randn(B, T, 64, generator=g)) for _ in range(steps)]


def test_ttt_attention_matches_dense_mask(model):
    """Step k's attention equals one softmax over [step-0 keys (causal); step-j keys (same position only)]."""
    steps = step_inputs()
    captured = []
    hook = model.midlayer.self_attn.register_forward_hook(lambda mod, args, out: captured.append(out))
    _, cache = run_steps(model, steps)
    hook.remove()
    attn, layer = model.midlayer.self_attn, model.midlayer
    for k in (1, 2):
        embeds, hidden = steps[k]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        q = attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2)
        cos, sin = model.rotary(torch.arange(T).expand(B, T) + k, x.dtype)  # step k sits k positions later
        q = apply_rotary(q, cos, sin)
        keys = torch.cat(cache.keys[: k + 1], dim=2)  # [B, h, (k+1)T, d]
        values = torch.cat(cache.values[: k + 1], dim=2)
        t = torch.arange(T)
        allowed = [t[:, None] >= t[None, :]] + [t[:, None] == t[None, :]] * k
        ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat(allowed, dim=1))
        ref = attn.o_proj(ref.transpose(1, 2).reshape(B, T, -1))
        assert torch.allclose(captured[k], ref, atol=1e-5)


def test_ttt_dependencies(model):
    """Step 2 at row t sees step 0 at rows <= t and steps 1, 2 at row t only."""
    steps = step_inputs()
    base, _ = run_steps(model, steps)
    s = 3
    later = [tuple(x.clone() for x in pair) for pair in steps]
    later[1][0][:, s] += 1.0  # step 1's embedding at row s
    out, _ = run_steps(model, later)
    changed = ~torch.isclose(out[2], base[2], atol=1e-6).all(-1).all(0)  # per row
    assert changed.tolist() == [t == s for t in range(T)]
    early = [tuple(x.clone() for x in pair) for pair in steps]
    early[0][1][:, s] += 1.0  # step 0's hidden at row s
    out, _ = run_steps(model, early)
    changed = ~torch.isclose(out[2], base[2], atol=1e-6).all(-1).all(0)
    assert changed.tolist() == [t >= s for t in range(T)]


def test_draft_vocab_from_counts():
    counts = torch.tensor([5, 0, 3, 3, 0, 7, 1, 0])
    d2t, t2d = draft_vocab_from_counts(counts, 4)  # 7 (id 5), 5 (id 0), 3 (ids 2, 3)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert d2t.tolist() == [0, 1, 1, 2]  # target ids [0, 2, 3, 5]
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    d2t, _ = draft_vocab_from_counts(counts, 3)  # tie between ids 2 and 3: the smaller id wins
    assert (d2t + torch.arange(3)).tolist() == [0, 2, 5]
    d2t, t2d = draft_vocab_from_counts(counts, 7)  # 5 seen ids, then unseen ids 1, 4 by id order
    assert (d2t + torch.arange(7)).tolist() == [0, 1, 2, 3, 4, 5, 6] and not t2d[7]
    assert draft_vocab_from_counts(torch.zeros(5, dtype=torch.int64), 2)[0].tolist() == [0, 0]
    for bad in (0, 9):
        with pytest.raises(ValueError):
            draft_vocab_from_counts(counts, bad)


def test_set_draft_vocab_rejects_inconsistent_maps(model):
    d2t, t2d = draft_vocab_from_counts(torch.arange(100), 40)
    t2d[0] = not t2d[0]
    with pytest.raises(ValueError, match="different target ids"):
        model.set_draft_vocab(d2t, t2d)


def test_head_started_from_the_target_gives_its_logits_at_draft_tokens(model):
    target_head = torch.randn(100, 64)
    model.start_head_from_target(target_head)
    hidden = torch.randn(5, 64)
    target_ids = model.d2t + torch.arange(40)  # a scattered draft vocab: draft id i is target id i + d2t[i]
    assert torch.equal(model.lm_head(hidden), (hidden @ target_head.T)[:, target_ids])


# --- exports -----------------------------------------------------------------------------------------------------

LAYER_KEYS = {
    "hidden_norm.weight": (64,),
    "input_layernorm.weight": (64,),
    "post_attention_layernorm.weight": (64,),
    "self_attn.q_proj.weight": (64, 128),
    "self_attn.k_proj.weight": (32, 128),
    "self_attn.v_proj.weight": (32, 128),
    "self_attn.o_proj.weight": (64, 64),
    "mlp.gate_proj.weight": (96, 64),
    "mlp.up_proj.weight": (96, 64),
    "mlp.down_proj.weight": (64, 96),
}


def expected_keys(prefix: str) -> dict[str, tuple]:
    keys = {f"{prefix}.{k}": v for k, v in LAYER_KEYS.items()}
    return keys | {
        "fc.weight": (64, 144),
        "norm.weight": (64,),
        "lm_head.weight": (40, 64),
        "d2t": (40,),
        "t2d": (100,),
    }


def read_export(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    return json.loads((path / "config.json").read_text()), tensors, metadata


def check_weights(model, tensors, prefix):
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_keys(prefix)
    for k, v in tensors.items():
        assert v.dtype == {"d2t": torch.int64, "t2d": torch.bool}.get(k, torch.bfloat16), k
        source = model.state_dict()[k.replace("layers.0.", "midlayer.")]
        assert torch.equal(v, source.to(v.dtype))


def check_llama_fields(c: dict):
    expected = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 96,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 256,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}  # fmt: skip
    assert {k: c[k] for k in expected} == expected
    parsed = LlamaConfig(**c)  # what transformers (5.x here) makes of it
    assert parsed.rope_parameters["rope_theta"] == 10000.0 and parsed.head_dim == 16


def test_export_sglang(model, tmp_path):
    out = export_sglang(model, model.config, tmp_path / "sglang", "Qwen/Qwen2-Audio-7B-Instruct")
    c, tensors, metadata = read_export(out)
    check_weights(model, tensors, "midlayer")
    assert metadata == {"format": "pt"}
    assert c["architectures"] == ["LlamaForCausalLMEagle3"]
    check_llama_fields(c)
    assert (c["draft_vocab_size"], c["target_hidden_size"]) == (40, 48)
    assert c["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}  # HF [2, 4, 5] - 1


def test_export_speculators(model, tmp_path):
    verifier = ["Qwen2AudioForConditionalGeneration"]
    out = export_speculators(model, model.config, tmp_path / "spec", "Qwen/Qwen2-Audio-7B-Instruct", verifier, 5)
    c, tensors, _ = read_export(out)
    check_weights(model, tensors, "layers.0")
    assert c["architectures"] == ["Eagle3Speculator"] and c["speculators_model_type"] == "eagle3"
    check_llama_fields(c["transformer_layer_config"])
    assert (c["draft_vocab_size"], c["target_hidden_size"], c["norm_before_residual"]) == (40, 48, False)
    assert c["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # HF indices as they are
    assert c["speculators_config"] == {
        "algorithm": "eagle3",
        "proposal_methods": [
            {"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1, "accept_tolerance": 0.0}
        ],
        "default_proposal_method": "greedy",
        "verifier": {
            "name_or_path": "Qwen/Qwen2-Audio-7B-Instruct",
            "architectures": ["Qwen2AudioForConditionalGeneration"],
        },
    }


def test_export_needs_three_aux_layers(model, tmp_path):
    cfg = DraftConfig(**{**model.config.to_dict(), "aux_layers": [2, 4]})
    with pytest.raises(ValueError, match="3 aux layers"):
        export_sglang(Eagle3Draft(cfg), cfg, tmp_path, "x")


def test_sglang_export_reloads_identically(model, tmp_path):
    out = export_sglang(model, model.config, tmp_path / "sglang", "tiny", dtype=torch.float32)
    loaded = load_sglang_export(out).eval()
    assert loaded.config == model.config
    assert torch.equal(loaded.d2t, model.d2t) and torch.equal(loaded.t2d, model.t2d)
    embeds, aux = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(embeds, aux)[1], model(embeds, aux)[1])
        steps = step_inputs()
        for a, b in zip(run_steps(loaded, steps)[0], run_steps(model, steps)[0], strict=True):
            assert torch.equal(a, b)


# --- draft vocab over a real cache -------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(reference_cache, tmp_path):
    """The shared reference dump, copied so storing a draft vocab in it touches no other test's cache."""
    return shutil.copytree(reference_cache, tmp_path / "cache")


def test_count_masked_tokens_matches_brute_force(cache_copy):
    cache = open_cache(cache_copy)
    expected = torch.zeros(cache.info["vocab_size"], dtype=torch.int64)
    for i in range(len(cache)):
        s = cache[i]
        expected += torch.bincount(s["input_ids"][s["loss_mask"]], minlength=len(expected))
    counts = draft_vocab.count_masked_tokens(cache)
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)
    assert counts.sum() > 0 and (counts == 0).any()  # the sample is small: some ids never appear


def test_draft_vocab_is_stored_and_reused(cache_copy, monkeypatch):
    cache = open_cache(cache_copy)
    d2t, t2d = draft_vocab.load_or_build_draft_vocab(cache, 64)
    expected = draft_vocab_from_counts(draft_vocab.count_masked_tokens(cache), 64)
    assert torch.equal(d2t, expected[0]) and torch.equal(t2d, expected[1])
    path = cache_copy / "draft_vocab" / "size-64.safetensors"
    mtime = path.stat().st_mtime_ns
    assert not list(path.parent.glob(".*.tmp"))

    def no_recount(_):
        raise AssertionError("recounted a stored draft vocab")

    monkeypatch.setattr(draft_vocab, "count_masked_tokens", no_recount)
    d2t2, t2d2 = draft_vocab.load_or_build_draft_vocab(open_cache(cache_copy), 64)
    assert torch.equal(d2t, d2t2) and torch.equal(t2d, t2d2)
    assert path.stat().st_mtime_ns == mtime
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["num_samples"] == str(len(cache))
        assert np.array_equal(f.get_tensor("counts").numpy(), expected_counts(cache))


def expected_counts(cache) -> np.ndarray:
    counts = np.zeros(cache.info["vocab_size"], dtype=np.int64)
    for i in range(len(cache)):
        s = cache[i]
        np.add.at(counts, s["input_ids"][s["loss_mask"]].numpy(), 1)
    return counts


def ttt_batch(model, b: int = 3, t: int = 12) -> tuple[dict, TeacherOutput]:
    """A batch with answers of several lengths (one ending the sample) and a teacher whose top token is sometimes
    outside the draft vocab."""
    torch.manual_seed(3)
    embeds, aux = torch.randn(b, t, 64), torch.randn(b, t, 3 * 48)
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    loss_mask[0, 7:11], loss_mask[1, 3:5], loss_mask[1, 9:], loss_mask[2, 10:] = True, True, True, True  # answers
    teacher = Teacher(torch.randn(100, 64), model.d2t, model.t2d)
    batch = {"input_ids": torch.randint(0, 100, (b, t)), "loss_mask": loss_mask, "inputs_embeds": embeds,
             "aux": aux, "final_hidden": torch.randn(b, t, 64)}  # fmt: skip
    target = teacher_targets(teacher, batch)
    assert target.in_draft_vocab.any() and not target.in_draft_vocab[loss_mask.roll(-1, 1)].all()
    return batch, target


def ttt_by_definition(model, batch: dict, target: TeacherOutput, steps: int):
    """Every step on every row -> (loss, per-step [loss, rows, correct, chain_correct, supervised], right flags)."""
    embeds, loss_mask = batch["inputs_embeds"], batch["loss_mask"]
    cache, hidden, total, sums, rights = TTTCache(), model.project(batch["aux"]), 0.0, [], []
    to_target, chain = model.d2t + torch.arange(40), torch.ones_like(loss_mask)
    for k in range(steps):
        hidden, logits = model(shift_left(embeds, 1 + k), hidden, cache=cache)
        counted = shift_left(loss_mask, 2 + k) & shift_left(target.in_draft_vocab, 1 + k)
        p_log, d_log = shift_left(target.log_probs, 1 + k), logits.log_softmax(-1)
        row_loss = -(p_log.exp() * d_log).sum(-1)[counted]
        total = total + 0.8**k * row_loss.sum() / counted.sum().clamp(min=1)
        ok = to_target[logits.argmax(-1)] == shift_left(target.top_ids, 1 + k)
        rights.append(ok & counted)
        sums.append(torch.stack([row_loss.sum(), counted.sum(), (ok & counted).sum(), (chain & ok & counted).sum(),
                                 shift_left(loss_mask, 2 + k).sum()]).detach().float())  # fmt: skip
        chain = chain & (ok | ~counted)
    return total, torch.stack(sums, 1), torch.stack(rights, -1)


@torch.no_grad()
def test_ttt_on_the_rows_that_count_equals_running_every_row(model):
    """The training objective runs step 0's queries, and steps 1.., only on the rows a step is scored on or starts
    from; a plain loop over every row (the definition) gives the same loss, per-step sums and right/wrong flags."""
    steps = 4
    batch, target = ttt_batch(model)
    loss, sums, right = TrainingTimeTest(model, steps)(batch, target)
    ref_loss, ref_sums, ref_right = ttt_by_definition(model, batch, target, steps)
    counted = torch.stack([shift_left(batch["loss_mask"], 2 + k) & shift_left(target.in_draft_vocab, 1 + k)
                           for k in range(steps)], -1)  # fmt: skip
    assert torch.equal(right & counted, ref_right)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(sums[[0, 2, 3, 5, 6]].float(), ref_sums)
    # Coverage: the rows step 0 scores (target top token in the draft vocab) among all that predict an answer token.
    coverage = StepStats(sums).summary()["vocab_coverage"]
    assert 0 < coverage < 1 and coverage == pytest.approx(float(ref_sums[1, 0] / ref_sums[4, 0]))


def test_ttt_on_the_rows_that_count_has_the_gradients_of_every_row(model):
    """The rows step 0 only takes keys and values from still pass gradients to fc, k_proj and v_proj: every
    parameter's gradient equals the definition's."""
    steps = 4
    batch, target = ttt_batch(model)
    model.zero_grad()
    TrainingTimeTest(model, steps)(batch, target)[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ttt_by_definition(model, batch, target, steps)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    assert grads["fc.weight"].abs().sum() > 0 and grads["midlayer.self_attn.k_proj.weight"].abs().sum() > 0
