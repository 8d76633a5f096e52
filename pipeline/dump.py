"""Stage one: run the target over webdataset shards and write its states to a hidden-state cache.

Shards are dealt to ranks (``shards[rank::world]``); each shard becomes one part written by one rank, so two
writers never share a store, the world size may change between runs, and a re-run resumes each unfinished part
at its first uncommitted sample (a shard that could not be read is unfinished: a re-run retries it). Bad samples
are skipped, recorded with their key and reason, and summarised. One run at a time writes a cache: its main
process holds the cache's lock for the whole run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from pipeline.cache.format import CodecConfig, Manifest, SampleStates
from pipeline.cache.writer import (
    BackgroundWriter,
    CacheLock,
    CacheWriter,
    PartWriter,
    SampleRecord,
    WriteStats,
    create_or_resume,
)
from pipeline.errors import ConfigError, StrictModeError
from pipeline.inputs.audio import AudioError, AudioPolicy, decode_audio
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.shards import RawSample, expand_shard_urls, iter_raw_samples, unreadable_shard
from pipeline.settings import setting
from pipeline.targets import AudioTarget, TargetInputs, load_target


@dataclass
class DumpConfig:
    shards: str = setting(help="webdataset shards: path, glob, brace pattern {000..009}, comma list or URL")
    out: Path = setting(help="cache directory (re-run the same command to resume)")
    model: str = setting("tiny", "the target: an alias (tiny: the built-in test target), an HF id or a local directory")
    layers: list[int] | None = setting(
        None,
        "HF hidden_states indices to cache, e.g. 2,16,29 (default: EAGLE-3's 2, L//2, L-3); capture more so one "
        "dump serves drafts that use other layers",
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = setting(
        None, "model and cache dtype (default: bfloat16 on GPU, float32 on CPU)"
    )
    max_length: int = setting(2048, "truncate prompts to this many tokens")
    audio: AudioPolicy = setting(factory=AudioPolicy)
    codec: CodecConfig = setting(factory=CodecConfig)
    strict: bool = setting(False, "fail on the first bad sample instead of skipping it")
    max_pending: int = setting(8, "samples queued for the writer before the forward waits (bounds memory)")


def run_dump(cfg: DumpConfig, target: AudioTarget | None = None) -> Manifest:
    """Dump every shard of ``cfg.shards`` into ``cfg.out`` and return the final manifest.

    ``target`` may be passed already loaded (benchmarks); otherwise ``cfg.model`` is loaded here.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    urls = expand_shard_urls(cfg.shards)
    lock = CacheLock(cfg.out) if state.is_main_process else None
    try:
        if lock and cfg.out.exists():
            lock.acquire()  # before loading the target: a second dump into a busy cache fails at once
        dtype = cfg.dtype or ("bfloat16" if state.device.type == "cuda" else "float32")
        target = target or load_target(cfg.model, dtype, state.device)
        layers = _check_layers(cfg.layers or target.default_layers(), target.num_layers)
        if lock:
            lock.acquire()
            _create_or_resume(cfg, target, layers, urls)
        state.wait_for_everyone()
        return _dump_parts(cfg, state, CacheWriter(cfg.out, Manifest.read(cfg.out)), target, layers)
    finally:
        if lock:
            lock.release()


def _create_or_resume(cfg: DumpConfig, target: AudioTarget, layers: list[int], urls: list[str]) -> None:
    """Main process only: the target's identity hashes its weights, once per run."""
    dtype = str(target.dtype).removeprefix("torch.")
    create_or_resume(cfg.out, _manifest(cfg, target, layers, dtype, urls), target.head_weights)


def _dump_parts(
    cfg: DumpConfig, state: PartialState, cache: CacheWriter, target: AudioTarget, layers: list[int]
) -> Manifest:
    """This rank's shards into their parts; the main process then gathers every part into the final manifest."""
    urls = cache.manifest.shards
    writer = BackgroundWriter(cfg.max_pending)
    stats = WriteStats()
    progress = tqdm(unit="sample", desc=f"dump rank {state.process_index}", disable=not state.is_local_main_process)
    start = time.perf_counter()
    try:
        for url in urls[state.process_index :: state.num_processes]:
            writer_id = {"rank": state.process_index, "world_size": state.num_processes}
            part = cache.part(url, writer_id, stats)
            if part.complete:  # read to its end; a shard that could not be read is retried
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
    final = cache.finalise() if state.is_main_process else None
    state.wait_for_everyone()
    return final or Manifest.read(cfg.out)


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
    first_at: dict[str, int] = {}  # each key's first position in the shard, samples skipped on resume included
    while True:
        try:
            raw = next(samples)
        except StopIteration:
            break
        except Exception as err:  # an unreadable shard: keep what was cached, record why, retry it next run
            writer.submit(part.finish, unreadable_shard(url, position + 1, err, cfg.strict))
            return
        position += 1
        first = first_at.setdefault(raw.key, position)
        if position < resume_at:
            continue
        try:
            if first != position:
                raise _duplicate_key(raw.key, first)
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


def _duplicate_key(key: str, first: int) -> BadSample:
    # A second sample under one key would be cached twice under it (or silently replace the first downstream).
    return BadSample(f"duplicate key {key!r}: sample {first} of this shard has it too (keys must be unique)")


def _process(raw: RawSample, position: int, target: AudioTarget, layers: list[int], cfg: DumpConfig) -> SampleRecord:
    messages = parse_conversations(raw.json)
    if raw.audio is None:
        raise BadSample("missing audio member (expected <key>.wav, .flac, .mp3 or .ogg)")
    if raw.other_audio:
        names = [f"{raw.key}.{ext}" for ext in (raw.audio_ext, *raw.other_audio)]
        raise BadSample(f"{len(names)} audio members ({', '.join(names)}); a sample holds one clip")
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


def _forward(target: AudioTarget, inputs: TargetInputs, layers: list[int]) -> SampleStates:
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


def _manifest(cfg: DumpConfig, target: AudioTarget, layers: list[int], dtype: str, urls: list[str]) -> Manifest:
    """What the cache records of this dump: the target's identity and shape, the layers, and the settings."""
    return Manifest(
        target=target.identity(),
        audio_token_id=target.audio_token_id,
        hidden_size=target.hidden_size,
        num_layers=target.num_layers,
        vocab_size=target.vocab_size,
        captured_layers=layers,
        dtype=dtype,
        codec=cfg.codec,
        settings={"max_length": cfg.max_length, "audio_policy": asdict(cfg.audio)},
        shards=urls,
    )
