# Audio EAGLE-3: dump hidden states of an audio LLM, train an EAGLE-3 draft from the cache.
# Run `./setup.sh` once (the README's commands do it for you); recipes use the project's venv.

set positional-arguments
set shell := ["bash", "-uc"]

py := justfile_directory() / ".venv/bin/python"
sample_shards := "data/sample/shards/sample-{000000..000003}.tar"

# List the recipes.
default:
    @just --list

# The main job end to end, a real gain in minutes on a CPU: the small trained target shipped in data/melody-target,
# melody clips made from a seed, the target's own answers (regenerate), one cache (dump), a draft (train, both
# exports), lossless speculative decoding on held-out clips with tau and speed against plain greedy (eval).
# A re-run resumes the finished steps and trains the draft afresh.
pipeline out="runs/pipeline" target="data/melody-target" clips="480" steps="240":
    {{py}} -m pipeline.testing.tone_data {{out}}/clips --count {{clips}} --seed 1
    {{py}} -m stages.regenerate "{{out}}/clips/*.tar" {{out}}/shards --model {{target}} --max-new-tokens 24 \
        --batch-size 16
    {{py}} -m stages.dump_hidden "{{out}}/shards/*.tar" {{out}}/cache --model {{target}}
    {{py}} -m stages.inspect_cache {{out}}/cache
    {{py}} -m stages.train_draft {{out}}/cache --runs-dir {{out}} --name eagle3 --overwrite --draft-vocab-size 256 \
        --max-tokens 4096 --max-steps {{steps}} --lr 3e-3 --eval-every 80 --eval-percent 8 --num-workers 0 --ttt-steps 7
    {{py}} -m stages.eval_draft {{out}}/eagle3 "{{out}}/shards/*.tar" --split eval --k 7 --max-new-tokens 24

# The same job on the bundled speech sample (every audio format, multi-turn conversations) with a tiny random target:
# the machinery on real speech shards, no gain (the target knows nothing: tau ~1.5). MODEL: another family's stand-in.
pipeline-sample out="runs/sample" model="tiny":
    {{py}} -m stages.regenerate "{{sample_shards}}" {{out}}/shards --model {{model}} --max-new-tokens 32
    {{py}} -m stages.dump_hidden "{{out}}/shards/*.tar" {{out}}/cache --model {{model}}
    {{py}} -m stages.inspect_cache {{out}}/cache
    {{py}} -m stages.train_draft {{out}}/cache --runs-dir {{out}} --name eagle3 --overwrite --draft-vocab-size 256 \
        --max-tokens 2048 --max-steps 60 --lr 3e-3 --warmup-steps 5 --eval-every 20 --ttt-steps 7
    {{py}} -m stages.eval_draft {{out}}/eagle3 "{{sample_shards}}" --k 7 --max-new-tokens 32

# The sample job with another family's tiny target (README: Supported families), e.g. `just pipeline-family
# tiny-qwen3-omni`; its outputs go to runs/sample-MODEL.
pipeline-family model:
    {{just_executable()}} pipeline-sample "runs/sample-{{model}}" "{{model}}"

# Stage one: cache the target's hidden states for SHARDS in OUT (extra flags: see --help).
dump-hidden shards out *flags:
    {{py}} -m stages.dump_hidden "$1" "$2" "${@:3}"

# Stage two: train an EAGLE-3 draft from CACHE (never loads the target) and export it for SGLang and vLLM.
train-draft cache *flags:
    {{py}} -m stages.train_draft "$1" "${@:2}"

# Rewrite the assistant turns of SHARDS with the target's own answers into OUT (resumable, multi-rank).
regenerate shards out *flags:
    {{py}} -m stages.regenerate "$1" "$2" "${@:3}"

# Speculative decoding with the target and a trained draft: lossless check, acceptance length, tokens/s.
eval-draft run_or_draft shards *flags:
    {{py}} -m stages.eval_draft "$1" "$2" "${@:3}"

# What a cache holds: samples, tokens, bytes on disk, compression, rejects (--verify: check every chunk).
inspect-cache path *flags:
    {{py}} -m stages.inspect_cache "$1" "${@:2}"

# Tar shards from a JSONL manifest (MANIFEST OUT_PATTERN) or an HF audio dataset (--hf-dataset PATH OUT_PATTERN ...).
make-shards +args:
    {{py}} -m stages.make_shards "$@"

# Regenerate the bundled sample (needs espeak-ng).
make-sample:
    {{py}} data/make_sample.py

# Benchmark stage one: dump vs forward-only throughput, writer MB/s per core, bytes per token.
bench-dump *flags:
    {{py}} -m stages.bench.dump "$@"

# Which codec for the states of CACHE: bytes/token vs 8H+16 and decode MB/s per core, exact and fp8 states.
bench-codecs cache *flags:
    {{py}} -m stages.bench.codecs "$1" "${@:2}"

# Benchmark stage two's loader: Zarr cache vs raw bytes vs one torch.save file per sample; time to first batch.
bench-train *flags:
    {{py}} -m stages.bench.train "$@"

# Train the small melody-transcription target (a Qwen2-Audio that has learned something audio-dependent).
train-small-target out *flags:
    {{py}} -m stages.bench.train_small_target "$1" "${@:2}"

# The quality benchmark: small trained target, regenerate, dump, draft variants, eval (QUALITY.md; --small: CI size;
# --task speech: the speech target on an HF audio dataset -> runs/quality-speech/QUALITY-speech.md; --target DIR).
quality *flags:
    {{py}} -m stages.bench.quality "$@"

# The whole test suite (what CI runs): every tier, multi-process runs and the CI-sized quality run, spread over
# one pytest worker per core (pytest-xdist; an idle worker takes tests queued on a busy one; `-n 0`: one process).
test *flags:
    {{py}} -m pytest -q -n auto --dist worksteal "$@"

# The edit loop's tier (78-96 s on 2 idle cores): no trainings, long dumps or multi-rank runs; a worker per core.
test-fast *flags:
    {{py}} -m pytest -q -n auto --dist worksteal -m "not slow and not distributed" "$@"

# Lint and format check (CI runs it).
lint:
    {{py}} -m ruff check pipeline stages tests data
    {{py}} -m ruff format --check pipeline stages tests data

# Qwen2-Audio-7B dimensions end to end on this machine (random 17 GB target built once under runs/): per-stage
# wall time and peak memory against the budgets, in results/scale-check.md (run it with `nice`; 41 min on 2 loaded cores).
scale-check *flags:
    {{py}} -m stages.bench.scale_check "$@"
