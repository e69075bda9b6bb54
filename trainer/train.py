"""The training loop: data -> model -> parallel engine -> optimizer -> resume -> steps -> eval -> artifact.

One call of :func:`train` is one training process (one torchrun worker). Every rank runs the same loop;
collectives keep them in lockstep:

* about every ``SYNC_SECONDS`` (and at each log line) the ranks all-reduce one small tensor
  ``[stop, checkpoint_due, next_sync, loss, correct, count]``, so a SIGTERM on any rank, or rank 0's time-based
  checkpoint trigger, is acted on by all ranks at the same step, and rank 0 can log the global loss and
  accuracy (in a pipeline only the last stage has them); rank 0 turns the measured step time into the
  number of steps until the next such sync and sends it along, so all ranks agree on it; in between, nothing
  waits on the host;
* the position in the data is (epoch, batch within the epoch); with the sampler's per-epoch permutation it
  fully determines the next batch, so resuming from a checkpoint repeats and skips nothing.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from aiaas.contract.config import Architecture, LRSchedule, OptimizerName, TrainerConfig

from . import distributed as D
from .checkpoint import Checkpointer
from .config import check_config, config_hash
from .data import Dataset, ShardedLoader, eval_batches, load_dataset
from .errors import PermanentError, Preempted
from .export import make_manifest, write_artifact
from .metrics import TrainerMetrics
from .models import build_model, count_parameters, max_stages
from .parallel import Engine, make_engine, uses_bf16

log = logging.getLogger("aiaas.trainer")

EVAL_BATCH = 512
WARMUP_STEPS = 5
SYNC_SECONDS = 0.5  # how often the ranks agree on stopping (SIGTERM) and time-based checkpoints
MAX_SYNC_STEPS = 100


# ------------------------------------------------------------------------------------------------ signals
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step. A second signal exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise Preempted(f"received signal {signum} twice; stopping without a checkpoint")
        self.requested = True
        self.signum = signum


STOP = StopFlag()
PROGRESS: dict[str, int | None] = {"step": None}  # the last optimizer step done, for the termination message of an unexpected error


@dataclass
class Result:
    step: int
    artifact: str
    metrics: dict[str, Any]
    env: D.DistEnv  # the caller leaves the process group (D.shutdown) once the outcome is written


def make_optimizer(params: Any, cfg: TrainerConfig) -> torch.optim.Optimizer:
    hp = cfg.hyperparameters
    name = OptimizerName(hp.optimizer)
    if name == OptimizerName.sgd:
        return torch.optim.SGD(params, lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay)
    if name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.Adam(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)


def learning_rate_at(step: int, total_steps: int, cfg: TrainerConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a pure function of the step, so a resumed run
    continues the same schedule without keeping scheduler state."""
    hp = cfg.hyperparameters
    if hp.warmup_steps and step < hp.warmup_steps:
        return hp.learning_rate * (step + 1) / hp.warmup_steps
    if LRSchedule(hp.lr_schedule) is LRSchedule.constant or total_steps <= hp.warmup_steps:
        return hp.learning_rate
    progress = min(1.0, (step - hp.warmup_steps) / max(1, total_steps - hp.warmup_steps))
    floor = hp.learning_rate / 10
    return floor + (hp.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step_count(optimizer: torch.optim.Optimizer) -> int | None:
    """The optimizer's own step counter (Adam/AdamW), as a cross-check of the loop's step count."""
    for state in optimizer.state.values():
        if "step" in state:
            s = state["step"]
            s = s.full_tensor() if hasattr(s, "full_tensor") else s
            return int(s.item()) if isinstance(s, torch.Tensor) else int(s)
    return None


def evaluate(engine: Engine, data: Dataset, env: D.DistEnv) -> dict[str, float]:
    """Loss and accuracy on the eval split, every rank evaluating its share (collective)."""
    engine.train(False)
    stats = torch.zeros(3, device=env.device)
    for x, y, w in eval_batches(data.eval_x, data.eval_y, env.dp_size, env.dp_rank, EVAL_BATCH):
        stats += engine.eval_step(x, y, w)
    D.all_reduce_sum(stats, env)
    engine.train(True)
    loss_sum, correct, count = stats.tolist()
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "evalSamples": int(count)}


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def train(cfg: TrainerConfig) -> Result:
    """Run one training process to the end; raise :class:`PermanentError`, :class:`Preempted` or anything
    else (retryable). Rank 0 writes the artifact."""
    _, world_size, *_ = D.world_from_env()
    check_config(cfg, world_size)
    hp, par = cfg.hyperparameters, cfg.parallelism
    arch = Architecture(cfg.model.architecture)

    # ---- data and model (identical on every rank: same seed)
    data = load_dataset(cfg.dataset, arch)
    torch.manual_seed(hp.seed)
    try:
        model = build_model(cfg.model, data.inputs)
    except ValueError as e:
        raise PermanentError(str(e)) from e
    if par.model > max_stages(model):  # type: ignore[arg-type]
        raise PermanentError(
            f"parallelism.model is {par.model}, but the {arch.value} model can be cut into at most "
            f"{max_stages(model)} pipeline stages (one per layer with parameters); lower parallelism.model "  # type: ignore[arg-type]
            "or add layers (model.numLayers)", reason="ParallelismMismatch")

    # ---- processes
    env = D.init_distributed(par.data, par.model)
    torch.manual_seed(hp.seed + env.rank)  # dropout masks differ between replicas
    engine = make_engine(model, env, par.strategy, cfg.precision, par.microbatches)
    optimizer = make_optimizer(engine.parameters(), cfg)
    loader = ShardedLoader(data.train_x, data.train_y, hp.batch_size, env.dp_size, env.dp_rank, hp.seed)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = hp.epochs * steps_per_epoch
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    metrics = TrainerMetrics(cfg.job_name, env.rank, cfg.metrics_port + env.local_rank if cfg.metrics_port else None)
    metrics.total_steps.set(total_steps)
    chash = config_hash(cfg)

    if env.is_main:
        log.info("job %s: %s (%d parameters) on %s %s | world %d = data %d x model %d (%s%s) | %s%s",
                 cfg.job_name, arch.value, count_parameters(model), data.name, list(data.inputs.shape), world_size,
                 par.data, par.model, par.strategy, f", {par.microbatches} micro-batches" if par.model > 1 else "",
                 env.device, ", bf16" if uses_bf16(cfg.precision, env.device) else "")
        log.info("train %d / eval %d samples, global batch %d (%d per replica), %d steps/epoch, %d steps in all",
                 len(data.train_x), len(data.eval_x), hp.batch_size, loader.local_batch, steps_per_epoch,
                 total_steps)

    # ---- resume
    step, epoch, batch_in_epoch, resumed_from = 0, 0, 0, None
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, env) if cfg.checkpoint.enabled else None
    if ckpt is not None:
        state = ckpt.resume(engine.state_module(), optimizer)
        if state is not None:
            step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batchInEpoch"])
            resumed_from = step
            PROGRESS["step"] = step
            metrics.checkpointed(ckpt.last_saved_at or time.time())
            if env.is_main:
                log.info("resumed from checkpoint step %d (epoch %d, batch %d)", step, epoch, batch_in_epoch)
                if state.get("configHash") not in (None, chash):
                    log.warning("the config changed since this checkpoint was written; continuing with the new one")

    def save() -> None:
        assert ckpt is not None
        ckpt.save(step, engine.state_module(), optimizer,
                  {"epoch": epoch, "batchInEpoch": batch_in_epoch, "samplesSeen": step * hp.batch_size,
                   "configHash": chash, "savedAt": time.time(), "worldSize": world_size,
                   "parallelism": par.dump()})
        metrics.checkpointed(time.time())

    # ---- the loop
    start_time = time.time()
    window_t, window_steps = time.perf_counter(), 0
    window = torch.zeros(3, device=env.device)
    # steady-state throughput: training steps only (no eval, no checkpoints), after WARMUP_STEPS
    train_time, timed_steps, first_step = 0.0, 0, step
    next_sync, sync_t, sync_step = step + 1, time.perf_counter(), step
    last_eval: dict[str, float] = {}
    engine.train(True)
    while step < total_steps:
        metrics.epoch.set(epoch)
        for x, y in loader.epoch(epoch, batch_in_epoch):
            t_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            engine.train_step(x, y, window)  # adds this rank's [loss_sum, correct, count]; summed when logged
            lr = learning_rate_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            PROGRESS["step"] = step
            batch_in_epoch += 1
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if step - first_step > WARMUP_STEPS:
                train_time += time.perf_counter() - t_step
                timed_steps += 1
            window_steps += 1
            metrics.step.set(step)
            log_now = step % cfg.log_interval_steps == 0 or step == total_steps
            if not (log_now or step >= next_sync):
                if ckpt is not None and step % cfg.checkpoint.interval_steps == 0:
                    save()
                continue
            # every ~SYNC_SECONDS (and when logging) the ranks agree on stopping and time-based checkpoints
            due = ckpt is not None and cfg.checkpoint.interval_seconds is not None and env.is_main and \
                time.time() - (ckpt.last_saved_at or start_time) >= cfg.checkpoint.interval_seconds
            gap = 0.0
            if env.is_main:  # steps until the next sync, from the time per step since the last one
                now = time.perf_counter()
                per_step = (now - sync_t) / max(step - sync_step, 1)
                gap = float(min(MAX_SYNC_STEPS, max(1, int(SYNC_SECONDS / max(per_step, 1e-6)))))
                sync_t, sync_step = now, step
            flags = torch.tensor([float(STOP.requested), float(due), gap], device=env.device)
            control = D.all_reduce_sum(torch.cat([flags, window]), env)
            stop, due = control[0].item() > 0, control[1].item() > 0
            next_sync = step + int(control[2].item())
            if log_now:
                elapsed = time.perf_counter() - window_t
                loss_sum, correct, count = control[3:].tolist()
                sps = window_steps * hp.batch_size / max(elapsed, 1e-9)
                metrics.loss.set(loss_sum / max(count, 1))
                metrics.samples_per_second.set(sps)
                if env.is_main:
                    log.info("epoch %d/%d step %d/%d (%d%%) loss %.4f acc %.4f | %.0f samples/s | eta %s",
                             min(epoch + (batch_in_epoch > 0), hp.epochs), hp.epochs, step, total_steps,
                             100 * step // total_steps, loss_sum / max(count, 1), correct / max(count, 1), sps,
                             _fmt_eta((total_steps - step) * hp.batch_size / max(sps, 1e-9)))
                window.zero_()
                window_t, window_steps = time.perf_counter(), 0
            if ckpt is not None and (stop or due or step % cfg.checkpoint.interval_steps == 0):
                save()
            if stop:
                raise Preempted(f"stopped by signal {STOP.signum or 'on a peer'} at step {step}; "
                                f"{'checkpoint saved' if ckpt else 'checkpoints are disabled'}", step=step)
            if batch_in_epoch == 0 or step >= total_steps:
                break
        if batch_in_epoch == 0 or step >= total_steps:  # an epoch ended (or the run did): evaluate
            last_eval = evaluate(engine, data, env)
            metrics.accuracy.set(last_eval["accuracy"])
            if env.is_main:
                log.info("eval after epoch %d: accuracy %.4f loss %.4f (%d samples)", epoch, last_eval["accuracy"],
                         last_eval["loss"], last_eval["evalSamples"])
    wall = time.time() - start_time

    # ---- the end: final eval, checkpoint, artifact
    if not last_eval:
        last_eval = evaluate(engine, data, env)
        metrics.accuracy.set(last_eval["accuracy"])
    if ckpt is not None and ckpt.last_step != step:
        save()
    full = engine.full_state_dict()
    opt_steps = optimizer_step_count(optimizer)
    result_metrics: dict[str, Any] = {
        **last_eval,
        "steps": step,
        "optimizerSteps": opt_steps,
        "totalSteps": total_steps,
        "epochs": epoch if batch_in_epoch == 0 else epoch + 1,
        "trainSamples": len(data.train_x),
        "globalBatchSize": hp.batch_size,
        "resumedFromStep": resumed_from,
        "wallSeconds": round(wall, 3),
        "samplesPerSecond": round(timed_steps * hp.batch_size / train_time, 2) if train_time > 0 else None,
        "worldSize": world_size,
        "parallelism": par.dump(),
    }
    if env.is_main:
        assert full is not None
        manifest = make_manifest(cfg.job_name, cfg.model, data.inputs, cfg.dataset.dump(),
                                 training={"steps": step, "epochs": hp.epochs, "seed": hp.seed,
                                           "parallelism": par.dump(), "configHash": chash})
        write_artifact(cfg.artifact_dir, full, manifest, result_metrics)
        log.info("done: %d steps, eval accuracy %.4f, artifact %s", step, last_eval["accuracy"], cfg.artifact_dir)
    try:  # wait for rank 0's artifact; the run is complete either way, so a peer gone by now is no failure
        D.barrier(env)
    except Exception as e:  # noqa: BLE001
        log.warning("rank %d: the final barrier failed after training completed: %s", env.rank, e)
    return Result(step, cfg.artifact_dir, result_metrics, env)
