"""A speech benchmark corpus: real English sentences spoken by espeak-ng, saved as a Hugging Face audio dataset.

Text: the quotations of Debian's ``fortunes`` packages (``/usr/share/games/fortunes``; BSD licence, see
data/README.md), a chosen set of files, split into sentences, cleaned (ASCII letters and punctuation, 3-30 words,
no all-capital words, no dialogue labels) and de-duplicated case-insensitively. A sentence is held out by a hash of
its lower-cased text alone, so the split is the same for every seed and never shares a sentence.

Speech: clip ``index`` of a split speaks the split's ``index``-th sentence in an order shuffled by ``seed``, with a
voice, rate, pitch and gain (and, optionally, light white noise) drawn from ``(seed, split, index)``. espeak-ng
speaks at 22.05 kHz; the clip is trimmed of its silences, resampled to 16 kHz mono and stored as 16-bit wav (or
flac) bytes. A clip outside 1-15 s is skipped, its index consumed, so clip ``index`` is the same whatever count is
asked for: the same (seed, split, index) gives byte-identical audio.

The corpus is written as ``datasets`` would hold LibriSpeech (an ``Audio`` column plus ``text``), so the shards
come from the path users take with their own data: ``python -m stages.make_shards --hf-dataset OUT ...``.

    python -m pipeline.testing.speech_data OUT --count 1000 --seed 0 --split train
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr

from pipeline.errors import ConfigError, PipelineError

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Prose quotations. Left out: files about groups of people, politics, drugs and the sexes (not what a benchmark
# should put in a model's mouth), and jargon or layout a speech corpus gains nothing from (computers, linux, perl,
# debian, startrek, zippy, definitions, ascii-art, songs-poems, knghtbrd, disclaimer, news, translate-me) as well as
# ``cookie``, an unsorted mix of all of these.
FORTUNE_FILES: tuple[str, ...] = (
    "art", "education", "food", "fortunes", "goedel", "humorists", "kids", "law", "literature", "love", "magic",
    "medicine", "miscellaneous", "paradoxum", "people", "pets", "platitudes", "riddles", "science", "sports", "tao",
    "wisdom", "work",
)  # fmt: skip

ESPEAK_RATE = 22050  # espeak-ng always speaks at 22.05 kHz
SAMPLING_RATE = 16000
_WRITER_ROWS = 100  # rows datasets buffers before writing them out (its default, 1000, is ~110 MB of audio)
# espeak-ng's own English voices (the mbrola ones need another package). British English is "en": espeak-ng 1.51
# silently drops the variant of "en-gb+f1" (it speaks plain en-gb).
VOICES: tuple[str, ...] = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)  # fmt: skip
# Each voice is also spoken with a variant. Not f2, f3 or f5: their breath noise is random, and the first call in a
# fresh HOME (where espeak-ng's audio library sets itself up) gives other bytes than the calls after it (measured).
VARIANTS: tuple[str, ...] = ("", "+f1", "+f4", "+m1", "+m3", "+m7")

# Sentence splitting: after . ! ? and before a capital, unless the word before is an abbreviation or an initial.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc prof gen col lt sgt capt rev mt vol fig inc ltd co corp".split()
    + "e.g i.e u.s a.m p.m".split()
)
# The inoffensive fortunes still swear now and then; a benchmark's transcripts need not.
_CRUDE = frozenset("piss pissed shit crap damn damned bastard bitch ass arse fuck fucking sex sexual".split())
_CLEAN = re.compile(r"[A-Z][A-Za-z ,;:'!?.-]*[.!?]")  # ASCII letters and punctuation, a capital first, a stop last


@dataclass(frozen=True)
class Sentence:
    text: str
    source: str  # the fortune file it came from


@dataclass(frozen=True)
class SpeechConfig:
    """How clips are spoken; every random choice is drawn per (seed, split, index) from these ranges."""

    min_seconds: float = 1.0
    max_seconds: float = 15.0
    voices: tuple[str, ...] = VOICES
    variants: tuple[str, ...] = VARIANTS
    rate_wpm: tuple[int, int] = (130, 200)  # espeak-ng -s, words per minute (its default is 175)
    pitch: tuple[int, int] = (30, 70)  # espeak-ng -p, 0-99 (its default is 50)
    peak: tuple[float, float] = (0.3, 0.9)  # gain: the clip's peak amplitude
    noise: bool = False  # light white noise
    snr_db: tuple[float, float] = (25.0, 40.0)  # speech-to-noise ratio when noise is on
    format: Literal["wav", "flac"] = "wav"
    heldout_percent: float = 10.0
    margin_seconds: float = 0.15  # silence kept before and after the speech when trimming

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds < self.max_seconds:
            raise ConfigError(f"need 0 < min_seconds < max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if not 0 < self.heldout_percent < 100:
            raise ConfigError(f"heldout_percent must be in (0, 100), got {self.heldout_percent}")
        if self.format not in ("wav", "flac"):
            raise ConfigError(f'format must be "wav" or "flac", got {self.format!r}')


DEFAULT_SPEECH = SpeechConfig()


@dataclass(frozen=True)
class SpeechClip:
    """One clip: the encoded audio (16 kHz mono, 16-bit) and how it was made."""

    key: str
    index: int
    split: Split
    text: str
    source: str
    voice: str
    rate: int
    pitch: int
    snr_db: float | None
    seconds: float
    audio: bytes = field(repr=False)
    ext: str = "wav"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def fortune_entries(text: str) -> Iterator[str]:
    """The quotations of a fortune file (entries between ``%`` lines), attribution lines (``-- Name``) dropped,
    each on one line with single spaces."""
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        lines = [line for line in entry.splitlines() if not re.match(r"^\s*--", line)]
        joined = " ".join(" ".join(lines).split())
        if joined:
            yield joined


def split_sentences(entry: str) -> list[str]:
    """The sentences of a one-line entry: split after . ! or ? where a capital follows."""
    pieces: list[str] = []
    for piece in _SENTENCE_BREAK.split(entry):
        last_word = pieces[-1].split()[-1].rstrip(".").lower() if pieces else ""
        # "Mr. Smith", "Dr. Jekyll", "R. A. Heinlein": the break was not the end of a sentence.
        if pieces and (last_word in _ABBREVIATIONS or re.search(r"\b[A-Z]\.$", pieces[-1])):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return pieces


def clean_sentence(sentence: str, min_words: int = 3, max_words: int = 30) -> str | None:
    """The sentence if it makes a clean transcript, else None."""
    sentence = sentence.strip()
    if not _CLEAN.fullmatch(sentence) or not min_words <= len(sentence.split()) <= max_words:
        return None
    if "--" in sentence or ".." in sentence:  # dashes and ellipses: asides and cut-offs, not sentences
        return None
    if re.search(r"\b[A-Z]{2,}\b", sentence):  # acronyms and shouting: espeak spells or mangles them
        return None
    if re.match(r"[A-Za-z]+:", sentence):  # "Q: ...", "A: ...", "Jones: ...": dialogue labels
        return None
    if re.search(r"(^|\s)['-]|['-]($|\s)", sentence):  # stray quotes and dashes at word edges
        return None
    if _CRUDE.intersection(re.findall(r"[a-z]+", sentence.lower())):
        return None
    return sentence


def normalised(text: str) -> str:
    """The form that decides duplicates and the split: lower case, single spaces."""
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=4)
def load_sentences(corpus_dir: Path = FORTUNE_DIR, files: tuple[str, ...] = FORTUNE_FILES) -> tuple[Sentence, ...]:
    """The cleaned, de-duplicated sentences of ``files`` in ``corpus_dir``, in file and reading order."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise ConfigError(
            f"no fortune corpus at {str(corpus_dir)!r}: install Debian's fortunes (apt-get install fortunes)"
        )
    seen: set[str] = set()
    sentences: list[Sentence] = []
    for name in files:
        path = corpus_dir / name
        if not path.is_file():
            raise ConfigError(
                f"fortune file {str(path)!r} is missing: install Debian's fortunes (apt-get install fortunes)"
            )
        # Undecodable bytes become U+FFFD, which cleaning rejects along with every other non-ASCII character.
        for entry in fortune_entries(path.read_bytes().decode("utf-8", errors="replace")):
            for piece in split_sentences(entry):
                text = clean_sentence(piece)
                if text is not None and normalised(text) not in seen:
                    seen.add(normalised(text))
                    sentences.append(Sentence(text, name))
    return tuple(sentences)


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64 * 100


