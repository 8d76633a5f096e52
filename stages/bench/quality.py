"""`just quality`: the whole pipeline on a small trained target, and every draft comparison measured.

    1. train the small target (melody transcription, pipeline/testing/small_target.py; --task speech: English speech,
       stages/bench/quality_speech.py), unless ROOT/target exists or --target names a trained one
    2. fresh clips for the draft (train) and held-out clips (eval), as webdataset shards (speech: a local HF audio
       dataset converted by `make-shards --hf-dataset`, as users bring theirs)
    3. regenerate the train shards' answers with the target itself
    4. dump one cache with every layer captured (and one with fp8 states when a variant trains on it)
    5. train draft variants from that one cache: TTT 7 vs 1, audio embeddings merged / placeholder / mixed,
       draft vocab sizes, auxiliary layer choices, states stored as fp8
    6. speculative decoding of every variant on the held-out clips (lossless-checked), K=7, with the draft's inputs
       as SGLang or vLLM builds them (``eval-draft --serve``): the audio-embeddings variants under both engines
    7. QUALITY.md (speech: QUALITY-speech.md) + quality.png + quality.json: measured tau per variant with a 95%
       bootstrap interval over the held-out clips, the paired difference to the base draft on the same clips, the
       trained-on x served-by matrix, and the offline (teacher-forced) estimate against each measured tau

Each step is the project's own stage run as a user runs it, so the benchmark exercises the real commands.
Finished steps are skipped on a re-run (delete ROOT to start over); a re-run whose settings (clips, steps, ...)
differ from those ROOT/settings.json recorded is refused, since it would report the old outputs as new.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.testing.tone_data import DRAFT_TONES, write_tone_shards  # noqa: E402

BASE = ["--ttt-steps", "7", "--draft-vocab-size", "256", "--layers", "2,4,5"]


@dataclass(frozen=True)
class Variant:
    """One measured row: a draft trained with ``train`` flags (in run ``run``, default: named after the row) from
    the cache whose states are stored as ``states`` (dump-hidden --state-encoding), decoded with its inputs built as
    ``serve`` builds them (eval-draft --serve)."""

    name: str
    train: list[str]
    serve: str = "sglang"
    run: str | None = None
    states: str = "exact"

    @property
    def run_name(self) -> str:
        return self.run or slug(self.name)

    @property
    def eval_dir(self) -> str:
        return f"eval-{self.serve}"


def slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", name.split(" (")[0]).strip("-")


AUDIO_EMBEDS = ("merged", "placeholder", "mixed")


def serving_matrix() -> list[Variant]:
    """Drafts trained on each kind of audio-position input, each decoded as each engine feeds it."""
    return [
        Variant(f"{embeds} embeds, served by {serve}", [*BASE, "--audio-embeds", embeds], serve, f"{embeds}-embeds")
        for embeds in AUDIO_EMBEDS
        for serve in ("sglang", "vllm")
    ]


@dataclass
class QualityPlan:
    """The melody benchmark; stages/bench/quality_speech.py's SpeechQualityPlan overrides the task's parts (target
    task, draft data, variants, report name and notes)."""

    root: Path = Path("runs/quality")
    target_flags: list[str] = field(default_factory=list)  # for train_small_target (defaults: the full one)
    target: Path | None = None  # a trained target directory to use as it is (default: ROOT/target, trained if absent)
    # The draft's data: each next note climbs a third with this chance, else is random (0: random notes only).
    thirds: float = DRAFT_TONES.thirds
    draft_clips: int = 480
    eval_percent: float = 8.0  # held-out clips (by key hash): never trained on; the measured tau is theirs
    draft_steps: int = 240
    max_tokens: int = 4096
    k: int = 7
    max_new_tokens: int = 24  # tunes are at most 16 notes, one token each, then <|im_end|>
    variants: list[Variant] = field(
        default_factory=lambda: [
            *serving_matrix(),
            Variant("ttt1", [*BASE, "--ttt-steps", "1"]),
            Variant("vocab 64", [*BASE, "--draft-vocab-size", "64"]),
            Variant("vocab 1024", [*BASE, "--draft-vocab-size", "1024"]),
            Variant("layers 1,2,3", [*BASE, "--layers", "1,2,3"]),
            Variant("layers 5,6,7", [*BASE, "--layers", "5,6,7"]),
            Variant("fp8 states", BASE, states="fp8"),  # compare with "mixed embeds, served by sglang"
        ]
    )
    baseline: str = "mixed embeds, served by sglang"  # the row every other is compared with (paired, same clips)
    # Run names (Variant.run_name) to train and report, the baseline's always among them; empty: every variant.
    only: tuple[str, ...] = ()
    resamples: int = 2000  # bootstrap resamples of the held-out clips
    command: str = "just quality"  # how the run was started, for the report
    # Stages run side by side: regenerate and dump with this many ranks (torchrun, gloo), and this many drafts trained
    # and evaluated at once, each process with cores/jobs torch threads (small drafts scale poorly over threads).
    jobs: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8))
    task = "melody"  # train_small_target --task
    report_name = "QUALITY.md"
    clip_words = "melody clips"

    def settings(self) -> dict:
        """What ROOT's data, caches and drafts depend on besides the target. Finished steps are skipped on a re-run,
        so a re-run asking for other settings would report old outputs as new ones: check_settings refuses it."""
        names = ("draft_clips", "draft_train_clips", "data_seed", "thirds", "eval_percent", "draft_steps",
                 "max_tokens", "k", "max_new_tokens")  # fmt: skip
        return {"task": self.task, **{n: getattr(self, n) for n in names if hasattr(self, n)}}

    @property
    def threads_per_job(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def target_dir(self) -> Path:
        return self.target or self.root / "target"

    def plan_variants(self, target: Path) -> list[Variant]:
        """The variants to train, once the target exists (a task may size them from its tokenizer)."""
        return self.variants

    def chosen_variants(self, target: Path) -> list[Variant]:
        """plan_variants, narrowed to the runs named in ``only`` (and the baseline's run, which every row is compared
        with). Exits naming the runs there are if ``only`` names another."""
        variants = self.plan_variants(target)
        if not self.only:
            return variants
        names = list(dict.fromkeys(v.run_name for v in variants))
        unknown = [n for n in self.only if n not in names]
        if unknown:
            sys.exit(f"--variants: no run named {', '.join(unknown)}; this task's runs: {', '.join(names)}")
        keep = {*self.only, *(v.run_name for v in variants if v.name == self.baseline)}
        return [v for v in variants if v.run_name in keep]

    def write_draft_data(self, data: Path, target: Path) -> None:
        """data/train/*.tar: the draft's conversations, whose answers regenerate rewrites (a task may fit them to
        the target)."""
        # Transcription turns only (no "How many notes?"): the answers eval-draft generates.
        tones = dataclasses.replace(DRAFT_TONES, thirds=self.thirds)
        write_tone_shards(data / "train", self.draft_clips, seed=1, per_shard=100, cfg=tones)

    def data_words(self) -> str:
        return (f"{self.draft_clips} melodies of 12-16 notes, each note after the first climbing a third with "
                f"chance {self.thirds:.2f}, else random")  # fmt: skip

    def notes(self, target: Path) -> str:
        """Task-specific paragraphs for the report (after the header)."""
        return ""

    def target_scores(self, target: Path) -> dict | None:
        """The target's held-out figures from train_small_target's record (None for a target without one)."""
        record = target_record(target)
        return None if record is None else {k: v for k, v in record["eval"].items() if k != "answers"}

    def train_flags(self) -> list[str]:
        # No DataLoader workers: on a cache this small their start-up each epoch costs more than decoding.
        evals = min(max(80, self.draft_steps // 6), self.draft_steps)  # every 80 steps, at most ~6 times a run
        flags = {"max-steps": self.draft_steps, "max-tokens": self.max_tokens, "lr": 3e-3,
                 "eval-every": evals, "checkpoint-every": 1000, "eval-percent": self.eval_percent,
                 "num-workers": 0}  # fmt: skip
        return [item for name, value in flags.items() for item in (f"--{name}", str(value))]

    @classmethod
    def small(cls, root: Path) -> QualityPlan:
        """The CI-sized run (a few CPU minutes): a briefly trained target, one draft, a few held-out clips."""
        return cls(
            root=root, target_flags=["--steps", "300", "--train-clips", "1200", "--eval-clips", "10"],
            draft_clips=240, eval_percent=8.0, draft_steps=160, variants=[Variant("base", BASE, run="base")],
        )  # fmt: skip


STAGE_SECONDS: dict[str, float] = {}  # what each step of this run took (summed over jobs side by side), for the report
_SECONDS_LOCK = threading.Lock()


def stage(*args: str, ranks: int = 1, threads: int | None = None, log: Path | None = None) -> None:
    """Run a project stage as a user would: ``python -m`` (or torchrun with ``ranks`` processes), with ``threads``
    torch threads each (default: torch's own), its output to the console or appended to ``log``."""
    launch = (
        ["-m"] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m"]
    )
    shown = "python " + " ".join([*launch, *args]) + (f"  (output: {log})" if log else "")
    print(f"$ {'' if threads is None else f'OMP_NUM_THREADS={threads} '}{shown}", flush=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    with open(log, "a") if log else contextlib.nullcontext() as out:
        done = subprocess.run(
            [sys.executable, *launch, *args], env=env, stdout=out, stderr=subprocess.STDOUT if out else None
        )
    if done.returncode:
        sys.exit(f"{args[0]} failed (exit {done.returncode})" + (f": see {log}" if log else ""))
    with _SECONDS_LOCK:
        name = args[0].removeprefix("stages.")
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.time() - started


def run(plan: QualityPlan) -> list[dict]:
    root, started = plan.root, time.time()
    check_settings(root, plan.settings())
    target, data, cache, runs = plan.target_dir(), root / "data", root / "cache", root / "runs"
    if not (target / "config.json").exists():
        if plan.target is not None:
            sys.exit(f"--target {target}: no trained target there (no config.json)")
        stage("stages.bench.train_small_target", str(target), "--task", plan.task, *plan.target_flags)
    check_task(target, plan.task)
    variants = plan.chosen_variants(target)
    if not (data / "train").exists():
        plan.write_draft_data(data, target)
    # Ranks share the cores (one torch thread each); regenerate's answers do not depend on the number of ranks.
    ranks = dict(ranks=plan.jobs, threads=plan.threads_per_job) if plan.jobs > 1 else {}
    stage("stages.regenerate", f"{data}/train/*.tar", str(data / "train-regen"), "--model", str(target),
          "--max-new-tokens", str(plan.max_new_tokens), "--batch-size", "16", **ranks)  # fmt: skip
    for states in sorted({v.states for v in variants} | {"exact"}):
        if dumped(cache_dir(cache, states)):  # finished (maybe with an earlier version's codec defaults): keep it
            continue
        stage("stages.dump_hidden", f"{data}/train-regen/*.tar", str(cache_dir(cache, states)), "--model",
              str(target), "--layers", "1,2,3,4,5,6,7", "--state-encoding", states, **ranks)  # fmt: skip
    draft_runs: dict[str, list[Variant]] = {}  # one training per run, then each of its variants' evaluation
    for variant in variants:
        draft_runs.setdefault(variant.run_name, []).append(variant)
    with ThreadPoolExecutor(plan.jobs) as pool:
        list(pool.map(lambda run_variants: train_and_evaluate(plan, run_variants), draft_runs.values()))
    results, clips = [], {}
    for variant in variants:
        run_dir, eval_dir = runs / variant.run_name, runs / variant.run_name / variant.eval_dir
        measured = json.loads((eval_dir / "eval.json").read_text())
        clips[variant.name] = clip_tokens(measured)
        offline = json.loads((run_dir / "eval.json").read_text())[-1]  # the held-out figures, per engine
        s = variant.serve
        results.append({"variant": variant.name, "serve": s, "tau": measured["tau"],
                        "offline_tau": offline[f"tau_replay_{s}"], "product_tau": offline[f"expected_accept_len_{s}"],
                        "acc_0": offline[f"acc_0_{s}"], "lossless": measured["lossless"],
                        "speedup": measured["tokens_per_s"]["speedup"], "clips": measured["samples"],
                        "cut": cut_clips(measured, plan.max_new_tokens)})  # fmt: skip
    add_intervals(results, clips, plan.baseline, plan.resamples)
    report(plan, results, time.time() - started)
    return results


def train_and_evaluate(plan: QualityPlan, variants: list[Variant]) -> None:
    """Train the draft the ``variants`` share (one run), then evaluate it as each of them is served; steps whose
    outputs exist are skipped. Beside other jobs, each job's output goes to runs/NAME.log."""
    data, runs, target = plan.root / "data", plan.root / "runs", plan.target_dir()
    run_dir = runs / variants[0].run_name
    side = {}
    if plan.jobs > 1:
        runs.mkdir(parents=True, exist_ok=True)
        side = dict(threads=plan.threads_per_job, log=runs / f"{run_dir.name}.log")
    if not (run_dir / "eval.json").exists():  # never trained, or an attempt that died: train from scratch
        stage("stages.train_draft", str(cache_dir(plan.root / "cache", variants[0].states)), "--runs-dir", str(runs),
              "--name", run_dir.name, "--overwrite", *variants[0].train, *plan.train_flags(), **side)  # fmt: skip
    for variant in variants:
        eval_dir = run_dir / variant.eval_dir
        if not (eval_dir / "eval.json").exists():
            # The run's held-out clips: the very samples its offline estimate was computed on.
            stage("stages.eval_draft", str(run_dir), f"{data}/train-regen/*.tar", "--model", str(target),
                  "--split", "eval", "--k", str(plan.k), "--max-new-tokens", str(plan.max_new_tokens),
                  "--out", str(eval_dir), "--serve", variant.serve, **side)  # fmt: skip


def check_settings(root: Path, settings: dict) -> None:
    """Exit with what differs (and what to delete) when ROOT holds outputs (ROOT/data onwards) made with other
    settings than ``settings``; else record them in ROOT/settings.json (a run that failed before writing data, e.g.
    on bad input, leaves nothing to protect)."""
    path = root / "settings.json"
    if path.exists() and (root / "data").exists():
        old = json.loads(path.read_text())
        changed = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            sys.exit(f"{root} holds a run made with other settings ({', '.join(changed)}): delete everything in it "
                     "but target/ (the trained target is reused), or pass another --root")  # fmt: skip
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def target_record(target: Path) -> dict | None:
    """train_small_target's small_target.json of the target (None for a target without one)."""
    path = target / "small_target.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_task(target: Path, task: str) -> None:
    """Refuse a target trained for another task (its small_target.json says which)."""
    record = target_record(target)
    trained = None if record is None else record.get("task", "melody")
    if trained is not None and trained != task:
        sys.exit(f"{target} was trained on the {trained} task, not {task}: pass --task {trained} or another target")


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals over the held-out clips
# ---------------------------------------------------------------------------------------------


def clip_tokens(measured: dict) -> dict[str, tuple[int, int]]:
    """Per held-out clip of an eval.json: (tokens emitted by verify passes, verify passes). eval-draft's tau is the
    sum of the first over the sum of the second (every verify pass weighs the same)."""
    return {s["key"]: (sum(s["accepted_lengths"]), len(s["accepted_lengths"])) for s in measured["per_sample"]}


def resampled_taus(samples: list[dict[str, tuple[int, int]]], keys: list[str], resamples: int, seed: int):
    """tau of each clip set in ``samples`` on the same ``resamples`` bootstrap draws of ``keys`` (paired: every set is
    resampled with the same clips) -> [len(samples), resamples]."""
    draws = np.random.default_rng(seed).integers(len(keys), size=(resamples, len(keys)))
    out = []
    for per_clip in samples:
        tokens, passes = (np.array([per_clip[k][i] for k in keys], dtype=np.float64) for i in (0, 1))
        out.append(tokens[draws].sum(axis=1) / np.maximum(passes[draws].sum(axis=1), 1))
    return np.stack(out)


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval holding ``level`` of the bootstrap values."""
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]


def add_intervals(results: list[dict], clips: dict[str, dict], baseline: str, resamples: int, seed: int = 0) -> None:
    """Give each result its tau's 95% bootstrap interval over its held-out clips (``tau_ci``) and, where it was
    measured on the same clips as the baseline row (the first row when ``baseline`` is absent), the paired difference
    ``diff_vs_base`` = tau - baseline's tau with its interval (``diff_ci``): the clips are resampled together, so the
    clip-to-clip spread both share cancels. An interval excluding 0 is a difference these clips resolve."""
    base = baseline if baseline in clips else results[0]["variant"]
    for r in results:
        mine, theirs = clips[r["variant"]], clips[base]
        keys = sorted(mine)
        own = resampled_taus([mine], keys, resamples, seed)[0]
        r["tau_ci"] = interval(own)
        r["baseline"] = base
        if r["variant"] == base or set(mine) != set(theirs):
            r["diff_vs_base"] = r["diff_ci"] = None
            continue
        pair = resampled_taus([mine, theirs], keys, resamples, seed)
        r["diff_vs_base"] = r["tau"] - clip_tau(theirs)
        r["diff_ci"] = interval(pair[0] - pair[1])


def cut_clips(measured: dict, max_new_tokens: int) -> int:
    """Held-out clips whose answer reached max_new_tokens (a target that loops; regenerate cut them there too, and
    their end-of-turn token is left out of what the draft learns and is replayed on)."""
    return sum(s["new_tokens"] >= max_new_tokens for s in measured["per_sample"])


def clip_tau(per_clip: dict[str, tuple[int, int]]) -> float:
    return sum(t for t, _ in per_clip.values()) / max(sum(p for _, p in per_clip.values()), 1)


def dumped(cache: Path) -> bool:
    manifest = cache / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("complete") is True


def cache_dir(cache: Path, states: str) -> Path:
    """The cache of one state encoding: ROOT/cache (exact, as before) or ROOT/cache-fp8."""
    return cache if states == "exact" else cache.with_name(f"{cache.name}-{states}")


def report(plan: QualityPlan, results: list[dict], seconds: float) -> None:
    out = plan.root
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["variant"].split(" (")[0] + ("" if " served by " in r["variant"] else f" [{r['serve']}]")
             for r in results]  # fmt: skip
    left.barh(names, [r["tau"] for r in results], color="tab:blue")
    left.axvline(4.0, color="k", ls=":", lw=0.8)
    low = [r["tau"] - r["tau_ci"][0] for r in results]
    high = [r["tau_ci"][1] - r["tau"] for r in results]
    left.errorbar([r["tau"] for r in results], names, xerr=[low, high], fmt="none", ecolor="k", capsize=2, lw=0.8)
    left.set(xlabel=f"measured acceptance length tau (K={plan.k}), 95% CI",
             title=f"held-out {plan.clip_words}, lossless")  # fmt: skip
    for key, marker, label in (("offline_tau", "o", "greedy decoding replayed"), ("product_tau", "x", "1 + sum prod")):
        right.scatter([r[key] for r in results], [r["tau"] for r in results], marker=marker, label=label)
    for r, n in zip(results, names, strict=True):
        if abs(r["offline_tau"] - r["tau"]) > 0.02:  # the rest lie on the diagonal, too many to label
            right.annotate(n, (r["offline_tau"], r["tau"]), xytext=(-5, 5), textcoords="offset points", ha="right",
                           fontsize=7)  # fmt: skip
    lim = max(max(r[k] for r in results) for k in ("tau", "offline_tau", "product_tau")) + 0.5
    right.plot([1, lim], [1, lim], "k--", lw=0.8)
    right.set(xlabel="offline estimate from the cache (held-out clips)", ylabel="measured tau (the same clips)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)
    plt.close(fig)
    rows = "\n".join(
        f"| {r['variant']} | {r['serve']} | {r['tau']:.2f} [{r['tau_ci'][0]:.2f}, {r['tau_ci'][1]:.2f}] | "
        f"{_difference(r)} | {r['offline_tau']:.2f} | {r['product_tau']:.2f} | {r['acc_0']:.3f} | "
        f"{r['speedup']:.2f}x | {'yes' if r['lossless'] else 'NO'} |"
        for r in results
    )
    stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in STAGE_SECONDS.items())
    cut = max(r["cut"] for r in results)
    cut_words = (f"{cut} of the held-out clips' answers reached {plan.max_new_tokens} tokens (a target that loops): "
                 "regenerate cut them, and their end-of-turn token is not learned.\n\n") if cut else ""  # fmt: skip
    (out / plan.report_name).write_text(
        f"# Quality benchmark{'' if plan.task == 'melody' else f': {plan.task}'}\n\nCommand: `{plan.command}` "
        f"({seconds / 60:.1f} min, {plan.jobs} {'job' if plan.jobs == 1 else 'jobs side by side'}; minutes per "
        f"stage{'' if plan.jobs == 1 else ', summed over jobs'}: {stages}; a stage whose outputs existed was skipped). "
        f"K={plan.k}; every draft measured on its run's held-out clips "
        f"({plan.eval_percent:g}% of the keys, {results[0]['clips']} clips, never trained on), at most "
        f"{plan.max_new_tokens} new tokens, every output checked equal to plain greedy.\n"
        f"Draft data: {plan.data_words()}; answers regenerated by the target. {plan.draft_steps} draft steps.\n\n"
        f"{plan.notes(plan.target_dir())}{cut_words}"
        f"{serving_table(results)}"
        f"{_interval_words(plan, results)}"
        "| variant | served by | measured tau [95% CI] | vs base [95% CI] | offline: decoding replayed | "
        "offline: 1 + sum prod cond_acc | held-out acc_0 | speed vs plain greedy | lossless |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n![quality](quality.png)\n"
    )
    target = plan.target_dir()
    summary = {"minutes": seconds / 60, "task": plan.task, "target": str(target),
               "target_scores": plan.target_scores(target), "results": results}  # fmt: skip
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    print((out / plan.report_name).read_text())


def _difference(r: dict) -> str:
    if r["variant"] == r["baseline"]:
        return "(base)"
    if r["diff_vs_base"] is None:
        return "- (other clips)"
    lo, hi = r["diff_ci"]
    verdict = "" if lo <= 0 <= hi else " *"
    return f"{r['diff_vs_base']:+.2f} [{lo:+.2f}, {hi:+.2f}]{verdict}"


def _interval_words(plan: QualityPlan, results: list[dict]) -> str:
    return (
        f"Intervals: 95% percentile bootstrap over the held-out clips ({plan.resamples} resamples, seed 0; tau of a "
        'resample = tokens emitted by its verify passes / its verify passes, as eval-draft counts). "vs base": '
        f"tau minus the base row's ({results[0]['baseline']}) on the same clips, resampled in pairs; * marks an "
        "interval that excludes 0, a difference these clips resolve.\n\n"
    )


def serving_table(results: list[dict]) -> str:
    """The trained-on x served-by matrix (measured tau, offline replay in brackets) and the mixed draft against the
    draft trained for each engine; empty when the run has no such rows."""
    cell = {(r["variant"].split(" embeds")[0], r["serve"]): r for r in results if " embeds, served by " in r["variant"]}
    if not cell:
        return ""
    lines = ["## Which engine: what the draft reads at audio positions\n",
             "Measured tau (offline replay in brackets), the same held-out clips, K=7:\n",
             "| trained on \\ served by | SGLang (merged) | vLLM (placeholder) |", "|---|---|---|"]  # fmt: skip
    for embeds in AUDIO_EMBEDS:
        row = [cell.get((embeds, s)) for s in ("sglang", "vllm")]
        lines.append(f"| {embeds} | " + " | ".join(
            f"{r['tau']:.2f} ({r['offline_tau']:.2f})" if r else "-" for r in row) + " |")  # fmt: skip
    for serve, matched in (("sglang", "merged"), ("vllm", "placeholder")):
        mixed, best = cell.get(("mixed", serve)), cell.get((matched, serve))
        if mixed and best:
            lines.append(f"\nmixed under {serve}: {mixed['tau'] / best['tau']:.3f}x the draft trained for it "
                         f"({matched}); goal >= 0.97x")  # fmt: skip
    return "\n".join(lines) + "\n\n## Every variant\n\n"


def main(argv: list[str] | None = None) -> None:
    from stages.bench.quality_speech import SpeechQualityPlan  # it builds on this module

    plans: dict[str, type[QualityPlan]] = {"melody": QualityPlan, "speech": SpeechQualityPlan}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=plans, default="melody", help="melody (default) or speech")
    p.add_argument("--root", type=Path, help="output directory (default: runs/quality, speech: runs/quality-speech)")
    p.add_argument("--target", type=Path, help="a trained target directory to use as it is (default: ROOT/target, "
                   "trained first when absent)")  # fmt: skip
    p.add_argument("--draft-steps", type=int, help="draft training steps (default: the task's)")
    p.add_argument("--thirds", type=float, default=QualityPlan.thirds, help="melody only; 0: random notes")
    p.add_argument("--draft-train-clips", type=int, help="speech only: add clips of the train split's sentences to "
                   "the draft's data (default: the plan's; only held-out sentences are evaluated)")  # fmt: skip
    p.add_argument("--small", action="store_true", help="the CI-sized run (briefly trained target, one draft)")
    p.add_argument("--jobs", type=int, help="processes side by side: ranks of regenerate and dump, drafts trained and "
                   "evaluated at once (default: the CPU cores, at most 8; 1: one stage at a time)")  # fmt: skip
    p.add_argument("--variants", help="comma-separated run names to train and report (e.g. base,ttt1; the baseline's "
                   "run is always included; default: every variant)")  # fmt: skip
    a = p.parse_args(argv)
    kind = plans[a.task]
    root = a.root or kind.root
    plan = kind.small(root) if a.small else kind(root=root)
    command = " ".join(["just quality", *(argv if argv is not None else sys.argv[1:])])
    changes = {"target": a.target, "thirds": a.thirds, "command": command}
    if a.jobs is not None:
        if a.jobs < 1:
            p.error(f"--jobs must be 1 or more, got {a.jobs}")
        changes["jobs"] = a.jobs
    if a.variants is not None:
        changes["only"] = tuple(n for n in a.variants.split(",") if n)
    if a.draft_steps is not None:
        changes["draft_steps"] = a.draft_steps
    if a.draft_train_clips is not None:
        if not hasattr(plan, "draft_train_clips"):
            p.error(f"--draft-train-clips: the {a.task} task has no train-split clips (speech has)")
        if a.draft_train_clips < 0:  # refused before a target is trained (~30 CPU minutes), not after
            p.error(f"--draft-train-clips must be 0 or more, got {a.draft_train_clips}")
        changes["draft_train_clips"] = a.draft_train_clips
    run(dataclasses.replace(plan, **changes))


if __name__ == "__main__":
    main()
