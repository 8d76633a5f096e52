"""The teacher: the target's own next-token distribution, rebuilt from cached final states and its lm_head.

No target forward is needed: ``lm_head(final_hidden)`` are the target's logits. EAGLE-3 learns the softmax of
those logits restricted to the draft vocabulary, on positions whose target top token (over the full vocabulary) the
draft can emit at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_CHUNK = 4096  # rows per full-vocab matmul: bounds memory at a 156k vocabulary


@dataclass
class TeacherOutput:
    log_probs: torch.Tensor  # [B, T, Vd] float32, log-softmax over the draft vocab where asked, else 0
    top_ids: torch.Tensor  # [B, T] int64 target top token (full vocab) where asked, else -1
    in_draft_vocab: torch.Tensor  # [B, T] bool: the top token is in the draft vocab (False where not asked)


class Teacher(torch.nn.Module):
    def __init__(self, lm_head: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor):
        super().__init__()
        draft_to_target = d2t + torch.arange(len(d2t))
        self.register_buffer("lm_head", lm_head, persistent=False)  # [V, H]
        self.register_buffer("draft_head", lm_head[draft_to_target].clone(), persistent=False)  # [Vd, H]
        self.register_buffer("t2d", t2d, persistent=False)

    @torch.no_grad()
    def forward(self, final_hidden: torch.Tensor, needed: torch.Tensor) -> TeacherOutput:
        """``final_hidden`` [B, T, H]; ``needed`` [B, T] bool marks the positions whose top token matters."""
        h = final_hidden.to(self.draft_head.dtype)
        rows = h[needed]  # only these: with audio prompts most positions are never scored
        log_probs = torch.zeros(*needed.shape, len(self.draft_head), dtype=torch.float32, device=h.device)
        log_probs[needed] = (rows @ self.draft_head.T).float().log_softmax(-1)
        top = torch.full(needed.shape, -1, dtype=torch.long, device=h.device)
        if len(rows):
            top[needed] = torch.cat([(chunk @ self.lm_head.T).argmax(-1) for chunk in rows.split(TOP_CHUNK)])
        in_vocab = needed & self.t2d[top.clamp(min=0)]
        return TeacherOutput(log_probs, top, in_vocab)
