"""A randomly initialised Qwen2-Audio with Qwen2-Audio-7B-Instruct's published dimensions, for scale checks.

No real checkpoint can be downloaded here, so ``just scale-check`` runs the stages on a random model of the real
size: 8.40B parameters, 15.6 GiB in bf16, a 156032 x 4096 ``lm_head``. The dimensions are the published config's
(``Qwen/Qwen2-Audio-7B-Instruct/config.json``; see ``RealSizeConfig``). The tokenizer is the tiny target's locally
trained BPE, padded with unreachable filler entries so that its special tokens sit at the real ids
(``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|AUDIO|>`` 151646, ``<|audio_bos|>``
151647, ``<|audio_eos|>`` 151648): prompts have the real model's audio token id and end markers.

The weights are never held twice, nor even once: the model is built on the meta device (shapes and module types
only), and each tensor is drawn in bf16 (HF's init: N(0, 0.02) for linear, convolution and embedding weights,
zeros for biases, ones for norm weights), written into a safetensors shard of at most ``shard_bytes`` and dropped.
Peak memory is about one shard. Each tensor's values depend only on the seed and its name, so a build is
reproducible whatever the shard size. The directory is an ordinary HF model directory (config, shards, index,
processor), built into a temp directory and renamed when complete, and reused when present.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from pipeline.testing.tiny_target import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    REPO_ROOT,
    _train_tokenizer,
    default_corpus,
)

BUILD_VERSION = 1
REAL_SIZE_NAME = "Qwen2-Audio-7B-Instruct's dimensions (random weights)"
RECORD = "real_size.json"
INDEX = "model.safetensors.index.json"

# The real tokenizer's special ids, in id order from 151643.
REAL_SPECIALS = (ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
FIRST_SPECIAL_ID = 151643


@dataclass(frozen=True)
class RealSizeConfig:
    """Qwen2-Audio-7B-Instruct's published dimensions (its config.json; unset text fields take Qwen2Config's
    defaults there: 32 heads, 32 KV heads). Smaller values build the same recipe small, for tests."""

    seed: int = 0
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 156032
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    audio_token_index: int = 151646
    initializer_range: float = 0.02
    # Tokenizer BPE size before padding (the tiny target's), then padded to FIRST_SPECIAL_ID.
    bpe_size: int = 1000


REAL_SIZE = RealSizeConfig()


def default_dir() -> Path:
    return REPO_ROOT / "runs" / "qwen2-audio-7b-random"


def model_config(config: RealSizeConfig) -> Qwen2AudioConfig:
    pad_id, eos_id = FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + 2
    return Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": config.d_model,
            "encoder_layers": config.encoder_layers,
            "encoder_attention_heads": config.encoder_attention_heads,
            "encoder_ffn_dim": config.encoder_ffn_dim,
            "num_mel_bins": config.num_mel_bins,
            "max_source_positions": config.max_source_positions,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "initializer_range": config.initializer_range,
            "tie_word_embeddings": False,
            "bos_token_id": pad_id,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
        },
        audio_token_index=config.audio_token_index,
    )


def build_tokenizer(config: RealSizeConfig) -> PreTrainedTokenizerFast:
    """The tiny target's BPE, padded with filler entries no merge produces, then the specials at the real ids."""
    trained = json.loads(_train_tokenizer(default_corpus(), config.bpe_size).to_str())
    trained["added_tokens"] = []
    vocab: dict[str, int] = trained["model"]["vocab"]
    if len(vocab) > FIRST_SPECIAL_ID:
        raise ValueError(f"the BPE has {len(vocab)} entries, more than the {FIRST_SPECIAL_ID} before the specials")
    for i in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"<|filler_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(trained))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in REAL_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=config.max_position_embeddings,
    )
    ids = tokenizer.convert_tokens_to_ids(list(REAL_SPECIALS))
    if ids != list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(REAL_SPECIALS))):
        raise AssertionError(f"special ids {ids} are not the real ones")
    return tokenizer


def build_processor(config: RealSizeConfig) -> Qwen2AudioProcessor:
    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
        tokenizer=build_tokenizer(config),
        chat_template=CHAT_TEMPLATE,
    )


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return "LayerNorm" in name or "RMSNorm" in name


def _init_tensor(module: nn.Module, pname: str, param: torch.Tensor, std: float, gen: torch.Generator):
    """One parameter as HF's ``_init_weights`` initialises it, in bf16."""
    out = torch.empty(param.shape, dtype=torch.bfloat16)
    if _is_norm(module):
        return out.fill_(1.0 if pname == "weight" else 0.0)
    if pname == "bias":
        return out.zero_()
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Embedding):
        out.normal_(0.0, std, generator=gen)
        padding_idx = getattr(module, "padding_idx", None)
        if padding_idx is not None:
            out[padding_idx] = 0
        return out
    raise TypeError(f"no init rule for {type(module).__name__}.{pname}")


def iter_weights(config: RealSizeConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, bf16 tensor) of every weight, one at a time."""
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(model_config(config))
    expected = set(model.state_dict())
    seen: set[str] = set()
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            seen.add(name)
            yield name, _init_tensor(module, pname, param, config.initializer_range, _generator(config.seed, name))
    if seen != expected:
        raise AssertionError(f"state dict entries not built: {sorted(expected - seen)[:5]}")


def write_shards(weights: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> dict:
    """Safetensors shards of at most ``shard_bytes`` (one tensor may exceed it alone) and the HF index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    names: list[list[str]] = [[]]

    def flush(last: bool) -> None:
        n = len(names)
        shard = shards[-1]
        if shard:
            save_file(shard, out / f"part-{n:05d}.safetensors", metadata={"format": "pt"})
            shard.clear()
        if not last:
            shards.append({})
            names.append([])

    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(last=False)
            size = 0
        shards[-1][name] = tensor
        names[-1].append(name)
        size += nbytes
        total += nbytes
    flush(last=True)
    count = len(names)
    weight_map = {}
    for i, group in enumerate(names, start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        os.rename(out / f"part-{i:05d}.safetensors", out / final)
        weight_map.update(dict.fromkeys(group, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def build_real_size(out_dir: Path, config: RealSizeConfig = REAL_SIZE, shard_bytes: int = 2 << 30) -> Path:
    """Build the model directory at ``out_dir`` (must not exist), a tensor at a time."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        processor = build_processor(config)
        cfg = model_config(config)
        cfg.dtype = torch.bfloat16
        cfg.architectures = ["Qwen2AudioForConditionalGeneration"]
        cfg.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        generation = {"eos_token_id": [FIRST_SPECIAL_ID + 2, FIRST_SPECIAL_ID], "pad_token_id": FIRST_SPECIAL_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        index = write_shards(iter_weights(config), tmp, shard_bytes)
        record = {"build_version": BUILD_VERSION, "config": asdict(config), "bytes": index["metadata"]["total_size"]}
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_real_size(out_dir: Path | None = None, config: RealSizeConfig = REAL_SIZE) -> Path:
    """The model directory, built on first use; a directory built by another recipe or config is refused."""
    out_dir = Path(out_dir) if out_dir is not None else default_dir()
    if not out_dir.exists():
        return build_real_size(out_dir, config)
    record = json.loads((out_dir / RECORD).read_text())
    if record != {**record, "build_version": BUILD_VERSION, "config": asdict(config)}:
        raise FileExistsError(f"{out_dir} holds another build ({record}); remove it to rebuild")
    return out_dir


if __name__ == "__main__":  # python -m pipeline.testing.real_size [OUT_DIR]: build (or find) it, print its path
    import sys

    print(ensure_real_size(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
