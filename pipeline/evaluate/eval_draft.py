"""Evaluate an exported EAGLE-3 draft by real speculative decoding with its target (greedy, batch size 1).

Each sample's conversation is cut before its first assistant answer and the target generates instead. Both
speculative decoding and the target's plain greedy decoding run on every sample and must agree: token for token in
float32; in bf16/fp16 every emitted token must be the target's one-token greedy choice on its own prefix or a
near-tie within the dtype's resolution (``lossless``: the rule, ties reported with their gaps). A mismatch is a bug,
reported with the sample key and every deviation, and ``run_eval`` raises, after writing ``eval.json`` (mean
acceptance length tau, acceptance per draft position, target forwards per token, tokens/s of both) and
``eval.png``.

The draft is a training run (runs/<name>, whose SGLang export runs/<name>/draft is used; its samples are then the
run's held-out split) or an SGLang export directory.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import torch

from pipeline.draft.export import CONFIG, load_sglang_export
from pipeline.draft.model import Eagle3Draft
from pipeline.draft.serving import Engine, ServingRecord, check_engine
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate.lossless import EXACT_DTYPES, TIE_ULPS, check_output
from pipeline.evaluate.speculative import GreedyResult, SpecConfig, SpecResult, plain_greedy, speculative_generate
from pipeline.inputs.audio import AudioError, AudioPolicy, decode_audio
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.shards import expand_shard_urls, iter_raw_samples
from pipeline.inputs.split import in_split
from pipeline.settings import setting
from pipeline.targets import AudioTarget, TargetInputs, load_target
from pipeline.targets.dtype import resolve_dtype

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

WARMUP_TOKENS = 8  # one short untimed run of each decoder first, so tokens/s excludes first-call costs


@dataclass
class EvalConfig:
    draft: str = setting(help="a training run (runs/<name>) or an SGLang draft export directory")
    shards: str = setting(help="webdataset shards: path, glob, brace pattern {000..009}, comma list or URL")
    model: str | None = setting(
        None, "the target: an alias (tiny), an HF id or a local directory (default: the export's target)"
    )
    limit: int | None = setting(None, "evaluate at most this many samples")
    k: int = setting(7, "draft tokens proposed per round")
    max_new_tokens: int = setting(64, "longest answer generated per sample")
    out: str | None = setting(None, "output directory (default: RUN/eval, or DRAFT_DIR-eval for a bare export)")
    split: Literal["auto", "eval", "all"] = setting(
        "auto", "eval: the run's held-out keys; all: every sample; auto: eval when a run directory is given"
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = setting(
        None, "target and draft dtype (default: bfloat16 on GPU; on CPU float32 if its weights fit in free memory)"
    )
    device: str | None = setting(None, "default: cuda if available, else cpu")
    max_length: int = setting(2048, "prompt token limit, as in dump-hidden")
    tie_ulps: float = setting(
        TIE_ULPS,
        "bf16/fp16 only (float32 must match exactly): an emitted token whose logit is within this many ulps of the "
        "dtype at |top logit| of the target's argmax is a floating-point near-tie, reported, not a failure",
    )
    serve: Literal["sglang", "vllm"] | None = setting(
        None,
        "decode as this engine feeds the draft (at audio positions: sglang the merged audio embeddings, vllm the "
        "placeholder's; see pipeline/draft/serving.py); default: the engine the draft was trained for",
    )

    def __post_init__(self) -> None:
        if self.tie_ulps < 0:  # a negative tolerance would call every bf16 near-tie a failure
            raise ValueError(f"tie_ulps must be >= 0 (0: only exact ties), got {self.tie_ulps}")


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """-> (the SGLang export directory, the run directory holding it or None)."""
    path = Path(path)
    if (path / "draft" / CONFIG).exists():
        return path / "draft", path
    if (path / CONFIG).exists() and "architectures" in json.loads((path / CONFIG).read_text()):
        run_config = path.parent / "config.json"
        is_run = run_config.exists() and "train" in json.loads(run_config.read_text())
        return path, path.parent if is_run else None
    raise ConfigError(f"{path} is neither a training run (with draft/{CONFIG}) nor an SGLang draft export")


def held_out_percent(run: Path | None, split: str) -> float | None:
    """The run's eval percent when only its held-out keys are wanted, else None (every sample)."""
    if split == "all" or (split == "auto" and run is None):
        return None
    if run is None:
        raise ConfigError("--split eval needs a training run directory (its config says which keys were held out)")
    return float(json.loads((run / "config.json").read_text())["train"]["eval_percent"])


