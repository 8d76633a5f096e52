"""Regenerate: rewrite a dataset's assistant turns with the target's own answers.

A draft learns to predict the target, so it accepts far more tokens when it is trained on what the target itself
says than on a dataset's reference answers. This stage replays each conversation through the target: every
assistant turn, in order, is replaced by what the target generates after the conversation so far (with its own
earlier answers in place of the dataset's), and the result is written as new shards that stage one reads as usual.

    OUT/
      <shard>.tar              one per input shard, same basename and samples (minus rejects), every member copied
                               byte for byte except the json, whose assistant contents are the target's answers and
                               which gains "regenerated_by" and "regeneration" (the generation settings)
      rejects-<shard>.json     that shard's rejects (key, position, reason) and counts; written just before the tar
      regenerate.json          the settings (a re-run with other settings is refused) and, at the end, the summary

A shard's tar is written to a temp file and renamed into place, so it exists only when complete: a re-run (after a
crash or ``kill -9``) skips finished shards and redoes the unfinished one from its start. Shards are dealt to ranks
(``shards[rank::world]``) as in stage one, and batches never span shards, so the answers do not depend on the
world size, on resuming, or (for sampling) on how samples are batched: sampling draws its noise from a generator
seeded per sample and turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from pipeline.cache.format import read_json, write_json_atomic
from pipeline.errors import ConfigError, StrictModeError
from pipeline.inputs.audio import AudioError, AudioPolicy, decode_audio
from pipeline.inputs.conversation import BadSample, Message, parse_conversations
from pipeline.inputs.shards import (
    RawSample,
    ShardReadError,
    expand_shard_urls,
    iter_tar_members,
    make_sample,
    split_member_name,
    unreadable_shard,
)
from pipeline.settings import setting
from pipeline.targets import AudioTarget, Sampling, TargetInputs, load_target
from pipeline.targets.dtype import resolve_dtype

SUMMARY = "regenerate.json"
_TAR_MTIME = 0  # fixed member metadata: the same input and settings give byte-identical output shards
_TAR_MODE = 0o444


@dataclass
class RegenerateConfig:
    shards: str = setting(help="webdataset shards: path, glob, brace pattern {000..009}, comma list or URL")
    out: Path = setting(help="output directory for the regenerated shards (re-run the same command to resume)")
    model: str = setting("tiny", "the target: an alias (tiny: the built-in test target), an HF id or a local directory")
    max_new_tokens: int = setting(256, "longest answer per assistant turn")
    do_sample: bool = setting(
        False, "sample instead of greedy decoding (the target's most likely answer)", flag="sample"
    )
    temperature: float = setting(1.0, "with --sample")
    top_p: float = setting(1.0, "with --sample")
    seed: int = setting(0, "with --sample: each sample and turn draws from a generator seeded by this and its key")
    batch_size: int = setting(4, "samples generated together (left-padded); batches never span shards")
    strict: bool = setting(False, "fail on the first bad sample instead of skipping it")
    dtype: Literal["bfloat16", "float16", "float32"] | None = setting(
        None, "model dtype (default: bfloat16 on GPU; on CPU float32 if its weights fit in free memory, else bfloat16)"
    )
    audio: AudioPolicy = setting(factory=AudioPolicy)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_new_tokens and batch_size must be positive, got {self.max_new_tokens}, {self.batch_size}"
            )
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")


def generation_settings(cfg: RegenerateConfig, dtype: str) -> dict:
    """What decides the answers, recorded in every regenerated sample and checked when a run is resumed.

    Settings that do not apply are left out (greedy ignores temperature, top-p and seed), so two greedy runs
    that differ only in them write identical shards. The batch size is not a setting: it does not change answers.
    """
    settings: dict = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "dtype": dtype}
    if cfg.do_sample:
        settings |= {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    return settings


def output_name(url: str) -> str:
    """The output shard's file name: the input's basename (always an uncompressed .tar)."""
    match = re.findall(r"([^/\s:]+?)\.(?:tar|tgz|tar\.gz)(?:\?|\s|$)", url)
    stem = match[-1] if match else re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("?")[0]).strip("_")[-80:]
    return f"{stem}.tar"


def rejects_name(url: str) -> str:
    return f"rejects-{output_name(url).removesuffix('.tar')}.json"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    samples: int = 0
    answers: int = 0
    rejected: int = 0


def run_regenerate(cfg: RegenerateConfig, target: AudioTarget | None = None) -> dict:
    """Regenerate every shard of ``cfg.shards`` into ``cfg.out`` and return the summary (also in regenerate.json).

    ``target`` may be passed already loaded (tests, benchmarks); otherwise ``cfg.model`` is loaded here.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    urls = expand_shard_urls(cfg.shards)
    names = [output_name(u) for u in urls]
    clashes = sorted(n for n, c in Counter(names).items() if c > 1)
    if clashes:
        raise ConfigError(f"several input shards are named {clashes}; outputs keep the basename, so rename them")
    target = target or load_target(cfg.model, resolve_dtype(cfg.dtype, state.device, cfg.model), state.device)
    settings = generation_settings(cfg, str(target.dtype).removeprefix("torch."))
    generator = _Generator(target, cfg, settings)
    if state.is_main_process:
        _init_out(cfg.out, target.name_or_path, settings, urls)
    state.wait_for_everyone()

    stats = _Stats()
    progress = tqdm(
        unit="sample", desc=f"regenerate rank {state.process_index}", disable=not state.is_local_main_process
    )
    start = time.perf_counter()
    try:
        for url in urls[state.process_index :: state.num_processes]:
            if (cfg.out / output_name(url)).exists():
                continue  # finished in an earlier run: never redone
            _regenerate_shard(url, cfg, generator, stats, progress)
    finally:
        progress.close()
    elapsed, tokens = time.perf_counter() - start, generator.tokens_generated
    print(
        f"rank {state.process_index}: {stats.samples} samples, {stats.answers} answers, {tokens} tokens "
        f"generated in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):.1f} tokens/s), {stats.rejected} rejected",
        file=sys.stderr,
    )
    state.wait_for_everyone()
    summary = _finalise(cfg.out, urls) if state.is_main_process else None
    state.wait_for_everyone()
    return summary or read_json(cfg.out / SUMMARY)


