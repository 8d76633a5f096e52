"""Human-readable summaries of a cache: the end-of-dump summary and `just inspect-cache`."""

from __future__ import annotations

import numpy as np

from pipeline.cache.format import STORED_DTYPES, Manifest


def reference_bytes_per_token(hidden_size: int, itemsize: int = 2) -> int:
    """Reference trainers' per-sample files: 3 aux + final states (8H in bf16) plus ids and masks (16)."""
    return 4 * hidden_size * itemsize + 16


def describe_dump(manifest: Manifest) -> str:
    c = manifest.counts
    lines = [
        f"cache: {'complete' if manifest.complete else 'INCOMPLETE (re-run the same command to resume)'}",
        f"  shards {c.get('shards_done', 0)}/{c.get('shards', 0)} done, samples {c.get('samples', 0)}, "
        f"tokens {c.get('tokens', 0)} (audio {c.get('audio_tokens', 0)}), rejected {c.get('rejected', 0)}",
    ]
    lines += _storage_lines(manifest)
    lines += [f"  rejected {r['key']} ({r['shard']}): {r['reason']}" for r in manifest.rejects[:50]]
    if len(manifest.rejects) > 50:
        lines.append(f"  ... {len(manifest.rejects) - 50} more rejects listed in manifest.json")
    lines += [f"  UNREADABLE shard {e['shard']}: {e['error']}" for e in manifest.shard_errors]
    return "\n".join(lines)


def _storage_lines(manifest: Manifest) -> list[str]:
    c = manifest.counts
    tokens, stored, raw = c.get("tokens", 0), c.get("stored_bytes", 0), c.get("raw_bytes", 0)
    if not tokens:
        return []
    return [
        f"  layers {manifest.captured_layers}, dtype {manifest.dtype}, states {manifest.codec.states}, "
        f"codec {manifest.codec.to_dict()}",
        f"  bytes on disk {stored / 1e6:.1f} MB, raw {raw / 1e6:.1f} MB, compression {raw / max(stored, 1):.2f}x",
        "  " + per_token_line(stored / tokens, manifest.hidden_size, manifest.dtype, len(manifest.captured_layers) + 1),
    ]


def per_token_line(per_token: float, hidden_size: int, dtype: str, states: int = 4) -> str:
    """Bytes per token against the reference trainers' bf16 files (3 aux + final: 8H + 16), and against such files
    holding as many states as the cache (``states``: captured layers + final) in the cache's own dtype, when
    either differs."""
    ref = reference_bytes_per_token(hidden_size)
    line = f"bytes per token {per_token:.0f}, {per_token / ref:.3f}x the {ref} of reference per-sample files (8H+16)"
    itemsize = np.dtype(STORED_DTYPES[dtype][0]).itemsize
    if itemsize != 2 or states != 4:
        same = states * hidden_size * itemsize + 16
        line += f"; {per_token / same:.3f}x the {same} of such files with {states} states in {dtype}"
    return line