def check_fits(draft: Eagle3Draft, target: AudioTarget) -> None:
    c = draft.config
    problems = []
    if c.target_hidden_size != target.hidden_size:
        problems.append(f"the draft reads hidden size {c.target_hidden_size}, the target has {target.hidden_size}")
    if c.vocab_size != target.vocab_size:
        problems.append(f"the draft's target vocab is {c.vocab_size}, the target's {target.vocab_size}")
    if max(c.aux_layers) > target.num_layers:
        problems.append(f"aux layers {c.aux_layers} exceed the target's {target.num_layers} layers")
    if problems:
        raise ConfigError(f"the draft does not fit {target.name_or_path}: " + "; ".join(problems))


def iter_prompts(
    target: AudioTarget, cfg: EvalConfig, eval_percent: float | None, skipped: list[dict]
) -> Iterator[tuple[str, TargetInputs]]:
    """(key, the conversation up to its first assistant answer) of the wanted samples in shard order; unusable
    ones go to ``skipped`` with a reason."""
    taken = 0
    for url in expand_shard_urls(cfg.shards):
        for raw in iter_raw_samples(url):
            if cfg.limit is not None and taken >= cfg.limit:
                return
            if eval_percent is not None and not in_split(raw.key, "eval", eval_percent):
                continue
            try:
                messages = parse_conversations(raw.json)
                if raw.audio is None:
                    raise BadSample("missing audio member")
                wave = decode_audio(raw.audio, AudioPolicy(), raw.audio_ext)
                first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                prompt = target.generation_inputs(messages[:first_answer], wave, cfg.max_length)
            except (BadSample, AudioError) as err:
                skipped.append({"key": raw.key, "reason": str(err)})
                continue
            taken += 1
            yield raw.key, prompt


def diagnose(target: AudioTarget, prompt: TargetInputs, spec: list[int], plain: list[int], tie_ulps: float) -> dict:
    """Where two outputs first differ, and every deviation of the speculative output from the target's one-token
    greedy choices on its own prefix (``lossless.check_output``), ties included; ``lossless``: within the dtype's
    rule (float32: never, once the outputs differ; bf16/fp16: every deviation a near-tie)."""
    i = next((j for j, (a, b) in enumerate(zip(spec, plain, strict=False)) if a != b), min(len(spec), len(plain)))
    check = check_output(target, prompt, spec, tie_ulps)
    first = check.deviations[0] if check.deviations else None
    return {
        "index": i,
        "speculative": spec[i : i + 4],
        "plain": plain[i : i + 4],
        "logit_gap": first.gap if first else None,
        "top_logit": first.top_logit if first else None,
        "deviations": check.as_dict()["deviations"],
        "lossless": target.dtype not in EXACT_DTYPES and not check.errors,
    }


def lossless_rule(target: AudioTarget, tie_ulps: float) -> str:
    dtype = str(target.dtype).removeprefix("torch.")
    if target.dtype in EXACT_DTYPES:
        return f"exact: {dtype} output equal to plain greedy token for token"
    return (
        f"{dtype}: every emitted token the target's one-token greedy choice on its own prefix, or within "
        f"{tie_ulps:g} ulps of {dtype} at |top logit| of it (a near-tie, listed under 'ties')"
    )


def describe_difference(report: dict) -> str:
    """One line: where the outputs differ and whether each deviation is a near-tie."""
    devs = report["deviations"]
    shown = ", ".join(
        f"{'tie' if d['tie'] else 'ERROR'} at {d['index']} (gap {d['gap']:.4g}, tolerance {d['tolerance']:.4g}, "
        f"top {d['top_logit']:.4g})"
        for d in devs[:4]
    )
    head = "differs from plain greedy (near-ties only)" if report["lossless"] else "MISMATCH"
    return f"{head} from token {report['index']}: " + (shown or "every token the one-token greedy choice")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # None, not NaN: eval.json stays strict JSON


