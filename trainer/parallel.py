"""How the model is spread over the ranks: an :class:`Engine` runs one training or eval step of this rank.

* :class:`DataParallelEngine` — one full model per data-parallel rank: plain (a world of one), DDP
  (``DistributedDataParallel`` over the ``dp`` mesh dimension) or FSDP (FSDP2 ``fully_shard`` of every layer
  with parameters and of the root, over the ``dp`` mesh dimension; parameters, gradients and optimizer state
  are sharded).
* :class:`PipelineEngine` — the model cut into ``parallelism.model`` stages (:func:`~.models.split_stages`),
  stage ``s`` on mesh coordinate ``pp = s``; each step runs a GPipe schedule over ``parallelism.microbatches``
  micro-batches with point-to-point send/recv (all forwards, then all backwards in reverse order). With
  ``data > 1`` this is the 2-D data x pipeline layout: each stage's replicas average their gradients over
  the ``dp`` mesh dimension (all-reduce for ddp, FSDP2 reduce-scatter for fsdp).

A training step adds its statistics into the caller's tensor ``[loss_sum, correct, count]`` (in place, no host
sync); an eval step returns them. Only ranks holding the last stage have non-zero statistics, so summing over
the world gives the global ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from aiaas.contract.config import Precision, Strategy

from .distributed import DistEnv
from .models import split_stages

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
_HEADER = 8


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked for, or (``auto``) on CUDA devices that support bf16; fp32 otherwise."""
    p = Precision(precision)
    if p == Precision.fp32:
        return contextlib.nullcontext()
    if p == Precision.auto and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def uses_bf16(precision: str, device: torch.device) -> bool:
    return not isinstance(autocast_context(precision, device), contextlib.nullcontext)


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[..., classes]`` and labels ``[...]`` as ``[n, classes]`` and ``[n]``: one row per prediction
    (a sample of a classifier, a position of a language model)."""
    return logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)


def _batch_stats(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """``[loss_sum, correct, count]`` over the predictions of a batch; ``w`` weighs samples (0: padding)."""
    if w is not None and y.dim() > 1:  # a weight per sample -> per prediction
        w = w.reshape(-1, *([1] * (y.dim() - 1))).expand_as(y)
    logits, y = _flat(logits, y)
    losses = F.cross_entropy(logits, y, reduction="none")
    correct = (logits.argmax(dim=1) == y).float()
    w = torch.ones_like(losses) if w is None else w.reshape(-1).float()
    return torch.stack([(losses * w).sum(), (correct * w).sum(), w.sum()]).detach()


def _fully_shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


class Engine:
    """One rank's share of the model and how to run a step on it."""

    module: nn.Module

    def __init__(self, env: DistEnv, precision: str) -> None:
        self.env = env
        self.precision = precision

    def amp(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.precision, self.env.device)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the data-parallel replicas, so
        that evaluation and the exported model see one set (FSDP and the pipeline do not sync buffers; DDP
        broadcasts rank 0's at each forward, which this keeps). Collective over the replicas."""
        if self.env.dp_size == 1:
            return
        for buf in self.module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, group=self.env.dp_group)
                buf /= self.env.dp_size

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor) -> None:
        """Forward and backward of one batch (gradients ready for the optimizer); adds
        ``[loss_sum, correct, count]`` of this rank's samples into ``stats``."""
        raise NotImplementedError

    def eval_step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_module(self) -> nn.Module:
        """The module whose (possibly sharded) state goes into a checkpoint."""
        return self.module

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model's state dict on CPU on global rank 0 (None elsewhere). Collective."""
        raise NotImplementedError


class DataParallelEngine(Engine):
    def __init__(self, model: nn.Module, env: DistEnv, strategy: str, precision: str) -> None:
        super().__init__(env, precision)
        model.to(env.device)
        self.model = model
        self.strategy = Strategy(strategy)
        if env.dp_size > 1 and self.strategy == Strategy.fsdp:
            assert env.mesh is not None
            _fully_shard(model, env.mesh["dp"])
            self.module = model
        elif env.dp_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids, process_group=env.dp_group)
        else:
            self.module = model

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor) -> None:
        x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
        with self.amp():
            logits = self.module(x)
        flat_logits, flat_y = _flat(logits, y)
        loss = F.cross_entropy(flat_logits, flat_y)
        loss.backward()
        with torch.no_grad():
            stats[0] += loss.detach() * len(flat_y)
            stats[1] += (flat_logits.argmax(dim=1) == flat_y).sum()
            stats[2] += len(flat_y)

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d = self.env.device
        with self.amp():
            logits = self.module(x.to(d))
        return _batch_stats(logits, y.to(d), w.to(d))

    def state_module(self) -> nn.Module:
        return self.model if isinstance(self.module, DistributedDataParallel) else self.module

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.env.dp_size > 1 and self.strategy == Strategy.fsdp:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if self.env.is_main else None
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ pipeline
def _send(t: torch.Tensor, dst: int) -> None:
    header = torch.zeros(_HEADER, dtype=torch.int64, device=t.device)
    header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
    header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dst)
    dist.send(t.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src)
    ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
    t = torch.empty([int(s) for s in header[2:2 + ndim]], dtype=dtype, device=device)
    dist.recv(t, src)
    return t


