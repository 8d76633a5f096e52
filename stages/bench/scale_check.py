"""`just scale-check`: every stage at the real target's size on this machine, each as a separate process.

    1. the target: a random model with the real target's published dimensions (``pipeline/testing/real_size.py``:
       8.4B parameters, 15.6 GiB in bf16), built once under runs/ (a tensor at a time) and reused
    2. a shard of the first ``--clips`` bundled clips
    3. dump-hidden (default layers), inspect-cache --verify, train-draft for ``--steps`` steps at the draft size the
       target implies (hidden 4096, intermediate 11008, draft vocab 32000, teacher over the full 156032 head),
       both exports, eval-draft for ``--max-new-tokens`` tokens (lossless as the dtype defines it)
    4. per stage: wall time, peak resident memory (the process, and its whole tree), against the budgets: dump
       below the model's size + 4 GiB, training below 16 GiB, every stage within the machine's memory; and the
       cache's bytes per token. Written to ``--out`` (results/scale-check.md).

Each stage picks its own default dtype (``pipeline/targets/dtype.py``) unless a ``--*-dtype`` flag says otherwise.
The stages' output goes to ROOT/<stage>.log. A stage that fails stops the check; the report says which and why.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from pipeline.cache.format import Manifest
from pipeline.settings import setting
from pipeline.testing.real_size import REAL_SIZE_NAME, default_dir
from stages.bench.process_memory import Measured, measure
from stages.flags import add_flags, config_from_args

GIB = 2**30
SAMPLE_SHARD = "data/sample/shards/sample-000000.tar"


@dataclass
class ScaleCheckConfig:
    root: Path = setting(Path("runs/scale-check"), "working directory: the clips, the cache, the draft run, logs")
    model: str | None = setting(
        None, "target directory (default: the random real-size target in runs/, built on first use: 17 GB)"
    )
    shard: str = setting(SAMPLE_SHARD, "the shard the clips are taken from")
    clips: int = setting(3, "clips dumped and evaluated")
    steps: int = setting(3, "training steps")
    k: int = setting(4, "draft tokens per round in eval-draft")
    max_new_tokens: int = setting(8, "tokens eval-draft generates per clip")
    dump_dtype: str | None = setting(None, "dump-hidden --dtype (default: the stage's own choice)")
    eval_dtype: str | None = setting(None, "eval-draft --dtype (default: the stage's own choice)")
    out: Path = setting(Path("results/scale-check.md"), "the report")


@dataclass
class Stage:
    name: str
    command: list[str]
    budget: int | None  # bytes of the stage's tree at its peak
    budget_text: str = ""
    result: Measured | None = None

    @property
    def log(self) -> str:
        return f"{self.name}.log"


def write_clips(shard: str, out: Path, clips: int) -> int:
    """The first ``clips`` samples of ``shard`` (members grouped by key, in order) as a new tar shard."""
    out.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for member in src:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == clips:
                    break
                keys.append(key)
            dst.addfile(member, src.extractfile(member))
    return len(keys)


def stages(cfg: ScaleCheckConfig, model: str, model_bytes: int, total: int) -> list[Stage]:
    py, root, clips = sys.executable, cfg.root, str(cfg.root / "clips-000000.tar")
    dump_dtype = ["--dtype", cfg.dump_dtype] if cfg.dump_dtype else []
    eval_dtype = ["--dtype", cfg.eval_dtype] if cfg.eval_dtype else []
    steps = str(cfg.steps)
    every = ["--log-every", "1", "--eval-every", steps, "--checkpoint-every", steps, "--warmup-steps", "1"]
    return [
        Stage("dump-hidden", [py, "-m", "stages.dump_hidden", clips, str(root / "cache"), "--model", model,
                              *dump_dtype], model_bytes + 4 * GIB, "model + 4 GiB"),
        Stage("inspect-cache", [py, "-m", "stages.inspect_cache", str(root / "cache"), "--verify"], total, "machine"),
        Stage("train-draft", [py, "-m", "stages.train_draft", str(root / "cache"), "--runs-dir", str(root), "--name",
                              "draft", "--overwrite", "--max-steps", steps, *every], 16 * GIB, "16 GiB"),
        Stage("eval-draft", [py, "-m", "stages.eval_draft", str(root / "draft"), clips, "--split", "all", "--limit",
                             str(cfg.clips), "--k", str(cfg.k), "--max-new-tokens", str(cfg.max_new_tokens),
                             *eval_dtype], total, "machine"),
    ]  # fmt: skip


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = re.search(r"flags\s*:\s*(.*)", cpuinfo)
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s*(\d+)", meminfo).group(1)) * 1024
    return {
        "cpu": name.group(1) if name else platform.processor(),
        "cores": len(re.findall(r"^processor", cpuinfo, re.M)),
        "memory": total,
        "avx512_bf16": bool(flags and "avx512_bf16" in flags.group(1).split()),
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def weights_bytes(model: str) -> int:
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))


def dtype_line(log: Path) -> str:
    found = re.findall(r"^dtype: .*$", log.read_text(errors="replace"), re.M) if log.exists() else []
    return found[0] if found else ""


def run(cfg: ScaleCheckConfig) -> bool:
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    info, facts = machine(), {}
    model = cfg.model
    if model is None:  # the random real-size target, built once (a tensor at a time) and reused
        build = Stage("build-target", [sys.executable, "-m", "pipeline.testing.real_size", str(default_dir())], None)
        build.result = measure(build.command, root / build.log)
        if build.result.returncode:
            sys.exit(f"building the target failed: see {root / build.log}")
        model = str(default_dir())
        facts["build_s"] = build.result.wall_s
    model_bytes = weights_bytes(model)
    for old in ("cache", "draft"):  # measure from nothing
        shutil.rmtree(root / old, ignore_errors=True)
    facts["clips"] = write_clips(cfg.shard, root / "clips-000000.tar", cfg.clips)
    plan = stages(cfg, model, model_bytes, info["memory"])
    for stage in plan:
        print(f"[scale-check] {stage.name}: {' '.join(stage.command)}", flush=True)
        stage.result = measure(stage.command, root / stage.log)
        r = stage.result
        print(f"[scale-check] {stage.name}: rc {r.returncode}, {r.wall_s:.0f} s, max RSS {r.max_rss / GIB:.2f} GiB, "
              f"tree PSS {r.peak_tree_pss / GIB:.2f} GiB", flush=True)  # fmt: skip
        if r.returncode:
            break
    write_report(cfg, plan, info, facts, model, model_bytes)
    print(f"[scale-check] wrote {cfg.out}")
    return all(s.result is not None and s.result.returncode == 0 and within(s) for s in plan)


def within(stage: Stage) -> bool:
    r = stage.result
    return r is not None and (stage.budget is None or max(r.max_rss, r.peak_tree_pss) < stage.budget)


def cache_facts(root: Path) -> dict:
    try:
        c = Manifest.read(root / "cache").counts
    except Exception:  # noqa: BLE001 - a failed dump leaves no manifest: the report says so
        return {}
    tokens = max(c.get("tokens", 0), 1)
    return {
        "samples": c.get("samples", 0),
        "tokens": c.get("tokens", 0),
        "stored_per_token": c.get("stored_bytes", 0) / tokens,
        "raw_per_token": c.get("raw_bytes", 0) / tokens,
        "stored_mb": c.get("stored_bytes", 0) / 1e6,
        "dtype": Manifest.read(root / "cache").dtype,
    }


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.exists() else 0.0


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(cfg: ScaleCheckConfig, plan: list[Stage], info: dict, facts: dict, model: str, nbytes: int) -> None:
    root = cfg.root
    cache, ev = cache_facts(root), read_json(root / "draft" / "eval" / "eval.json")
    draft_cfg = read_json(root / "draft" / "draft" / "config.json")
    lines = [
        f"# Scale check: {REAL_SIZE_NAME} end to end",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory'] / GIB:.1f} GiB memory, "
        f"avx512_bf16 {'yes' if info['avx512_bf16'] else 'no'}, GPU {'yes' if info['gpu'] else 'no'}; "
        f"torch {info['torch']}, transformers {info['transformers']}",
        f"- command: `{' '.join(['just scale-check', *sys.argv[1:]])}` (stages/bench/scale_check.py)",
        f"- target: `{model}`, {nbytes / GIB:.1f} GiB of bf16 weights"
        + (f" (built in {facts['build_s']:.0f} s or found)" if "build_s" in facts else ""),
        f"- clips: {facts.get('clips')} from `{cfg.shard}`",
        "",
        "| stage | dtype | wall s | CPU s | load avg | peak RSS (process) GiB | peak PSS (process tree) GiB "
        "| lowest MemAvailable GiB | budget | within |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dtypes = {"inspect-cache": cache.get("dtype", "-"), "train-draft": "float32 (draft)"}
    for s in plan:
        r = s.result
        if r is None:
            lines.append(f"| {s.name} | | not run | | | | | | {s.budget_text} | |")
            continue
        dtype = dtype_line(root / s.log).removeprefix("dtype: ").split(" (")[0] or dtypes.get(s.name, "-")
        budget = f"{s.budget_text} = {s.budget / GIB:.1f} GiB" if s.budget else "-"
        status = ("yes" if within(s) else "NO") if r.returncode == 0 else f"FAILED (rc {r.returncode})"
        lines.append(
            f"| {s.name} | {dtype} | {r.wall_s:.0f} | {r.cpu_s:.0f} | {r.load:.1f} | {r.max_rss / GIB:.2f} "
            f"| {r.peak_tree_pss / GIB:.2f} "
            f"| {r.min_available / GIB:.1f} | {budget} | {status} |"
        )
    lines += ["", "Dtype choices, as each stage printed them:", ""]
    lines += [f"- {s.name}: `{dtype_line(root / s.log)}`" for s in plan if dtype_line(root / s.log)]
    if cache:
        lines += [
            "",
            f"Cache: {cache['samples']} samples, {cache['tokens']} tokens, {cache['stored_mb']:.1f} MB on disk: "
            f"**{cache['stored_per_token']:.0f} bytes/token stored**, {cache['raw_per_token']:.0f} raw "
            f"({cache['raw_per_token'] / max(cache['stored_per_token'], 1):.2f}x compression).",
        ]
    if draft_cfg:
        sglang, vllm = dir_mb(root / "draft" / "draft"), dir_mb(root / "draft" / "draft-speculators")
        lines += [
            "",
            f"Draft: hidden {draft_cfg.get('hidden_size')}, intermediate {draft_cfg.get('intermediate_size')}, "
            f"heads {draft_cfg.get('num_attention_heads')}/{draft_cfg.get('num_key_value_heads')}, draft vocab "
            f"{draft_cfg.get('draft_vocab_size')} of {draft_cfg.get('vocab_size')}; exports: SGLang "
            f"{sglang:.0f} MB, vLLM speculators {vllm:.0f} MB.",
        ]
    if ev:
        lines += ["", *eval_lines(ev)]
    lines += ["", "Logs: " + ", ".join(f"`{root / s.log}`" for s in plan if s.result is not None) + "."]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines) + "\n")


def eval_lines(ev: dict) -> list[str]:
    rates = ev.get("tokens_per_s", {})
    lines = [
        f"Eval: {ev['samples']} clips, {ev['generated_tokens']} tokens, K={ev.get('config', {}).get('k')}, tau "
        f"{ev['tau']:.2f} (a random target and a draft trained for a few steps: only the mechanics are measured), "
        f"{rates.get('speculative') or 0:.2f} vs {rates.get('plain') or 0:.2f} tokens/s.",
        f'Lossless: **{ev["lossless"]}** under the rule "{ev.get("lossless_rule", "exact")}"; '
        f"{ev.get('exact_samples', '?')} of {ev['samples']} clips equal to plain greedy token for token, "
        f"{len(ev.get('ties', []))} differing by near-ties only, {len(ev['mismatches'])} mismatched.",
    ]
    for item in ev.get("ties", []) + ev["mismatches"]:
        devs = "; ".join(
            f"{'tie' if d['tie'] else 'ERROR'} at token {d['index']}: emitted {d['token']}, argmax {d['greedy']}, "
            f"top logit {d['top_logit']:.3f}, gap {d['gap']:.4f} (tolerance {d['tolerance']:.4f})"
            for d in item.get("deviations", [])
        )
        lines.append(f"- {item['key']}: outputs differ from token {item['index']}: {devs or 'no deviation'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, ScaleCheckConfig)
    cfg = config_from_args(ScaleCheckConfig, p.parse_args(argv), p)
    if not run(cfg):
        sys.exit(f"scale check: a stage failed or exceeded its budget; see {cfg.out}")


if __name__ == "__main__":
    main()
