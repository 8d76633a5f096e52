"""Stage two: train an EAGLE-3 draft from a hidden-state cache (the target is never loaded) and export it.

The whole loop is ``train`` below; everything it composes lives in its own module: the cache reader and loader
(``cache``, ``draft_data``), the draft vocab (``draft_vocab``), the model (``draft_model``), the teacher
(``teacher``), the training-time test objective (``ttt_loss``), checkpoints, plots and the server exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.cache.reader import HiddenStateCache, open_cache
from pipeline.draft.export import export_sglang, export_speculators
from pipeline.draft.model import DraftConfig, Eagle3Draft
from pipeline.draft.serving import ENGINE_NAMES, ENGINES, Engine, ServingRecord, as_served
from pipeline.draft.teacher import Teacher
from pipeline.draft.ttt_loss import StepStats, TrainingTimeTest, replay_decoding, teacher_targets
from pipeline.draft.vocab import load_or_build_draft_vocab
from pipeline.errors import ConfigError
from pipeline.settings import setting
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.data import (
    LoaderConfig,
    audio_embeds_setting,
    eval_percent_setting,
    make_loader,
    max_tokens_setting,
    num_workers_setting,
    placeholder_share_setting,
    seed_setting,
)
from pipeline.train.distributed import distribute, load_states, local_parameter_share, model_state, optimizer_state
from pipeline.train.plots import plot_acceptance
from pipeline.train.run_dir import TRAIN_LOG, claim_run_dir, run_identity, trim_log

# What training reads of the target's description in the cache (opaque otherwise; the target is never loaded):
# the Llama layer config the draft defaults to, and the verifier architectures the vLLM export names.
TARGET_KEYS = ("draft_defaults", "architectures")


@dataclass
class TrainConfig:
    cache: str = setting(help="cache directory written by `just dump-hidden`")
    name: str = setting("draft", "run name: the run directory is RUNS_DIR/NAME")
    runs_dir: str = setting("runs", "where run directories go")
    target: str | None = setting(None, "refuse a cache dumped from another target (model id or path)")
    # The draft: which cached layers it reads, its vocab and width (None: derived from the cache's target).
    layers: list[int] | None = setting(
        None, "aux layers (HF hidden_states indices) the draft reads, e.g. 2,16,29 (default: EAGLE-3's 2, L//2, L-3)"
    )
    draft_vocab_size: int | None = setting(None, "draft vocabulary size (default: 32000, or the target's if smaller)")
    hidden_size: int | None = setting(None, "draft width: the target's (the draft reads its token embeddings)")
    intermediate_size: int | None = setting(None, "draft MLP width (default: the target's)")
    num_attention_heads: int | None = setting(None, "default: the target's")
    num_key_value_heads: int | None = setting(None, "default: the target's")
    head_init: Literal["target", "random"] = setting(
        "target", "start the draft's lm_head from the target's rows of the draft vocab (target) or at random"
    )
    ttt_steps: int = setting(7, "training-time test steps K: the draft is trained on its own fed-back states")
    loss_decay: float = setting(0.8, "step k's loss weight is loss_decay ** k")
    audio_embeds: Literal["merged", "placeholder", "mixed"] = audio_embeds_setting()
    placeholder_share: float = placeholder_share_setting()
    # Optimisation.
    lr: float = setting(3e-4, "peak AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(20, "linear warm-up steps, then cosine decay")
    max_steps: int | None = setting(None, "optimizer steps (default: --epochs over the cache's tokens)")
    epochs: float = setting(1.0, "passes over the cache when --max-steps is not given")
    max_tokens: int = max_tokens_setting()
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    clip_grad: float = setting(0.5, "gradient norm clip")
    seed: int = seed_setting()
    # Data, evaluation, logging, checkpoints.
    num_workers: int = num_workers_setting()
    eval_percent: float = eval_percent_setting()
    eval_every: int = setting(50, "steps between held-out evaluations")
    log_every: int = setting(10, "steps between training log lines")
    checkpoint_every: int = setting(50, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)")
    resume: bool = setting(
        False,
        "continue the run from its last checkpoint (same settings, cache and number of ranks; only --max-steps "
        "and --epochs may change)",
    )
    overwrite: bool = setting(False, "replace the run already in the run directory (default: refuse to touch it)")
    allow_partial: bool = setting(False, "train on an unfinished dump's committed samples (default: refuse it)")
    fsdp: bool = setting(False, "shard the draft, its gradients and optimizer state over the ranks (FSDP2), not DDP")
    extra: dict = setting(factory=dict, flag=None)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def check_cache_finished(cache: HiddenStateCache, cfg: TrainConfig) -> list[int]:
    """Each part's committed tokens. Stops on an unfinished dump unless --allow-partial, and on a cache with no tokens
    (which would otherwise train a step or two on nothing and export that)."""
    finished = cache.info["complete"]
    if not finished and not cfg.allow_partial:
        unreadable = len(cache.manifest.shard_errors)  # a finished run leaves these shards for the next one
        why = f"{unreadable} shards could not be read to their end" if unreadable else "still running, or stopped"
        raise ConfigError(
            f"{cfg.cache} is an unfinished dump ({why}; {len(cache)} samples committed so far): finish it by "
            "re-running the same dump command (it resumes where it stopped), or pass --allow-partial to train on "
            "the samples committed so far"
        )
    tokens = part_tokens(cache)
    if sum(tokens) == 0 and finished:
        raise ConfigError(
            f"{cfg.cache} holds no samples to train on (the dump cached none): see what it rejected with "
            f"`python -m stages.inspect_cache {cfg.cache}`"
        )
    if sum(tokens) == 0:
        raise ConfigError(
            f"{cfg.cache} is an unfinished dump that has committed no sample yet: nothing to train on; re-run once "
            "the dump has committed samples (or has finished)"
        )
    return tokens


def part_tokens(cache: HiddenStateCache) -> list[int]:
    """Tokens of each part's committed samples: from the manifest, or for an unfinished dump (whose manifest has no
    counts yet) from the parts' commit records, up to the samples the reader took."""
    if cache.info["complete"]:
        return [part.tokens for part in cache.manifest.parts]
    return [part.read_commit().token_offsets[part.num_samples] for part in cache.parts]


