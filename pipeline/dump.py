"""Stage one: run the target over webdataset shards and write its states to a hidden-state cache.

Shards are dealt to ranks (``shards[rank::world]``); each shard becomes one part written by one rank, so two
writers never share a store, the world size may change between runs, and a re-run resumes each unfinished part
at its first uncommitted sample (a shard that could not be read is unfinished: a re-run retries it). Bad samples
are skipped, recorded with their key and reason, and summarised. One run at a time writes a cache: its main
process holds the cache's lock for the whole run.

Within a shard, samples are prepared (decoded, resampled, tokenised, features extracted) by worker processes ahead
of the forward (``pipeline.inputs.prefetch``). With ``batch_tokens`` the shard is cut into windows of
``batch_window`` consecutive samples; a window's samples are sorted by length and packed into padded forwards of at
most ``batch_tokens`` padded tokens and ``batch_size`` samples, then handed to the writer in shard order, so the
part's commits, positions and rejects are those of the one-sample loop. Windows start at multiples of
``batch_window``: a resumed run forms the batches of the uninterrupted one (it prepares the committed head of the
window it resumes in again and drops those results), so its states are bit-for-bit those of an uninterrupted run
with the same settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from pipeline.cache.format import MANIFEST, CodecConfig, Manifest, SampleStates
from pipeline.cache.writer import (
    BackgroundWriter,
    CacheLock,
    CacheWriter,
    PartWriter,
    SampleRecord,
    WriteStats,
    create_or_resume,
)
from pipeline.errors import ConfigError, PipelineError, StrictModeError
from pipeline.inputs.audio import AudioError, AudioPolicy, decode_audio
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.prefetch import Prefetcher
from pipeline.inputs.shards import RawSample, expand_shard_urls, iter_raw_samples, unreadable_shard
from pipeline.settings import setting
from pipeline.targets import AudioTarget, TargetInputs, load_target
from pipeline.targets.base import Preparer
from pipeline.targets.dtype import resolve_dtype

GPU_BATCH_TOKENS = 8192  # a 7B forward of this many tokens keeps a GPU busy; its states fit in any current GPU
MAX_AUTO_WORKERS = 8


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
        None,
        "model and cache dtype (default: bfloat16 on GPU; on CPU float32 if its weights fit in free memory, else bf16)",
    )
    max_length: int = setting(2048, "truncate prompts to this many tokens")
    audio: AudioPolicy = setting(factory=AudioPolicy)
    codec: CodecConfig = setting(factory=CodecConfig)
    strict: bool = setting(False, "fail on the first bad sample instead of skipping it")
    max_pending: int = setting(8, "samples queued for the writer before the forward waits (bounds memory)")
    batch_tokens: int | None = setting(
        None,
        "padded tokens per forward (samples x the longest): samples grouped by length share one padded, masked "
        f"forward; 0: one sample per forward, bit-exact with the target's plain forward (default: {GPU_BATCH_TOKENS} "
        "on GPU, 0 on CPU, where batching gains nothing)",
    )
    batch_size: int = setting(32, "most samples per forward (each clip also costs the audio encoder its padded length)")
    batch_window: int = setting(
        64, "consecutive samples sorted by length together before batching (the cache keeps shard order)"
    )
    prepare_workers: int | None = setting(
        None,
        "processes decoding audio and extracting features ahead of the forward; 0: in the forward's process "
        f"(default: 0 on CPU, else the rank's share of the cores less 2, at most {MAX_AUTO_WORKERS})",
    )
    trim_audio_padding: bool = setting(
        False,
        "run the audio encoder over each clip's real frames instead of the padded 30 s: equal to the full-length "
        "forward within float tolerance, not bit-exact (measured in BENCHMARKS.md)",
    )

    def __post_init__(self) -> None:
        if self.batch_tokens is not None and self.batch_tokens < 0:
            raise ValueError(f"batch_tokens must be >= 0 (0: one sample per forward), got {self.batch_tokens}")
        if self.batch_size < 1 or self.batch_window < 1:
            raise ValueError(f"batch_size and batch_window must be >= 1, got {self.batch_size}, {self.batch_window}")
        if self.prepare_workers is not None and self.prepare_workers < 0:
            raise ValueError(f"prepare_workers must be >= 0, got {self.prepare_workers}")


@dataclass(frozen=True)
class Batching:
    """How this run forms its forwards: the settings resolved for the device."""

    batch_tokens: int  # 0: one sample per forward
    batch_size: int
    window: int  # samples sorted together; 1 without batching
    workers: int
    trim_audio_padding: bool

    @classmethod
    def resolve(cls, cfg: DumpConfig, device: torch.device) -> Batching:
        gpu = device.type != "cpu"
        tokens = cfg.batch_tokens if cfg.batch_tokens is not None else (GPU_BATCH_TOKENS if gpu else 0)
        workers = cfg.prepare_workers if cfg.prepare_workers is not None else (_auto_workers() if gpu else 0)
        return cls(tokens, cfg.batch_size, cfg.batch_window if tokens else 1, workers, cfg.trim_audio_padding)


def _auto_workers() -> int:
    # The rank's share of the cores, less the forward's own thread and the writer's compression.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cores // ranks - 2))


@dataclass
class DumpTimes:
    """Where one rank's dump time went: the forward, waiting for prepared input, waiting for the writer."""

    seconds: float = 0.0
    forward: float = 0.0
    input_wait: float = 0.0
    writer_wait: float = 0.0
    samples: int = 0
    tokens: int = 0

    def describe(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.samples} samples, {self.tokens / s:.0f} tokens/s in {self.seconds:.1f} s; the forward waited for "
            f"input {self.input_wait / s:.1%} and for the writer {self.writer_wait / s:.1%} of the time "
            f"(forward {self.forward / s:.1%})"
        )


