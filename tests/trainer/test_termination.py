"""The termination message: valid JSON within the kubelet's 4096 bytes whatever the error, and one coherent
outcome when several worker processes write the same file at once (real processes, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from aiaas.trainer.termination import MAX_BYTES, Outcome, encode_outcome, read_outcome, write_outcome


def test_termination_log_keeps_the_most_severe_first_outcome(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    write_outcome(Outcome("RetryableError", "TrainerFailed", "root cause", rank=1), log)
    write_outcome(Outcome("RetryableError", "TrainerFailed", "connection closed by peer", rank=0), log)
    write_outcome(Outcome("Preempted", "Preempted", "SIGTERM", rank=2), log)
    assert read_outcome(log)["message"] == "root cause"  # type: ignore[index]
    write_outcome(Outcome("PermanentError", "InvalidConfig", "bad", rank=0), log)
    data = read_outcome(log)
    assert data and data["outcome"] == "PermanentError" and data["exitCode"] == 78


def test_a_10kb_non_ascii_error_stays_valid_json_under_the_kubelet_limit(tmp_path: Path) -> None:
    """Cutting by characters let 3500 characters of 3-4 byte UTF-8 (or 6-12 byte \\u escapes) overflow 4096
    bytes; the kubelet then cut the JSON and the operator took a permanent error for a retryable one."""
    message = 'données "invalides" é€😀 ligne\n\t' * 320  # ~10 kB of UTF-8, quotes and control characters
    assert len(message.encode()) > 10_000
    log = tmp_path / "termination-log"
    write_outcome(Outcome("PermanentError", "DataInvalid", message, rank=3, step=7), log)
    raw = log.read_bytes()
    assert len(raw) <= MAX_BYTES
    data = json.loads(raw.decode("utf-8"))  # strict: a cut in the middle of a character would fail here
    assert data["outcome"] == "PermanentError" and data["reason"] == "DataInvalid" and data["exitCode"] == 78
    assert data["rank"] == 3 and data["step"] == 7
    assert data["message"].endswith("...") and message.startswith(data["message"][:-3])
    assert len(raw) > MAX_BYTES - 64, "the message was cut far more than needed"
    short = encode_outcome(Outcome("Succeeded", "Completed", "trained 3 steps"))
    assert json.loads(short)["message"] == "trained 3 steps"


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from aiaas.trainer.termination import Outcome, write_outcome
    path, rank = Path(sys.argv[1]), int(sys.argv[2])
    for i in range(150):  # one permanent error among retryable ones: an unlocked read-compare-write loses it
        kind = "PermanentError" if i == 60 + rank else "RetryableError"
        write_outcome(Outcome(kind, "R" + str(rank), (str(rank) + "é") * 2000, rank=rank, step=i), path)
""")


def test_concurrent_workers_never_interleave(tmp_path: Path) -> None:
    """Eight worker processes race to write outcomes with ~6 kB messages: the file ends as one valid JSON
    line, the most severe outcome, with the message of the writer named in it."""
    log = tmp_path / "termination-log"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(r)]) for r in range(8)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    raw = log.read_bytes()
    assert len(raw) <= MAX_BYTES and raw.count(b"\n") == 1
    data = json.loads(raw)
    assert data["outcome"] == "PermanentError"
    assert data["reason"] == f"R{data['rank']}" and data["message"].startswith(f"{data['rank']}é")
    assert not list(tmp_path.glob(".termination-log.[0-9]*")), "a temp file was left behind"