def _init_out(out: Path, model: str, settings: dict, urls: list[str]) -> None:
    """Create OUT, or check that the run in it used the same model and settings (then resume it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output directory {out}: {err}") from None
    path = out / SUMMARY
    if path.exists():
        old = read_json(path)
        if (old.get("regenerated_by"), old.get("generation")) != (model, settings):
            raise ConfigError(
                f"{out} holds shards regenerated by {old.get('regenerated_by')!r} with {old.get('generation')}, "
                f"not {model!r} with {settings}; re-run with the original settings to resume, or choose another OUT"
            )
    write_json_atomic(path, {"regenerated_by": model, "generation": settings, "shards": urls, "complete": False})


def _finalise(out: Path, urls: list[str]) -> dict:
    """Gather every finished shard's rejects file into the summary; complete only if every shard is done."""
    summary = read_json(out / SUMMARY)
    done = [u for u in urls if (out / output_name(u)).exists() and (out / rejects_name(u)).exists()]
    records = [read_json(out / rejects_name(u)) for u in done]
    rejects = [{**r, "shard": rec["shard"]} for rec in records for r in rec["rejects"]]
    errors = [{"shard": rec["shard"], "error": rec["shard_error"]} for rec in records if rec["shard_error"]]
    counts = {
        "shards": len(urls),
        "shards_done": len(done),
        "samples": sum(rec["samples"] for rec in records),
        "answers": sum(rec["answers"] for rec in records),
        "answers_cut_at_max_new_tokens": sum(rec["answers_cut"] for rec in records),
        "rejected": len(rejects),
        "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejects)),
        "unreadable_shards": len(errors),
    }
    summary.update(counts=counts, rejects=rejects, shard_errors=errors, complete=len(done) == len(urls))
    write_json_atomic(out / SUMMARY, summary)
    return summary