def run_dump(cfg: DumpConfig, target: AudioTarget | None = None, times: DumpTimes | None = None) -> Manifest:
    """Dump every shard of ``cfg.shards`` into ``cfg.out`` and return the final manifest.

    ``target`` may be passed already loaded (benchmarks); otherwise ``cfg.model`` is loaded here. ``times``, when
    given, receives this rank's timings.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    urls = expand_shard_urls(cfg.shards)
    lock = CacheLock(cfg.out) if state.is_main_process else None
    try:
        if lock and cfg.out.exists():
            lock.acquire()  # before loading the target: a second dump into a busy cache fails at once
        target = target or load_target(cfg.model, _dtype(cfg, state.device), state.device)
        layers = _check_layers(cfg.layers or target.default_layers(), target.num_layers)
        if lock:
            lock.acquire()
            _create_or_resume(cfg, target, layers, urls)
        state.wait_for_everyone()
        cache = CacheWriter(cfg.out, Manifest.read(cfg.out))
        return _dump_parts(cfg, state, cache, target, layers, times or DumpTimes())
    finally:
        if lock:
            lock.release()


def _dtype(cfg: DumpConfig, device: torch.device) -> str:
    """The dtype asked for; else, resuming, the cache's own (the default depends on the memory free at the time, and a
    resume must not flip it); else the default for this model and device."""
    if cfg.dtype is None and (cfg.out / MANIFEST).is_file():
        try:
            dtype = Manifest.read(cfg.out).dtype
        except PipelineError:
            dtype = None  # a damaged manifest: create_or_resume says what is wrong with it
        if dtype:
            print(f"dtype: {dtype} (the cache's, resuming it; --dtype overrides)", flush=True)
            return dtype
    return resolve_dtype(cfg.dtype, device, cfg.model)


def _create_or_resume(cfg: DumpConfig, target: AudioTarget, layers: list[int], urls: list[str]) -> None:
    """Main process only: the target's identity hashes its weights, once per run."""
    dtype = str(target.dtype).removeprefix("torch.")
    create_or_resume(cfg.out, _manifest(cfg, target, layers, dtype, urls), target.head_weights)


