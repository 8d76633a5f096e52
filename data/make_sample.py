"""Regenerate the bundled sample data set in data/sample/ deterministically.

    HOME=$(mktemp -d) .venv/bin/python data/make_sample.py

Synthesises 36 short English clips with espeak-ng (four voices, slightly varied speed), stores them
in mixed formats/rates (wav 16 kHz and 22.05 kHz, flac 44.1 kHz, ogg/vorbis 24 kHz, mp3 22.05 kHz,
a few stereo), pairs each with one conversation (transcription or question answering, a few
two-turn), and writes data/sample/manifest.jsonl plus four webdataset shards of nine samples.
Needs espeak-ng and ffmpeg (libvorbis, libmp3lame) on PATH. Everything random comes from one seeded
generator, and ffmpeg runs in bitexact mode, so reruns give the same files with the same tools.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so the script also runs without the editable install

from pipeline.inputs.shards import write_shards  # noqa: E402

OUT = REPO / "data" / "sample"
SEED = 20240601
ESPEAK_RATE = 22050  # espeak-ng always synthesises at 22.05 kHz
MIN_SECONDS, MAX_SECONDS = 1.5, 4.0
SAMPLES_PER_SHARD = 9
VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3")
SYSTEM_PROMPT = "You are a helpful assistant."
FFMPEG_BITEXACT = ["-fflags", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1"]


@dataclass(frozen=True)
class Sentence:
    text: str
    colour: str | None = None
    number: str | None = None
    animal: str | None = None  # noun phrase used in answers, e.g. "a fox", "birds"
    place: str | None = None


@dataclass(frozen=True)
class Format:
    ext: str
    rate: int
    channels: int


SENTENCES: tuple[Sentence, ...] = (
    Sentence("The red fox sleeps in London.", colour="red", animal="a fox", place="London"),
    Sentence("Three blue birds flew over Paris.", "blue", "three", "birds", "Paris"),
    Sentence("A green frog sat by the river.", colour="green", animal="a frog", place="the river"),
    Sentence("Seven white sheep walk to the farm.", "white", "seven", "sheep", "the farm"),
    Sentence("My black cat lives in Tokyo.", colour="black", animal="a cat", place="Tokyo"),
    Sentence("Two brown dogs ran through the park.", "brown", "two", "dogs", "the park"),
    Sentence("The yellow duck swims in the lake.", colour="yellow", animal="a duck", place="the lake"),
    Sentence("Four grey wolves live near Rome.", "grey", "four", "wolves", "Rome"),
    Sentence("She saw a pink pig in Madrid.", colour="pink", animal="a pig", place="Madrid"),
    Sentence("Five orange fish swim in the sea.", "orange", "five", "fish", "the sea"),
    Sentence("The purple cow stood in Berlin.", colour="purple", animal="a cow", place="Berlin"),
    Sentence("Nine small mice hide in the kitchen.", number="nine", animal="mice", place="the kitchen"),
    Sentence("A golden lion rests in Kenya.", colour="golden", animal="a lion", place="Kenya"),
    Sentence("Six silver horses crossed the bridge.", "silver", "six", "horses", "the bridge"),
    Sentence("The old bear walked into the forest.", animal="a bear", place="the forest"),
    Sentence("Eight red ants marched across Cairo.", "red", "eight", "ants", "Cairo"),
    Sentence("One white rabbit hopped to school.", "white", "one", "a rabbit", "school"),
    Sentence("The blue whale swam past Sydney.", colour="blue", animal="a whale", place="Sydney"),
    Sentence("Ten green parrots sang in Lima.", "green", "ten", "parrots", "Lima"),
    Sentence("A brown owl watched over the village.", colour="brown", animal="an owl", place="the village"),
    Sentence("Two black goats climbed the mountain.", "black", "two", "goats", "the mountain"),
    Sentence("The tiny yellow chick ran home.", colour="yellow", animal="a chick", place="home"),
    Sentence("Three grey elephants bathed in the river.", "grey", "three", "elephants", "the river"),
    Sentence("We met a red deer in Oslo.", colour="red", animal="a deer", place="Oslo"),
    Sentence("Five white swans float on the pond.", "white", "five", "swans", "the pond"),
    Sentence("The orange tiger sleeps in India.", colour="orange", animal="a tiger", place="India"),
    Sentence("Four pink flamingos stood in Miami.", "pink", "four", "flamingos", "Miami"),
    Sentence("A green snake hid in the garden.", colour="green", animal="a snake", place="the garden"),
    Sentence("Six black crows sat on the roof.", "black", "six", "crows", "the roof"),
    Sentence("The brown horse trotted through Dublin.", colour="brown", animal="a horse", place="Dublin"),
    Sentence("Seven blue fish swam near the island.", "blue", "seven", "fish", "the island"),
    Sentence("A white goat ate grass in Wales.", colour="white", animal="a goat", place="Wales"),
    Sentence("Eight yellow bees flew to the meadow.", "yellow", "eight", "bees", "the meadow"),
    Sentence("The grey mouse ran into the barn.", colour="grey", animal="a mouse", place="the barn"),
    Sentence("Nine red apples fell in Vienna.", colour="red", number="nine", place="Vienna"),
    Sentence("Two purple butterflies danced in Spain.", "purple", "two", "butterflies", "Spain"),
)

# Uncompressed/lossless formats cost the most bytes, so they go to the shortest sentences (the
# costliest per second first); the lossy ones (a few stereo) carry the rest.
LOSSLESS_FORMATS: tuple[Format, ...] = (
    Format("flac", 44100, 2),
    *[Format("wav", 22050, 1)] * 2,
    *[Format("wav", 16000, 1)] * 3,
    Format("flac", 44100, 1),
)
LOSSY_FORMATS: tuple[Format, ...] = (  # cycled; one clip in six is stereo
    *[Format("ogg", 24000, 1), Format("mp3", 22050, 1)] * 2,
    Format("ogg", 24000, 1),
    Format("mp3", 22050, 2),
    *[Format("ogg", 24000, 1), Format("mp3", 22050, 1)] * 2,
    Format("ogg", 24000, 2),
    Format("mp3", 22050, 1),
)

TRANSCRIBE_PROMPTS = (
    "Transcribe the audio.",
    "Transcribe the audio.",
    "Please transcribe this recording.",
    "Write down exactly what is said.",
    "What does the speaker say? Give the exact words.",
)
QUESTIONS = {
    "colour": ("What colour is mentioned?", "Which colour does the speaker mention?"),
    "number": ("What number is mentioned?", "Which number does the speaker say?"),
    "animal": ("Which animal is mentioned?", "What animal is the speaker talking about?"),
    "place": ("Which place is mentioned?", "What place does the speaker name?"),
    "words": ("How many words are spoken?", "Count the words in the recording."),
}
FOLLOW_UPS = {
    "colour": "And what colour is it?",
    "number": "And which number do you hear?",
    "animal": "And which animal is it?",
    "place": "And where is it?",
    "transcribe": "Now write down the whole sentence.",
}
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
)


def word_count(text: str) -> int:
    return len(re.findall(r"[A-Za-z']+", text))


def answer(sentence: Sentence, topic: str) -> str:
    if topic == "colour":
        return f"The colour mentioned is {sentence.colour}."
    if topic == "number":
        return f"The number mentioned is {sentence.number}."
    if topic == "animal":
        return f"The speaker mentions {sentence.animal}."
    if topic == "place":
        return f"The place mentioned is {sentence.place}."
    if topic == "words":
        return f"There are {NUMBER_WORDS[word_count(sentence.text)]} words."
    if topic == "transcribe":
        return sentence.text
    raise ValueError(topic)


def topics_for(sentence: Sentence) -> list[str]:
    fields = ("colour", "number", "animal", "place")
    return [name for name in fields if getattr(sentence, name) is not None] + ["words"]


def user_audio_turn(text: str) -> dict:
    return {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}


def build_conversation(index: int, sentence: Sentence, rng: random.Random) -> tuple[str, list[dict]]:
    """Return (task, conversation) for clip ``index``; the pattern is fixed, wording uses ``rng``."""
    turns: list[dict] = []
    if rng.random() < 0.7:  # the system prompt is sometimes omitted
        turns.append({"role": "system", "content": SYSTEM_PROMPT})
    if index % 12 == 5:  # three two-turn conversations: a question, then a text-only follow-up
        topics = topics_for(sentence)[:-1]  # the word count makes an odd follow-up
        first = rng.choice(topics)
        # The first follow-up asks for the transcript, the others for another detail.
        second = "transcribe" if index < 12 else rng.choice([t for t in topics if t != first])
        turns.append(user_audio_turn(rng.choice(QUESTIONS[first])))
        turns.append({"role": "assistant", "content": answer(sentence, first)})
        turns.append({"role": "user", "content": FOLLOW_UPS[second]})
        turns.append({"role": "assistant", "content": answer(sentence, second)})
        return "qa-2turn", turns
    if index % 2 == 0:
        turns.append(user_audio_turn(rng.choice(TRANSCRIBE_PROMPTS)))
        turns.append({"role": "assistant", "content": sentence.text})
        return "transcribe", turns
    topic = rng.choice(topics_for(sentence))
    turns.append(user_audio_turn(rng.choice(QUESTIONS[topic])))
    turns.append({"role": "assistant", "content": answer(sentence, topic)})
    return "qa", turns


def synthesise(text: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    raw = workdir / "espeak.wav"
    # espeak-ng wants a writable HOME for its config; keep it away from the user's.
    env = {**os.environ, "HOME": str(workdir)}
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True, env=env)
    audio, rate = sf.read(raw, dtype="float32")
    assert rate == ESPEAK_RATE, rate
    # Trim espeak's leading/trailing silence (bytes are scarce), keeping 0.1 s either side.
    voiced = np.flatnonzero(np.abs(audio) > 0.01)
    margin = int(0.1 * rate)
    audio = audio[max(0, voiced[0] - margin) : voiced[-1] + margin]
    shortfall = int(MIN_SECONDS * rate) - len(audio)
    if shortfall > 0:
        audio = np.pad(audio, (0, shortfall))
    return audio


def encode(audio: np.ndarray, fmt: Format, path: Path, workdir: Path) -> None:
    audio = soxr.resample(audio, ESPEAK_RATE, fmt.rate) if fmt.rate != ESPEAK_RATE else audio
    if fmt.channels == 2:
        # Slightly different channels, so downmixing is actually exercised.
        audio = np.stack([audio, 0.8 * audio], axis=1)
    audio = np.clip(audio, -1.0, 1.0)
    if fmt.ext in ("wav", "flac"):
        extra = {"compression_level": 1.0} if fmt.ext == "flac" else {}  # 1.0 = smallest flac
        sf.write(path, audio, fmt.rate, subtype="PCM_16", format=fmt.ext.upper(), **extra)
        return
    pcm = workdir / "pcm.wav"
    sf.write(pcm, audio, fmt.rate, subtype="PCM_16")
    # Low bitrates keep the bundled sample small; bitexact keeps the bytes reproducible.
    codec = ["-c:a", "libvorbis", "-q:a", "0"] if fmt.ext == "ogg" else ["-c:a", "libmp3lame", "-b:a", "32k"]
    command = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(pcm), "-ar", str(fmt.rate)]
    subprocess.run([*command, *codec, *FFMPEG_BITEXACT, str(path)], check=True)


def assign_formats() -> list[Format]:
    by_length = sorted(range(len(SENTENCES)), key=lambda i: (word_count(SENTENCES[i].text), i))
    formats: list[Format | None] = [None] * len(SENTENCES)
    for slot, index in enumerate(by_length[: len(LOSSLESS_FORMATS)]):
        formats[index] = LOSSLESS_FORMATS[slot]
    lossy = (fmt for fmt in LOSSY_FORMATS * len(SENTENCES))
    return [fmt if fmt is not None else next(lossy) for fmt in formats]


def main() -> None:
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH; install it (apt-get install espeak-ng ffmpeg)")
    rng = random.Random(SEED)
    audio_dir = OUT / "audio"
    shard_dir = OUT / "shards"
    for stale in (audio_dir, shard_dir):
        shutil.rmtree(stale, ignore_errors=True)
    audio_dir.mkdir(parents=True)

    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for index, (sentence, fmt) in enumerate(zip(SENTENCES, assign_formats(), strict=True)):
            voice = VOICES[index % len(VOICES)]
            speed = rng.randrange(150, 186, 5)
            audio = synthesise(sentence.text, voice, speed, workdir)
            seconds = len(audio) / ESPEAK_RATE
            if seconds > MAX_SECONDS:
                sys.exit(f"clip {index} is {seconds:.2f} s (> {MAX_SECONDS}); shorten {sentence.text!r}")
            key = f"clip-{index:03d}"
            path = audio_dir / f"{key}.{fmt.ext}"
            encode(audio, fmt, path, workdir)
            task, conversation = build_conversation(index, sentence, rng)
            record = {
                "key": key,
                "audio": path.relative_to(OUT).as_posix(),
                "conversations": conversation,
                "task": task,
                "voice": voice,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
            channels = "stereo" if fmt.channels == 2 else "mono"
            print(f"{key} {fmt.ext:4} {fmt.rate:5d} Hz {channels:6} {seconds:.2f} s {task:10} {voice}")

    manifest = OUT / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shards = write_shards(manifest, str(shard_dir / "sample-%06d.tar"), max_count=SAMPLES_PER_SHARD)
    print(f"wrote {manifest.relative_to(REPO)} ({len(lines)} samples) and {len(shards)} shards")


if __name__ == "__main__":
    main()
