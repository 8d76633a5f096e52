"""`just bench-codecs CACHE`: which codec for the states, measured on a real cache's states.

    just bench-codecs runs/quality/cache --samples 200

Reads the cache's EAGLE-3 states (three aux layers and the final state) and merged audio embeddings through
``open_cache``, casts them to ``--dtype`` (bfloat16: what a GPU dump stores), packs them along the token axis
as the writer does (``--chunk-tokens`` rows per chunk), and for each setting - state encoding (exact, fp8) x
blosc compressor, level and shuffle - reports, on one core:

  * bytes per token of the whole cache as it would be stored (states, audio embeddings at audio positions, ids
    and masks), against the reference trainers' 8H+16 bfloat16 layout;
  * encode MB/s (the writer's cost: fp8 quantisation + compression) and decode MB/s (decompression + fp8
    decoding) of the four state arrays, both per core, in bytes of the cache's dtype, best of 5 passes (15 with
    ``--short``); decoding passes run round-robin over the settings, so that load changes hit all alike.

Audio embeddings are always stored exactly (encoded with the setting's compressor); ids and masks as the writer
stores them (zstd-3 bitshuffle, 16 chunks' rows per chunk: a few bytes per token).
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numcodecs.blosc
import numpy as np
import torch
from numcodecs import Blosc

from pipeline.cache.encoding import decode_fp8, encode_fp8
from pipeline.cache.format import to_storable
from pipeline.cache.reader import open_cache
from pipeline.cache.report import reference_bytes_per_token
from stages.exits import user_errors

SHUFFLES = {"bitshuffle": Blosc.BITSHUFFLE, "shuffle": Blosc.SHUFFLE, "noshuffle": Blosc.NOSHUFFLE}
MIB = 1 << 20
BLOCKS = (0, MIB // 4, MIB)
SETTINGS = [  # (states, cname, level, shuffle, blosc block bytes; 0: blosc's choice); fp8 codes are 1 byte wide,
    # so their byte shuffle is no shuffle
    *[("exact", "zstd", lv, s, b) for lv in (1, 3, 5) for s in ("bitshuffle", "shuffle") for b in BLOCKS],
    *[("exact", "zstd", 9, s, 0) for s in ("bitshuffle", "shuffle")],
    *[("exact", "lz4", 5, s, b) for s in ("bitshuffle", "shuffle") for b in (0, MIB)],
    *[("fp8", "zstd", lv, s, b) for lv in (1, 3, 5) for s in ("bitshuffle", "noshuffle") for b in BLOCKS],
    *[("fp8", "zstd", 9, "noshuffle", b) for b in (0, MIB)],
    *[("fp8", "lz4", 5, s, b) for s in ("bitshuffle", "noshuffle") for b in (0, MIB)],
    *[("fp8-audio", "zstd", lv, "noshuffle", b) for lv in (1, 3) for b in BLOCKS],
]

SHORT = [  # the defaults of each encoding, and the lossless default before (zstd-3 bitshuffle, blosc's blocks)
    ("exact", "zstd", 3, "bitshuffle", 0),
    ("exact", "zstd", 1, "shuffle", MIB),
    ("fp8", "zstd", 1, "shuffle", MIB),
    ("fp8-audio", "zstd", 1, "shuffle", MIB),
    ("fp8-audio", "zstd", 3, "shuffle", MIB),
]


@dataclass
class States:
    """A cache's EAGLE-3 inputs packed along tokens: what one part of it stores."""

    layers: list[np.ndarray]  # 3 aux + final, [tokens, H] each, torch tensors' storable form
    torch_layers: list[torch.Tensor]
    audio: np.ndarray  # [audio tokens, H]
    audio_torch: torch.Tensor
    ids: np.ndarray  # [tokens] int32
    mask: np.ndarray  # [tokens] uint8
    tokens: int
    hidden: int


def load_states(path: str, samples: int, dtype: torch.dtype) -> States:
    cache = open_cache(path)
    num_layers = cache.manifest.num_layers
    aux = [2, num_layers // 2, num_layers - 3]
    missing = [a for a in aux if a not in cache.layers]
    if missing:
        raise SystemExit(f"{path} lacks EAGLE-3's default layers {missing} (it has {cache.layers})")
    rows: list[list[torch.Tensor]] = [[] for _ in range(len(aux) + 1)]
    audio, ids, mask = [], [], []
    for i in range(min(samples, len(cache))):
        s = cache[i]
        for j, layer in enumerate(aux):
            rows[j].append(s["hidden_states"][layer])
        rows[-1].append(s["final_hidden"])
        audio.append(s["inputs_embeds"][s["input_ids"] == cache.audio_token_id])
        ids.append(s["input_ids"].numpy().astype(np.int32))
        mask.append(s["loss_mask"].numpy().astype(np.uint8))
    packed = [torch.cat(r).to(dtype) for r in rows]
    return States(
        [to_storable(t) for t in packed],
        packed,
        to_storable(torch.cat(audio).to(dtype)),
        torch.cat(audio).to(dtype),
        np.concatenate(ids),
        np.concatenate(mask),
        len(packed[0]),
        cache.manifest.hidden_size,
    )


def entropy_floor(st: States) -> float:
    """Bytes per token no byte-wise (order-0) coder can beat on the exact states and audio embeddings: the empirical
    entropy of each byte position of the stored values (e.g. a bf16's sign-and-exponent byte, mantissa byte)."""
    total = 0.0
    for a in [*st.layers, st.audio]:
        planes = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
        for k in range(planes.shape[1]):
            p = np.bincount(planes[:, k], minlength=256) / len(planes)
            total += -(p[p > 0] * np.log2(p[p > 0])).sum() / 8 * len(planes)
    return total / st.tokens


def chunks(a: np.ndarray, rows: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[i : i + rows]) for i in range(0, len(a), rows)]