def _dump_parts(
    cfg: DumpConfig, state: PartialState, cache: CacheWriter, target: AudioTarget, layers: list[int], times: DumpTimes
) -> Manifest:
    """This rank's shards into their parts; the main process then gathers every part into the final manifest."""
    urls = cache.manifest.shards
    batching = Batching.resolve(cfg, state.device)
    # A window's samples reach the writer together: its queue holds them on top of max_pending.
    writer = BackgroundWriter(cfg.max_pending + batching.window)
    # Workers get the model-free preparer; in this process prepare itself is as good.
    prepare = target.preparer() if batching.workers else target.prepare
    work = _Preparation(prepare, cfg.audio, cfg.max_length)
    prefetch = Prefetcher(work, batching.workers, ahead=batching.window + 2 * batching.workers, on_crash=_crashed)
    stats = WriteStats()
    progress = tqdm(unit="sample", desc=f"dump rank {state.process_index}", disable=not state.is_local_main_process)
    start = time.perf_counter()
    try:
        for url in urls[state.process_index :: state.num_processes]:
            writer_id = {"rank": state.process_index, "world_size": state.num_processes}
            part = cache.part(url, writer_id, stats)
            if part.complete:  # read to its end; a shard that could not be read is retried
                continue
            for record in _dump_shard(url, part, target, layers, cfg, batching, writer, prefetch, times):
                stats.add(record)
                times.samples += 1
                times.tokens += len(record.input_ids)
                progress.update(1)
                progress.set_postfix_str(stats.describe(time.perf_counter() - start), refresh=False)
    finally:
        progress.close()
        prefetch.close()
        writer.close()  # drains the queue; re-raises a write error (e.g. a full disk) here
    times.seconds = time.perf_counter() - start
    times.input_wait, times.writer_wait = prefetch.wait_seconds, writer.wait_seconds
    print(f"rank {state.process_index}: {times.describe()}")
    state.wait_for_everyone()
    final = cache.finalise() if state.is_main_process else None
    state.wait_for_everyone()
    return final or Manifest.read(cfg.out)


# -------------------------------------------------------------------------------------- reading and preparing


@dataclass(frozen=True)
class _Item:
    """A sample of a shard on its way to a worker: its position, and the position of the first sample with its key."""

    position: int
    raw: RawSample
    first: int


class _ShardSamples:
    """A shard's samples from position ``start`` on, in order; the keys of the ones before still count for duplicates.
    A read error ends the iteration and is kept in ``error``, with ``read`` the samples read before it."""

    def __init__(self, url: str, start: int):
        self.url, self.start = url, start
        self.read, self.error = 0, None

    def __iter__(self) -> Iterator[_Item]:
        first_at: dict[str, int] = {}  # each key's first position in the shard, samples skipped on resume included
        samples = iter_raw_samples(self.url)
        while True:
            try:
                raw = next(samples)
            except StopIteration:
                return
            except Exception as err:  # an unreadable shard: the samples before it are kept, the shard retried
                self.error = err
                return
            position, self.read = self.read, self.read + 1
            first = first_at.setdefault(raw.key, position)
            if position >= self.start:
                yield _Item(position, raw, first)


# Prepared inputs cross the process boundary as numpy arrays, pickled through the pool's pipe: torch tensors would
# travel through shared memory files, which a container's small /dev/shm can run out of. bf16 travels as int16.
_Wire = tuple[np.ndarray, torch.dtype]


def _to_wire(t: torch.Tensor) -> _Wire:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), t.dtype


def _from_wire(w: _Wire) -> torch.Tensor:
    t = torch.from_numpy(w[0])
    return t.view(torch.bfloat16) if w[1] == torch.bfloat16 else t


