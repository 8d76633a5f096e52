"""Decode audio bytes into a mono float32 waveform at the target's rate (16 kHz for Whisper-style encoders).

libsndfile (via soundfile) reads wav, flac, ogg vorbis/opus and mp3 straight from memory, so that is the
only decoder on the normal path. Containers it does not know (m4a/aac, webm, ...) fall back to audioread,
which shells out to ffmpeg and needs a real file.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

from pipeline.settings import setting

# libsndfile's SF_ERR_UNRECOGNISED_FORMAT: the only open failure worth handing to another decoder.
_SF_UNRECOGNISED_FORMAT = 1


@dataclass(frozen=True)
class AudioPolicy:
    sampling_rate: int = setting(16000, "decode to this rate (the target's)", flag=None)
    # Whisper-style feature extractors pad or cut to 30 s anyway
    max_seconds: float = setting(30.0, "longest clip used", flag="max-audio-seconds")
    overlong: Literal["cut", "reject"] = setting(
        "cut", "a clip over --max-audio-seconds is cut to it, or rejected", flag="overlong-audio"
    )

    def __post_init__(self) -> None:
        if self.sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be positive, got {self.sampling_rate}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.overlong not in ("cut", "reject"):
            raise ValueError(f'overlong must be "cut" or "reject", got {self.overlong!r}')


class AudioError(ValueError):
    """A sample's audio cannot be used; the message is recorded next to the sample key."""


def audio_seconds(wave: np.ndarray, sampling_rate: int) -> float:
    return wave.shape[-1] / sampling_rate


def decode_audio(data: bytes, policy: AudioPolicy, ext: str | None = None) -> np.ndarray:
    """Decode ``data`` to a 1-D float32 array at ``policy.sampling_rate``, down-mixed to mono.

    ``ext`` (e.g. "flac" or ".flac") only labels error messages and names the fallback's temp file;
    the decoders sniff the actual format from the bytes.
    """
    fmt = ext.lstrip(".").lower() if ext else None
    if not data:
        raise AudioError("empty audio file (0 bytes)")
    try:
        head, rate, total = _read_soundfile(data, policy)
    except _Unrecognised as unrecognised:
        try:
            head, rate, total = _read_audioread(data, fmt, policy)
        except Exception:
            # Any fallback failure (no ffmpeg, ffmpeg rejects it too) means undecodable; soundfile's
            # reason is the more useful one to record.
            raise AudioError(_undecodable(fmt, unrecognised.reason)) from None
    except sf.SoundFileError as e:
        # The format was recognised but the stream is broken (truncated flac, bad header, ...).
        raise AudioError(_undecodable(fmt, _sf_reason(e))) from None
    return _finish(head, rate, total, policy)


class _Unrecognised(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _undecodable(fmt: str | None, reason: str) -> str:
    return f"undecodable audio ({fmt}): {reason}" if fmt else f"undecodable audio: {reason}"


def _sf_reason(e: Exception) -> str:
    # str(LibsndfileError) embeds the BytesIO repr (a memory address); error_string is the stable part.
    return str(getattr(e, "error_string", None) or e).strip()


def _frame_budget(rate: int, policy: AudioPolicy) -> tuple[int, int]:
    """(most native frames allowed, frames to decode) for a stream at ``rate``.

    We decode one second past the limit so the resampler's filter sees real signal at the cut point:
    the kept samples then equal the prefix of resampling the whole file, and a 2-hour file still
    only costs 31 s of decoding.
    """
    limit = math.floor(policy.max_seconds * rate)
    return limit, limit + rate


def _read_soundfile(data: bytes, policy: AudioPolicy) -> tuple[np.ndarray, int, int]:
    """Return (decoded head as (frames, channels) float32, native rate, total native frames)."""
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as e:
        if e.code == _SF_UNRECOGNISED_FORMAT:
            raise _Unrecognised(_sf_reason(e)) from None
        raise
    with f:
        rate = f.samplerate
        limit, budget = _frame_budget(rate, policy)
        head = f.read(budget, dtype="float32", always_2d=True)
        total = len(head)
        if total > limit and policy.overlong == "reject":
            # Count the rest only to report an honest duration: f.frames comes from headers, which
            # lie for truncated mp3s (Xing frame count), so count by decoding in bounded chunks.
            while n := len(f.read(60 * rate, dtype="float32", always_2d=True)):
                total += n
    return head, rate, total


def _read_audioread(data: bytes, fmt: str | None, policy: AudioPolicy) -> tuple[np.ndarray, int, int]:
    # ffmpeg is the only audioread backend worth trying: its stdlib "raw" backend reads only formats
    # libsndfile already rejected (and imports aifc/audioop, gone in Python 3.13).
    from audioread.ffdec import FFmpegAudioFile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"audio.{fmt or 'bin'}"
        path.write_bytes(data)
        with FFmpegAudioFile(str(path)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            pcm = b"".join(f)
    # audioread always yields interleaved little-endian int16.
    frames = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels)
    total = len(frames)
    _, budget = _frame_budget(rate, policy)
    head = frames[:budget].astype(np.float32) / np.float32(32768)
    return head, rate, total


def _finish(head: np.ndarray, rate: int, total: int, policy: AudioPolicy) -> np.ndarray:
    if total == 0:
        raise AudioError("zero-length audio")
    limit, _ = _frame_budget(rate, policy)
    if total > limit and policy.overlong == "reject":
        raise AudioError(
            f"audio is {total / rate:.1f} s, over the {policy.max_seconds:.1f} s limit "
            f'(overlong="reject"; use overlong="cut" to keep the first {policy.max_seconds:.1f} s)'
        )
    # Check before resampling: soxr would smear a single NaN across the filter length.
    if not np.isfinite(head).all():
        raise AudioError("audio contains NaN or Inf samples")
    mono = head.mean(axis=1)  # float32 in, float32 out; exact for a single channel
    wave = mono
    if rate != policy.sampling_rate:
        wave = soxr.resample(mono, rate, policy.sampling_rate, quality="HQ")
    # Cut on the output grid so "cut" yields exactly max_seconds * rate samples; for clips within
    # the limit this only trims a possible extra sample from the resampler's rounding.
    wave = wave[: round(policy.max_seconds * policy.sampling_rate)]
    if len(wave) == 0:  # e.g. a single 44.1 kHz frame resamples to nothing
        raise AudioError("zero-length audio")
    return np.ascontiguousarray(wave, dtype=np.float32)