def check_cache_fits(cache: HiddenStateCache, cfg: TrainConfig) -> list[int]:
    """The aux layers to train on; stops with a message, before any training, if the cache cannot serve them."""
    info = cache.info
    missing_keys = [key for key in TARGET_KEYS if key not in cache.target]
    if missing_keys:
        raise ConfigError(
            f"{cfg.cache} does not record its target's {', '.join(missing_keys)} (dumped by an older version): "
            "dump it again"
        )
    if cfg.target and cfg.target not in (info["model"], info["model"].rstrip("/").split("/")[-1]):
        raise ConfigError(f"{cfg.cache} was dumped from {info['model']!r}, not --target {cfg.target!r}")
    layers = cfg.layers or _eagle3_layers(info["num_layers"], info["captured_layers"])
    missing = sorted(set(layers) - set(info["captured_layers"]))
    if missing:
        raise ConfigError(
            f"--layers {layers}: the cache captured {info['captured_layers']}, not {missing}; dump again with "
            f"--layers {','.join(map(str, sorted(set(layers) | set(info['captured_layers']))))}"
        )
    if cfg.draft_vocab_size is None:
        cfg.draft_vocab_size = min(32000, info["vocab_size"])
    if cfg.draft_vocab_size > info["vocab_size"]:
        raise ConfigError(f"--draft-vocab-size {cfg.draft_vocab_size} exceeds the target vocab {info['vocab_size']}")
    return layers


