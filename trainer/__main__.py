"""``python -m aiaas.trainer [--config FILE]`` — one training process, as torchrun starts it.

Exit codes and the termination message are described in :mod:`aiaas.trainer.termination`.

Run as a program, the process ends with :func:`os._exit` right after it has written its outcome and flushed
its output: nothing after that point (interpreter teardown destroying leftover process-group threads, a
daemon thread such as the metrics server) can change the exit code that the outcome states.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Mapping

from .errors import PermanentError, Preempted, RetryableError
from .termination import PERMANENT, PREEMPTED, RETRYABLE, SUCCEEDED, Outcome, write_outcome


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logging.getLogger("torch").setLevel(logging.WARNING)


# where libraries put their caches, by default under $HOME (read-only in a pod with readOnlyRootFilesystem)
CACHE_VARIABLES = {
    "XDG_CACHE_HOME": "xdg",  # torch hub/kernels, pip, ...
    "TORCHINDUCTOR_CACHE_DIR": "inductor",  # its default needs a passwd entry for the uid (getpass)
    "TRITON_CACHE_DIR": "triton",  # ~/.triton/cache
    "CUDA_CACHE_PATH": "cuda",  # ~/.nv/ComputeCache
    "MPLCONFIGDIR": "matplotlib",  # ~/.config/matplotlib (scikit-learn may import it)
}


def cache_defaults(environ: Mapping[str, str], tmp: str) -> dict[str, str]:
    """The cache variables not set in ``environ``, pointed under ``tmp``: the trainer writes only there, into
    the checkpoint and artifact directories, and into the termination log."""
    root = os.path.join(tmp, f"aiaas-cache-{os.getuid()}")
    return {name: os.path.join(root, sub) for name, sub in CACHE_VARIABLES.items() if not environ.get(name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiaas.trainer", description=__doc__)
    parser.add_argument("--config", "-c", help="TrainerConfig as a JSON/YAML file (default: $AIAAS_TRAINER_CONFIG)")
    args = parser.parse_args(argv)
    os.environ.update(cache_defaults(os.environ, tempfile.gettempdir()))
    _setup_logging()
    log = logging.getLogger("aiaas.trainer")
    rank = int(os.environ.get("RANK", "0"))
    progress = None
    try:
        from .config import load_config
        from .train import Progress, StopFlag, train

        stop, progress = StopFlag(), Progress()
        stop.install()
        cfg = load_config(args.config)
        result = train(cfg, stop, progress)
        outcome = Outcome(SUCCEEDED, "Completed", f"trained {result.step} steps, eval accuracy "
                          f"{result.metrics.get('accuracy', float('nan')):.4f}", rank=rank, step=result.step,
                          artifact=result.artifact, extra={"accuracy": result.metrics.get("accuracy")})
    except PermanentError as e:
        log.error("permanent error (%s): %s", e.reason, e)
        outcome = Outcome(PERMANENT, e.reason, str(e), rank=rank, step=e.step)
    except Preempted as e:
        log.warning("%s", e)
        outcome = Outcome(PREEMPTED, e.reason, str(e), rank=rank, step=e.step)
    except RetryableError as e:
        log.error("retryable error (%s): %s", e.reason, e)
        outcome = Outcome(RETRYABLE, e.reason, str(e), rank=rank, step=e.step)
    except Exception as e:  # noqa: BLE001 - anything unexpected: restart from the last checkpoint
        traceback.print_exc()
        outcome = Outcome(RETRYABLE, "TrainerFailed", f"{type(e).__name__}: {e}", rank=rank,
                          step=progress.step if progress else None)
    write_outcome(outcome)
    if outcome.outcome == SUCCEEDED:
        from . import distributed

        distributed.shutdown(result.env)  # after the outcome: what happens here cannot undo a finished run
    sys.stdout.flush()
    return outcome.exit_code


def exit_now(code: int) -> None:
    """Flush the output and end the process with ``code``, skipping interpreter teardown (see above)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
