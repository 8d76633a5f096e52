"""Stage one: run the target over webdataset shards and write its states to a hidden-state cache.

Shards are dealt to ranks (``shards[rank::world]``); each shard becomes one part written by one rank, so two
writers never share a store, the world size may change between runs, and a re-run resumes each unfinished part
at its first uncommitted sample. Bad samples are skipped, recorded with their key and reason, and summarised.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.cache.format import (
    COMMIT,
    FORMAT_VERSION,
    HEAD_WEIGHTS,
    MANIFEST,
    PARTS,
    CodecConfig,
    part_name,
    read_json,
    write_json_atomic,
)
from pipeline.cache.writer import BackgroundWriter, PartWriter, SampleRecord, WriteStats
from pipeline.errors import ConfigError, StrictModeError
from pipeline.inputs.audio import AudioError, AudioPolicy, decode_audio
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.shards import RawSample, expand_shard_urls, iter_raw_samples, unreadable_shard
from pipeline.targets.base import AudioTarget, TargetInputs, TargetStates, load_target


@dataclass
class DumpConfig:
    shards: str  # path, glob, brace pattern, comma list or URL of webdataset tar shards
    out: Path
    model: str = "tiny"  # "tiny", an HF id or a local model directory
    layers: list[int] | None = None  # HF hidden_states indices; default EAGLE-3's (2, L//2, L-3)
    dtype: str | None = None  # default bfloat16 on GPU, float32 on CPU
    max_length: int = 2048
    audio: AudioPolicy = field(default_factory=AudioPolicy)
    codec: CodecConfig = field(default_factory=CodecConfig)
    strict: bool = False  # the first bad sample fails the job
    max_pending: int = 8  # samples queued for the writer before the forward waits (bounds memory)


def run_dump(cfg: DumpConfig, target: AudioTarget | None = None) -> dict:
    """Dump every shard of ``cfg.shards`` into ``cfg.out`` and return the final manifest.

    ``target`` may be passed already loaded (benchmarks); otherwise ``cfg.model`` is loaded here.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    urls = expand_shard_urls(cfg.shards)
    dtype = cfg.dtype or ("bfloat16" if state.device.type == "cuda" else "float32")
    target = target or load_target(cfg.model, dtype, state.device)
    dtype = str(target.dtype).removeprefix("torch.")
    layers = _check_layers(cfg.layers or target.default_layers(), target.num_layers)
    if state.is_main_process:
        _init_cache(cfg, target, layers, dtype, urls)
    state.wait_for_everyone()

    writer = BackgroundWriter(cfg.max_pending)
    stats = WriteStats()
    progress = tqdm(unit="sample", desc=f"dump rank {state.process_index}", disable=not state.is_local_main_process)
    start = time.perf_counter()
    try:
        for url in urls[state.process_index :: state.num_processes]:
            writer_id = {"rank": state.process_index, "world_size": state.num_processes}
            path = cfg.out / PARTS / part_name(url)
            part = PartWriter(path, url, layers, target.hidden_size, dtype, cfg.codec, writer_id, stats)
            if part.complete:
                continue
            for record in _dump_shard(url, part, target, layers, cfg, writer):
                stats.add(record)
                progress.update(1)
                progress.set_postfix_str(stats.describe(time.perf_counter() - start), refresh=False)
    finally:
        progress.close()
        writer.close()  # drains the queue; re-raises a write error (e.g. a full disk) here
    elapsed = time.perf_counter() - start
    print(f"rank {state.process_index}: the model waited {writer.wait_seconds:.1f} s of {elapsed:.1f} s on the writer")
    state.wait_for_everyone()
    manifest = _finalise(cfg.out, urls) if state.is_main_process else None
    state.wait_for_everyone()
    return manifest or read_json(cfg.out / MANIFEST)


def _dump_shard(
    url: str,
    part: PartWriter,
    target: AudioTarget,
    layers: list[int],
    cfg: DumpConfig,
    writer: BackgroundWriter,
):
    """Yield each cached sample's record after handing it to the writer; rejects go to the part's log."""
    resume_at, position, samples = part.position, -1, iter_raw_samples(url)
    while True:
        try:
            raw = next(samples)
        except StopIteration:
            break
        except Exception as err:  # an unreadable shard: keep what was cached, record why, go on
            writer.submit(part.finish, unreadable_shard(url, position + 1, err, cfg.strict))
            return
        position += 1
        if position < resume_at:
            continue
        try:
            record = _process(raw, position, target, layers, cfg)
        except Exception as err:  # any bad sample is skipped and recorded, never fatal
            reason = str(err) if isinstance(err, BadSample | AudioError) else f"{type(err).__name__}: {err}"
            if cfg.strict:
                raise StrictModeError(f"--strict: bad sample {raw.key!r} in {url}: {reason}") from err
            writer.submit(part.reject, raw.key, position, reason)
            continue
        writer.submit(part.append, record)
        yield record
    writer.submit(part.finish)


