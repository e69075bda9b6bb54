"""``python -m aiaas.trainer [--config FILE]`` — one training process, as torchrun starts it.

Exit codes and the termination message are described in :mod:`aiaas.trainer.termination`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .errors import PermanentError, Preempted, RetryableError
from .termination import PERMANENT, PREEMPTED, RETRYABLE, SUCCEEDED, Outcome, write_outcome


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    logging.getLogger("torch").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiaas.trainer", description=__doc__)
    parser.add_argument("--config", "-c", help="TrainerConfig as a JSON/YAML file (default: $AIAAS_TRAINER_CONFIG)")
    args = parser.parse_args(argv)
    _setup_logging()
    log = logging.getLogger("aiaas.trainer")
    rank = int(os.environ.get("RANK", "0"))
    try:
        from .config import load_config
        from .train import STOP, train

        STOP.install()
        cfg = load_config(args.config)
        result = train(cfg)
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
        from .train import PROGRESS

        outcome = Outcome(RETRYABLE, "TrainerFailed", f"{type(e).__name__}: {e}", rank=rank, step=PROGRESS["step"])
    write_outcome(outcome)
    sys.stdout.flush()
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
