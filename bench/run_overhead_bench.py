"""Fixed cost of ``aiaas run`` per job: its whole-process wall time against a plain PyTorch script doing the
same training, measured interleaved in the same run (never a timed test).

    python bench/run_overhead_bench.py [--epochs 10] [--repeats 3]

Both train LeNet-5 on scikit-learn's digits (80/20 split, global batch 32, Adam, lr 0.002) for ``--epochs``
epochs, evaluate on the held-out fifth and save the weights: ``aiaas run -f examples/01-cnn-digits.yaml`` (the
epochs set by the bench, metrics off) and the plain script written below, each as a fresh process timed from
start to exit, each pinned to one thread (OMP_NUM_THREADS=1: on a shared machine two threads per process swing
the step time several-fold). They alternate, so both see the same machine load; the median of ``--repeats`` is
compared.
Prints both medians and the ratio (goal <= 1.15x), then where the runner's time went (from its own log):
the runner's start, the trainer's start until its first step, the training, the end (eval, export).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

PLAIN = '''
import sys, time
import torch, torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

class Net(nn.Module):  # LeNet-5, the classic sketch (8x8 digits upsampled to 32x32, as the trainer does)
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.interpolate((x - 4.9) / 6.0, size=(32, 32), mode="bilinear", align_corners=False)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))

torch.manual_seed(42)
d = load_digits()
x, y = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
n_eval = round(len(x) * 0.2)
tr, ev = perm[n_eval:], perm[:n_eval]
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=0.002)
epochs, batch = int(sys.argv[1]), 32
for epoch in range(epochs):
    order = tr[torch.randperm(len(tr))]
    for i in range(len(order) // batch):
        idx = order[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
net.eval()
with torch.no_grad():
    acc = (net(x[ev]).argmax(-1) == y[ev]).float().mean().item()
torch.save(net.state_dict(), sys.argv[2])
print(f"plain: eval accuracy {acc:.4f}")
'''


def timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return took, done.stdout


STAMP = re.compile(r"\| (\d\d):(\d\d):(\d\d) \[rank 0\] (.*)")


def phases(log: str) -> str:
    """Seconds between the trainer's own log stamps: start -> first step log -> last step -> done."""
    stamps = [(int(h) * 3600 + int(m) * 60 + int(s), what) for h, m, s, what in STAMP.findall(log)]
    steps = [t for t, what in stamps if " step " in what]
    done = [t for t, what in stamps if what.startswith("done")]
    if not stamps or not steps or not done:
        return "(no trainer log stamps)"
    return (f"trainer log: first stamp -> first step log {steps[0] - stamps[0][0]}s, training "
            f"{steps[-1] - steps[0]}s, last step -> done {done[0] - steps[-1]}s (1 s resolution)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="run-overhead-") as tmp:
        work = Path(tmp)
        doc = yaml.safe_load((REPO / "examples" / "01-cnn-digits.yaml").read_text())
        doc["spec"]["trainer"]["hyperparameters"]["epochs"] = args.epochs
        (work / "job.yaml").write_text(yaml.safe_dump(doc))
        (work / "plain.py").write_text(PLAIN)
        runs: dict[str, list[float]] = {"aiaas run": [], "plain script": []}
        log = ""
        for i in range(args.repeats):
            took, out = timed([sys.executable, "-m", "aiaas.operator.cli", "run", "-f", str(work / "job.yaml"),
                               "--metrics-port", "0", "--run-dir", str(work / "run")], work)
            runs["aiaas run"].append(took)
            log = out
            took, _ = timed([sys.executable, str(work / "plain.py"), str(args.epochs), str(work / "plain.pt")], work)
            runs["plain script"].append(took)
            print(f"round {i + 1}: aiaas run {runs['aiaas run'][-1]:.2f}s, plain {took:.2f}s", flush=True)
        ours, plain = statistics.median(runs["aiaas run"]), statistics.median(runs["plain script"])
        print(f"\nLeNet-5 on digits, {args.epochs} epochs, whole process, median of {args.repeats}:")
        print(f"  aiaas run     {ours:6.2f} s")
        print(f"  plain script  {plain:6.2f} s")
        print(f"  ratio         {ours / plain:6.2f}x  (goal <= 1.15x)")
        print(f"  {phases(log)}")


if __name__ == "__main__":
    main()
