"""PNG plots of a training run: per-step acceptance of the draft over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_acceptance(history: list[dict], path: Path, title: str) -> None:
    """``history``: dicts with ``step``, ``acc_k``, ``tau_replay`` and ``expected_accept_len`` from evaluations."""
    if not history:
        return
    steps = [h["step"] for h in history]
    ks = sorted(int(k.split("_")[1]) for k in history[0] if k.startswith("acc_"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k in ks:
        left.plot(steps, [h[f"acc_{k}"] for h in history], marker="o", label=f"step {k}")
    left.set(xlabel="training step", ylabel="acc_k (argmax agrees with the target)", ylim=(0, 1), title=title)
    left.legend(fontsize=7)
    right.plot(steps, [h["tau_replay"] for h in history], marker="o", color="black", label="greedy decoding replayed")
    right.plot(steps, [h["expected_accept_len"] for h in history], marker=".", ls=":", label="1 + sum_k prod cond_acc")
    right.set(xlabel="training step", ylabel="acceptance length from the cache (tau)", title="offline tau")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
