#!/usr/bin/env bash
# Stage one at Qwen2-Audio-7B's dimensions on one lent GPU (an H200 here), in about 4 minutes: `just bench-dump` on
# a randomly initialised 7B-sized copy of the small target (32+32 layers, H=4096, encoder d=1280; bf16), over the
# bundled clips as recorded (~2 s) and repeated to 10 s. It prints one-sample vs batched tokens/s, the share of
# time the forward waited for prepared input and for the writer, the audio encoder's share of the forward, what
# trimming its 30 s padding saves, and how far batched and trimmed states are from the one-sample forward.
#
# Here, once (pip and the network): the packages the GPU image lacks, as Python 3.12 wheels (~26 MB), into
# runs/gpu-wheels (git-ignored, so it travels only when carried):
#     bash stages/bench/gpu_dump_7b.sh prepare
# On the lent machine, through the device tool:
#     run(command="bash stages/bench/gpu_dump_7b.sh run", carry=["runs/gpu-wheels"], timeout_s=420)
# The log comes back as $OUT/bench-dump-7b.log; copy its figures into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=runs/gpu-wheels
# Not in the GPU image (Python 3.12, torch 2.11, transformers 5.17): the cache, shard and audio libraries, and the
# transformers this project is developed against.
PACKAGES=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 webdataset==1.0.2
          braceexpand==0.1.7 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 transformers==5.24.0)

prepare() {
    mkdir -p "$WHEELS"
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
}

bench() {  # progress bars dropped from the log
    timeout "$1" python3 -m stages.bench.dump --model small --random-sizes 7b --dtype bfloat16 "${@:2}" 2>&1 \
        | grep --line-buffered -v -E 'it/s\]|sample/s|Loading weights|Writing model' | tee -a "$LOG"
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 AUDIO_EAGLE_HOME=/tmp/audio-eagle
    LOG="${OUT:-/tmp}/bench-dump-7b.log"
    { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } | tee "$LOG"
    # Clips as recorded: 108 of ~2 s (~95 tokens each), the writer part included (~3 min with the model's build).
    bench 270 --repeat 3 --rounds 1 --batch-tokens 8192 --batch-size 32 --encoder-clips 32
    # The same clips repeated to 10 s (~290 tokens each): the encoder's share at a longer clip (model reused).
    bench 150 --repeat 1 --rounds 1 --batch-tokens 8192 --batch-size 32 --encoder-clips 32 --clip-seconds 10 \
        --skip writer
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
