"""Prometheus metrics of one training process (names from :mod:`aiaas.contract.metrics`, labels job, rank).

Each rank serves its own endpoint on ``metricsPort + LOCAL_RANK`` (a pod with ``nprocPerNode`` processes
exposes consecutive ports). A port that is taken is reported and skipped: metrics never stop training.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from aiaas.contract import metrics as names

log = logging.getLogger(__name__)


class TrainerMetrics:
    def __init__(self, job: str, rank: int, port: int | None) -> None:
        self.registry = CollectorRegistry()
        labels = ["job", "rank"]
        lv = {"job": job, "rank": str(rank)}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.loss = gauge(names.TRAINER_LOSS, "Training loss (mean over the last logging window).").labels(**lv)
        self.accuracy = gauge(names.TRAINER_ACCURACY, "Accuracy on the held-out eval split.").labels(**lv)
        self.samples_per_second = gauge(names.TRAINER_SAMPLES_PER_SECOND,
                                        "Training throughput of the whole job (global samples/s).").labels(**lv)
        self.step = gauge(names.TRAINER_STEP, "Optimizer steps done.").labels(**lv)
        self.total_steps = gauge(names.TRAINER_TOTAL_STEPS, "Optimizer steps the job will run.").labels(**lv)
        self.epoch = gauge(names.TRAINER_EPOCH, "Current epoch (0-based).").labels(**lv)
        self.last_checkpoint = gauge(names.TRAINER_LAST_CHECKPOINT,
                                     "Unix time of the last checkpoint written or loaded.").labels(**lv)
        self.checkpoint_age = gauge(names.TRAINER_CHECKPOINT_AGE, "Seconds since the last checkpoint.").labels(**lv)
        self._last_ckpt: float | None = None
        self.checkpoint_age.set_function(lambda: time.time() - self._last_ckpt if self._last_ckpt else float("nan"))
        self.port: int | None = None
        if port:
            try:
                start_http_server(port, registry=self.registry)
                self.port = port
            except OSError as e:
                log.warning("rank %d: cannot serve metrics on port %d (%s); continuing without", rank, port, e)

    def checkpointed(self, at: float) -> None:
        self._last_ckpt = at
        self.last_checkpoint.set(at)
