"""Process-group setup from torchrun's environment.

torchrun (or a Kubeflow PyTorchJob) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them the process is a world of one and no process
group is created. The backend follows the device: NCCL on CUDA, Gloo on CPU.

The world is laid out on a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` ``("dp", "pp")`` of shape
``(parallelism.data, parallelism.model)``: global rank ``r`` is data-parallel replica ``r // model`` and
pipeline stage ``r % model``, so the stages of one replica are neighbouring ranks (on the same node when
``nprocPerNode`` is a multiple of ``model``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str | None
    dp_size: int = 1
    dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    mesh: DeviceMesh | None = None
    dp_group: Any = None  # ProcessGroup of the replicas of this pipeline stage (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of stage ``pp_rank`` in this process's replica."""
        return self.dp_rank * self.pp_size + pp_rank


def world_from_env() -> tuple[int, int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size, node_rank) from torchrun's variables."""
    world = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return (_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), local_world,
            _env_int("GROUP_RANK", _env_int("PET_NODE_RANK", 0)))


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def init_distributed(data: int, model: int, timeout_s: int = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group (when the world has more than one process) and build the dp x pp mesh.

    The caller has already checked ``data * model == WORLD_SIZE``.
    """
    rank, world, local_rank, local_world, node_rank = world_from_env()
    device = pick_device(local_rank)
    if device.type == "cpu" and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    env = DistEnv(rank, world, local_rank, local_world, node_rank, device, None,
                  dp_size=data, dp_rank=rank // model, pp_size=model, pp_rank=rank % model)
    if world == 1:
        return env
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    env.backend = backend
    env.mesh = init_device_mesh(device.type, (data, model), mesh_dim_names=("dp", "pp"))
    if data > 1 and model > 1:  # with model == 1 the replicas are the whole world: the default group
        env.dp_group = env.mesh.get_group("dp")
    log.debug("rank %d/%d: dp %d/%d pp %d/%d on %s (%s)", rank, world, env.dp_rank, data, env.pp_rank, model,
              device, backend)
    return env


def all_reduce_sum(t: torch.Tensor, env: DistEnv, group: Any = None) -> torch.Tensor:
    """Sum ``t`` over ``group`` (the world by default), in place; a no-op in a world of one."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    """Leave the process group after the last collective. Training is over by then, so a failure here is
    logged, never raised: it must not turn a finished job into a failed one.

    ``destroy_process_group`` shuts the backends down but does not end gloo's threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``): torch keeps references to the process groups until the interpreter exits, and
    destroying them then, in whatever order exit-time teardown takes, aborted a worker now and then
    ("terminate called without an active exception", SIGABRT) after a successful run. The process therefore
    ends with :func:`os._exit` once its outcome is written (see ``aiaas.trainer.__main__``).
    """
    if env.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("rank %d: leaving the process group failed (training is complete): %s", env.rank, e)
