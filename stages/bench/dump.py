"""`just bench-dump`: stage one's speed and size, measured side by side in one run.

1. Dump throughput in tokens/s over the same samples with the same loaded target, one sample per forward against
   padded batches grouped by length, preparation in this process against worker processes, the audio encoder on
   30 s of frames against the clip's real frames; for each, the share of the time the forward waited for prepared
   input and for the writer. Also the forward-only pass (read, decode, tokenize, forward, copy to CPU: everything
   but the writer) against the one-sample dump (target >= 0.95).
2. The audio encoder: its share of the one-sample forward, what running it over the real frames only saves, and the
   largest difference that makes to the states (and batching makes), relative to each state's largest magnitude.
3. The writer's compress-and-write rate on bf16 states at H=4096 (3 aux layers + final + audio embeddings), in
   MB/s with one compression thread and with all cores (target: above the ~450 MB/s a 7B forward produces per GPU,
   given the 12-24 cores per GPU of a GPU node).
4. Bytes per token on disk against the 8H+16 of the reference trainers' per-sample bf16 files (target <= 0.8x).

The default target is the small target's architecture (SmallTargetConfig's sizes, untrained: speed and rounding do
not depend on what it learned); `--model` takes any model directory or alias, `--random-sizes 7b` builds a randomly
initialised copy of `--model` at the 7B target's dimensions first (on a GPU: see stages/bench/gpu_dump_7b.sh).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import zarr

from pipeline.cache.format import CodecConfig, SampleStates
from pipeline.cache.report import reference_bytes_per_token
from pipeline.cache.writer import PartWriter, SampleRecord
from pipeline.dump import DumpConfig, DumpTimes, run_dump
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.shards import ShardSample, expand_shard_urls, iter_raw_samples, write_samples
from pipeline.targets import AudioTarget, TargetInputs, load_target, resolve_model

SAMPLE = "data/sample/shards/sample-{000000..000003}.tar"
# The 7B audio LLM's dimensions (its hub config.json, in DESIGN-NOTES): the vocabulary stays the base
# model's, since the dump never runs the lm_head.
RANDOM_SIZES = {
    "7b": {
        "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192},
        "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120},
    },
}  # fmt: skip


def small_target() -> Path:
    """The small target's architecture, untrained, built once under AUDIO_EAGLE_HOME."""
    from pipeline.testing.small_target import SmallTargetConfig
    from pipeline.testing.tiny_target import ensure_tiny_target

    return ensure_tiny_target(config=SmallTargetConfig().tiny_config())


