"""The quality benchmark at CI size: a small trained target (the melody one shipped in data/, a briefly trained speech
one), its own answers regenerated, one cache, one EAGLE-3 draft, speculative decoding on held-out clips. Outputs
must equal greedy and the draft must pay off."""

from __future__ import annotations

import json

import pytest

from pipeline.inputs.split import in_split
from pipeline.testing.speech_target import TARGET_SPEECH
from stages.bench.quality import QualityPlan, add_intervals, check_settings
from stages.bench.quality_speech import target_speech
from tests.conftest import REPO, run_stage
from tests.test_speech_data import needs_espeak, needs_fortunes


def test_bootstrap_intervals_and_paired_differences():
    # 30 clips of (tokens, verify passes): "same" is base itself, "better" one more token per pass on every clip,
    # "noise" base with two clips' passes swapped for others'.
    base = {f"c{i}": (3 * (i % 5) + 10, 5 + i % 3) for i in range(30)}
    better = {k: (t + p, p) for k, (t, p) in base.items()}
    noise = {**base, "c0": base["c1"], "c1": base["c0"]}
    clips = {"base": base, "same": dict(base), "better": better, "noise": noise, "other clips": {"x": (4, 2)}}
    tau = {n: sum(t for t, _ in c.values()) / sum(p for _, p in c.values()) for n, c in clips.items()}
    results = [{"variant": n, "tau": tau[n]} for n in clips]
    add_intervals(results, clips, "base", resamples=1000)
    r = {x["variant"]: x for x in results}
    for x in results:
        lo, hi = x["tau_ci"]
        assert lo <= x["tau"] <= hi and x["baseline"] == "base"
    assert r["base"]["diff_vs_base"] is None and r["other clips"]["diff_vs_base"] is None
    assert r["same"]["diff_vs_base"] == 0.0 and r["same"]["diff_ci"] == [0.0, 0.0]
    assert r["better"]["diff_vs_base"] == pytest.approx(1.0) and r["better"]["diff_ci"][0] > 0.9
    lo, hi = r["noise"]["diff_ci"]
    assert lo <= 0 <= hi  # a difference these clips do not resolve
    again = [{"variant": n, "tau": tau[n]} for n in clips]
    add_intervals(again, clips, "base", resamples=1000)
    assert again == results  # seeded


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    # Finished steps are skipped on a re-run, so other settings would be reported over old drafts.
    plan = QualityPlan(root=tmp_path / "quality")
    longer = QualityPlan(root=plan.root, draft_steps=1200)
    check_settings(longer.root, longer.settings())
    check_settings(plan.root, plan.settings())  # no outputs yet (a run that failed early): the new settings replace
    (plan.root / "data").mkdir()  # the run wrote its draft data
    check_settings(plan.root, plan.settings())  # the same settings: resumes
    with pytest.raises(SystemExit, match=r"draft_steps 240 -> 1200\): delete everything in it but target/"):
        check_settings(longer.root, longer.settings())
    assert json.loads((plan.root / "settings.json").read_text())["draft_steps"] == 240  # the first run's, kept


def test_variants_narrows_the_runs_and_keeps_the_baseline(tmp_path):
    plan = QualityPlan(root=tmp_path, only=("ttt1",))
    assert [v.name for v in plan.chosen_variants(tmp_path)] == [
        v.name for v in plan.variants if v.run_name in {"ttt1", "mixed-embeds"}
    ]
    assert plan.baseline in [v.name for v in plan.chosen_variants(tmp_path)]
    assert QualityPlan(root=tmp_path).chosen_variants(tmp_path) == QualityPlan(root=tmp_path).variants
    with pytest.raises(SystemExit, match=r"no run named tt1; this task's runs: .*ttt1"):
        QualityPlan(root=tmp_path, only=("tt1",)).chosen_variants(tmp_path)