def measure(
    st: States, states: str, cname: str, level: int, shuffle: str, block: int, chunk: int, passes: int
) -> tuple[dict, Callable[[], None]]:
    """Bytes per token and per-core encode rate of one setting (best of ``passes``), and one decoding pass of its
    frames (timed by the caller, interleaved with the other settings' so that load changes hit all alike)."""
    codec = Blosc(cname=cname, clevel=level, shuffle=SHUFFLES[shuffle], blocksize=block)
    delivered = sum(a.nbytes for a in st.layers)  # bytes of the cache's dtype the readers hand out

    def encode() -> list[list[bytes]]:
        stored = [encode_fp8(t) for t in st.torch_layers] if states != "exact" else st.layers
        return [[codec.encode(c) for c in chunks(a, chunk)] for a in stored]

    def decode(frames: list[list[bytes]]) -> None:
        width = st.hidden + 1 if states != "exact" else st.hidden
        raw = np.empty((chunk, width), np.uint8 if states != "exact" else st.layers[0].dtype)
        out = np.empty((chunk, st.hidden), st.layers[0].dtype)
        for layer in frames:
            for frame in layer:
                n = struct.unpack_from("<I", frame, 4)[0] // raw[0].nbytes  # blosc header: uncompressed size
                codec.decode(frame, out=raw[:n])
                if states != "exact":
                    decode_fp8(raw[:n], out[:n])

    frames, encode_s = best(encode, passes)
    state_bytes = sum(len(f) for layer in frames for f in layer)
    audio = encode_fp8(st.audio_torch) if states == "fp8-audio" else st.audio
    audio_bytes = sum(len(codec.encode(c)) for c in chunks(audio, chunk))
    ids_bytes = sum(len(codec.encode(c)) for a in (st.ids, st.mask) for c in chunks(a, 16 * chunk))  # as written
    per_token = (state_bytes + audio_bytes + ids_bytes) / st.tokens
    return {
        "setting": f"{states:<9} {cname}-{level} {shuffle} {f'{block // 1024}K' if block else 'auto'}",
        "bytes_per_token": per_token,
        "state_bytes_per_token": state_bytes / st.tokens,
        "x_reference": per_token / reference_bytes_per_token(st.hidden),
        "encode_mb_s": delivered / encode_s / 1e6,
    }, lambda: decode(frames)


def best(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="a cache written by `just dump-hidden` (with EAGLE-3's default layers)")
    p.add_argument("--samples", type=int, default=200, help="samples read from the cache")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="states cast to this first")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--short", action="store_true", help="only the defaults (and 2026-11's), 15 passes each")
    a = p.parse_args(argv)
    numcodecs.blosc.set_nthreads(1)  # per core
    torch.set_num_threads(1)
    with user_errors():  # not a cache, or a damaged one: the message, not a traceback
        st = load_states(a.cache, a.samples, getattr(torch, a.dtype))
    audio_share = len(st.audio) / st.tokens
    ref = reference_bytes_per_token(st.hidden)
    print(f"{a.cache}: {st.tokens} tokens ({audio_share:.0%} audio) of H={st.hidden} states as {a.dtype}, "
          f"3 aux + final; reference 8H+16 = {ref} bytes/token; one core, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    floor = entropy_floor(st)
    print(f"  exact states' order-0 byte entropy: {floor:.0f} bytes/token = {floor / ref:.3f}x 8H+16 (plus ids)")
    print(f"  {'setting':<38} {'bytes/token':>11} {'x 8H+16':>8} {'states B/tok':>12} {'enc MB/s':>9} {'dec MB/s':>9}")
    passes = 15 if a.short else 5
    measured = [measure(st, *setting, a.chunk_tokens, passes) for setting in (SHORT if a.short else SETTINGS)]
    seconds = [[] for _ in measured]
    for _ in range(passes):  # round-robin: a load change on the shared machine hits every setting alike
        for times, (_, decode) in zip(seconds, measured, strict=True):
            start = time.perf_counter()
            decode()
            times.append(time.perf_counter() - start)
    delivered = sum(a.nbytes for a in st.layers)
    for (r, _), times in zip(measured, seconds, strict=True):
        r["decode_mb_s"] = delivered / min(times) / 1e6
        print(f"  {r['setting']:<38} {r['bytes_per_token']:>11.0f} {r['x_reference']:>8.3f} "
              f"{r['state_bytes_per_token']:>12.0f} {r['encode_mb_s']:>9.0f} {r['decode_mb_s']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
