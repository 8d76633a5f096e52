import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.inputs.audio import AudioError, AudioPolicy, audio_seconds, decode_audio

POLICY = AudioPolicy()


def _sine(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    # Different amplitude per channel so a wrong down-mix (e.g. taking channel 0) shows up.
    cols = [(0.3 / (c + 1)) * np.sin(2 * np.pi * freq * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def _noise(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((round(seconds * rate), channels))).astype(np.float32)


def _write(tmp_path: Path, name: str, frames: np.ndarray, rate: int, **kw) -> bytes:
    path = tmp_path / name
    sf.write(path, frames, rate, **kw)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "rate", "kw"),
    [
        ("a.wav", 16000, {"subtype": "PCM_16"}),
        ("a.wav", 22050, {"subtype": "PCM_24"}),
        ("a.flac", 44100, {"subtype": "PCM_16"}),
        ("a.ogg", 44100, {"format": "OGG", "subtype": "VORBIS"}),
        ("a.opus", 48000, {"format": "OGG", "subtype": "OPUS"}),
        ("a.mp3", 44100, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
    ],
)
def test_each_format_decodes(tmp_path: Path, name: str, rate: int, kw: dict) -> None:
    data = _write(tmp_path, name, _sine(2.0, rate, channels=2), rate, **kw)
    wave = decode_audio(data, POLICY, ext=name.rsplit(".", 1)[1])
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.flags.c_contiguous
    # libsndfile trims mp3/opus encoder delay, so even lossy formats land within a few ms.
    assert abs(len(wave) - 32000) <= 80
    # Mean of 0.3 and 0.15 amplitude sines is a 0.225 sine: RMS ~0.159, lossy codecs stay close.
    rms = float(np.sqrt(np.mean(wave[1600:-1600] ** 2)))
    assert rms == pytest.approx(0.225 / np.sqrt(2), rel=0.05)
    assert np.array_equal(wave, decode_audio(data, POLICY, ext=name))  # deterministic


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_unknown_container_falls_back_to_ffmpeg(tmp_path: Path) -> None:
    src = tmp_path / "a.wav"
    sf.write(src, _sine(1.0, 44100), 44100)
    dst = tmp_path / "a.m4a"
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src), "-c:a", "aac", str(dst)]
    subprocess.run(cmd, check=True)
    wave = decode_audio(dst.read_bytes(), POLICY, ext="m4a")
    # AAC keeps its priming samples (~1024 at 44.1 kHz) through audioread, hence the loose bound.
    assert abs(audio_seconds(wave, 16000) - 1.0) < 0.1


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_downmix_then_resample_matches_soxr(tmp_path: Path, channels: int) -> None:
    frames = _noise(3.0, 44100, channels)
    data = _write(tmp_path, "a.wav", frames, 44100, subtype="FLOAT")  # lossless, so the mean is exact
    wave = decode_audio(data, POLICY, ext="wav")
    assert abs(len(wave) - 48000) <= 1
    expected = soxr.resample(frames.mean(axis=1), 44100, 16000, quality="HQ")
    assert np.array_equal(wave, expected)


def test_native_rate_is_passed_through_untouched(tmp_path: Path) -> None:
    frames = _noise(1.0, 16000, 1)
    wave = decode_audio(_write(tmp_path, "a.wav", frames, 16000, subtype="FLOAT"), POLICY)
    assert np.array_equal(wave, frames[:, 0])


def test_overlong_is_cut_to_exact_prefix(tmp_path: Path) -> None:
    frames = _noise(35.0, 44100, 2)
    data = _write(tmp_path, "long.wav", frames, 44100, subtype="FLOAT")
    wave = decode_audio(data, AudioPolicy(overlong="cut"))
    assert wave.shape == (480000,)
    # Decoding stops ~1 s past the limit; the kept samples must still equal resampling the whole file.
    full = soxr.resample(frames.mean(axis=1), 44100, 16000, quality="HQ")
    assert np.array_equal(wave, full[:480000])


def test_overlong_is_rejected_with_limit_in_message(tmp_path: Path) -> None:
    data = _write(tmp_path, "long.flac", _sine(35.0, 22050), 22050)
    with pytest.raises(AudioError, match=r"audio is 35\.0 s, over the 30\.0 s limit") as err:
        decode_audio(data, AudioPolicy(overlong="reject"))
    assert 'overlong="cut"' in str(err.value)


def test_exactly_max_seconds_is_not_overlong(tmp_path: Path) -> None:
    data = _write(tmp_path, "a.flac", _sine(30.0, 44100), 44100)
    assert decode_audio(data, AudioPolicy(overlong="reject")).shape == (480000,)


def test_garbage_bytes_raise(tmp_path: Path) -> None:
    path = tmp_path / "junk.wav"
    path.write_bytes(b"this is not audio" * 64)
    with pytest.raises(AudioError, match=r"^undecodable audio \(wav\): Format not recognised"):
        decode_audio(path.read_bytes(), POLICY, ext=".WAV")


def test_truncated_flac_raises(tmp_path: Path) -> None:
    data = _write(tmp_path, "a.flac", _noise(5.0, 16000, 1), 16000)
    with pytest.raises(AudioError, match=r"^undecodable audio \(flac\): "):
        decode_audio(data[: len(data) // 2], POLICY, ext="flac")


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.flac"
    path.touch()
    with pytest.raises(AudioError, match="empty audio file"):
        decode_audio(path.read_bytes(), POLICY, ext="flac")


def test_zero_sample_wav_raises(tmp_path: Path) -> None:
    data = _write(tmp_path, "zero.wav", np.zeros((0, 1), np.float32), 16000)
    assert data  # a valid header, just no frames
    with pytest.raises(AudioError, match="^zero-length audio$"):
        decode_audio(data, POLICY)


def test_non_finite_samples_raise(tmp_path: Path) -> None:
    frames = _noise(1.0, 16000, 1)
    frames[100, 0] = np.nan
    data = _write(tmp_path, "nan.wav", frames, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or Inf"):
        decode_audio(data, POLICY)


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="overlong"):
        AudioPolicy(overlong="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seconds"):
        AudioPolicy(max_seconds=0)


def test_audio_seconds() -> None:
    assert audio_seconds(np.zeros(24000, np.float32), 16000) == 1.5


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_real_speech_from_espeak(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    # espeak-ng wants a writable HOME for its config; keep it inside tmp_path.
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(out), "hello world"], check=True, env=env)
    wave = decode_audio(out.read_bytes(), POLICY, ext="wav")
    assert 0.5 < audio_seconds(wave, POLICY.sampling_rate) < 3.0  # two words of TTS
    assert np.abs(wave).max() > 0.05  # actually voiced, not silence
