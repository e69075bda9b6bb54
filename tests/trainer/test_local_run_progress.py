"""``aiaas run`` in a terminal (a real pseudo-terminal: one progress line redrawn in place) and piped (the
plain log lines), both with the real trainer, so the runner's reading of the trainer's step line is checked
against what the trainer actually prints."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiaas.operator.local import CLEAR_LINE, STEP_LINE, progress_line

REPO = Path(__file__).resolve().parents[2]
STEP = "16:29:28 [rank 0] epoch 6/10 step 240/440 (54%) loss 0.0391 acc 0.9906 | 348 samples/s | eta 18s"


def small_job(tmp_path: Path) -> list[str]:
    doc = yaml.safe_load((REPO / "examples" / "01-cnn-digits.yaml").read_text())
    doc["spec"]["trainer"]["hyperparameters"]["epochs"] = 2  # 88 steps, a step line every 10
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    return [sys.executable, "-m", "aiaas.operator.cli", "run", "-f", str(tmp_path / "job.yaml"), "--metrics-port", "0"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONSAFEPATH="1", COLUMNS="200", TERM="xterm")


def run_in_terminal(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; everything it wrote, as the terminal got it."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL, cwd=cwd, env=env())
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    return proc.wait(timeout=timeout), out.decode(errors="replace")


def test_progress_line_fits_the_terminal() -> None:
    m = STEP_LINE.search(STEP)
    assert m is not None
    wide = progress_line("cnn-digits", m, 200)
    assert wide == ("cnn-digits [##########----------] 240/440 54% | epoch 6/10 | loss 0.0391 acc 0.9906 | "
                    "348 samples/s | eta 18s")
    for columns in (80, 60, 40, 20):
        line = progress_line("cnn-digits", m, columns)
        assert len(line) < columns and "240/440" in line
    assert "eta 18s" in progress_line("cnn-digits", m, 60)


@pytest.mark.slow
def test_on_a_terminal_one_progress_line_is_redrawn(tmp_path: Path) -> None:
    code, out = run_in_terminal(small_job(tmp_path), tmp_path)
    assert code == 0, out[-3000:]
    bars = [part for part in out.split(CLEAR_LINE) if part.startswith("cnn-digits [")]
    assert len(bars) >= 9, out[-3000:]  # steps 10, 20, ... 80, 88 (redrawn after each line printed above it)
    assert bars[0].startswith("cnn-digits [##------------------] 10/88 11% | epoch 1/2 | loss ")
    assert "88/88 100% | epoch 2/2" in bars[-1] and "samples/s | eta " in bars[-1]
    assert " step 10/88 " not in out  # the step lines themselves are not printed
    assert "eval after epoch 1: accuracy" in out and "cnn-digits succeeded" in out


@pytest.mark.slow
def test_piped_every_line_is_printed(tmp_path: Path) -> None:
    done = subprocess.run(small_job(tmp_path), cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    steps = [line for line in done.stdout.splitlines() if STEP_LINE.search(line)]
    assert len(steps) == 9 and steps[0].startswith("cnn-digits-0 | ") and " step 88/88 (100%) " in steps[-1]
