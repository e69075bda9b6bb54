"""Checkpoints: written atomically, verified before they are trusted, resumed automatically.

Layout under ``checkpointDir`` (a volume every rank of the job sees)::

    step-00000120/              one checkpoint, named by the optimizer step it was taken after
      .metadata, __0_0.distcp   torch.distributed.checkpoint (DCP) of {"model", "optim"}: each rank writes its
                                shards (FSDP) or its stage (pipeline); replicated tensors are written once
      trainer.json              step, epoch, batch within the epoch, samples seen, config hash, time
      rng-rank<r>.pt            each rank's torch RNG state (dropout)
      COMPLETE                  written last: {"step", "files": {name: {"size", "sha256"}}}

Writing: all ranks save into ``.tmp-step-N/`` (DCP fsyncs its files), then rank 0 checksums every file,
writes ``COMPLETE``, fsyncs, and renames the directory to ``step-N`` (atomic on one filesystem), then deletes
all but the newest ``keepLast``. Reading: rank 0 walks the checkpoints newest first and takes the first whose
``COMPLETE`` marker exists and whose files match it; anything else (a half-written or corrupted
checkpoint) is skipped with a warning and never loaded. Because DCP stores tensors by their fully
qualified names, a checkpoint also loads into a different layout (e.g. DDP -> FSDP, or a different number
of pipeline stages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_object
from .fsio import fsync_path, sha256_file, write_synced

log = logging.getLogger(__name__)

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MARKER = "COMPLETE"
STATE_FILE = "trainer.json"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns when it runs without a process group (a world of one); that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (None when it is complete and intact)."""
    marker = path / MARKER
    if not marker.exists():
        return f"no {MARKER} marker (half-written)"
    try:
        meta = json.loads(marker.read_text())
        files: dict[str, dict[str, Any]] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker: {e}"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != info["size"]:
            return f"file {name} has {f.stat().st_size} bytes, expected {info['size']}"
        if sha256_file(f) != info["sha256"]:
            return f"file {name} does not match its checksum"
    return None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest first (complete or not)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def valid_checkpoints(directory: Path) -> list[Path]:
    """Complete, intact checkpoints, newest first; the others are reported with a warning."""
    good = []
    for p in list_checkpoints(directory):
        problem = verify(p)
        if problem:
            log.warning("skipping checkpoint %s: %s", p, problem)
        else:
            good.append(p)
    return good


class Checkpointer:
    """Saves and restores ``{"model", "optim"}`` (DCP) plus the loop position and RNG state."""

    def __init__(self, directory: str | os.PathLike[str], keep_last: int, env: DistEnv) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.env = env
        self.last_saved_at: float | None = None
        self.last_step: int | None = None

    # -------------------------------------------------------------------------------------------- save
    def save(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (collective: every rank calls it)."""
        env = self.env
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{step_dir_name(step)}"
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(env)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(env.device)
        rng_file = tmp / f"rng-rank{env.rank}.pt"
        torch.save(rng, rng_file)
        with open(rng_file, "rb") as f:
            os.fsync(f.fileno())
        barrier(env)
        if env.is_main:
            write_synced(tmp / STATE_FILE, json.dumps({**state, "step": step}, indent=1).encode())
            files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
                     if p.is_file()}
            write_synced(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1).encode())
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.dir)
            self._prune()
        barrier(env)
        self.last_saved_at = time.time()
        self.last_step = step
        return final

    def _prune(self) -> None:
        complete = [p for p in list_checkpoints(self.dir) if (p / MARKER).exists()]
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        newest = int(complete[0].name[len(PREFIX):]) if complete else 0
        for p in self.dir.iterdir():  # half-written leftovers older than the newest complete checkpoint
            name = p.name
            stale_tmp = name.startswith(TMP_PREFIX + PREFIX) and int(name.rsplit("-", 1)[-1]) < newest
            stale_incomplete = name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and \
                not (p / MARKER).exists() and int(name[len(PREFIX):]) < newest
            if p.is_dir() and (stale_tmp or stale_incomplete):
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- load
    def load(self, path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load checkpoint ``path`` into ``module`` and ``optimizer`` (collective). Returns the loop state."""
        model_sd, optim_sd = get_state_dict(module, optimizer)
        sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng_file = path / f"rng-rank{self.env.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
        self.last_step = int(state["step"])
        self.last_saved_at = float(state.get("savedAt", time.time()))
        return state

    def resume(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint, if there is one (collective). Rank 0 picks the candidates,
        so every rank loads the same one; a checkpoint that fails to load on any rank is skipped."""
        candidates: list[str] = [str(p) for p in valid_checkpoints(self.dir)] if self.env.is_main else []
        candidates = broadcast_object(candidates, self.env)
        for c in candidates:
            err: str | None = None
            state: dict[str, Any] | None = None
            try:
                state = self.load(Path(c), module, optimizer)
            except Exception as e:  # noqa: BLE001 - a broken checkpoint must not stop the job
                err = f"{type(e).__name__}: {e}"
            failed = all_reduce_sum(torch.tensor([1.0 if err else 0.0], device=self.env.device), self.env)
            if float(failed.item()) == 0 and state is not None:
                return state
            if err:
                log.warning("rank %d: cannot load checkpoint %s, trying an older one: %s", self.env.rank, c, err)
        return None
