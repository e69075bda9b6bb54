"""Loading and checking the :class:`~aiaas.contract.config.TrainerConfig` of a training process.

The config comes from, in order: ``--config FILE``, ``$AIAAS_TRAINER_CONFIG`` (JSON, camelCase, as the
operator renders it), ``$AIAAS_TRAINER_CONFIG_FILE``. Anything wrong with it is a :class:`PermanentError`
whose message names the field and the fix: restarting the pod cannot repair a config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from aiaas.contract.config import Architecture, DatasetKind, TrainerConfig
from aiaas.contract.launch import ENV_CONFIG, ENV_CONFIG_FILE, ENV_NNODES

from .errors import PermanentError

log = logging.getLogger(__name__)


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err and
                                               not isinstance(err["input"], dict) else ""))
    return "invalid trainer config: " + "; ".join(parts)


def parse_config(data: dict[str, Any] | str) -> TrainerConfig:
    """Validate a config given as a dict or JSON/YAML text."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data) if data.strip() else {}
        except yaml.YAMLError as e:
            raise PermanentError(f"trainer config is not valid JSON/YAML: {e}") from e
    if not isinstance(data, dict):
        raise PermanentError(f"trainer config must be an object, got {type(data).__name__}")
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as e:
        raise PermanentError(_format_validation_error(e)) from e


def load_config(path: str | None = None, environ: dict[str, str] | None = None) -> TrainerConfig:
    """The config of this process (see the module docstring for where it comes from)."""
    env = os.environ if environ is None else environ
    if path:
        try:
            return parse_config(Path(path).read_text())
        except OSError as e:
            raise PermanentError(f"cannot read trainer config file {path}: {e}") from e
    if env.get(ENV_CONFIG):
        return parse_config(env[ENV_CONFIG])
    if env.get(ENV_CONFIG_FILE):
        return load_config(env[ENV_CONFIG_FILE], environ={})
    raise PermanentError(f"no trainer config: pass --config FILE, or set {ENV_CONFIG} (JSON) or {ENV_CONFIG_FILE}")


def check_config(cfg: TrainerConfig, world_size: int) -> None:
    """Cross-field checks that need the world: raise :class:`PermanentError` naming the problem."""
    par, ds, hp = cfg.parallelism, cfg.dataset, cfg.hyperparameters
    if par.data * par.model != world_size and is_elastic() and world_size % par.model == 0:
        # an elastic job re-forms with fewer or more nodes: the data-parallel degree follows the world (the
        # global batch stays the same, so the trajectory does too; DCP checkpoints reshard on load)
        par.data = world_size // par.model
    if par.data * par.model != world_size:
        raise PermanentError(
            f"parallelism.data ({par.data}) x parallelism.model ({par.model}) = {par.data * par.model}, but the "
            f"job has {world_size} processes (nodes x nprocPerNode); make them equal",
            reason="ParallelismMismatch",
        )
    if hp.batch_size % par.data and is_elastic():
        # a world the global batch does not split over (an Auto job grown to 3 pods with batchSize 64) trains on:
        # with the nearest smaller global batch that splits, said in the log, rather than fail after a resize
        split = hp.batch_size // par.data * par.data
        log.warning("global batch %d does not split over %d data-parallel ranks: training with %d (%d per rank) "
                    "at this size; a batchSize divisible by every size in minNodes..maxNodes keeps it fixed",
                    hp.batch_size, par.data, split, split // par.data)
        hp.batch_size = split
    if hp.batch_size % par.data:
        raise PermanentError(
            f"hyperparameters.batchSize ({hp.batch_size}) must be divisible by parallelism.data ({par.data}): "
            "it is the global batch, split evenly across the data-parallel replicas",
            reason="InvalidConfig",
        )
    kind = DatasetKind(ds.kind)
    if kind in (DatasetKind.mnist, DatasetKind.text):
        if not ds.path:
            raise PermanentError(f"dataset.path is required for dataset kind {kind.value}", reason="DataNotFound")
        if not Path(ds.path).exists():
            raise PermanentError(
                f"dataset.path {ds.path} does not exist (dataset kind {kind.value}); mount the data into the "
                "pod (spec.volumes) or fix the path",
                reason="DataNotFound",
            )
    arch = Architecture(cfg.model.architecture)
    if kind == DatasetKind.text and arch in (Architecture.cnn, Architecture.resnet):
        raise PermanentError(
            f"model.architecture {arch.value} cannot read the text dataset (character ids); use rnn, lstm, gru "
            "or transformer",
            reason="InvalidConfig",
        )
    if arch == Architecture.transformer and kind != DatasetKind.text:
        raise PermanentError(
            f"model.architecture transformer is a language model over characters: it needs dataset.kind text, "
            f"not {kind.value}",
            reason="InvalidConfig",
        )


def is_elastic(environ: dict[str, str] | None = None) -> bool:
    """Whether torchrun runs this job elastically (``--nnodes=MIN:MAX``)."""
    env = os.environ if environ is None else environ
    nnodes = env.get(ENV_NNODES, "")
    return ":" in nnodes and len(set(nnodes.split(":"))) > 1


def config_hash(cfg: TrainerConfig) -> str:
    """A hash of what determines the training trajectory (not where files go or how progress is logged)."""
    d = cfg.dump()
    for k in ("checkpointDir", "artifactDir", "metricsPort", "logIntervalSteps", "checkpoint", "jobName"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
