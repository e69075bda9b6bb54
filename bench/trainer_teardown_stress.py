"""Stress the end of a distributed training run: N consecutive 2-process torchrun jobs (FSDP and DDP) must
all succeed (rc 0, outcome Succeeded, artifact DONE). Not part of the test suite (it takes minutes).

    PYTHONSAFEPATH=1 python bench/trainer_teardown_stress.py --runs 20 [--strategies fsdp ddp] [--steps 44]

A failure prints the run's log tail; the summary is one JSON line: {"fsdp": {"runs", "failures"}, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "trainer"))
from trainer_helpers import train  # noqa: E402


def one_run(strategy: str, steps: int, root: Path, i: int) -> str | None:
    """None when the run succeeded, else what went wrong."""
    run = train(root / f"{strategy}-{i}", nproc=2, timeout=600, parallelism={"data": 2, "strategy": strategy},
                model={"architecture": "cnn"}, dataset={"kind": "digits"},
                hyperparameters={"epochs": 100, "maxSteps": steps, "batchSize": 32, "seed": i},
                checkpoint={"intervalSteps": max(1, steps // 2)})
    ok = run.rc == 0 and run.outcome is not None and run.outcome["outcome"] == "Succeeded" \
        and (run.artifact / "DONE").exists()
    return None if ok else f"rc {run.rc}, outcome {run.outcome}\n{run.log[-2500:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=44)
    ap.add_argument("--strategies", nargs="+", default=["fsdp", "ddp"])
    args = ap.parse_args()
    summary: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="teardown-stress-") as tmp:
        for strategy in args.strategies:
            failures = 0
            for i in range(args.runs):
                problem = one_run(strategy, args.steps, Path(tmp), i)
                if problem:
                    failures += 1
                    print(f"{strategy} run {i}: FAILED {problem}", flush=True)
                else:
                    print(f"{strategy} run {i}: ok", flush=True)
            summary[strategy] = {"runs": args.runs, "failures": failures}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
