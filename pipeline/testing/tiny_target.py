"""A tiny, seeded, randomly initialised Qwen2-Audio target that stands in for Qwen2-Audio-7B-Instruct.

No weights can be downloaded here, so every stage is developed and tested against this model. It keeps the
real model's interfaces (processor, chat template, special tokens, 128 mel bins, 3000-frame encoder input,
untied lm_head, vocab padded past the tokenizer size) and shrinks only the sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

logger = logging.getLogger(__name__)

# The model alias that stands for `ensure_tiny_target()` (entry point "audio_eagle.model_aliases" in
# pyproject.toml): `--model tiny` and `load_target("tiny", ...)` load this target.
TINY_MODEL_NAME = "tiny"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO_ROOT / "data" / "sample" / "manifest.jsonl"
HOME_ENV = "AUDIO_EAGLE_HOME"

# Bump when the build recipe changes in a way that changes the output for the same config and corpus,
# so cached builds under the old recipe are not reused.
BUILD_VERSION = 1

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)

# Qwen2-Audio-7B-Instruct's chat template (its chat_template.json), with one addition taken from the
# default template in transformers' Qwen2AudioProcessor: `content['type'] == 'audio'`, so that a bare
# {"type": "audio"} item (our manifest's form, and {"type": "audio", "path": ...}) renders as audio; the
# hub template only recognises items carrying an `audio` or `audio_url` key. Every input the hub template
# accepts renders identically.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen2's pre-tokenizer split (from its tokenizer.json): digits one by one, letters with one leading
# non-letter, so the tiny tokenizer segments text the way the real one does.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The literal text the chat template emits, so the tokenizer learns it even from an empty manifest.
TEMPLATE_STRINGS = (
    "system\nYou are a helpful assistant.\n",
    "user\n",
    "assistant\n",
    "Audio 1: \nAudio 2: \nAudio 3: \n",
)

# A fixed word list so the tokenizer is never degenerate (a vocab of bytes only) on a tiny corpus.
COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has
look more day could go come did number sound no most people my over know water than call first who may
down side been now find any new work part take get place made live where after back little only round man
year came show every good me give our under name very through just form sentence great think say help low
line differ turn cause much mean before move right boy old too same tell does set three want air well also
play small end put home read hand port large spell add even land here must big high such follow act why
ask men change went light kind off need house picture try us again animal point mother world near build
self earth father head stand own page should country found answer school grow study still learn plant
cover food sun four between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run while press close night real life few north open seem together next
white children begin got walk example ease paper group always music those both mark often letter until
mile river car feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list
though feel talk bird soon body dog family direct pose leave song measure door product black short numeral
class wind question happen complete ship area half rock order fire south problem piece told knew pass since
top whole king space heard best hour better true during hundred five remember step early hold west ground
interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green quick develop ocean
warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course
stay wheel full force blue object decide surface deep moon island foot system busy test record boat common
gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat
snow tire bring yes distant fill east paint language among audio speech transcribe transcription describe
speaker sound recording clip what is said please answer briefly
""".split()


@dataclass(frozen=True)
class TinyTargetConfig:
    """Sizes of the tiny target. Frozen: it is hashed into the cache directory name."""

    seed: int = 0
    # Text model (Qwen2). 8 layers so EAGLE-3's default aux layers 2, L//2, L-3 = 2, 4, 5 are distinct.
    hidden_size: int = 64
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    # Audio encoder (Whisper-style). max_source_positions stays 1500: the encoder insists on 3000 mel frames.
    d_model: int = 64
    encoder_layers: int = 2
    encoder_attention_heads: int = 2
    encoder_ffn_dim: int = 128
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    # Tokenizer size including the special tokens; the BPE may stop short on a small corpus.
    vocab_size: int = 1000
    # The real model's embedding table is larger than its tokenizer (156032 vs ~151650); pad likewise.
    vocab_multiple: int = 64


DEFAULT_CONFIG = TinyTargetConfig()


