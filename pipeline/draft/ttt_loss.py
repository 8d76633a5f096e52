"""EAGLE-3's training-time test (TTT): unroll the draft K steps on its own hidden states and score every step.

Alignment (row t of the batch is one drafting chain):
    step 0: hidden = fc(aux states of token t), input embedding of token t+1, predicts token t+2
    step k: hidden = the draft's own step k-1 output for row t, embedding of token t+1+k, predicts token t+2+k
The teacher for step k at row t is the target's distribution at position t+1+k (it predicts token t+2+k). Step k
counts at row t only where token t+2+k is an assistant token (loss mask) and the target's top token there is in
the draft vocab. Loss: soft cross-entropy against the teacher, mean over counted rows, weighted ``decay**k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.draft.model import Eagle3Draft, TTTCache
from pipeline.draft.rows import rows_where, take
from pipeline.draft.teacher import Teacher, TeacherOutput


def shift_left(x: torch.Tensor, s: int) -> torch.Tensor:
    """x[:, s:] padded with zeros to the same length: row t now holds what row t+s held."""
    if s == 0:
        return x
    pad = torch.zeros_like(x[:, :s])
    return torch.cat([x[:, s:], pad], dim=1)


# "supervised": rows whose predicted token is an answer token, drafts possible or not (``rows`` counts only those
# whose target top token is in the draft vocab).
FIELDS = ("loss", "kl", "rows", "correct", "chain_rows", "chain_correct", "supervised")


@dataclass
class StepStats:
    """Per-step sums over rows (``FIELDS`` x K steps); sums add across batches and ranks, means come last.

    ``chain_rows``/``chain_correct`` count only rows whose earlier steps were all right: their ratio is the
    conditional acceptance of step k, the quantity speculative decoding's acceptance length is made of.
    """

    sums: torch.Tensor  # [len(FIELDS), K] float64

    @classmethod
    def zeros(cls, steps: int) -> StepStats:
        return cls(torch.zeros(len(FIELDS), steps, dtype=torch.float64))

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(self.sums + other.sums)

    def summary(self) -> dict[str, float]:
        """loss_k, kl_k, acc_k, cond_acc_k, the teacher-forced acceptance length 1 + sum_k prod_{j<=k} cond_j, and
        ``vocab_coverage``: the share of answer tokens whose target top token the draft vocab holds. acc_k counts
        only those rows, so a draft vocab that misses what the target says shows here, not in acc_k."""
        loss, kl, rows, correct, chain_rows, chain_correct, supervised = self.sums.tolist()
        out, survive, tau = {}, 1.0, 1.0
        for k in range(len(rows)):
            out[f"loss_{k}"] = loss[k] / max(rows[k], 1)
            out[f"kl_{k}"] = kl[k] / max(rows[k], 1)  # loss minus the teacher's entropy: what can still fall
            out[f"acc_{k}"] = correct[k] / max(rows[k], 1)
            out[f"cond_acc_{k}"] = chain_correct[k] / max(chain_rows[k], 1)
            survive *= out[f"cond_acc_{k}"]
            tau += survive
        out["expected_accept_len"] = tau
        out["vocab_coverage"] = rows[0] / max(supervised[0], 1)
        return out


class TrainingTimeTest(nn.Module):
    """The draft unrolled ``steps`` times with its loss: the module DDP wraps (the teacher stays outside it, so
    its large lm_head is never broadcast as a buffer)."""

    def __init__(self, draft: Eagle3Draft, steps: int, decay: float = 0.8):
        super().__init__()
        self.draft, self.steps, self.decay = draft, steps, decay

    def forward(self, batch: dict, target: TeacherOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weighted loss, per-step sums [len(FIELDS), steps], right [B, T, steps]) for one micro-batch;
        ``right[b, t, k]``: step k of row t drafts the target's own choice for token t+2+k.

        Step 0 gives every row's key and value (what every later step attends to), but its output only where it
        is scored or a later step starts from it; steps 1.. run only on the rows a later step is scored on (chains
        ending in an answer). With audio prompts of hundreds of tokens and short answers that is a small share of
        the rows, and the numbers are those of running every row.
        """
        draft, ids, loss_mask = self.draft, batch["input_ids"], batch["loss_mask"]
        dtype = draft.fc.weight.dtype
        embeds = batch["inputs_embeds"].to(dtype)
        hidden = draft.project(batch["aux"].to(dtype))
        B, T = ids.shape
        draft_to_target = draft.d2t + torch.arange(len(draft.d2t), device=ids.device)
        scored = [shift_left(loss_mask, 2 + k) & shift_left(target.in_draft_vocab, 1 + k) for k in range(self.steps)]
        later = torch.stack(scored[1:]).any(0) if self.steps > 1 else torch.zeros_like(loss_mask)
        rows = rows_where(scored[0] | later)  # the rows step 0 computes an output for
        cache, total, per_step = TTTCache(), 0.0, []
        # Full size plus a column that padded row indices (T) write to: right/wrong per step, unbroken chains.
        rights = torch.zeros(B, T + 1, self.steps, dtype=torch.bool, device=ids.device)
        chain = torch.ones(B, T + 1, dtype=torch.bool, device=ids.device)
        for k in range(self.steps):
            if k == 0:
                hidden = draft.step(shift_left(embeds, 1), hidden, cache=cache, queries=rows)
                # Back to full width (a column more for the padded row index T), to pick rows by index.
                full = hidden.new_zeros(B, T + 1, hidden.shape[-1]).scatter(
                    1, rows[..., None].expand_as(hidden), hidden
                )
                rows, at = rows_where(later), rows_where(scored[0])  # steps 1.. run on; step 0's logits
                hidden, logits = take(full[:, :T], rows), draft.head(take(full[:, :T], at))
            else:
                hidden = draft.step(take(embeds, rows, 1 + k), hidden, rows, cache, rows=rows)
                at = rows
                logits = draft.head(hidden)
            counted = take(scored[k], at)
            teacher_logp = take(target.log_probs, at, 1 + k)
            teacher_p, draft_logp = teacher_logp.exp(), logits.float().log_softmax(-1)
            row_loss = -(teacher_p * draft_logp).sum(-1)[counted]
            row_kl = (teacher_p * (teacher_logp - draft_logp)).sum(-1)[counted]
            total = total + self.decay**k * row_loss.sum() / counted.sum().clamp(min=1)
            right = draft_to_target[logits.argmax(-1)] == take(target.top_ids, at, 1 + k)
            alive = take(chain, at)
            counts = [row_loss.sum(), row_kl.sum(), counted.sum(), (right & counted).sum(), (alive & counted).sum(),
                      (alive & right & counted).sum(), shift_left(loss_mask, 2 + k).sum()]  # fmt: skip
            per_step.append(torch.stack([c.detach().double() for c in counts]))
            rights[..., k].scatter_(1, at, right)
            chain.scatter_(1, at, alive & (right | ~counted))  # a row's chain breaks at its first counted miss
        return total, torch.stack(per_step, dim=1), rights[:, :T]


