"""How the state arrays (auxiliary layers and the final state) are stored: exactly, or as FP8 with a row scale.

``exact``: the cache's dtype, bit for bit (bf16 as its uint16 bits). ``fp8-audio``: as ``fp8``, and the merged
audio embeddings too (``fp8`` keeps them exact).

``fp8``: each row (one token's state of one layer) as float8 e4m3 codes times a power-of-two scale, stored as
H + 1 bytes: the H e4m3 codes, then the scale's exponent ``e`` (int8), scale ``s = 2**e``. ``e`` is the least
integer with ``max|x| <= 448 s`` (448: the largest e4m3 value), so the row's largest element lands in e4m3's top
binade. A power of two rather than ``max|x| / 448``: dividing and multiplying by it is exact, so the only rounding
is e4m3's own, the bound below holds in the cache's dtype with nothing added, and the scale costs one byte.

Error bound, per element x of a row with scale s (``fp8_error_bound``), after round-to-nearest-even to e4m3:
  * |x| >= 2**-6 s (e4m3 normal range): |x' - x| <= 2**-4 |x|  (3 mantissa bits: half an ulp is 2**-4 relative)
  * |x| <  2**-6 s (e4m3 subnormals, steps of 2**-9 s): |x' - x| <= 2**-10 s; |x| <= 2**-10 s reads back as 0
  * a row of zeros reads back as zeros; signs are kept; NaN stays NaN (the dump rejects non-finite states anyway)
Since s <= max|x| / 224, elements below max|x| / 2**13.8 or so lose relative precision, and the smallest of them
become 0. ``e`` is clamped to [-100, 127] so that ``x' = code * s`` is a normal float32/bfloat16 number (rows with
max|x| < 3.5e-28 are quantised on the 2**-100 grid instead). float16 caches are refused (x' could exceed its range).

Reading decodes into the cache's dtype through a 256-entry table per row (one gather per element, compiled with
numba, which the audio decoding stack already depends on): table-free numpy or torch conversions ran 3-7x slower
than the blosc decoding they follow (BENCHMARKS.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from pipeline.errors import CacheError, ConfigError

StateEncoding = Literal["exact", "fp8", "fp8-audio"]
STATE_ENCODINGS: tuple[str, ...] = ("exact", "fp8", "fp8-audio")  # fp8-audio: the audio embeddings too
E4M3_MAX = 448.0
MIN_EXPONENT, MAX_EXPONENT = -100, 127
FP8_DTYPES = ("bfloat16", "float32")  # cache dtypes an fp8 cache can be read back into exactly


def check_encoding(encoding: str, dtype: str) -> None:
    """ConfigError if a cache of ``dtype`` cannot store its states as ``encoding``."""
    if encoding not in STATE_ENCODINGS:
        raise ConfigError(f"unknown state encoding {encoding!r}: choose one of {', '.join(STATE_ENCODINGS)}")
    if encoding != "exact" and dtype not in FP8_DTYPES:
        raise ConfigError(
            f"--state-encoding {encoding} needs a bfloat16 or float32 cache, not {dtype} (FP8 values times their "
            "scale can fall outside float16's range)"
        )


def check_readable(encoding: object, where: str) -> None:
    """CacheError if this code cannot decode states stored as ``encoding`` (a cache written by a newer version)."""
    if encoding not in STATE_ENCODINGS:
        raise CacheError(
            f"{where}: the cache stores its hidden states as {encoding!r}, an encoding this code cannot decode "
            f"(it knows {', '.join(STATE_ENCODINGS)}); read it with the version of this project that wrote it, or "
            "dump it again"
        )


def encoded(encoding: str, name: str) -> bool:
    """Whether array ``name`` of a cache with this state encoding holds fp8 rows (the rest are exact)."""
    if encoding == "exact":
        return False
    return name == "final_hidden" or name.startswith("hidden_") or (encoding == "fp8-audio" and name == "audio_embeds")


# ------------------------------------------------------------------------------------------------- encoding


def encode_fp8(states: torch.Tensor) -> np.ndarray:
    """[T, H] float states -> [T, H + 1] uint8: each row's e4m3 codes, then its scale exponent (int8)."""
    x = states.to(torch.float32)
    exponent = row_exponents(x)
    codes = (x * torch.exp2(-exponent.to(torch.float32))[:, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    out = torch.empty((len(x), x.shape[1] + 1), dtype=torch.uint8)
    out[:, :-1] = codes.to(torch.float8_e4m3fn).view(torch.uint8)
    out[:, -1] = exponent.to(torch.int8).view(torch.uint8)
    return out.numpy()


def row_exponents(x: torch.Tensor) -> torch.Tensor:
    """Per row, the least e (clamped) with max|x| <= 448 * 2**e; 0 for a row of zeros. int32."""
    amax = x.abs().amax(dim=1)
    mantissa, exponent = torch.frexp(amax / E4M3_MAX)  # amax / 448 = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # an exact power of two needs no rounding up
    # amax / 448 was rounded: make sure no element is above 448 after scaling (scaling by 2**-e is exact)
    exponent = exponent + (amax * torch.exp2(-exponent.to(torch.float32)) > E4M3_MAX).to(exponent.dtype)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    return exponent.clamp_(MIN_EXPONENT, MAX_EXPONENT)


def fp8_error_bound(x: torch.Tensor) -> torch.Tensor:
    """The largest |x' - x| the fp8 encoding allows for each element of ``x`` [T, H] (see the module text)."""
    x = x.to(torch.float32)
    scale = torch.exp2(row_exponents(x).to(torch.float32))[:, None]
    return torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)


# ------------------------------------------------------------------------------------------------- decoding


def decode_fp8(rows: np.ndarray, out: np.ndarray) -> None:
    """[n, H + 1] stored uint8 rows -> ``out`` [n, H] (the cache's stored dtype: uint16 bfloat16 bits or float32).

    Each distinct row exponent's 256 possible values are tabled once (exact: an e4m3 value times a power of two has
    4 significant bits), then every element is one table look-up."""
    if out.dtype not in (np.uint16, np.float32):
        raise CacheError(f"fp8 states cannot be decoded into {out.dtype} (bfloat16 or float32 caches only)")
    _kernel()(rows, e4m3_values(), out, out.dtype == np.uint16)


@lru_cache(maxsize=1)
def e4m3_values() -> np.ndarray:
    """The float32 value of every e4m3 code (0x7f and 0xff are NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


def _kernel():
    """The compiled look-up loop (numba, imported on the first fp8 read; it releases the GIL, so ``RowReader``'s
    threads decode in parallel)."""
    from pipeline.cache.gather import decode_rows

    return decode_rows
