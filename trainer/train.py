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

The parts, each readable on its own: :class:`Progress` (where the run is), :class:`CheckpointSchedule` (when
to save, and saving), :class:`Trainer` (``train_step`` one optimizer step, ``sync`` the periodic agreement,
``run`` the epochs, ``finish`` eval and export). Nothing here is module-level mutable state: the caller owns
the :class:`StopFlag` and the :class:`Progress` (``__main__`` reads the step of an unexpected error from it).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
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
from .models import build_model, count_parameters, max_stages, set_activation_checkpointing
from .parallel import Engine, make_engine, uses_bf16

log = logging.getLogger("aiaas.trainer")

EVAL_BATCH = 512
WARMUP_STEPS = 5
SYNC_SECONDS = 0.5  # how often the ranks agree on stopping (SIGTERM) and time-based checkpoints
MAX_SYNC_STEPS = 100


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next sync. A second signal exits at once."""

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


@dataclass
class Progress:
    """Where the run is: optimizer steps done and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


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
    engine.sync_buffers()
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


class CheckpointSchedule:
    """Decides when to save (every ``intervalSteps``, every ``intervalSeconds`` as judged by rank 0, on a stop,
    at the end) and saves; a no-op when checkpoints are disabled."""

    def __init__(self, cfg: TrainerConfig, env: D.DistEnv, world_size: int) -> None:
        self.cfg, self.env, self.world_size = cfg, env, world_size
        policy = cfg.checkpoint
        self.store = Checkpointer(cfg.checkpoint_dir, policy.keep_last, env) if policy.enabled else None
        self.config_hash = config_hash(cfg)
        self.started = time.time()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def due_by_steps(self, step: int) -> bool:
        return self.store is not None and step % self.cfg.checkpoint.interval_steps == 0

    def due_by_time(self) -> bool:
        """Rank 0's view (the sync spreads it to all ranks)."""
        seconds = self.cfg.checkpoint.interval_seconds
        return self.store is not None and seconds is not None and self.env.is_main and \
            time.time() - (self.store.last_saved_at or self.started) >= seconds

    def saved(self, step: int) -> bool:
        return self.store is None or self.store.last_step == step

    def resume(self, engine: Engine, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return self.store.resume(engine.state_module(), optimizer) if self.store is not None else None

    def save(self, progress: Progress, engine: Engine, optimizer: torch.optim.Optimizer) -> None:
        if self.store is None:
            return
        hp, par = self.cfg.hyperparameters, self.cfg.parallelism
        self.store.save(progress.step, engine.state_module(), optimizer,
                        {"epoch": progress.epoch, "batchInEpoch": progress.batch_in_epoch,
                         "samplesSeen": progress.step * hp.batch_size, "configHash": self.config_hash,
                         "savedAt": time.time(), "worldSize": self.world_size, "parallelism": par.dump()})


@dataclass
class Throughput:
    """Steady-state training time (optimizer steps only, after ``WARMUP_STEPS``) and the logging window."""

    first_step: int
    seconds: float = 0.0
    steps: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0

    def add(self, step: int, seconds: float) -> None:
        if step - self.first_step > WARMUP_STEPS:
            self.seconds += seconds
            self.steps += 1
        self.window_steps += 1

    def samples_per_second(self, batch: int) -> float | None:
        return round(self.steps * batch / self.seconds, 2) if self.seconds > 0 else None


class Trainer:
    """One rank's training run, built by :func:`build_trainer`."""

    def __init__(self, cfg: TrainerConfig, env: D.DistEnv, data: Dataset, engine: Engine,
                 optimizer: torch.optim.Optimizer, loader: ShardedLoader, total_steps: int,
                 metrics: TrainerMetrics, checkpoints: CheckpointSchedule, stop: StopFlag,
                 progress: Progress) -> None:
        self.cfg, self.env, self.data, self.engine, self.optimizer = cfg, env, data, engine, optimizer
        self.loader, self.total_steps, self.metrics, self.checkpoints = loader, total_steps, metrics, checkpoints
        self.stop, self.progress = stop, progress
        self.window = torch.zeros(3, device=env.device)  # this rank's [loss_sum, correct, count] since the last log
        self.throughput = Throughput(progress.step)
        self.next_sync, self.sync_t, self.sync_step = progress.step + 1, time.perf_counter(), progress.step
        self.resumed_from: int | None = None
        self.last_eval: dict[str, float] = {}

    def resume(self) -> None:
        state = self.checkpoints.resume(self.engine, self.optimizer)
        if state is None:
            return
        p = self.progress
        p.step, p.epoch, p.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batchInEpoch"])
        self.resumed_from = p.step
        self.throughput = Throughput(p.step)
        self.next_sync, self.sync_step = p.step + 1, p.step
        assert self.checkpoints.store is not None
        self.metrics.checkpointed(self.checkpoints.store.last_saved_at or time.time())
        if self.env.is_main:
            log.info("resumed from checkpoint step %d (epoch %d, batch %d)", p.step, p.epoch, p.batch_in_epoch)
            if state.get("configHash") not in (None, self.checkpoints.config_hash):
                log.warning("the config changed since this checkpoint was written; continuing with the new one")

    def save(self) -> None:
        self.checkpoints.save(self.progress, self.engine, self.optimizer)
        self.metrics.checkpointed(time.time())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step: gradients of the batch, the learning rate of this step, the update."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.train_step(x, y, self.window)  # adds [loss_sum, correct, count]; summed when logged
        lr = learning_rate_at(self.progress.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.progress.advance(self.loader.steps_per_epoch)
        self.throughput.add(self.progress.step, time.perf_counter() - t0)
        self.metrics.step.set(self.progress.step)

    def sync(self) -> tuple[bool, bool, list[float]]:
        """All ranks agree on (stop, checkpoint due) and sum the statistics window; rank 0 also sets how many
        steps until the next sync, from the time per step since the last one. Collective."""
        gap = 0.0
        if self.env.is_main:
            now = time.perf_counter()
            per_step = (now - self.sync_t) / max(self.progress.step - self.sync_step, 1)
            gap = float(min(MAX_SYNC_STEPS, max(1, int(SYNC_SECONDS / max(per_step, 1e-6)))))
            self.sync_t, self.sync_step = now, self.progress.step
        flags = torch.tensor([float(self.stop.requested), float(self.checkpoints.due_by_time()), gap],
                             device=self.env.device)
        control = D.all_reduce_sum(torch.cat([flags, self.window]), self.env)
        self.next_sync = self.progress.step + int(control[2].item())
        return control[0].item() > 0, control[1].item() > 0, control[3:].tolist()

    def log_window(self, stats: list[float]) -> None:
        hp, p, tp = self.cfg.hyperparameters, self.progress, self.throughput
        loss_sum, correct, count = stats
        sps = tp.window_steps * hp.batch_size / max(time.perf_counter() - tp.window_start, 1e-9)
        self.metrics.loss.set(loss_sum / max(count, 1))
        self.metrics.samples_per_second.set(sps)
        if self.env.is_main:
            log.info("epoch %d/%d step %d/%d (%d%%) loss %.4f acc %.4f | %.0f samples/s | eta %s",
                     min(p.epoch + (p.batch_in_epoch > 0), hp.epochs), hp.epochs, p.step, self.total_steps,
                     100 * p.step // self.total_steps, loss_sum / max(count, 1), correct / max(count, 1), sps,
                     _fmt_eta((self.total_steps - p.step) * hp.batch_size / max(sps, 1e-9)))
        self.window.zero_()
        tp.window_start, tp.window_steps = time.perf_counter(), 0

    def after_step(self) -> None:
        """Log, sync, checkpoint and stop as due after an optimizer step."""
        step = self.progress.step
        log_now = step % self.cfg.log_interval_steps == 0 or step == self.total_steps
        stop = due = False
        if log_now or step >= self.next_sync:
            stop, due, stats = self.sync()
            if log_now:
                self.log_window(stats)
        if stop or due or self.checkpoints.due_by_steps(step):
            self.save()
        if stop:
            raise Preempted(f"stopped by signal {self.stop.signum or 'on a peer'} at step {step}; "
                            f"{'checkpoint saved' if self.checkpoints.enabled else 'checkpoints are disabled'}",
                            step=step)

    def evaluate(self) -> None:
        self.last_eval = evaluate(self.engine, self.data, self.env)
        self.metrics.accuracy.set(self.last_eval["accuracy"])
        if self.env.is_main:
            log.info("eval after epoch %d: accuracy %.4f loss %.4f (%d samples)", self.progress.epoch,
                     self.last_eval["accuracy"], self.last_eval["loss"], self.last_eval["evalSamples"])

    def run(self) -> None:
        """The epochs: steps until the end of each epoch (then eval) or of the run."""
        p = self.progress
        self.engine.train(True)
        while p.step < self.total_steps:
            self.metrics.epoch.set(p.epoch)
            for x, y in self.loader.epoch(p.epoch, p.batch_in_epoch):
                self.train_step(x, y)
                self.after_step()
                if p.batch_in_epoch == 0 or p.step >= self.total_steps:
                    break
            self.evaluate()

    def finish(self, wall: float) -> dict[str, Any]:
        """Final eval and checkpoint, the artifact (rank 0); returns the run's metrics. Collective."""
        cfg, hp, par, p = self.cfg, self.cfg.hyperparameters, self.cfg.parallelism, self.progress
        if not self.last_eval:
            self.evaluate()
        if not self.checkpoints.saved(p.step):
            self.save()
        full = self.engine.full_state_dict()
        result: dict[str, Any] = {
            **self.last_eval, "steps": p.step, "optimizerSteps": optimizer_step_count(self.optimizer),
            "totalSteps": self.total_steps, "epochs": p.epoch if p.batch_in_epoch == 0 else p.epoch + 1,
            "trainSamples": len(self.data.train_x), "globalBatchSize": hp.batch_size,
            "resumedFromStep": self.resumed_from, "wallSeconds": round(wall, 3),
            "samplesPerSecond": self.throughput.samples_per_second(hp.batch_size),
            "worldSize": self.env.world_size, "parallelism": par.dump(),
        }
        if self.env.is_main:
            assert full is not None
            manifest = make_manifest(cfg.job_name, cfg.model, self.data.inputs, cfg.dataset.dump(),
                                     training={"steps": p.step, "epochs": hp.epochs, "seed": hp.seed,
                                               "parallelism": par.dump(),
                                               "configHash": self.checkpoints.config_hash})
            write_artifact(cfg.artifact_dir, full, manifest, result)
            log.info("done: %d steps, eval accuracy %.4f, artifact %s", p.step, self.last_eval["accuracy"],
                     cfg.artifact_dir)
        return result


def build_trainer(cfg: TrainerConfig, stop: StopFlag, progress: Progress) -> Trainer:
    """Data, model, process group, engine, optimizer, loader, metrics and checkpoints of this rank."""
    _, world_size, *_ = D.world_from_env()
    check_config(cfg, world_size)
    hp, par = cfg.hyperparameters, cfg.parallelism
    arch = Architecture(cfg.model.architecture)
    data = load_dataset(cfg.dataset, arch)  # identical on every rank (same seed)
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
    set_activation_checkpointing(model, par.activation_checkpointing)

    env = D.init_distributed(par.data, par.model)
    torch.manual_seed(hp.seed + env.rank)  # dropout masks differ between replicas
    engine = make_engine(model, env, par.strategy, cfg.precision, par.microbatches)
    optimizer = make_optimizer(engine.parameters(), cfg)
    loader = ShardedLoader(data.train_x, data.train_y, hp.batch_size, env.dp_size, env.dp_rank, hp.seed)
    total_steps = hp.epochs * loader.steps_per_epoch
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    metrics = TrainerMetrics(cfg.job_name, env.rank, cfg.metrics_port + env.local_rank if cfg.metrics_port else None)
    metrics.total_steps.set(total_steps)
    if env.is_main:
        log.info("job %s: %s (%d parameters) on %s %s | world %d = data %d x model %d (%s%s) | %s%s",
                 cfg.job_name, arch.value, count_parameters(model), data.name, list(data.inputs.shape), world_size,
                 par.data, par.model, par.strategy, f", {par.microbatches} micro-batches" if par.model > 1 else "",
                 env.device, ", bf16" if uses_bf16(cfg.precision, env.device) else "")
        log.info("train %d / eval %d samples, global batch %d (%d per replica), %d steps/epoch, %d steps in all",
                 len(data.train_x), len(data.eval_x), hp.batch_size, loader.local_batch, loader.steps_per_epoch,
                 total_steps)
    checkpoints = CheckpointSchedule(cfg, env, world_size)
    return Trainer(cfg, env, data, engine, optimizer, loader, total_steps, metrics, checkpoints, stop, progress)


def train(cfg: TrainerConfig, stop: StopFlag | None = None, progress: Progress | None = None) -> Result:
    """Run one training process to the end; raise :class:`PermanentError`, :class:`Preempted` or anything
    else (retryable). Rank 0 writes the artifact. ``progress`` (the caller's) follows the run's steps."""
    trainer = build_trainer(cfg, stop or StopFlag(), progress or Progress())
    trainer.resume()
    start = time.time()
    trainer.run()
    result = trainer.finish(time.time() - start)
    env = trainer.env
    try:  # wait for rank 0's artifact; the run is complete either way, so a peer gone by now is no failure
        D.barrier(env)
    except Exception as e:  # noqa: BLE001
        log.warning("rank %d: the final barrier failed after training completed: %s", env.rank, e)
    return Result(trainer.progress.step, cfg.artifact_dir, result, env)
