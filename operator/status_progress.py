"""Training progress from rank 0's Prometheus endpoint: a pure parser and a small, time-boxed scraper."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from aiaas.contract import metrics as m

from . import api


def parse_progress(text: str) -> api.Progress | None:
    """Progress from the trainer's metrics text (exposition format); None when no trainer metric is in it.

    Several samples of one metric (e.g. one per rank on a shared registry) resolve to rank 0's, else the first.
    """
    values: dict[str, float] = {}
    ranks: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name
            if name not in (m.TRAINER_STEP, m.TRAINER_TOTAL_STEPS, m.TRAINER_EPOCH, m.TRAINER_LOSS,
                            m.TRAINER_ACCURACY, m.TRAINER_SAMPLES_PER_SECOND):
                continue
            rank = str(s.labels.get("rank", "0"))
            if name not in values or (rank == "0" and ranks.get(name) != "0"):
                values[name], ranks[name] = float(s.value), rank
    if not values:
        return None

    def as_int(name: str) -> int | None:
        v = values.get(name)
        return int(v) if v is not None and v == v else None

    def as_float(name: str) -> float | None:
        v = values.get(name)
        return round(v, 6) if v is not None and v == v else None

    return api.Progress(
        epoch=as_int(m.TRAINER_EPOCH),
        step=as_int(m.TRAINER_STEP),
        total_steps=as_int(m.TRAINER_TOTAL_STEPS) or None,
        loss=as_float(m.TRAINER_LOSS),
        metric=as_float(m.TRAINER_ACCURACY),
        samples_per_second=as_float(m.TRAINER_SAMPLES_PER_SECOND),
    )


Fetch = Callable[[str, float], str]


def http_fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - URL from operator settings
        return resp.read(1 << 20).decode("utf-8", "replace")


def scrape(url: str, timeout: float, fetch: Fetch = http_fetch) -> api.Progress | None:
    """Rank 0's progress, or None if the endpoint does not answer in time (the job is not failed for it)."""
    try:
        return parse_progress(fetch(url, timeout))
    except (OSError, ValueError):
        return None