def summarise(cfg: EvalConfig, results: list[tuple[str, SpecResult, GreedyResult]]) -> dict:
    """Totals over samples: tau is averaged over verify passes, tokens/s is total tokens over total time."""
    specs, plains = [s for _, s, _ in results], [p for _, _, p in results]
    lengths = [n for s in specs for n in s.accepted_lengths]
    proposed, accepted, reached = ([sum(getattr(s, f)[j] for s in specs) for j in range(cfg.k)]
                                   for f in ("proposed", "accepted", "reached"))  # fmt: skip
    tokens, forwards = sum(len(s.tokens) for s in specs), sum(s.target_forwards for s in specs)
    spec_s, plain_s = sum(s.wall_s for s in specs), sum(p.wall_s for p in plains)
    spec_rate, plain_rate = _ratio(tokens, spec_s), _ratio(sum(len(p.tokens) for p in plains), plain_s)
    return {
        "tau": _ratio(sum(lengths), len(lengths)),
        "verify_passes": len(lengths),
        "acceptance_rate": [_ratio(a, p) for a, p in zip(accepted, proposed, strict=True)],
        "conditional_acceptance": [_ratio(a, r) for a, r in zip(accepted, reached, strict=True)],
        "proposed_per_position": proposed,
        "accepted_length_histogram": {str(n): c for n, c in sorted(Counter(lengths).items())},
        "generated_tokens": tokens,
        "target_forwards": forwards,
        "target_forwards_per_token": _ratio(forwards, tokens),
        "tokens_per_s": {
            "speculative": spec_rate,
            "plain": plain_rate,
            "speedup": _ratio(spec_rate, plain_rate) if spec_rate is not None else None,
        },
        "draft_time_fraction": _ratio(sum(s.draft_s for s in specs), spec_s),
    }