@pytest.mark.slow
def test_small_quality_run_is_lossless_and_the_draft_is_accepted(tmp_path):
    root = tmp_path / "quality"
    # The shipped target (data/melody-target): training one here would cost CI ~4 CPU minutes more.
    # Two jobs: regenerate and dump as two torchrun ranks, the draft's stages logged to runs/base.log.
    run_stage("stages.bench.quality", "--small", "--root", str(root), "--target", str(REPO / "data/melody-target"),
              "--jobs", "2")  # fmt: skip
    report = json.loads((root / "quality.json").read_text())
    (base,) = report["results"]
    assert len(list((root / "data" / "train-regen").glob("*.tar"))) == len(
        list((root / "data" / "train").glob("*.tar"))
    )
    log = (root / "runs" / "base.log").read_text()
    assert "step 160 eval:" in log and "samples: tau" in log, log[-2000:]  # the draft's training, then its eval
    assert "2 jobs side by side" in (root / "QUALITY.md").read_text()
    assert base["lossless"] is True
    assert base["tau"] > 3.0, base  # tokens per verify pass; 1.0 means the draft never helped
    # Measured on the run's held-out clips, whose cached answers are the target's greedy ones: the offline replay
    # from the cache is the measurement itself.
    assert base["offline_tau"] == pytest.approx(base["tau"], abs=1e-6), base
    assert base["product_tau"] > base["tau"]  # the independence estimate overshoots
    lo, hi = base["tau_ci"]
    assert lo <= base["tau"] <= hi, base
    assert (root / "quality.png").stat().st_size > 0 and "| base |" in (root / "QUALITY.md").read_text()


@pytest.mark.slow
@needs_espeak
@needs_fortunes
def test_small_speech_quality_run_is_lossless_and_replays_exactly(tmp_path):
    # Speech clips as users bring them: an HF audio dataset converted by make-shards --hf-dataset (~3 CPU minutes).
    root = tmp_path / "quality-speech"
    run_stage("stages.bench.quality", "--task", "speech", "--small", "--root", str(root), "--jobs", "1")
    report = json.loads((root / "quality.json").read_text())
    assert report["task"] == "speech" and report["target_scores"]["wer"] >= 0, report["target_scores"]
    # --small keeps the run "base": its one draft, evaluated as SGLang and as vLLM serve it.
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"base", "base, served by vllm"}, rows
    base, vllm = rows["base"], rows["base, served by vllm"]
    assert vllm["lossless"] is True and vllm["clips"] == base["clips"], vllm
    assert base["clips"] >= 5 and base["lossless"] is True, base
    assert base["cut"] == 0, base  # no answer reached max_new_tokens: the target ends every answer
    assert base["offline_tau"] == pytest.approx(base["tau"], abs=1e-6), base
    assert base["tau"] > 2.0, base  # 5.92 when written: the target answers with one of 4 memorised sentences
    lo, hi = base["tau_ci"]
    assert 1.0 <= lo <= base["tau"] <= hi <= 8.0, base  # K=7: at most 8 tokens per verify pass
    text = (root / "QUALITY-speech.md").read_text()
    assert "| base | sglang |" in text and f"[{lo:.2f}, {hi:.2f}]" in text and "WER" in text and "3.51" in text
    assert (root / "quality.png").stat().st_size > 0
    # The draft's clips are spoken as the target heard its training (its voices, rates, pitches, longest clip), not
    # with the corpus's wider defaults, on which the target's answers are worse.
    from datasets import load_from_disk

    speech = target_speech(root / "target")
    assert speech == TARGET_SPEECH  # what the CI-sized target was trained on
    heldout = load_from_disk(str(root / "data" / "hf")).remove_columns("audio")
    train = load_from_disk(str(root / "data" / "hf-train")).remove_columns("audio")
    for clip in [*heldout, *train]:
        assert clip["voice"] in {v + variant for v in speech.voices for variant in speech.variants}, clip
        assert speech.rate_wpm[0] <= clip["rate"] <= speech.rate_wpm[1] and clip["seconds"] <= speech.max_seconds
    # Clips of the train split's sentences train the draft but are never evaluated: the held-out sentences alone are.
    assert {c["split"] for c in heldout} == {"heldout"} and {c["split"] for c in train} == {"train"}
    assert 8 <= len(train) < 16 and not any(in_split(c["key"], "eval", 25.0) for c in train), len(train)
    measured = json.loads((root / "runs" / "base" / "eval-sglang" / "eval.json").read_text())
    assert {s["key"] for s in measured["per_sample"]} == {c["key"] for c in heldout if in_split(c["key"], "eval", 25.0)}
