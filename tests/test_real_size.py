"""The pieces of `just scale-check` on small inputs: the real-size target's recipe (built small), the default dtype
rule, and the per-process memory measurement. The real-size run itself is a recipe, not a test (results/)."""

from __future__ import annotations

import hashlib
import sys

import torch
from safetensors.torch import load_file

from pipeline.targets import load_target
from pipeline.targets.dtype import choose_dtype, parameter_count, resolve_dtype
from pipeline.testing.real_size import REAL_SIZE, RealSizeConfig, build_real_size, model_config
from stages.bench.process_memory import measure

GIB = 2**30
SMALL = RealSizeConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=128, d_model=64, encoder_layers=2, encoder_attention_heads=2,
                       encoder_ffn_dim=128)  # fmt: skip


def weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].view(torch.uint16).numpy().tobytes())
    return h.hexdigest()


def test_the_real_dimensions():
    with torch.device("meta"):
        from transformers import Qwen2AudioForConditionalGeneration

        model = Qwen2AudioForConditionalGeneration(model_config(REAL_SIZE))
    params = sum(p.numel() for p in model.parameters())
    assert 8.39e9 < params < 8.41e9 and model.lm_head.weight.shape == (156032, 4096)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (32, 32, 32)
    assert model.config.audio_token_index == 151646 and model.config.audio_config.encoder_layers == 32


def test_the_recipe_builds_a_loadable_target_with_the_real_ids(tmp_path):
    built = build_real_size(tmp_path / "a", SMALL, shard_bytes=4 << 20)
    assert len(list(built.glob("*.safetensors"))) > 2  # sharded
    target = load_target(str(built), "bfloat16", "cpu")
    tokenizer = target.processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>"])
    assert ids == [151643, 151644, 151645, 151646] and target.audio_token_id == 151646
    assert target.vocab_size == 156032 and sorted(target.eos_token_ids) == [151643, 151645]
    stored = weights(built)
    loaded = target.model.state_dict()
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)
    assert parameter_count(built) == sum(t.numel() for t in stored.values())
    # Each tensor depends on the seed and its name only: another shard size gives the same weights.
    assert digest(weights(build_real_size(tmp_path / "b", SMALL, shard_bytes=64 << 20))) == digest(stored)


def test_the_default_dtype_rule(tiny_dir, capsys):
    seven_b = 8_400_000_000
    assert choose_dtype("cpu", seven_b, 22 * GIB).dtype == "bfloat16"
    assert choose_dtype("cpu", seven_b, 64 * GIB).dtype == "float32"
    assert choose_dtype("cpu", seven_b, 64 * GIB, copies=2).dtype == "bfloat16"
    assert choose_dtype("cuda", 1000, 0).dtype == "bfloat16"
    assert resolve_dtype("float16", "cpu", "tiny") == "float16" and capsys.readouterr().out == ""
    assert resolve_dtype(None, "cpu", "tiny") == "float32"
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("dtype: float32 (CPU: ") and "--dtype overrides" in line


def test_measure_reports_a_child_s_memory_and_time(tmp_path):
    grow = "import time; b = b'x' * (300 << 20); time.sleep(1.5)"
    m = measure([sys.executable, "-c", grow], tmp_path / "log", interval=0.1)
    assert m.returncode == 0 and m.wall_s >= 1.5 and m.cpu_s > 0
    assert 300 << 20 < m.max_rss < 450 << 20 and 250 << 20 < m.peak_tree_pss < 450 << 20