def sentence_split(text: str, heldout_percent: float = DEFAULT_SPEECH.heldout_percent) -> Split:
    """The split a sentence belongs to, by a hash of its normalised text alone."""
    return "heldout" if _hash_fraction(normalised(text)) < heldout_percent else "train"


def split_order(
    sentences: tuple[Sentence, ...], split: Split, seed: int, heldout_percent: float = DEFAULT_SPEECH.heldout_percent
) -> list[Sentence]:
    """The sentences of ``split``, shuffled by ``seed`` (sorted by a hash of seed and text, so the order of the
    corpus files does not matter)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = [s for s in sentences if sentence_split(s.text, heldout_percent) == split]
    return sorted(chosen, key=lambda s: hashlib.sha1(f"{seed}\0{normalised(s.text)}".encode()).digest())


# ---------------------------------------------------------------------------------------------
# Speech
# ---------------------------------------------------------------------------------------------


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, rate: int, pitch: int, home: Path) -> np.ndarray:
    """espeak-ng's float32 waveform at 22.05 kHz. ``home`` is a writable HOME for its settings, not the user's."""
    if not espeak_available():
        raise ConfigError("espeak-ng is not installed: apt-get install espeak-ng")
    command = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout"]
    # The text goes on stdin so that nothing in it can be read as an option.
    proc = subprocess.run(
        command, input=text.encode(), capture_output=True, env={**os.environ, "HOME": str(home)}, check=False
    )
    if proc.returncode != 0 or not proc.stdout:
        raise ConfigError(f"espeak-ng {' '.join(command[1:])} failed: {proc.stderr.decode(errors='replace').strip()}")
    # --stdout cannot seek back to fill in the wav sizes; libsndfile reads up to the end of the stream instead.
    wave, rate_read = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if rate_read != ESPEAK_RATE:
        raise ConfigError(f"espeak-ng spoke at {rate_read} Hz, expected {ESPEAK_RATE}")
    return wave


def _trim(wave: np.ndarray, rate: int, margin_seconds: float) -> np.ndarray:
    voiced = np.flatnonzero(np.abs(wave) > 0.01 * max(float(np.abs(wave).max()), 1e-9))
    if not len(voiced):
        return wave[:0]
    margin = int(margin_seconds * rate)
    return wave[max(0, voiced[0] - margin) : voiced[-1] + 1 + margin]


def _encode(pcm: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLING_RATE, format=fmt.upper(), subtype="PCM_16")
    return buffer.getvalue()


def make_speech_clip(
    sentence: Sentence, seed: int, split: Split, index: int, home: Path, cfg: SpeechConfig = DEFAULT_SPEECH
) -> SpeechClip | None:
    """Clip ``index`` of ``split`` speaking ``sentence``; None when it is not within cfg's seconds."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    voice = str(rng.choice(cfg.voices)) + str(rng.choice(cfg.variants))
    rate = int(rng.integers(cfg.rate_wpm[0], cfg.rate_wpm[1] + 1))
    pitch = int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1))
    peak = float(rng.uniform(*cfg.peak))
    wave = _trim(speak(sentence.text, voice, rate, pitch, home), ESPEAK_RATE, cfg.margin_seconds)
    if not len(wave):  # nothing audible was spoken
        return None
    wave = soxr.resample(wave, ESPEAK_RATE, SAMPLING_RATE)
    seconds = len(wave) / SAMPLING_RATE
    if not cfg.min_seconds <= seconds <= cfg.max_seconds:
        return None
    wave = wave * (peak / max(float(np.abs(wave).max()), 1e-9))
    snr_db = None
    if cfg.noise:  # drawn after everything else, so turning noise on changes no other choice
        snr_db = round(float(rng.uniform(*cfg.snr_db)), 1)
        speech_rms = float(np.sqrt(np.mean(wave**2)))
        wave = wave + rng.normal(0.0, speech_rms / 10 ** (snr_db / 20), len(wave))
    pcm = np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)
    return SpeechClip(
        key=f"{split}-{seed}-{index:06d}",
        index=index,
        split=split,
        text=sentence.text,
        source=sentence.source,
        voice=voice,
        rate=rate,
        pitch=pitch,
        snr_db=snr_db,
        seconds=round(seconds, 3),
        audio=_encode(pcm, cfg.format),
        ext=cfg.format,
    )


