"""A training run's directory: whose run it holds, whether this command may continue or replace it.

    RUNS_DIR/NAME/  config.json  train_log.jsonl  checkpoints/  tensorboard/  acceptance.png  eval.json  draft/ ...

A new run never writes into a directory holding another run (``--overwrite`` replaces it); ``--resume`` continues
only the same run: every checkpoint records the run's identity (the settings that decide the weights, the draft's
shape, the cache's content), and a resume that differs is refused with each difference named by its flag.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline.cache.reader import HiddenStateCache
from pipeline.draft.model import DraftConfig
from pipeline.errors import ConfigError
from pipeline.train.checkpoint import CHECKPOINTS, latest_checkpoint, read_trainer

if TYPE_CHECKING:
    from pipeline.train.loop import TrainConfig

TRAIN_LOG = "train_log.jsonl"  # one line per logging step: train metrics, lr, tokens/s, data wait
# What a run writes into its directory: any of them there means the directory holds a run.
RUN_OUTPUTS = ("config.json", CHECKPOINTS, TRAIN_LOG, "eval.json", "tensorboard", "acceptance.png", "draft",
               "draft-speculators")  # fmt: skip
# The settings a resumed run shares with the run it continues, besides the draft's shape and the cache: they decide
# the weights from the checkpoint on (the objective, the optimiser, which batches come next; the optimizer's state
# would even override a new --lr or --weight-decay unseen). Only the run's length (--max-steps, --epochs) may change.
SAME_RUN_SETTINGS = ("head_init", "ttt_steps", "loss_decay", "audio_embeds", "placeholder_share", "lr", "weight_decay",
                     "warmup_steps", "clip_grad", "max_tokens", "grad_accum", "seed", "eval_percent")  # fmt: skip
# The draft config's fields a flag sets (the others follow from the cache's target).
DRAFT_FLAGS = {"aux_layers": "layers", "draft_vocab_size": "draft_vocab_size", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
               "num_key_value_heads": "num_key_value_heads"}  # fmt: skip


def run_identity(cfg: TrainConfig, draft_cfg: DraftConfig, cache: HiddenStateCache, tokens: list[int]) -> dict:
    """What makes a resumed run the same run: kept in every checkpoint, compared on --resume (as JSON holds it)."""
    identity = {
        "settings": {name: getattr(cfg, name) for name in SAME_RUN_SETTINGS},
        "draft": draft_cfg.to_dict(),
        "cache": cache_identity(cache, tokens),
    }
    return json.loads(json.dumps(identity))


def cache_identity(cache: HiddenStateCache, tokens: list[int]) -> dict:
    """The cache's content, wherever it lies: its target, how it was dumped, which samples it holds."""
    m = cache.manifest
    # Like the dump's own resume check, the target's whole identity but the path it was loaded from (it may move).
    target = {**m.target, "name_or_path": None}
    parts = [[part.name, part.num_samples, n] for part, n in zip(cache.parts, tokens, strict=True)]
    first = next(i for i, n in enumerate(tokens) if n)
    return {
        "target": _digest(json.dumps(target, sort_keys=True).encode()),
        "captured_layers": m.captured_layers,
        "dtype": m.dtype,
        "dump_settings": m.settings,
        "samples": len(cache),
        "tokens": sum(tokens),
        "parts": _digest(json.dumps(parts).encode()),
        # Two dumps of the same shards by two targets of one architecture differ only in their states.
        "first_state": _digest(cache.read_rows(first, "final_hidden", 0, 1).tobytes()),
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def claim_run_dir(acc: Accelerator, cfg: TrainConfig, identity: dict) -> Path | None:
    """The checkpoint to resume from (None: start afresh), once the run directory is known to be this run's.

    Only the main process looks at (and with --overwrite clears) the directory; the other ranks take its answer,
    so that all of them go on or all stop with the same message, before any work."""
    answer: list = [None, None]
    if acc.is_main_process:
        try:
            answer[1] = _claim(cfg, identity, acc.num_processes)
        except ConfigError as err:
            answer[0] = str(err)
    problem, checkpoint = broadcast_object_list(answer)
    if problem:
        raise ConfigError(problem)
    return checkpoint


def _claim(cfg: TrainConfig, identity: dict, world: int) -> Path | None:
    run = cfg.run_dir
    if cfg.resume:
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            print(f"{run} holds no checkpoint to resume: starting from step 0")
        else:
            _check_same_run(cfg, checkpoint, identity, world)
        return checkpoint
    if any((run / name).exists() for name in RUN_OUTPUTS):
        if not cfg.overwrite:
            raise ConfigError(
                f"{run} already holds a run: pass --resume to continue it, --overwrite to replace it, or choose "
                "another --name"
            )
        shutil.rmtree(run)
        print(f"removed the earlier run in {run} (--overwrite)")
    return None


def _check_same_run(cfg: TrainConfig, checkpoint: Path, identity: dict, world: int) -> None:
    saved = read_trainer(checkpoint)
    changes = []
    if len(saved["data"]) != world:
        changes.append(f"ranks: {len(saved['data'])} in the checkpoint, {world} now")
    if "run" in saved:
        changes += run_differences(saved["run"], identity)
    else:
        print(f"{checkpoint} does not record its run's settings and cache (an older version wrote it): not checked")
    if changes:
        raise ConfigError(
            f"cannot resume {cfg.run_dir} from {checkpoint.name}: it holds another run than this command's\n"
            + "".join(f"  {change}\n" for change in changes)
            + "Resume with the run's original settings, cache and number of ranks, or start a new run: another "
            "--name, or --overwrite (without --resume) to replace this one"
        )


def run_differences(saved: dict, current: dict) -> list[str]:
    """One line per field in which two run identities differ, named as the user knows it (the flag that sets it)."""
    return [
        f"{_label(section, key)}: {saved.get(section, {}).get(key)!r} in the checkpoint, {value!r} now"
        for section, fields in current.items()
        for key, value in fields.items()
        if saved.get(section, {}).get(key) != value
    ]


def _label(section: str, key: str) -> str:
    if section == "settings":
        return "--" + key.replace("_", "-")
    if section == "draft":
        return "--" + DRAFT_FLAGS[key].replace("_", "-") if key in DRAFT_FLAGS else f"the draft's {key} (derived)"
    return f"the cache's {key.replace('_', ' ')}"


def trim_log(path: Path, step: int) -> None:
    """Keep the log lines of the steps up to ``step``, the checkpoint resumed: the steps after it are trained and
    logged again. A line cut short by a kill goes too."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
