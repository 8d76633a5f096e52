"""The tiny Qwen2-Audio target: builds, reloads, is deterministic, has the real model's interfaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.targets import load_target, model_aliases, resolve_model, target_adapters
from pipeline.targets.qwen2_audio import Qwen2AudioTarget
from pipeline.testing import tiny_target
from pipeline.testing.tiny_target import (
    SPECIAL_TOKENS,
    TINY_MODEL_NAME,
    TinyTargetConfig,
    build_tiny_target,
    default_corpus,
    ensure_tiny_target,
)

MANIFEST_ROWS = [
    {
        "audio": "clips/0.wav",
        "conversations": [
            {
                "role": "user",
                "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the clip."}],
            },
            {"role": "assistant", "content": "Zebras graze quietly near the riverbank."},
        ],
    },
    {
        "audio": "clips/1.wav",
        "conversations": [
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": [{"type": "text", "text": "What is said?"}, {"type": "audio"}]},
            {"role": "assistant", "content": "A xylophone recital."},
        ],
    },
]


def _write_manifest(path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in MANIFEST_ROWS))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.jsonl")


@pytest.fixture(scope="module")
def corpus(manifest: Path) -> list[str]:
    return default_corpus(manifest)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("build") / "tiny", corpus)


@pytest.fixture(scope="module")
def processor(built: Path):
    return AutoProcessor.from_pretrained(built)


@pytest.fixture(scope="module")
def model(built: Path) -> Qwen2AudioForConditionalGeneration:
    return Qwen2AudioForConditionalGeneration.from_pretrained(built).eval()


def test_build_reloads(built: Path, processor, model: Qwen2AudioForConditionalGeneration) -> None:
    cfg = TinyTargetConfig()
    assert (built / "model.safetensors").is_file()
    assert not list(built.parent.glob(".tiny.tmp-*")), "temp dir left behind"
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    for s, i in ids.items():  # each special is one token, never split
        assert tok(s, add_special_tokens=False)["input_ids"] == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 500 < len(tok) <= cfg.vocab_size

    text_cfg = model.config.text_config
    assert model.dtype == torch.float32
    assert model.config.audio_token_index == ids["<|AUDIO|>"]
    assert text_cfg.vocab_size % 64 == 0 and len(tok) <= text_cfg.vocab_size < len(tok) + 64
    assert text_cfg.num_hidden_layers == 8 and text_cfg.hidden_size == 64
    assert text_cfg.pad_token_id == ids["<|endoftext|>"] and text_cfg.eos_token_id == ids["<|im_end|>"]
    assert model.config.audio_config.num_mel_bins == 128
    assert processor.feature_extractor.feature_size == 128


def test_corpus_and_tokenizer(corpus: list[str], processor) -> None:
    # The corpus holds every text item of the manifest plus the template's fixed strings.
    for text in (
        "Transcribe the clip.",
        "Zebras graze quietly near the riverbank.",
        "You answer in one sentence.",
    ):
        assert text in corpus
    assert any("You are a helpful assistant." in text for text in corpus)
    # Byte-level BPE: any text round-trips, whatever the corpus covered.
    tok = processor.tokenizer
    for text in (" Zebras graze", "naïve café, 東京 — 42!", "You are a helpful assistant."):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_deterministic_weights(tmp_path: Path, built: Path, corpus: list[str]) -> None:
    again = build_tiny_target(tmp_path / "again", corpus)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    other = build_tiny_target(tmp_path / "seed1", corpus, TinyTargetConfig(seed=1))
    assert (other / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (built / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_deterministic_across_processes(tmp_path: Path, built: Path, manifest: Path) -> None:
    # Rust hash maps in `tokenizers` are seeded per process: check the BPE does not depend on that.
    code = (
        "import sys; from pathlib import Path;"
        "from pipeline.testing.tiny_target import build_tiny_target, default_corpus;"
        "build_tiny_target(Path(sys.argv[1]), default_corpus(Path(sys.argv[2])))"
    )
    out = tmp_path / "subprocess"
    repo = Path(tiny_target.__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(out), str(manifest)], check=True, cwd=repo)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (built / name).read_bytes(), name


def test_existing_dir_and_crash_leave_no_partial_build(tmp_path: Path, corpus: list[str], monkeypatch) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        build_tiny_target(existing, corpus)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_target.Qwen2AudioProcessor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_target(tmp_path / "crashed", corpus)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_chat_template(processor) -> None:
    conversation = [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is said?"}]},
        {"role": "assistant", "content": "Hello there."},
    ]
    assert processor.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nYou are a test.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said?<|im_end|>\n"
        "<|im_start|>assistant\nHello there.<|im_end|>\n"
    )
    # No system message: the default one is inserted; audio items are numbered; the generation prompt.
    conversation = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": "a.wav"}, {"type": "audio", "audio": "b.wav"}],
        },
    ]
    assert processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Audio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_audio_expansion_and_hidden_states(processor, model: Qwen2AudioForConditionalGeneration) -> None:
    conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is said?"}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    sr = processor.feature_extractor.sampling_rate
    audio = (np.random.default_rng(0).standard_normal(sr) * 0.1).astype(np.float32)  # 1 s of noise
    inputs = processor(text=text, audio=audio, sampling_rate=sr, return_tensors="pt")

    # The processor pads every clip to 30 s (3000 mel frames) and marks the real ones.
    assert set(inputs) == {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
    assert inputs["input_features"].shape == (1, 128, 3000)
    mel_frames = int(inputs["feature_attention_mask"].sum())
    assert mel_frames == sr // 160
    expected_audio_tokens = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
    assert expected_audio_tokens == 25  # 25 per second

    ids = inputs["input_ids"][0]
    audio_id = model.config.audio_token_index
    is_audio = ids == audio_id
    assert int(is_audio.sum()) == expected_audio_tokens
    positions = is_audio.nonzero().flatten()
    assert (positions.diff() == 1).all(), "audio tokens must be consecutive"

    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
    hidden = out.hidden_states
    assert len(hidden) == model.config.text_config.num_hidden_layers + 1
    assert out.logits.shape == (1, len(ids), model.config.text_config.vocab_size)
    # hidden_states[0] is the merged input: token embeddings at text positions, audio features elsewhere.
    assert torch.equal(hidden[0][0, ~is_audio], embeds[0, ~is_audio])
    assert not torch.allclose(hidden[0][0, is_audio], embeds[0, is_audio])
    # The last hidden state is post-norm: logits == lm_head(hidden_states[-1]).
    assert torch.allclose(out.logits, model.lm_head(hidden[-1]))


def test_ensure_tiny_target(tmp_path: Path, manifest: Path, monkeypatch) -> None:
    first = ensure_tiny_target(tmp_path, manifest=manifest)
    assert first.parent == tmp_path and first.name.startswith("qwen2-audio-tiny-seed0-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_target(tmp_path, manifest=manifest) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "rebuilt instead of reused"
    assert ensure_tiny_target(tmp_path, TinyTargetConfig(seed=3), manifest=manifest).name.startswith(
        "qwen2-audio-tiny-seed3-"
    )

    # A changed manifest is a different target, not a stale reuse.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"audio": "x.wav", "conversations": [{"role": "user", "content": "Hi."}]}) + "\n")
    assert ensure_tiny_target(tmp_path, manifest=other) != first

    # Default root: $AUDIO_EAGLE_HOME.
    home = tmp_path / "home"
    monkeypatch.setenv("AUDIO_EAGLE_HOME", str(home))
    assert ensure_tiny_target(manifest=manifest).parent == home


def test_tiny_is_a_model_alias_the_product_resolves(tmp_path: Path, monkeypatch) -> None:
    """The installed entry point maps the name to the default tiny target; other names pass through."""
    assert model_aliases()[TINY_MODEL_NAME].value == "pipeline.testing.tiny_target:ensure_tiny_target"
    monkeypatch.setenv("AUDIO_EAGLE_HOME", str(tmp_path))
    path = Path(resolve_model(TINY_MODEL_NAME))
    assert path == ensure_tiny_target() and path.parent == tmp_path and (path / "config.json").is_file()
    assert resolve_model("Qwen/Qwen2-Audio-7B-Instruct") == "Qwen/Qwen2-Audio-7B-Instruct"
    assert resolve_model("/some/local/dir") == "/some/local/dir"


class PluggedTarget(Qwen2AudioTarget):
    """Stands for another package's adapter: the built-in one under another name."""


def test_an_installed_package_plugs_an_adapter_in_by_model_type(tmp_path: Path, monkeypatch, tiny_dir) -> None:
    """An entry point in "audio_eagle.targets" (here a package installed on sys.path) serves its model_type."""
    assert target_adapters()["qwen2_audio"].value == "pipeline.targets.qwen2_audio:Qwen2AudioTarget"
    assert type(load_target("tiny", "float32", "cpu")) is Qwen2AudioTarget
    dist = tmp_path / "family_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: family-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[audio_eagle.targets]\nqwen2_audio = tests.test_tiny_target:PluggedTarget\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert target_adapters()["qwen2_audio"].value == "tests.test_tiny_target:PluggedTarget"
    assert type(load_target("tiny", "float32", "cpu")) is PluggedTarget