def _train_tokenizer(corpus: list[str], vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        min_frequency=1,
        show_progress=False,
        # All 256 byte symbols, so any text stays encodable whatever the corpus held.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer)
    # Added after training so the special ids sit at the end of the vocab, as in Qwen's tokenizer.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def _build_processor(corpus: list[str], config: TinyTargetConfig) -> Qwen2AudioProcessor:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus, config.vocab_size),
        # As Qwen2-Instruct tokenizers do: eos ends an assistant turn, <|endoftext|> pads.
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=config.max_position_embeddings,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _build_model(processor: Qwen2AudioProcessor, config: TinyTargetConfig) -> Qwen2AudioForConditionalGeneration:
    tokenizer = processor.tokenizer
    multiple = config.vocab_multiple
    text_vocab = (len(tokenizer) + multiple - 1) // multiple * multiple
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    model_config = Qwen2AudioConfig(
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
            "vocab_size": text_vocab,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": False,
            "pad_token_id": endoftext_id,
            "eos_token_id": im_end_id,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    # Seed immediately before construction: initialisation is the only consumer of the RNG here, so the
    # weights depend on the seed and the config alone.
    torch.manual_seed(config.seed)
    model = Qwen2AudioForConditionalGeneration(model_config).to(torch.float32).eval()
    # Stop on either end marker, as the Instruct model's generation config does.
    model.generation_config.eos_token_id = [im_end_id, endoftext_id]
    model.generation_config.pad_token_id = endoftext_id
    return model


def build_tiny_target(out_dir: Path, corpus: Iterable[str], config: TinyTargetConfig = DEFAULT_CONFIG) -> Path:
    """Train a tokenizer on `corpus`, build a seeded tiny Qwen2-Audio and save model + processor to `out_dir`.

    Deterministic: the same config and corpus give byte-identical files. The build goes to a temp directory
    next to `out_dir` that is renamed at the end, so `out_dir` either does not exist or is complete.
    Raises FileExistsError if `out_dir` exists (also when a concurrent build renamed first).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    texts = [t for t in corpus if t]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        processor = _build_processor(texts, config)
        model = _build_model(processor, config)
        model.save_pretrained(tmp_dir)
        processor.save_pretrained(tmp_dir)
        # Record what was built, for people and for checks; not read by transformers.
        (tmp_dir / "tiny_target.json").write_text(
            json.dumps({"build_version": BUILD_VERSION, "config": asdict(config)}, indent=2, sort_keys=True) + "\n"
        )
        try:
            # Atomic on one filesystem; fails if another process renamed an identical build first.
            os.rename(tmp_dir, out_dir)
        except OSError as err:
            raise FileExistsError(f"{out_dir} appeared during the build") from err
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def manifest_texts(manifest: Path) -> list[str]:
    """All text content of the conversations in a JSONL manifest, in file order."""
    texts: list[str] = []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for message in json.loads(line).get("conversations", []):
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    texts.extend(item["text"] for item in content if isinstance(item.get("text"), str))
    return texts


def default_corpus(manifest: Path | None = DEFAULT_MANIFEST) -> list[str]:
    """Manifest texts plus the template's fixed strings and a common-word list (works with no manifest)."""
    texts = list(TEMPLATE_STRINGS) + [" ".join(COMMON_WORDS)]
    if manifest is not None:
        if Path(manifest).exists():
            texts.extend(manifest_texts(Path(manifest)))
        else:
            logger.warning("manifest %s not found; tiny tokenizer trained on built-in text only", manifest)
    return texts


def default_root() -> Path:
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else REPO_ROOT / ".tiny-target"


def tiny_target_dirname(config: TinyTargetConfig, corpus: list[str]) -> str:
    """Seed plus a fingerprint of config, corpus and recipe: a changed manifest or config gets a fresh build
    instead of silently reusing a stale one, and every process computes the same name."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": BUILD_VERSION, "config": asdict(config)}, sort_keys=True).encode())
    for text in corpus:
        digest.update(b"\0" + text.encode("utf-8"))
    return f"qwen2-audio-tiny-seed{config.seed}-{digest.hexdigest()[:10]}"


def ensure_tiny_target(
    root: Path | None = None,
    config: TinyTargetConfig = DEFAULT_CONFIG,
    manifest: Path | None = DEFAULT_MANIFEST,
) -> Path:
    """Directory of the tiny target for `config` and `manifest`, built on first use.

    root defaults to $AUDIO_EAGLE_HOME, else <repo>/.tiny-target. Safe to call from several processes at
    once: each may build, the first rename wins and the others reuse it (the builds are identical).
    """
    corpus = default_corpus(manifest)
    root = Path(root) if root is not None else default_root()
    out_dir = root / tiny_target_dirname(config, corpus)
    if not out_dir.exists():
        logger.info("building tiny Qwen2-Audio target in %s", out_dir)
        try:
            build_tiny_target(out_dir, corpus, config)
        except FileExistsError:
            pass  # built concurrently by another process
    return out_dir