def plot(summary: dict, k: int, path: Path, title: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = list(range(1, k + 1))
    rate = [r if r is not None else 0.0 for r in summary["acceptance_rate"]]
    cond = [r if r is not None else float("nan") for r in summary["conditional_acceptance"]]
    left.bar(positions, rate, color="tab:blue", label="accepted | proposed")
    left.plot(positions, cond, marker="o", color="black", label="accepted | earlier accepted")
    left.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.05), xticks=positions, title=title)
    left.legend(fontsize=8)
    hist = {int(n): c for n, c in summary["accepted_length_histogram"].items()}
    lengths = list(range(1, k + 2))
    right.bar(lengths, [hist.get(n, 0) for n in lengths], color="tab:green")
    tau = summary["tau"]
    right.set(
        xlabel="tokens per verify pass (accepted + bonus)",
        ylabel="verify passes",
        xticks=lengths,
        title=f"tau = {tau:.3f}" if tau is not None else "no verify pass",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def serving_engine(draft_dir: Path, wanted: str | None) -> Engine:
    """The engine to emulate: ``wanted``, or the one the draft was trained for; warns on a mismatch."""
    record = ServingRecord.from_config(json.loads((draft_dir / CONFIG).read_text()))
    if record is None:  # exported before drafts recorded what they were trained on
        return check_engine(wanted or "sglang")
    engine = check_engine(wanted or record.engines[0])
    warning = record.warning(engine)
    if warning:
        print(warning, flush=True)
    return engine


def load(cfg: EvalConfig) -> tuple[AudioTarget, Eagle3Draft, str]:
    """-> (the target adapter, the draft on its device in its dtype, the target's name)."""
    draft_dir, _ = locate(cfg.draft)
    model = cfg.model or json.loads((draft_dir / CONFIG).read_text()).get("target_name_or_path")
    if not model:
        raise ConfigError(f"{draft_dir / CONFIG} names no target: pass --model")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(model, resolve_dtype(cfg.dtype, device, model), device)
    draft = load_sglang_export(draft_dir).to(target.device).eval()
    for module in (draft.fc, draft.midlayer, draft.norm, draft.lm_head):
        module.to(target.dtype)  # the served dtype; RoPE's inv_freq stays float32, as in training
    check_fits(draft, target)
    return target, draft, model


def sample_record(key: str, prompt: TargetInputs, spec: SpecResult, plain: GreedyResult, target: AudioTarget) -> dict:
    return {
        "key": key,
        "lossless": spec.tokens == plain.tokens,  # or, in bf16/fp16, every difference a near-tie (run_eval)
        "exact": spec.tokens == plain.tokens,
        "prompt_tokens": len(prompt.input_ids),
        "new_tokens": len(spec.tokens),
        "tau": spec.tau if spec.accepted_lengths else None,
        "accepted_lengths": spec.accepted_lengths,
        "target_forwards": spec.target_forwards,
        "speculative_tokens_per_s": spec.tokens_per_s,
        "plain_tokens_per_s": plain.tokens_per_s,
        "text": target.decode(spec.tokens, skip_special_tokens=False),
    }


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate, write eval.json and eval.png, and return the report; raises ``PipelineError`` on a mismatch."""
    draft_dir, run = locate(cfg.draft)
    target, draft, model = load(cfg)
    eval_percent = held_out_percent(run, cfg.split)
    out = Path(cfg.out) if cfg.out else (run / "eval" if run else draft_dir.with_name(draft_dir.name + "-eval"))
    out.mkdir(parents=True, exist_ok=True)
    serve = serving_engine(draft_dir, cfg.serve)
    spec_cfg = SpecConfig(cfg.k, cfg.max_new_tokens, serve=serve)

    skipped: list[dict] = []
    results: list[tuple[str, SpecResult, GreedyResult]] = []
    per_sample, mismatches, ties = [], [], []
    for key, prompt in iter_prompts(target, cfg, eval_percent, skipped):
        if not results:  # warm-up, untimed
            plain_greedy(target, prompt, WARMUP_TOKENS)
            speculative_generate(target, draft, prompt, cfg=SpecConfig(cfg.k, WARMUP_TOKENS))
        plain = plain_greedy(target, prompt, cfg.max_new_tokens)
        spec = speculative_generate(target, draft, prompt, cfg=spec_cfg)
        results.append((key, spec, plain))
        per_sample.append(sample_record(key, prompt, spec, plain, target))
        verdict = ""
        if spec.tokens != plain.tokens:
            report = {"key": key, **diagnose(target, prompt, spec.tokens, plain.tokens, cfg.tie_ulps)}
            (ties if report["lossless"] else mismatches).append(report)
            per_sample[-1]["lossless"] = report["lossless"]
            verdict = "  " + describe_difference(report)
        tau = f"{spec.tau:.2f}" if spec.accepted_lengths else "-"
        print(
            f"{key}: {len(spec.tokens)} tokens, tau {tau}, {spec.target_forwards} target forwards, "
            f"{spec.tokens_per_s:.1f} vs {plain.tokens_per_s:.1f} tok/s{verdict}",
            flush=True,
        )
    if not results:
        raise ConfigError(
            f"no usable sample in {cfg.shards}"
            + (f" in the run's held-out split ({eval_percent}%): try --split all" if eval_percent is not None else "")
            + (f"; skipped: {skipped[:5]}" if skipped else "")
        )

    summary = summarise(cfg, results)
    report = {
        "draft": str(draft_dir),
        "run": str(run) if run else None,
        "model": model,
        "shards": cfg.shards,
        "split": "all" if eval_percent is None else f"held-out ({eval_percent}%)",
        "serve": serve,
        "config": asdict(cfg),
        "device": str(target.device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "samples": len(results),
        "skipped": skipped,
        "lossless": not mismatches,
        "lossless_rule": lossless_rule(target, cfg.tie_ulps),
        "exact_samples": sum(s["exact"] for s in per_sample),
        "mismatches": mismatches,
        "ties": ties,
        **summary,
        "per_sample": per_sample,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(summary, cfg.k, out / "eval.png", f"{draft_dir.parent.name}/{draft_dir.name}: K={cfg.k}")
    rates = summary["tokens_per_s"]
    print(
        f"{len(results)} samples: tau {summary['tau']}, acceptance by position "
        + " ".join(f"{r:.2f}" if r is not None else "-" for r in summary["acceptance_rate"])
        + f", {summary['target_forwards_per_token']:.3f} target forwards per token, "
        f"{rates['speculative']:.1f} vs {rates['plain']:.1f} tok/s (x{rates['speedup']:.2f}); wrote {out}/eval.json"
    )
    if mismatches:
        keys = ", ".join(m["key"] for m in mismatches)
        raise PipelineError(f"speculative output differs from plain greedy on {len(mismatches)} sample(s): {keys}; "
                            f"see {out / 'eval.json'} 'mismatches'")  # fmt: skip
    return report