def _speak_index(
    index: int, order: list[Sentence], seed: int, split: Split, home: Path, cfg: SpeechConfig
) -> SpeechClip | None:
    return make_speech_clip(order[index], seed, split, index, home, cfg)


def make_speech_clips(
    count: int,
    seed: int,
    split: Split,
    cfg: SpeechConfig = DEFAULT_SPEECH,
    sentences: tuple[Sentence, ...] | None = None,
    first: int = 0,
) -> Iterator[SpeechClip]:
    """The first ``count`` clips of ``split`` from sentence index ``first`` on (indices outside cfg's seconds are
    skipped). ``sentences``: the corpus, by default ``load_sentences()``. Raises ConfigError when the split has too
    few sentences."""
    corpus = load_sentences() if sentences is None else sentences
    order = split_order(corpus, split, seed, cfg.heldout_percent)
    made = 0
    workers = os.cpu_count() or 1
    # espeak-ng runs as a subprocess and soxr and numpy release the GIL, so threads speak clips side by side; a
    # window of clips at a time, taken in index order, keeps the output the same as one by one.
    window = 8 * workers
    with tempfile.TemporaryDirectory(prefix="espeak-home-") as home, ThreadPoolExecutor(workers) as pool:
        speak_one = functools.partial(_speak_index, order=order, seed=seed, split=split, home=Path(home), cfg=cfg)
        for lo in range(first, len(order), window):
            for clip in pool.map(speak_one, range(lo, min(lo + window, len(order)))):
                if made == count:
                    return
                if clip is not None:
                    made += 1
                    yield clip
    if made < count:
        raise ConfigError(
            f"the {split} split has {len(order)} sentences and gave {made} clips from index {first}, not {count}"
        )


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def _rows(clips: Iterator[SpeechClip]) -> Iterator[dict[str, Any]]:
    for clip in clips:
        yield {
            "audio": {"bytes": clip.audio, "path": f"{clip.key}.{clip.ext}"},
            "text": clip.text,
            "key": clip.key,
            "split": clip.split,
            "index": clip.index,
            "source": clip.source,
            "voice": clip.voice,
            "rate": clip.rate,
            "pitch": clip.pitch,
            "snr_db": clip.snr_db,
            "seconds": clip.seconds,
        }