def describe_regenerate(summary: dict) -> str:
    """The end-of-run summary printed by the CLI."""
    c = summary.get("counts", {})
    state = "complete" if summary.get("complete") else "INCOMPLETE (re-run the same command to resume)"
    lines = [
        f"regenerate: {state}",
        f"  by {summary['regenerated_by']} with {summary['generation']}",
        f"  shards {c.get('shards_done', 0)}/{c.get('shards', 0)} done, samples {c.get('samples', 0)}, "
        f"answers {c.get('answers', 0)} ({c.get('answers_cut_at_max_new_tokens', 0)} cut at max_new_tokens), "
        f"rejected {c.get('rejected', 0)}",
    ]
    rejects = summary.get("rejects", [])
    lines += [f"  rejected {r['key']} ({r['shard']}): {r['reason']}" for r in rejects[:50]]
    if len(rejects) > 50:
        lines.append(f"  ... {len(rejects) - 50} more rejects listed in {SUMMARY}")
    lines += [f"  UNREADABLE shard {e['shard']}: {e['error']}" for e in summary.get("shard_errors", [])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    position: int
    raw: RawSample
    members: list[tuple[str, bytes]]  # every member as stored, in order: written back unchanged but for the json
    doc: dict | None = None  # the parsed json document; its assistant contents are replaced
    messages: list[Message] = field(default_factory=list)  # normalised, to render prompts from
    turns: list[int] = field(default_factory=list)  # conversation indexes of the assistant turns, in order
    wave: np.ndarray | None = None  # the decoded clip
    answers: list[str] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)  # turns whose answer hit max_new_tokens before an end token
    error: str | None = None


def _regenerate_shard(url: str, cfg: RegenerateConfig, generator: _Generator, stats: _Stats, progress: tqdm) -> None:
    final = cfg.out / output_name(url)
    for stale in cfg.out.glob(f".{final.name}.*.tmp"):
        stale.unlink()  # left by a killed run; this rank alone owns the shard now
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    rejects: list[dict] = []
    written = answers = cut = 0
    shard_error = None

    def reject(sample: _Sample, reason: str) -> None:
        if cfg.strict:
            raise StrictModeError(f"--strict: bad sample {sample.raw.key!r} in {url}: {reason}")
        rejects.append({"key": sample.raw.key, "position": sample.position, "reason": reason})
        stats.rejected += 1

    def flush(batch: list[_Sample]) -> None:
        nonlocal written, answers, cut
        generator.regenerate(batch)
        for sample in batch:
            if sample.error is not None:
                reject(sample, sample.error)
                continue
            _write_sample(tar, sample, generator.model_id, generator.settings)
            written, answers, cut = written + 1, answers + len(sample.answers), cut + len(sample.cut)
            stats.samples, stats.answers = stats.samples + 1, stats.answers + len(sample.answers)
            progress.update(1)

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        batch: list[_Sample] = []
        samples = _iter_samples(url)
        while True:
            try:
                position, raw, members = next(samples)
            except StopIteration:
                break
            except Exception as err:  # an unreadable shard: keep what was read, record why, go on
                shard_error = unreadable_shard(url, written + len(rejects) + len(batch), err, cfg.strict)
                break
            sample = _Sample(position, raw, members)
            try:
                generator.prepare(sample, cfg.audio)
            except Exception as err:  # any bad sample is skipped and recorded, never fatal
                reject(sample, _reason(err))
                continue
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    record = {
        "shard": url,
        "output": final.name,
        "samples": written,
        "answers": answers,
        "answers_cut": cut,
        "rejects": sorted(rejects, key=lambda r: r["position"]),
        "shard_error": shard_error,
    }
    # The rejects file goes first: a finished tar then always has one; a kill in between only redoes the shard.
    write_json_atomic(cfg.out / rejects_name(url), record)
    os.replace(tmp, final)


def _reason(err: BaseException) -> str:
    if isinstance(err, BadSample | AudioError):
        return str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of GPU memory while generating (lower --batch-size or --max-new-tokens)"
    return f"{type(err).__name__}: {err}"


def _iter_samples(url: str) -> Iterator[tuple[int, RawSample, list[tuple[str, bytes]]]]:
    """(position, sample, every member as stored) in shard order.

    Groups members exactly as ``iter_raw_samples`` does, but also keeps the members it ignores (anything not
    audio or json) and the original member names, so an output shard holds everything its input held.
    """
    key: str | None = None
    named: list[tuple[str, bytes]] = []
    members: dict[str, bytes] = {}
    position = 0
    try:
        for name, data in iter_tar_members(url):
            split = split_member_name(name)
            if split is None:
                continue  # no extension: part of no sample, as in webdataset
            member_key, suffix = split
            if key is not None and (member_key != key or suffix in members):
                yield position, make_sample(key, url, members), named
                position, named, members = position + 1, [], {}
            key = member_key
            members[suffix] = data
            named.append((name, data))
    except ShardReadError:
        # Members are read whole, so a pending sample that has its audio and json is intact: keep it.
        sample = make_sample(key, url, members) if key is not None else None
        if sample is not None and sample.audio is not None and sample.json is not None:
            yield position, sample, named
        raise
    if key is not None:
        yield position, make_sample(key, url, members), named