def _eagle3_layers(num_layers: int, captured: list[int]) -> list[int]:
    default = sorted({2, num_layers // 2, num_layers - 3})
    return default if set(default) <= set(captured) else captured[:3]


def build_draft_config(cache: HiddenStateCache, cfg: TrainConfig, layers: list[int]) -> DraftConfig:
    """The target's ``draft_defaults`` (one layer shaped like the target's), with the sizes ``cfg`` overrides."""
    defaults = cache.target["draft_defaults"]
    if defaults["hidden_size"] != cache.info["hidden_size"]:
        raise ConfigError(f"cache hidden size {cache.info['hidden_size']} differs from its target's {defaults}")
    if cfg.hidden_size not in (None, defaults["hidden_size"]):
        # The draft embeds tokens with the target's embed_tokens, as both engines serve it (SGLang's set_embed, vLLM
        # sharing an export without embeddings); another width would need an embedding table of its own.
        raise ConfigError(
            f"--hidden-size {cfg.hidden_size}: an EAGLE-3 draft reads the target's token embeddings, so its width "
            f"is the target's hidden size {defaults['hidden_size']}; change --intermediate-size or the heads instead"
        )
    draft = DraftConfig.from_text_config(defaults, layers, cfg.draft_vocab_size)
    overrides = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(draft, name, value)
    if cfg.hidden_size or cfg.num_attention_heads:
        draft.head_dim = draft.hidden_size // draft.num_attention_heads
    return draft


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def estimate_steps(tokens: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps for ``cfg.epochs`` passes over the training share of a cache of ``tokens`` tokens."""
    train_tokens = tokens * (1 - cfg.eval_percent / 100)
    return max(1, math.ceil(cfg.epochs * train_tokens / (cfg.max_tokens * cfg.grad_accum * world)))


class Batches:
    """This rank's micro-batches, epoch after epoch, in groups of ``grad_accum`` that all ranks take together.

    Rank r's i-th batch of an epoch is the epoch's global batch i * world + r, so step s of any world size and
    accumulation with the same world * accum trains on the same global batches. An epoch's last, partial group is
    dropped on every rank at once (all ranks agree through one tiny all-reduce per step), which keeps the ranks in
    the same epoch and makes runs of different world sizes comparable batch for batch.
    """

    def __init__(self, acc: Accelerator, cache_path: str, loader_cfg: LoaderConfig, epoch: int = 0, consumed: int = 0):
        self.acc, self.cache_path, self.loader_cfg = acc, cache_path, loader_cfg
        self.epoch, self.consumed, self._it = epoch, consumed, None

    def next_group(self, size: int) -> list[dict]:
        while True:
            fresh = self._it is None and self.consumed == 0
            if self._it is None:
                self._it = iter(self._loader())
            group = [b for b in (next(self._it, None) for _ in range(size)) if b is not None]
            self.consumed += len(group)
            full = torch.tensor(float(len(group) == size), device=self.acc.device)
            if self.acc.reduce(full, reduction="sum").item() == self.acc.num_processes:
                return [{k: v.to(self.acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                        for b in group]  # fmt: skip
            if fresh:
                raise ConfigError(
                    f"an epoch of {self.cache_path} has fewer than {size} x {self.acc.num_processes} training "
                    "batches: lower --max-tokens or --grad-accum, use fewer ranks, or lower --eval-percent"
                )
            self._it, self.epoch, self.consumed = None, self.epoch + 1, 0

    def _loader(self):
        acc = self.acc
        return make_loader(self.cache_path, self.loader_cfg, "train", self.epoch, acc.process_index,
                           acc.num_processes, skip_batches=self.consumed)  # fmt: skip

    def position(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def train(cfg: TrainConfig) -> Path:
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if torch.cuda.is_available() else "no")
    if cfg.resume and cfg.overwrite:
        raise ConfigError(f"--resume continues the run in {cfg.run_dir} and --overwrite replaces it: pass one of them")
    torch.manual_seed(cfg.seed)
    cache = open_cache(cfg.cache)
    cached = check_cache_finished(cache, cfg)  # tokens per part
    layers = check_cache_fits(cache, cfg)
    draft_cfg = build_draft_config(cache, cfg, layers)
    identity = run_identity(cfg, draft_cfg, cache, cached)
    checkpoint = claim_run_dir(acc, cfg, identity)  # before any work: a directory holding another run stops here
    if not cache.info["complete"]:
        acc.print(f"{cfg.cache}: an unfinished dump; training on the {len(cache)} samples ({sum(cached)} tokens) "
                  "committed so far (--allow-partial)")  # fmt: skip
    with acc.main_process_first():  # the main process counts and stores the draft vocab once; the rest read it
        d2t, t2d = load_or_build_draft_vocab(cache, cfg.draft_vocab_size)
    draft = Eagle3Draft(draft_cfg)
    draft.set_draft_vocab(d2t, t2d)
    target_head = cache.head_weights()["lm_head"].float()
    if cfg.head_init == "target":
        draft.start_head_from_target(target_head)
    teacher = Teacher(target_head, d2t, t2d).to(acc.device)
    objective = TrainingTimeTest(draft, cfg.ttt_steps, cfg.loss_decay)
    model = distribute(acc, objective, cfg.fsdp)  # what the ranks run; ``objective`` stays the plain module
    if cfg.fsdp:
        print(f"FSDP: rank {acc.process_index} holds {local_parameter_share(objective):.0%} of the draft's parameters")
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or estimate_steps(sum(cached), cfg, acc.num_processes)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
    run = cfg.run_dir
    step, history, position = 0, [], {"epoch": 0, "consumed": 0}
    if checkpoint:  # the same run, on as many ranks: claim_run_dir checked
        weights, optim_state, trainer = load_checkpoint(checkpoint)
        load_states(objective, optimizer, weights, optim_state)
        step, history = trainer["step"], trainer["history"]
        schedule.load_state_dict(trainer["schedule"])
        position = trainer["data"][acc.process_index]
        acc.print(f"resumed from {checkpoint} at step {step}")
    loader_cfg = LoaderConfig(
        layers=layers, max_tokens=cfg.max_tokens, audio_embeds=cfg.audio_embeds,
        placeholder_share=cfg.placeholder_share, eval_percent=cfg.eval_percent, num_workers=cfg.num_workers,
        seed=cfg.seed,
    )  # fmt: skip
    served = ServedEval(cache, ServingRecord(cfg.audio_embeds, cfg.placeholder_share))
    batches = Batches(acc, cfg.cache, loader_cfg, **position)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            trim_log(run / TRAIN_LOG, step)
        (run / "config.json").write_text(json.dumps({"train": asdict(cfg), "draft": draft_cfg.to_dict()}, indent=1))
    # On resume, TensorBoard hides what the killed run logged after the checkpoint (it is logged again).
    purge = step + 1 if cfg.resume else None
    tb = SummaryWriter(run / "tensorboard", purge_step=purge) if acc.is_main_process else None
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.name}", disable=not acc.is_main_process)
    window, tokens, started, waited = StepStats.zeros(cfg.ttt_steps), 0, time.time(), 0.0

    if step == 0:  # the untrained draft: the baseline every later evaluation is read against
        history.append({"step": 0, **evaluate(acc, model, teacher, cfg, loader_cfg, served)})
    while step < total_steps:
        ask = time.time()
        group = batches.next_group(cfg.grad_accum)
        waited += time.time() - ask  # the accelerator idles while the loader has no batch ready
        for batch in group:
            with acc.autocast():
                loss, sums, _ = model(batch, teacher_targets(teacher, batch))
            acc.backward(loss / cfg.grad_accum)
            window, tokens = window + StepStats(sums.cpu()), tokens + int(batch["lengths"].sum())
        acc.clip_grad_norm_(objective.parameters(), cfg.clip_grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            metrics = _reduce(acc, window).summary()
            elapsed = time.time() - started
            rate = _reduce_scalar(acc, tokens) / elapsed
            extra = {"lr": schedule.get_last_lr()[0], "tokens_per_s": rate, "data_wait_fraction": waited / elapsed}
            _log(tb, "train", step, {**metrics, **extra})
            if acc.is_main_process:  # the same figures as plain JSON lines, for scripts (bench-train reads them)
                with (run / TRAIN_LOG).open("a") as f:
                    f.write(json.dumps({"step": step, **metrics, **extra}) + "\n")
            bar.set_postfix_str(
                f"kl_0 {metrics['kl_0']:.3f} acc_0 {metrics['acc_0']:.3f} {rate:.0f} tok/s, "
                f"data wait {extra['data_wait_fraction']:.0%}"
            )
            window, tokens, started, waited = StepStats.zeros(cfg.ttt_steps), 0, time.time(), 0.0
        if step % cfg.eval_every == 0 or step == total_steps:
            metrics = evaluate(acc, model, teacher, cfg, loader_cfg, served)
            history.append({"step": step, **metrics})
            _log(tb, "eval", step, metrics)
            acc.print(
                f"step {step} eval: "
                + " ".join(f"acc_{k} {metrics[f'acc_{k}']:.3f}" for k in range(cfg.ttt_steps))
                + f" tau: replayed {metrics['tau_replay']:.2f}, prod(cond_acc) {metrics['expected_accept_len']:.2f}"
                + "".join(f", served as {ENGINE_NAMES[e]} {metrics[f'tau_replay_{e}']:.2f}" for e in ENGINES)
                + f"; the draft vocab holds the target's top token at {metrics['vocab_coverage']:.0%} of answer tokens"
            )
            if acc.is_main_process:
                plot_acceptance(history, run / "acceptance.png", f"{cfg.name}: held-out acc_k")
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            positions = gather_object([batches.position()])
            weights, optim_state = model_state(objective), optimizer_state(objective, optimizer)  # all ranks
            if acc.is_main_process:
                trainer = {"step": step, "history": history, "data": positions, "schedule": schedule.state_dict(),
                           "run": identity}  # fmt: skip
                save_checkpoint(run, step, weights, optim_state, trainer, cfg.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    # The last step always checkpoints (and a run resumed at its end loaded them): ``weights`` are the final ones.
    if acc.is_main_process:
        final = Eagle3Draft(draft_cfg)
        final.load_state_dict(weights)
        _export(final, draft_cfg, cfg, cache, run)
        (run / "eval.json").write_text(json.dumps(history, indent=1))
    acc.wait_for_everyone()
    return run


class ServedEval:
    """How held-out batches are fed to the draft for each engine's evaluation: read with the merged audio
    embeddings once, and given the placeholder's for vLLM (``serving.as_served``). The engine the draft was trained
    for (the first, for ``mixed``) gives the headline metrics; every engine gets its own ``tau_replay_<engine>``."""

    def __init__(self, cache: HiddenStateCache, record: ServingRecord):
        self.audio_token_id = cache.audio_token_id
        self.placeholder = torch.as_tensor(cache.embed_tokens[cache.audio_token_id]).clone()
        self.primary: Engine = record.engines[0]

    def batches(self, batch: dict) -> dict[Engine, dict]:
        return {e: as_served(batch, e, self.audio_token_id, self.placeholder) for e in ENGINES}


@torch.no_grad()
def evaluate(
    acc: Accelerator, model, teacher: Teacher, cfg: TrainConfig, loader_cfg: LoaderConfig, served: ServedEval
) -> dict:
    # Unwrapped: ranks hold different numbers of eval batches and DDP's forward would sync buffers each call. An
    # FSDP forward is itself a collective, so there every rank runs as many forwards as the busiest one, repeating
    # its last batch (or a stand-in) without counting it.
    net = acc.unwrap_model(model)
    net.eval()
    total = {e: StepStats.zeros(cfg.ttt_steps) for e in ENGINES}
    replayed = {e: torch.zeros(2, dtype=torch.float64) for e in ENGINES}
    last = None
    read = dataclasses.replace(loader_cfg, audio_embeds="merged")  # each engine's inputs are made from these
    batches = iter(make_loader(cfg.cache, read, "eval", 0, acc.process_index, acc.num_processes))
    while True:
        batch = next(batches, None)
        more = batch is not None
        if cfg.fsdp:  # go on while any rank has a batch left
            more = _reduce_scalar(acc, more) > 0
        if not more:
            break
        if batch is not None:
            last = batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        feed = batch or last or _stand_in(net)
        targets = teacher_targets(teacher, feed)  # the teacher reads the final states: the same for every engine
        for engine, fed in served.batches(feed).items():
            with acc.autocast():
                _, sums, right = net(fed, targets)
            if batch is not None:
                total[engine] = total[engine] + StepStats(sums.cpu())
                replay = replay_decoding(right, batch["loss_mask"], cfg.ttt_steps)
                replayed[engine] += torch.tensor(replay, dtype=torch.float64)
    net.train()
    metrics = {}
    for engine in ENGINES:
        tokens, passes = acc.reduce(replayed[engine].to(acc.device), reduction="sum").tolist()
        metrics[engine] = {**_reduce(acc, total[engine]).summary(), "tau_replay": tokens / passes if passes else 1.0}
    named = ("tau_replay", "acc_0", "expected_accept_len")
    per_engine = {f"{name}_{e}": metrics[e][name] for e in ENGINES for name in named}
    return {**metrics[served.primary], **per_engine}


def _stand_in(net) -> dict:
    """A two-token batch with nothing supervised, for a rank with no eval batch of its own to repeat."""
    cfg, device = net.draft.config, net.draft.d2t.device
    h, zeros = cfg.target_hidden_size, lambda *shape, **kw: torch.zeros(*shape, device=device, **kw)
    return {"input_ids": zeros(1, 2, dtype=torch.int64), "loss_mask": zeros(1, 2, dtype=torch.bool),
            "aux": zeros(1, 2, len(cfg.aux_layers) * h), "inputs_embeds": zeros(1, 2, h),
            "final_hidden": zeros(1, 2, h), "lengths": torch.tensor([2])}  # fmt: skip


def _reduce(acc: Accelerator, stats: StepStats) -> StepStats:
    return StepStats(acc.reduce(stats.sums.to(acc.device), reduction="sum").cpu())


def _reduce_scalar(acc: Accelerator, value: float) -> float:
    return float(acc.reduce(torch.tensor(float(value), device=acc.device), reduction="sum"))


def _log(tb: SummaryWriter | None, split: str, step: int, metrics: dict) -> None:
    if tb is None:
        return
    for name, value in metrics.items():
        tb.add_scalar(f"{split}/{name}", value, step)
    tb.flush()


def _export(draft: Eagle3Draft, draft_cfg: DraftConfig, cfg: TrainConfig, cache: HiddenStateCache, run: Path) -> None:
    target, architectures = cache.info["model"], cache.target["architectures"]
    record = ServingRecord(cfg.audio_embeds, cfg.placeholder_share)
    try:
        export_sglang(draft, draft_cfg, run / "draft", target, record)
        export_speculators(draft, draft_cfg, run / "draft-speculators", target, architectures, cfg.ttt_steps, record)
        print(
            f"exported {run / 'draft'} (SGLang) and {run / 'draft-speculators'} (vLLM speculators), trained on "
            f"{cfg.audio_embeds} audio embeddings: for {' and '.join(ENGINE_NAMES[e] for e in record.engines)}"
        )
        for engine in ENGINES:
            if record.warning(engine):
                print(record.warning(engine))
    except ValueError as err:  # e.g. not 3 aux layers: trainable for experiments, not servable
        print(f"not exported for the servers: {err}")