def _features() -> Any:
    from datasets import Features, Value

    # A plain {bytes, path} struct, cast to Audio afterwards: encoding into an Audio column needs torchcodec in
    # datasets 4+, while the cast only relabels the same Arrow storage.
    return Features(
        {
            "audio": {"bytes": Value("binary"), "path": Value("string")},
            **{name: Value("string") for name in ("text", "key", "split")},
            "index": Value("int64"),
            "source": Value("string"),
            "voice": Value("string"),
            "rate": Value("int32"),
            "pitch": Value("int32"),
            "snr_db": Value("float32"),
            "seconds": Value("float32"),
        }
    )


def _generate(
    count: int, seed: int, split: Split, cfg: SpeechConfig, sentences: tuple[Sentence, ...]
) -> Iterator[dict[str, Any]]:
    # Module level with picklable arguments: datasets hashes the generator and its arguments to name its cache.
    yield from _rows(make_speech_clips(count, seed, split, cfg, sentences))


def write_speech_dataset(
    out: Path,
    count: int,
    seed: int,
    split: Split,
    cfg: SpeechConfig = DEFAULT_SPEECH,
    sentences: tuple[Sentence, ...] | None = None,
) -> Any:
    """Synthesise ``count`` clips of ``split`` (of ``sentences``, by default ``load_sentences()``) and
    ``save_to_disk`` them at ``out``; return the ``datasets.Dataset``.

    Columns: audio (``Audio(sampling_rate=16000, decode=False)``), text, key, split, index, source, voice, rate,
    pitch, snr_db, seconds. Rows go to Arrow files 100 at a time, not into one Python list.
    """
    from datasets import Audio, Dataset, load_from_disk

    if count < 1:
        raise ConfigError(f"count must be at least 1, got {count}")
    corpus = load_sentences() if sentences is None else sentences
    kwargs = {"count": count, "seed": seed, "split": split, "cfg": cfg, "sentences": corpus}
    with tempfile.TemporaryDirectory(prefix="speech-data-") as cache:
        dataset = Dataset.from_generator(
            _generate, features=_features(), gen_kwargs=kwargs, cache_dir=cache, writer_batch_size=_WRITER_ROWS
        )
        dataset = dataset.cast_column("audio", Audio(sampling_rate=SAMPLING_RATE, decode=False))
        dataset.save_to_disk(str(out), max_shard_size="100MB")  # its shards are built in memory: keep them small
    return load_from_disk(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to save the dataset to (datasets save_to_disk)")
    parser.add_argument("--count", type=int, required=True, help="clips to synthesise")
    parser.add_argument("--seed", type=int, default=0, help="voices and sentence order (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="train or heldout sentences (default train)")
    parser.add_argument("--noise", action="store_true", help="add light white noise (25-40 dB SNR)")
    parser.add_argument("--format", choices=("wav", "flac"), default="wav", help="audio encoding (default wav)")
    parser.add_argument("--corpus-dir", type=Path, default=FORTUNE_DIR, help=f"fortune files (default {FORTUNE_DIR})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        cfg = SpeechConfig(noise=args.noise, format=args.format)
        sentences = load_sentences(args.corpus_dir)
        dataset = write_speech_dataset(args.out, args.count, args.seed, args.split, cfg, sentences)
    except PipelineError as err:
        sys.exit(str(err))
    seconds = sum(dataset["seconds"])
    print(
        f"wrote {len(dataset)} {args.split} clips ({seconds / 60:.1f} min of speech) to {args.out} "
        f"in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