def _process(raw: RawSample, position: int, target: AudioTarget, layers: list[int], cfg: DumpConfig) -> SampleRecord:
    messages = parse_conversations(raw.json)
    if raw.audio is None:
        raise BadSample("missing audio member (expected <key>.wav, .flac, .mp3 or .ogg)")
    wave = decode_audio(raw.audio, cfg.audio, raw.audio_ext)
    inputs = target.prepare(messages, wave, cfg.max_length)
    states = _forward(target, inputs, layers)
    return SampleRecord(
        key=raw.key,
        position=position,
        input_ids=inputs.input_ids.numpy().astype(np.int32),
        loss_mask=inputs.loss_mask.numpy().astype(np.uint8),
        states=states,
    )


def _forward(target: AudioTarget, inputs: TargetInputs, layers: list[int]) -> TargetStates:
    try:
        states = target.forward(inputs, layers)
    except torch.cuda.OutOfMemoryError:
        raise BadSample(f"out of GPU memory at {len(inputs.input_ids)} tokens (lower --max-length)") from None
    tensors = {f"hidden_states[{i}]": h for i, h in states.hidden_states.items()}
    tensors |= {"final_hidden": states.final_hidden, "audio_embeds": states.audio_embeds}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise BadSample(f"NaN or Inf in the target's {name}")
    return states


def _check_layers(layers: list[int], num_layers: int) -> list[int]:
    bad = [i for i in layers if not 1 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"--layers {bad} out of range: capture HF hidden_states indices 1..{num_layers - 1} "
            f"(0 is the input embeddings and {num_layers} the final state; both are always cached)"
        )
    return sorted(set(layers))


def _init_cache(cfg: DumpConfig, target: AudioTarget, layers: list[int], dtype: str, urls: list[str]) -> None:
    """Create the cache, or check that an existing one was made with the same settings (then resume it)."""
    identity = {
        "format_version": FORMAT_VERSION,
        "target": target.identity(),
        "hidden_size": target.hidden_size,
        "num_layers": target.num_layers,
        "vocab_size": target.vocab_size,
        "captured_layers": layers,
        "dtype": dtype,
        "codec": cfg.codec.to_dict(),
        "max_length": cfg.max_length,
        "audio_policy": asdict(cfg.audio),
    }
    identity = json.loads(json.dumps(identity))  # compare as stored: tuples become lists, keys strings
    path = cfg.out / MANIFEST
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / PARTS).mkdir(exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the cache directory {cfg.out}: {err}") from None
    if path.exists():
        old = read_json(path)
        changed = [k for k in identity if k != "target" and old.get(k) != identity[k]]
        if old["target"]["config"] != identity["target"]["config"]:
            changed.append("target model")
        if changed:
            raise ConfigError(
                f"{cfg.out} holds a cache made with other settings ({', '.join(changed)} differ); "
                "re-run with the original settings to resume it, or choose another --out"
            )
    else:
        weights = {k: v.contiguous().clone() for k, v in target.head_weights().items()}
        save_file(weights, cfg.out / HEAD_WEIGHTS)
    write_json_atomic(path, {**identity, "shards": urls, "complete": False})


def _finalise(out: Path, urls: list[str]) -> dict:
    """Gather every part's commit into the manifest; it says complete only if every shard is done."""
    manifest = read_json(out / MANIFEST)
    parts, rejects, errors = [], [], []
    for url in urls:
        commit_path = out / PARTS / part_name(url) / COMMIT
        if not commit_path.exists():
            continue
        c = read_json(commit_path)
        parts.append(
            {
                "name": part_name(url),
                "shard": url,
                "samples": len(c["keys"]),
                "tokens": c["token_offsets"][-1],
                "audio_tokens": c["audio_offsets"][-1],
                "raw_bytes": c["raw_bytes"],
                "complete": c["complete"],
            }
        )
        rejects += [{**r, "shard": url} for r in c["rejects"]]
        if c["error"]:
            errors.append({"shard": url, "error": c["error"]})
    stored = sum(f.stat().st_size for f in (out / PARTS).rglob("*") if f.is_file())
    raw = sum(p["raw_bytes"] for p in parts)
    counts = {
        "shards": len(urls),
        "shards_done": sum(p["complete"] for p in parts),
        "samples": sum(p["samples"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "audio_tokens": sum(p["audio_tokens"] for p in parts),
        "rejected": len(rejects),
        "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejects)),
        "unreadable_shards": len(errors),
        "stored_bytes": stored,
        "raw_bytes": raw,
    }
    complete = counts["shards_done"] == len(urls)
    manifest.update(parts=parts, counts=counts, rejects=rejects, shard_errors=errors, complete=complete)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