def replay_decoding(right: torch.Tensor, loss_mask: torch.Tensor, k: int) -> tuple[int, int]:
    """Greedy speculative decoding with a K-token chain, replayed on teacher-forced rows -> (tokens, verify passes).

    Exact, not an approximation: while every earlier step of a chain was right, the chain's inputs are the
    teacher-forced ones, so a pass from pending token p accepts the leading right steps of row p-1's chain. Each
    answer (a run of loss-mask tokens) starts with a token the target emits itself, as after a prefill; then
    passes emit accepted drafts + the target's token, up to the answer's last token. Where the data are the
    target's own greedy answers (``just regenerate``) this is the tau ``just eval-draft`` measures, from the cache
    alone; unlike ``1 + sum_k prod_j cond_acc_j`` it weighs rows as decoding visits them (after misses).
    """
    right, mask = right[..., :k].cpu().numpy(), loss_mask.cpu().numpy()
    tokens = passes = 0
    for b in range(mask.shape[0]):
        answer = np.flatnonzero(mask[b])
        for span in np.split(answer, np.flatnonzero(np.diff(answer) > 1) + 1) if len(answer) else []:
            pending, last = int(span[0]), int(span[-1])
            while pending < last:
                left = last - pending  # tokens after the pending one, the answer's end included
                accepted = 0
                while accepted < min(k, left) and right[b, pending - 1, accepted]:
                    accepted += 1
                emitted = left if accepted >= left else accepted + 1
                tokens, passes, pending = tokens + emitted, passes + 1, pending + emitted
    return tokens, passes


def teacher_targets(teacher: Teacher, batch: dict) -> TeacherOutput:
    """The teacher at every position j whose next token j+1 is supervised (what any TTT step may count)."""
    return teacher(batch["final_hidden"], shift_left(batch["loss_mask"], 1))