def _write_sample(tar: tarfile.TarFile, sample: _Sample, model_id: str, settings: dict) -> None:
    doc = sample.doc
    assert doc is not None
    for index, answer in zip(sample.turns, sample.answers, strict=True):
        doc["conversations"][index]["content"] = answer
    doc["regenerated_by"] = model_id
    doc["regeneration"] = {**settings, "cut_at_max_new_tokens": sample.cut}
    new_json = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    for name, data in sample.members:
        is_json = split_member_name(name)[1] == "json"  # type: ignore[index]  # named members always split
        _add_member(tar, name, new_json if is_json else data)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def turn_seed(seed: int, key: str, turn: int) -> int:
    """The seed of one answer: depends on the run's seed, the sample key and the turn only."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**63


class _Generator:
    """Builds each turn's prompt through the target and turns its generated tokens into answers."""

    def __init__(self, target: AudioTarget, cfg: RegenerateConfig, settings: dict):
        self.target, self.cfg, self.settings = target, cfg, settings
        self.model_id = target.name_or_path
        self.tokens_generated = 0  # this process's, for the throughput line

    def prepare(self, sample: _Sample, audio: AudioPolicy) -> None:
        """Parse and decode a sample; raises with the reason it is bad."""
        raw = sample.raw
        sample.messages = parse_conversations(raw.json)
        sample.doc = json.loads(raw.json)  # type: ignore[arg-type]  # parse_conversations checked it
        if raw.audio is None:
            raise BadSample("missing audio member (expected <key>.wav, .flac, .mp3 or .ogg)")
        sample.wave = decode_audio(raw.audio, audio, raw.audio_ext)
        # Rejected here if stage one would reject it: the whole conversation must render with its clip.
        self.target.prepare(sample.messages, sample.wave, max_length=sys.maxsize)
        sample.turns = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]

    def regenerate(self, batch: list[_Sample]) -> None:
        """Answer every assistant turn of every sample: turn k of all samples together, then turn k + 1."""
        for k in range(max(len(s.turns) for s in batch)):
            todo = [s for s in batch if k < len(s.turns) and s.error is None]
            if not todo:
                break
            try:
                results: list[tuple[str, int, bool] | None] = list(self._generate(todo, k))
            except Exception as err:
                if len(todo) == 1:
                    todo[0].error = _reason(err)
                    continue
                # One bad sample must not sink its batch: answer one by one, so only it is rejected.
                results = []
                for sample in todo:
                    try:
                        results += self._generate([sample], k)
                    except Exception as single_err:
                        sample.error = _reason(single_err)
                        results.append(None)
            for sample, result in zip(todo, results, strict=True):
                if result is None:
                    continue
                answer, tokens, cut = result
                sample.answers.append(answer)
                self.tokens_generated += tokens
                if cut:
                    sample.cut.append(sample.turns[k])

    def prompt(self, sample: _Sample, k: int) -> TargetInputs:
        """The conversation up to assistant turn ``k`` with the assistant header, earlier answers the target's own."""
        index = sample.turns[k]
        messages = list(sample.messages[:index])
        for turn, answer in zip(sample.turns[:k], sample.answers, strict=True):
            messages[turn] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        assert sample.wave is not None  # prepared
        return self.target.generation_inputs(messages, sample.wave, max_length=sys.maxsize)

    def _generate(self, samples: list[_Sample], k: int) -> list[tuple[str, int, bool]]:
        prompts = [self.prompt(s, k) for s in samples]
        sampling = None
        if self.cfg.do_sample:
            seeds = tuple(turn_seed(self.cfg.seed, s.raw.key, s.turns[k]) for s in samples)
            sampling = Sampling(seeds, self.cfg.temperature, self.cfg.top_p)
        generated = self.target.generate(prompts, self.cfg.max_new_tokens, sampling)
        return [self._answer(tokens) for tokens in generated]

    def _answer(self, tokens: list[int]) -> tuple[str, int, bool]:
        """(answer text, tokens generated, whether max_new_tokens cut it before an end token)."""
        ended = bool(tokens) and tokens[-1] in self.target.eos_token_ids
        # Special tokens a model may emit mid-answer (the audio placeholder above all) would corrupt the text.
        text = self.target.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
        return text, len(tokens), not ended
