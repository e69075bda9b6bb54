"""Training progress from rank 0's Prometheus endpoint: a pure parser and a small, time-boxed scraper.

The endpoint is run by whoever wrote the TrainingJob, so the scraper trusts nothing it says: the whole exchange
(connect, request, every byte of the answer) ends by one absolute deadline, the answer is capped in size, and a
redirect is an error, never followed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

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


MAX_SCRAPE_BYTES = 1 << 20  # the trainer's metrics are a few KiB


def http_fetch(url: str, timeout: float, max_bytes: int = MAX_SCRAPE_BYTES) -> str:
    """The body of a plain-HTTP GET of ``url``, all of it within ``timeout`` seconds from now (an absolute
    deadline: a server sending a byte now and then does not extend it). Raises OSError (unreachable, too slow)
    or ValueError (not HTTP 200 — redirects included — or larger than ``max_bytes``)."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are scraped, not {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    data = bytearray()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request.encode())
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{url} did not answer within {timeout:g}s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > max_bytes:
                raise ValueError(f"{url} answered more than {max_bytes} bytes")
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or status[1] != b"200":
        code = status[1].decode(errors="replace") if len(status) > 1 else "no HTTP status"
        raise ValueError(f"{url} answered {code}, not 200 (redirects are not followed)")
    return body.decode("utf-8", "replace")


def scrape(url: str, timeout: float, fetch: Fetch = http_fetch) -> api.Progress | None:
    """Rank 0's progress, or None if the endpoint does not answer in time (the job is not failed for it)."""
    try:
        return parse_progress(fetch(url, timeout))
    except (OSError, ValueError):
        return None
