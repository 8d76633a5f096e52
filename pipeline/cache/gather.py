"""The one compiled loop of the cache package: fp8 rows decoded by table look-up (``encoding.decode_fp8``).

Kept in its own module so that numba is imported, and the loop compiled or loaded from its on-disk cache, only
when a cache with fp8 states is read."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def decode_rows(rows, values, out, bf16):  # pragma: no cover - compiled
    """``out[i, j] = values[rows[i, j]] * 2**e_i`` with ``e_i = int8(rows[i, -1])``, in ``out``'s dtype (bfloat16
    bits when ``bf16``, else float32). One 256-entry table per distinct exponent, built on first use: exact, since
    an e4m3 value times a power of two has 4 significant bits."""
    n, width = out.shape
    tables = np.empty((256, 256), out.dtype)
    built = np.zeros(256, np.bool_)
    scaled = np.empty(256, np.float32)
    bits = scaled.view(np.uint32)
    for i in range(n):
        e = np.int64(rows[i, width])
        if e >= 128:
            e -= 256
        if not built[e + 128]:
            scale = np.float32(math.ldexp(1.0, e))
            for k in range(256):
                scaled[k] = values[k] * scale  # inf beyond float32 for codes above any stored row's maximum
            for k in range(256):
                tables[e + 128, k] = (bits[k] >> 16) if bf16 else scaled[k]
            built[e + 128] = True
        table = tables[e + 128]
        for j in range(width):
            out[i, j] = table[rows[i, j]]