@dataclass(frozen=True)
class _Prepared:
    input_ids: _Wire
    loss_mask: _Wire
    model_inputs: dict[str, _Wire]

    def inputs(self) -> TargetInputs:
        model_inputs = {name: _from_wire(w) for name, w in self.model_inputs.items()}
        return TargetInputs(_from_wire(self.input_ids), _from_wire(self.loss_mask), model_inputs)


@dataclass(frozen=True)
class _Preparation:
    """Everything before the forward, for one sample (in a worker process or in this one): the prepared inputs, or
    the reason the sample is rejected."""

    prepare: Preparer
    audio: AudioPolicy
    max_length: int

    def __call__(self, item: _Item) -> _Prepared | str:
        raw = item.raw
        try:
            if item.first != item.position:
                raise _duplicate_key(raw.key, item.first)
            messages = parse_conversations(raw.json)
            if raw.audio is None:
                raise BadSample("missing audio member (expected <key>.wav, .flac, .mp3 or .ogg)")
            if raw.other_audio:
                names = [f"{raw.key}.{ext}" for ext in (raw.audio_ext, *raw.other_audio)]
                raise BadSample(f"{len(names)} audio members ({', '.join(names)}); a sample holds one clip")
            inputs = self.prepare(messages, decode_audio(raw.audio, self.audio, raw.audio_ext), self.max_length)
        except Exception as err:  # any bad sample is skipped and recorded, never fatal
            return _reason(err)
        wire = {name: _to_wire(t) for name, t in inputs.model_inputs.items()}
        return _Prepared(_to_wire(inputs.input_ids), _to_wire(inputs.loss_mask), wire)


def _crashed(item: _Item, err: BaseException) -> str:
    return f"the preparation worker process died on this sample ({err}); decoding or feature extraction crashed"


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, BadSample | AudioError) else f"{type(err).__name__}: {err}"


def _duplicate_key(key: str, first: int) -> BadSample:
    # A second sample under one key would be cached twice under it (or silently replace the first downstream).
    return BadSample(f"duplicate key {key!r}: sample {first} of this shard has it too (keys must be unique)")


# ------------------------------------------------------------------------------------------ one shard, in windows


def _dump_shard(
    url: str,
    part: PartWriter,
    target: AudioTarget,
    layers: list[int],
    cfg: DumpConfig,
    batching: Batching,
    writer: BackgroundWriter,
    prefetch: Prefetcher,
    times: DumpTimes,
) -> Iterator[SampleRecord]:
    """Yield each cached sample's record after handing it to the writer; rejects go to the part's log."""
    resume_at = part.position
    # Windows start at multiples of their size, so a resumed run re-forms the uninterrupted run's batches.
    samples = _ShardSamples(url, resume_at - resume_at % batching.window)
    for window in _windows(prefetch.map(samples), batching.window):
        for item, outcome in _run_window(window, resume_at, target, layers, batching, times):
            if isinstance(outcome, SampleRecord):
                writer.submit(part.append, outcome)
                yield outcome
                continue
            if cfg.strict:
                raise StrictModeError(f"--strict: bad sample {item.raw.key!r} in {url}: {outcome}")
            writer.submit(part.reject, item.raw.key, item.position, outcome)
    if samples.error is not None:  # keep what was cached, record why, retry the shard next run
        writer.submit(part.finish, unreadable_shard(url, samples.read, samples.error, cfg.strict))
        return
    writer.submit(part.finish)


def _windows(results: Iterable[tuple[_Item, _Prepared | str]], size: int) -> Iterator[list]:
    """Consecutive results grouped by ``position // size``."""
    window: list = []
    for item, result in results:
        if window and item.position // size != window[0][0].position // size:
            yield window
            window = []
        window.append((item, result))
    if window:
        yield window