class PipelineEngine(Engine):
    """GPipe over point-to-point send/recv; see the module docstring."""

    def __init__(self, model: nn.Sequential, env: DistEnv, strategy: str, precision: str,
                 microbatches: int) -> None:
        super().__init__(env, precision)
        self.stage = split_stages(model, env.pp_size)[env.pp_rank]
        self.stage.to(env.device)
        self.strategy = Strategy(strategy)
        self.microbatches = microbatches
        self.module = self.stage
        self.sharded = env.dp_size > 1 and self.strategy == Strategy.fsdp
        if self.sharded:
            assert env.mesh is not None
            _fully_shard(self.stage, env.mesh["dp"])
        self.prev = env.stage_rank(env.pp_rank - 1) if not env.first_stage else None
        self.next = env.stage_rank(env.pp_rank + 1) if not env.last_stage else None

    def _sync_grads(self) -> None:
        """Average this stage's gradients over its data-parallel replicas (ddp strategy)."""
        if self.env.dp_size == 1 or self.sharded:
            return
        grads = [p.grad for p in self.stage.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.env.dp_group)
        flat /= self.env.dp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor) -> None:
        env, d = self.env, self.env.device
        n = len(y)
        x_mbs, y_mbs = x.to(d).chunk(self.microbatches), y.to(d).chunk(self.microbatches)
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for i in range(len(y_mbs)):  # forward all micro-batches
            if env.first_stage:
                inp = x_mbs[i]
            else:
                assert self.prev is not None
                inp = _recv(self.prev, d)
                if inp.is_floating_point():
                    inp.requires_grad_(True)
            with self.amp():
                out = self.stage(inp)
            if env.last_stage:
                loss = F.cross_entropy(*_flat(out, y_mbs[i])) * (len(y_mbs[i]) / n)
                stats += _batch_stats(out, y_mbs[i])
                outputs.append(loss)
            else:
                assert self.next is not None
                _send(out.detach(), self.next)
                outputs.append(out)
            inputs.append(inp)
        for i in reversed(range(len(outputs))):  # backward in reverse order
            if env.last_stage:
                outputs[i].backward()
            else:
                grad = torch.empty(outputs[i].shape, dtype=outputs[i].dtype, device=d)
                dist.recv(grad, self.next)
                torch.autograd.backward(outputs[i], grad)
            grad_in = inputs[i].grad
            if not env.first_stage and grad_in is not None:
                assert self.prev is not None
                dist.send(grad_in.contiguous(), self.prev)
        self._sync_grads()

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        env, d = self.env, self.env.device
        if env.first_stage:
            inp = x.to(d)
        else:
            assert self.prev is not None
            inp = _recv(self.prev, d)
        with self.amp():
            out = self.stage(inp)
        if env.last_stage:
            return _batch_stats(out, y.to(d), w.to(d))
        assert self.next is not None
        _send(out, self.next)
        return torch.zeros(3, device=d)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.sharded:  # every replica of the stage gets the full tensors (rank 0 of the world may not hold it)
            sd = get_model_state_dict(self.stage, options=StateDictOptions(full_state_dict=True))
            sd = {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        else:
            sd = {k: v.detach().cpu().clone() for k, v in self.stage.state_dict().items()}
        mine = sd if self.env.dp_rank == 0 else None
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine)
        if not self.env.is_main:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            if part:
                full.update(part)
        return full


def make_engine(model: nn.Module, env: DistEnv, strategy: str, precision: str, microbatches: int) -> Engine:
    if env.pp_size > 1:
        assert isinstance(model, nn.Sequential)
        return PipelineEngine(model, env, strategy, precision, microbatches)
    return DataParallelEngine(model, env, strategy, precision)
