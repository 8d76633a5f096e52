"""How the draft is spread over ranks: replicated (DDP, accelerate's default) or sharded (FSDP2, ``--fsdp``).

At 7B dimensions an EAGLE-3 draft with a 32k draft vocab has ~0.4B parameters: DDP keeps it, its gradients and
AdamW's two moments on every GPU (~7 GB in float32), FSDP splits all of that over the ranks. Both modes meet in
one checkpoint format: full (unsharded) tensors keyed by parameter name, written by rank 0 and read by every rank,
so a run may resume in the other mode.

FSDP here is torch's ``fully_shard`` applied by us, not accelerate's FSDP plugin: accelerate does not offer FSDP
for CPU processes, and one code path for GPU and the CPU tests is the point. Under FSDP every forward is a
collective, so every rank must run the same number of forwards (``evaluate`` in ``train`` keeps them in step).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from pipeline.draft.ttt_loss import TrainingTimeTest
from pipeline.errors import ConfigError

# Gathered on rank 0 only, in CPU memory: what a checkpoint or an export needs, without a full copy on every GPU.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank reads the same full tensors from disk and keeps its own shard of them.
SCATTER = StateDictOptions(full_state_dict=True)


def distribute(acc: Accelerator, objective: TrainingTimeTest, fsdp: bool) -> nn.Module:
    """The training module as the ranks run it: FSDP2-sharded in place, or prepared by accelerate (DDP)."""
    if acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("use train-draft's --fsdp flag rather than accelerate's FSDP config (one way to shard)")
    if not fsdp:
        return acc.prepare(objective)
    draft = objective.draft
    for unit in (draft.fc, draft.midlayer, draft.lm_head):  # the three large blocks, gathered one at a time
        fully_shard(unit)
    fully_shard(objective)  # the rest (norms) and the root that schedules the gathers
    return objective


def model_state(objective: TrainingTimeTest) -> dict[str, torch.Tensor]:
    """The draft's full weights (keys as ``Eagle3Draft.state_dict``): complete on rank 0; a collective under FSDP."""
    return get_model_state_dict(objective.draft, options=GATHER)


def optimizer_state(objective: TrainingTimeTest, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name: complete on rank 0; a collective under FSDP."""
    return get_optimizer_state_dict(objective, optimizer, options=GATHER)


def load_states(objective: TrainingTimeTest, optimizer: torch.optim.Optimizer, model: dict, optim: dict) -> None:
    """Full states (as saved by rank 0) into this rank's draft and optimizer, sharded or not."""
    set_model_state_dict(objective.draft, model, options=SCATTER)
    set_optimizer_state_dict(objective, optimizer, optim, options=SCATTER)


def local_parameter_share(objective: nn.Module) -> float:
    """The fraction of the draft's parameters this rank holds (1.0 unsharded; ~1/world under FSDP)."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in objective.parameters())
    return local / sum(p.numel() for p in objective.parameters())