def _run_window(
    window: list[tuple[_Item, _Prepared | str]],
    resume_at: int,
    target: AudioTarget,
    layers: list[int],
    batching: Batching,
    times: DumpTimes,
) -> list[tuple[_Item, SampleRecord | str]]:
    """Forward a window's samples in batches; their records or reject reasons in shard order, from ``resume_at``."""
    outcomes: dict[int, SampleRecord | str] = {}
    ready: list[tuple[_Item, TargetInputs]] = []
    for item, prepared in window:
        if isinstance(prepared, str):
            outcomes[item.position] = prepared
        else:
            ready.append((item, prepared.inputs()))
    for batch in _batches(ready, batching):
        if all(item.position < resume_at for item, _ in batch):
            continue  # committed by an earlier run, and shares no forward with what is left
        start = time.perf_counter()
        results = _forward([inputs for _, inputs in batch], target, layers, batching.trim_audio_padding)
        times.forward += time.perf_counter() - start
        for (item, inputs), states in zip(batch, results, strict=True):
            outcomes[item.position] = states if isinstance(states, str) else _record(item, inputs, states)
    return [(item, outcomes[item.position]) for item, _ in window if item.position >= resume_at]


def _batches(ready: list[tuple[_Item, TargetInputs]], batching: Batching) -> list[list[tuple[_Item, TargetInputs]]]:
    """Samples sorted by length, packed while (samples x the longest) stays within the token budget."""
    if not batching.batch_tokens:
        return [[entry] for entry in ready]
    batches: list[list[tuple[_Item, TargetInputs]]] = []
    for entry in sorted(ready, key=lambda e: (len(e[1].input_ids), e[0].position)):
        longest = len(entry[1].input_ids)  # sorted: the newcomer is the longest
        current = batches[-1] if batches else []
        if not current or len(current) >= batching.batch_size or (len(current) + 1) * longest > batching.batch_tokens:
            batches.append([entry])
        else:
            current.append(entry)
    return batches


def _forward(
    inputs: list[TargetInputs], target: AudioTarget, layers: list[int], trim_audio_padding: bool
) -> list[SampleStates | str]:
    """Each sample's states, or the reason it is rejected. A batch that fails (out of memory, or one bad sample)
    is split in halves until the failure belongs to one sample, which is rejected alone."""
    try:
        states = target.forward_batch(inputs, layers, trim_audio_padding)
    except PipelineError:
        raise  # not the sample's fault: a setting the target cannot honour
    except Exception as err:
        out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(inputs) > 1:
            half = len(inputs) // 2
            return [
                *_forward(inputs[:half], target, layers, trim_audio_padding),
                *_forward(inputs[half:], target, layers, trim_audio_padding),
            ]
        if out_of_memory:
            return [f"out of GPU memory at {len(inputs[0].input_ids)} tokens (lower --max-length)"]
        return [_reason(err)]
    return [_non_finite(s) or s for s in states]


def _non_finite(states: SampleStates) -> str | None:
    tensors = {f"hidden_states[{i}]": h for i, h in states.hidden_states.items()}
    tensors |= {"final_hidden": states.final_hidden, "audio_embeds": states.audio_embeds}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            return f"NaN or Inf in the target's {name}"
    return None


def _record(item: _Item, inputs: TargetInputs, states: SampleStates) -> SampleRecord:
    return SampleRecord(
        key=item.raw.key,
        position=item.position,
        input_ids=inputs.input_ids.numpy().astype(np.int32),
        loss_mask=inputs.loss_mask.numpy().astype(np.uint8),
        states=states,
    )


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
        settings=_state_settings(cfg),
        shards=urls,
    )


def _state_settings(cfg: DumpConfig) -> dict:
    """The settings that decide the cached values (a resume must keep them). Batching does not: a batch equals the
    one-sample forward within float tolerance. Trimmed audio padding is recorded when used (same tolerance, but a
    different computation of the audio embeddings), so a cache never mixes the two."""
    settings = {"max_length": cfg.max_length, "audio_policy": asdict(cfg.audio)}
    if cfg.trim_audio_padding:
        settings["trim_audio_padding"] = True
    return settings
