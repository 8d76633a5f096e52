"""Edit distance and corpus error rates (CER, WER): how the small targets' transcripts, and the audio encoder's CTC
transcripts while it pre-trains, are scored."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions turning one into the other."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rate(references: Sequence[Sequence[Hashable]], hypotheses: Sequence[Sequence[Hashable]]) -> float:
    """Edits summed over the corpus divided by the references' total length (how jiwer and ASR papers count: long
    sentences weigh more). Can exceed 1 when the hypotheses hold many insertions."""
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("the references are empty: no error rate")
    return sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True)) / total