def build_random_model(base: str, sizes: dict, out: Path, device: str) -> Path:
    """A copy of ``base`` (an HF model directory) with its sub-configs resized and random bf16 weights, initialised
    on ``device``. Its processor, tokenizer and chat template are the base's. Reused when already built."""
    import transformers

    if (out / "config.json").exists():
        return out
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(base, stage, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    doc = json.loads((stage / "config.json").read_text())
    for sub, values in sizes.items():
        doc[sub].update(values)
        doc[sub].pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
    config = type(transformers.AutoConfig.from_pretrained(base)).from_dict(doc)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(stage)
    del model
    os.rename(stage, out)
    return out


def copies_of_sample(root: Path, repeat: int, clip_seconds: float | None = None) -> str:
    """The bundled shards copied ``repeat`` times under new names: more samples, same content. ``clip_seconds``:
    each clip repeated to that length (16 kHz wav), conversations unchanged, for longer audio."""
    names = []
    for r in range(repeat):
        for url in expand_shard_urls(SAMPLE):
            dst = root / f"r{r}-{Path(url).name}"
            if clip_seconds is None:
                shutil.copy(url, dst)
            else:
                samples = [_lengthened(raw, clip_seconds) for raw in iter_raw_samples(url)]
                [written] = write_samples(samples, str(dst).replace(".tar", "-%d.tar"), max_count=10**6)
                os.rename(written, dst)
            names.append(str(dst))
    return ",".join(names)


def _lengthened(raw, seconds: float) -> ShardSample:
    wave = decode_audio(raw.audio, AudioPolicy(), raw.audio_ext)
    wave = np.tile(wave, -(-round(seconds * 16000) // len(wave)))[: round(seconds * 16000)]
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return ShardSample(raw.key, "wav", buf.getvalue(), json.loads(raw.json))


# ------------------------------------------------------------------------------------------------ [1] throughput


@dataclass(frozen=True)
class Mode:
    name: str
    batch_tokens: int
    workers: int
    trim: bool = False


def modes(batch_tokens: int, workers: int) -> list[Mode]:
    return [
        Mode("one sample, prepared in-process", 0, 0),
        Mode(f"one sample, {workers} prep workers", 0, workers),
        Mode(f"batched {batch_tokens} tokens, {workers} workers", batch_tokens, workers),
        Mode(f"batched {batch_tokens}, trimmed audio, {workers} w.", batch_tokens, workers, True),
    ]


def forward_only(shards: str, target: AudioTarget, layers: list[int]) -> tuple[int, float]:
    """Everything the one-sample dump does but hand the states to the writer: tokens and seconds."""
    start, tokens = time.perf_counter(), 0
    for url in expand_shard_urls(shards):
        for raw in iter_raw_samples(url):
            wave = decode_audio(raw.audio, AudioPolicy(), raw.audio_ext)
            inputs = target.prepare(parse_conversations(raw.json), wave, 2048)
            target.forward(inputs, layers)
            tokens += len(inputs.input_ids)
    return tokens, time.perf_counter() - start


def bench_pipeline(target: AudioTarget, shards: str, root: Path, a: argparse.Namespace) -> None:
    layers = target.default_layers()
    forward_only(shards, target, layers)  # warm-up: lazy imports, allocator, page cache
    rows: dict[str, list[DumpTimes]] = {}
    fwd = []
    for r in range(a.rounds):
        tokens, seconds = forward_only(shards, target, layers)
        fwd.append(tokens / seconds)
        for mode in modes(a.batch_tokens, a.workers):
            shutil.rmtree(root / "cache", ignore_errors=True)
            times = DumpTimes()
            cfg = DumpConfig(shards=shards, out=root / "cache", batch_tokens=mode.batch_tokens,
                             batch_size=a.batch_size, prepare_workers=mode.workers,
                             trim_audio_padding=mode.trim)  # fmt: skip
            manifest = run_dump(cfg, target, times)
            rows.setdefault(mode.name, []).append(times)
        print(f"round {r}: forward-only {fwd[-1]:.0f} tokens/s, " + ", ".join(
            f"{name} {t[-1].tokens / t[-1].seconds:.0f}" for name, t in rows.items()))  # fmt: skip
    one = np.median([t.tokens / t.seconds for t in rows[modes(a.batch_tokens, a.workers)[0].name]])
    print(f"\n[1] {a.model} ({a.dtype}), {manifest.counts['samples']} samples, {manifest.counts['tokens']} tokens "
          f"x {a.rounds} rounds, median of rounds; batch size <= {a.batch_size}:")  # fmt: skip
    print(f"    {'mode':<44} {'tokens/s':>9} {'x one':>6} {'input wait':>10} {'writer wait':>11}")
    print(f"    {'forward only (no writer)':<44} {np.median(fwd):>9.0f} {np.median(fwd) / one:>6.2f}")
    for name, times in rows.items():
        rate = np.median([t.tokens / t.seconds for t in times])
        input_wait = np.median([t.input_wait / t.seconds for t in times])
        writer_wait = np.median([t.writer_wait / t.seconds for t in times])
        print(f"    {name:<44} {rate:>9.0f} {rate / one:>6.2f} {input_wait:>10.1%} {writer_wait:>11.1%}")
    print(f"    one-sample dump / forward-only: {one / np.median(fwd):.3f} (target >= 0.95)")
    c = manifest.counts
    ref = reference_bytes_per_token(manifest.hidden_size, 2 if a.dtype != "float32" else 4)
    print(
        f"    this cache: {c['stored_bytes'] / c['tokens']:.0f} bytes/token = "
        f"{c['stored_bytes'] / c['tokens'] / ref:.2f}x the reference's {ref} "
        f"(audio tokens {c['audio_tokens'] / c['tokens']:.0%} of all)"
    )


# --------------------------------------------------------------------------------------------- [2] the encoder


class Stopwatch:
    """Wall time spent inside a module's forward (synchronised on a GPU)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        self._hooks = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_) -> None:
        _sync()
        self._start = time.perf_counter()

    def _exit(self, *_) -> None:
        _sync()
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_encoder(target: AudioTarget, shards: str, count: int, batch_size: int) -> None:
    layers = target.default_layers()
    raws = [r for url in expand_shard_urls(shards) for r in iter_raw_samples(url)][:count]
    inputs = [target.prepare(parse_conversations(r.json), decode_audio(r.audio, AudioPolicy(), r.audio_ext), 2048)
              for r in raws]  # fmt: skip
    seconds = float(np.mean([len(decode_audio(r.audio, AudioPolicy(), r.audio_ext)) / 16000 for r in raws]))
    for x in inputs[:2]:  # warm-up
        target.forward_batch([x], layers, True)
    encoder = target.audio_encoder()
    watch = Stopwatch(encoder) if encoder is not None else None
    full, full_s = _timed(lambda: [target.forward(x, layers) for x in inputs])
    share = watch.seconds / full_s if watch else float("nan")
    if watch:
        watch.remove()
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    one = _alternating([[x] for x in inputs], target, layers)
    many = _alternating(batches, target, layers)
    print(f"\n[2] audio encoder, {len(inputs)} clips of {seconds:.1f} s on average, {target.dtype}:")
    print(f"    encoder share of the one-sample forward (30 s of frames): {share:.1%}")
    for name, (plain, trimmed, _) in (("one sample", one), (f"batches of {batch_size}", many)):
        print(f"    {name}: full {plain / len(inputs) * 1e3:.1f} ms, trimmed {trimmed / len(inputs) * 1e3:.1f} ms "
              f"per clip: saves {1 - trimmed / plain:.1%}")  # fmt: skip
    batched = [s for b in batches for s in target.forward_batch(b, layers)]
    print("    largest difference to the one-sample forward, relative to each state's largest magnitude:")
    for name, states in (("trimmed", one[2]), ("batched", batched), ("batched + trimmed", many[2])):
        print(f"      {name:<18} {worst_difference(states, full):.2e}")


def _alternating(batches: list[list[TargetInputs]], target: AudioTarget, layers: list[int], rounds: int = 2):
    """(seconds full, seconds trimmed, trimmed states): each batch forwarded full then trimmed, alternately, the
    fastest of ``rounds`` kept, so that a machine whose load drifts slows both alike."""
    plain, trimmed, states = 0.0, 0.0, []
    for batch in batches:
        times = {False: [], True: []}
        for _ in range(rounds):
            for trim in (False, True):
                out, seconds = _timed(lambda b=batch, t=trim: target.forward_batch(b, layers, t))
                times[trim].append(seconds)
        plain, trimmed = plain + min(times[False]), trimmed + min(times[True])
        states += out
    return plain, trimmed, states


def _timed(fn):
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


def worst_difference(states: list[SampleStates], reference: list[SampleStates]) -> float:
    def pairs(a: SampleStates, b: SampleStates):
        yield from ((a.hidden_states[i], b.hidden_states[i]) for i in b.hidden_states)
        yield a.final_hidden, b.final_hidden
        yield a.audio_embeds, b.audio_embeds

    return max(
        float((x.float() - y.float()).abs().max() / y.float().abs().max())
        for a, b in zip(states, reference, strict=True)
        for x, y in pairs(a, b)
    )


# ---------------------------------------------------------------------------------------------- [3] the writer


def synthetic_states(tokens: int, audio: int, hidden: int, layers: list[int], gen: torch.Generator) -> SampleStates:
    # Residual-stream-like values: mostly small, a few large outlier channels (as real LLM states have).
    scale = torch.ones(hidden)
    scale[torch.randperm(hidden, generator=gen)[:8]] = 50.0

    def state(n: int) -> torch.Tensor:
        return (torch.randn(n, hidden, generator=gen) * scale).to(torch.bfloat16)

    return SampleStates({i: state(tokens) for i in layers}, state(tokens), state(audio))


def bench_writer(hidden: int, samples: int, tokens: int, audio: int, codec: CodecConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [2, hidden // 256, 29]  # names only
    records = [
        SampleRecord(f"s{i}", i, np.zeros(tokens, np.int32), np.ones(tokens, np.uint8),
                     synthetic_states(tokens, audio, hidden, layers, gen))
        for i in range(samples)
    ]  # fmt: skip
    raw = sum(r.num_bytes for r in records)
    cores = os.cpu_count() or 1
    print(
        f"\n[3] writer on bf16 states, H={hidden}, {samples} samples x {tokens} tokens ({audio} audio), "
        f"{raw / 1e6:.0f} MB raw, {codec.states} states, codec {codec.cname}-{codec.clevel} {codec.shuffle}:"
    )
    for threads in sorted({1, cores}):
        with tempfile.TemporaryDirectory() as tmp, zarr.config.set({"threading.max_workers": threads}):
            part = PartWriter(Path(tmp) / "part", "bench", layers, hidden, "bfloat16", codec)
            start = time.perf_counter()
            for record in records:
                part.append(record)
            part.finish()
            seconds = time.perf_counter() - start
            stored = sum(f.stat().st_size for f in (Path(tmp) / "part").rglob("*") if f.is_file())
        rate = raw / seconds / 1e6
        print(
            f"    {threads} thread(s): {rate:.0f} MB/s ({rate / threads:.0f} MB/s per core); "
            f"compression {raw / stored:.2f}x"
        )
    n_tokens = samples * tokens
    ref = reference_bytes_per_token(hidden)
    print(
        f"[4] bytes per token at H={hidden}: {stored / n_tokens:.0f} vs reference 8H+16 = {ref}: "
        f"{stored / n_tokens / ref:.3f}x (target <= {0.8 if codec.states == 'exact' else 0.45}x; audio tokens "
        f"{audio / tokens:.0%} of all)"
    )
    print(
        "    a 7B forward at ~20k tokens/s yields ~0.45-1 GB/s per GPU: "
        f"{450 / (rate / threads):.1f}-{1000 / (rate / threads):.1f} cores per GPU at this rate"
    )


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpu = torch.cuda.is_available()
    p.add_argument("--model", default="small", help="small (default), tiny, or any model directory or HF id")
    p.add_argument("--random-sizes", choices=sorted(RANDOM_SIZES), help="resize --model, random bf16 weights")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--repeat", type=int, default=2, help="copies of the bundled sample (36 clips) to dump")
    p.add_argument("--clip-seconds", type=float, help="repeat each clip to this length (default: as recorded, ~2 s)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192 if gpu else 2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=max(1, min(8, cores - 2)), help="preparation workers")
    p.add_argument("--encoder-clips", type=int, default=24, help="clips timed in [2]")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--writer-samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per synthetic sample")
    p.add_argument("--audio", type=int, default=512, help="audio tokens per synthetic sample")
    p.add_argument("--skip", default="", help="comma list of parts to skip: pipeline,encoder,writer")
    p.add_argument("--torch-threads", type=int, help="leave cores to the writer, as a GPU node does")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if device == 'cuda' else 'CPU only'}, load {os.getloadavg()[0]:.1f}"
    )
    model = str(small_target()) if a.model == "small" else a.model
    if a.random_sizes:
        home = Path(os.environ.get("AUDIO_EAGLE_HOME", "."))
        out = home / f"random-{a.random_sizes}-{Path(resolve_model(model)).name}"
        start = time.perf_counter()
        model = str(build_random_model(resolve_model(model), RANDOM_SIZES[a.random_sizes], out, device))
        print(f"random {a.random_sizes} model at {model} ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    target = load_target(model, a.dtype, device)
    print(f"loaded {model} in {time.perf_counter() - start:.0f} s: {target.num_layers} layers, H={target.hidden_size}")
    skip = set(a.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        shards = copies_of_sample(Path(tmp), a.repeat, a.clip_seconds)
        if "pipeline" not in skip:
            bench_pipeline(target, shards, Path(tmp), a)
        if "encoder" not in skip:
            bench_encoder(target, shards, a.encoder_clips, a.batch_size)
    if "writer" not in skip:
        for states in ("exact", "fp8", "fp8-audio"):  # the lossless default, then the lossy encodings
            codec = CodecConfig(states=states)
            bench_writer(a.hidden, a.writer_samples, a.tokens, a.audio, codec)


if __name__ == "__main__":
    main()
