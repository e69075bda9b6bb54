"""Trainer benchmark: ratios against baselines measured in the same run (never a timed test).

    python bench/trainer_bench.py [--steps 300] [--repeats 3] [--batch 64]

prints

1. DDP scaling efficiency: steady-state samples/s of 2 data-parallel processes vs 1 process at the same global
   batch (strong scaling), each process pinned to one thread (OMP_NUM_THREADS=1) so "1 vs 2 workers" means
   "1 vs 2 cores". Anchors: 55-78% for CPU data parallel over TCP (gloo), 93-97% on GPUs (NCCL). The textbook
   hand-written DDP loop is measured the same way in the same run, so a busy machine shows up in both.
2. Trainer overhead: the trainer's samples/s (``python -m aiaas.trainer``, one process, one thread) against a
   plain hand-written PyTorch loop of the same LeNet-5 (the classic sketch, inputs upsampled to 32x32 as the
   trainer does for 8x8 digits), same batch size, optimizer, thread count and data in memory. Target >= 0.95x.
3. Achieved FLOP/s of the LeNet-5 training step (forward + backward, counted by torch's FlopCounterMode) at the
   trainer's step rate, as a fraction of a matmul peak measured on this machine (fp32 GEMM, one thread, as the
   trainer run it is compared with).

4. The Transformer language model's training step (the trainer's engine + AdamW, one thread): tokens/s and
   achieved FLOP/s as a fraction of the matmul peak measured in the same run (goal >= 30% on CPU).
5. The same for ResNet-18 (small width preset) on 32x32 images.
6. DDP: the trainer's step vs the textbook DDP step of the language model in one 2-process torchrun job,
   interleaved (keep >= 0.95x). ``--only-models`` runs 4.-6. only.

Each measurement is repeated and the best run is kept (the machine may be shared: best-of-N is the least noisy
estimate of what the code can do). Steady state excludes the first steps, evals and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------- the plain baseline
def plain_loop(steps: int, batch: int, warmup: int = 5) -> dict[str, float]:
    """A hand-written PyTorch loop over digits: the baseline the trainer is compared with. Under torchrun it
    is the textbook DDP loop (each rank takes its share of the global batch)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    class Net(nn.Module):  # LeNet-5, the classic sketch
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate((x - 4.9) / 6.0, size=(32, 32), mode="bilinear", align_corners=False)
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.fc3(x)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    net: nn.Module = Net()
    if world > 1:
        dist.init_process_group("gloo")
        net = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    n = len(x) // batch
    t = 0.0
    for step in range(steps):
        if step % n == 0:
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))
        idx = perm[(step % n) * batch:(step % n + 1) * batch][rank::world]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step >= warmup:
            t += time.perf_counter() - t0
    if world > 1:
        dist.destroy_process_group()
    return {"samplesPerSecond": (steps - warmup) * batch / t, "rank": rank}


def interleaved_step_ratio(batch: int, blocks: int = 30, steps: int = 20) -> tuple[float, float]:
    """Per-step time of the trainer's engine step (zero_grad, train_step with its statistics, optimizer step,
    the loop's window update) vs the plain step, in one process, alternating blocks so that both see the same
    load. Returns (trainer ms, plain ms)."""
    import torch
    import torch.nn.functional as F

    from aiaas.trainer.distributed import DistEnv
    from aiaas.trainer.models import LeNet5
    from aiaas.trainer.parallel import DataParallelEngine

    torch.set_num_threads(1)
    env = DistEnv(0, 1, 0, 1, 0, torch.device("cpu"), None)
    torch.manual_seed(0)
    ours, plain = LeNet5(1, 8, 10, 4.9, 6.0), LeNet5(1, 8, 10, 4.9, 6.0)
    plain.load_state_dict(ours.state_dict())
    engine = DataParallelEngine(ours, env, "ddp", "fp32")
    opt_a, opt_b = torch.optim.Adam(ours.parameters()), torch.optim.Adam(plain.parameters())
    x, y = torch.rand(batch, 1, 8, 8) * 16, torch.randint(0, 10, (batch,))
    window = torch.zeros(3)

    def trainer_step() -> None:
        opt_a.zero_grad(set_to_none=True)
        engine.train_step(x, y, window)
        opt_a.step()

    def plain_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_b.step()

    times = {trainer_step: 0.0, plain_step: 0.0}
    for f in times:
        for _ in range(steps):
            f()
    for _ in range(blocks):
        for f in times:
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[f] += time.perf_counter() - t0
    n = blocks * steps
    return times[trainer_step] / n * 1e3, times[plain_step] / n * 1e3


def bench_model(kind: str, batch: int, context: int = 128, preset: str | None = None) -> tuple[Any, Any, Any]:
    """(model, inputs, labels) of a benchmark: ``lenet`` on digits-shaped inputs, ``lm`` the Transformer language
    model (``preset``, ``context`` characters of a 65-character vocabulary), ``resnet`` on 32x32 images."""
    import torch

    from aiaas.contract.config import ModelSpec
    from aiaas.trainer.models import InputSpec, LeNet5, build_model

    if kind == "lenet":
        return LeNet5(1, 8, 10, 4.9, 6.0), torch.rand(batch, 1, 8, 8) * 16, torch.randint(0, 10, (batch,))
    if kind == "lm":
        inputs = InputSpec("tokens", (context,), 65, vocab_size=65)
        model = build_model(ModelSpec(architecture="transformer", preset=preset or "lm-1m"), inputs)
        return model, torch.randint(0, 65, (batch, context)), torch.randint(0, 65, (batch, context))
    model = build_model(ModelSpec(architecture="resnet", preset=preset or "resnet18-small"),
                        InputSpec("image", (1, 32, 32), 10))
    return model, torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))


def textbook_loss(model: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def ddp_interleaved(batch: int, kind: str = "lenet", blocks: int = 20, steps: int = 20) -> dict[str, float]:
    """Under torchrun: the trainer's DDP step (engine + the loop's periodic control all-reduce) vs the textbook
    DDP step of the same model, in the same process group, alternating blocks (both see the same load)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from aiaas.trainer.distributed import all_reduce_sum, init_distributed
    from aiaas.trainer.parallel import DataParallelEngine

    world = int(os.environ["WORLD_SIZE"])
    env = init_distributed(world, 1)
    torch.manual_seed(0)
    b = batch // world
    ours, x, y = bench_model(kind, b)
    plain = bench_model(kind, b)[0]
    plain.load_state_dict(ours.state_dict())
    engine = DataParallelEngine(ours, env, "ddp", "fp32")
    textbook = DistributedDataParallel(plain)
    opt_a, opt_b = torch.optim.Adam(engine.parameters()), torch.optim.Adam(textbook.parameters())
    window, count = torch.zeros(3), 0
    sync_every = 20 if kind == "lenet" else 1  # the trainer syncs about every 0.5 s: LeNet ~15 ms/step, LM > 0.5 s

    def trainer_step() -> None:
        nonlocal count
        opt_a.zero_grad(set_to_none=True)
        engine.train_step(x, y, window)
        opt_a.step()
        count += 1
        if count % sync_every == 0:
            control = all_reduce_sum(torch.cat([torch.zeros(2), window]), env)
            control[0].item()

    def textbook_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        textbook_loss(textbook, x, y).backward()
        opt_b.step()

    times = {trainer_step: 0.0, textbook_step: 0.0}
    for f in times:
        for _ in range(min(steps, 3)):
            f()
    for _ in range(blocks):
        for f in times:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[f] += time.perf_counter() - t0
    dist.destroy_process_group()
    n = blocks * steps
    return {"trainerMs": times[trainer_step] / n * 1e3, "textbookMs": times[textbook_step] / n * 1e3,
            "rank": env.rank}


def engine_throughput(kind: str, batch: int, preset: str | None, context: int, blocks: int = 3,
                      steps: int = 3) -> dict[str, float]:
    """The trainer's training step (engine + AdamW, one process, one thread) on ``kind``: FLOPs per step
    (FlopCounterMode: forward + backward), best seconds per step over ``blocks``, and the matmul peak measured
    right before and after (the better of the two), so the fraction is of this machine at this moment."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from aiaas.trainer.distributed import DistEnv
    from aiaas.trainer.models import count_parameters
    from aiaas.trainer.parallel import DataParallelEngine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y = bench_model(kind, batch, context, preset)
    with FlopCounterMode(display=False) as fc:
        textbook_loss(model, x, y).backward()
    flops = int(fc.get_total_flops())
    engine = DataParallelEngine(model, DistEnv(0, 1, 0, 1, 0, torch.device("cpu"), None), "ddp", "fp32")
    opt = torch.optim.AdamW(engine.parameters())
    window = torch.zeros(3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        engine.train_step(x, y, window)
        opt.step()

    peak = matmul_peak()
    step()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    peak = max(peak, matmul_peak())
    return {"parameters": count_parameters(model), "stepFlops": flops, "secondsPerStep": best,
            "achievedFlops": flops / best, "peakFlops": peak, "fractionOfPeak": flops / best / peak}


def flops_per_step(batch: int) -> int:
    """FLOPs of one LeNet-5 training step (forward + backward) as the trainer builds it."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from aiaas.contract.config import ModelSpec
    from aiaas.trainer.models import InputSpec, build_model

    model = build_model(ModelSpec(architecture="cnn"), InputSpec("image", (1, 8, 8), 10))
    x, y = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    return int(fc.get_total_flops())


def matmul_peak(n: int = 1024, seconds: float = 2.0) -> float:
    """Best fp32 GEMM FLOP/s over a few seconds, on one thread (as the step it is compared with)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.rand(n, n), torch.rand(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
    return best


# -------------------------------------------------------------------------------------------- subprocesses
def _python(args: list[str], env: dict[str, str]) -> str:
    env = dict(env, PYTHONSAFEPATH="1")  # the repo root must not be on sys.path (operator/ vs the stdlib)
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def run_trainer(nproc: int, steps: int, batch: int, threads: int | None) -> float:
    """Steady-state samples/s the trainer reports for ``steps`` steps on ``nproc`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "jobName": "bench", "metricsPort": 0, "logIntervalSteps": 1000,
            "checkpoint": {"enabled": False}, "checkpointDir": f"{tmp}/ck", "artifactDir": f"{tmp}/art",
            "model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
            "hyperparameters": {"epochs": 1000, "maxSteps": steps, "batchSize": batch, "learningRate": 1e-3},
            "parallelism": {"data": nproc},
        }
        env = dict(os.environ, AIAAS_TRAINER_CONFIG=json.dumps(cfg), AIAAS_TERMINATION_LOG=f"{tmp}/term")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if nproc == 1:
            _python(["-m", "aiaas.trainer"], env)
        else:
            _python(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
                     "aiaas.trainer"], env)
        return float(json.loads(Path(f"{tmp}/art/metrics.json").read_text())["samplesPerSecond"])


def run_plain(steps: int, batch: int, threads: int | None, nproc: int = 1) -> float:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [str(HERE), "--plain", "--steps", str(steps), "--batch", str(batch)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    out = _python(args, env)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return float(next(r for r in results if r.get("rank", 0) == 0)["samplesPerSecond"])


def best_pair(f: Any, g: Any, repeats: int) -> tuple[float, float]:
    """Best of ``repeats`` runs of ``f`` and of ``g``, interleaved so both see the same machine load."""
    fs, gs = [], []
    for _ in range(repeats):
        fs.append(f())
        gs.append(g())
    return max(fs), max(gs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-interleaved", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="lenet", help=argparse.SUPPRESS)
    ap.add_argument("--lm-preset", default="lm-1m", help="language model preset for 4.")
    ap.add_argument("--lm-context", type=int, default=128, help="language model context (characters) for 4.")
    ap.add_argument("--lm-batch", type=int, default=16, help="language model batch (sequences) for 4. and 6.")
    ap.add_argument("--resnet-batch", type=int, default=32, help="ResNet batch (32x32 images) for 5.")
    ap.add_argument("--only-models", action="store_true", help="only 4.-6. (the new models)")
    args = ap.parse_args()
    if args.plain or args.ddp_interleaved:
        result = plain_loop(args.steps, args.batch) if args.plain else \
            ddp_interleaved(args.batch, args.kind, blocks=20 if args.kind == "lenet" else 8,
                            steps=20 if args.kind == "lenet" else 3)
        if result["rank"] == 0:  # one line on stdout, from rank 0
            print(json.dumps(result), flush=True)
        return

    import torch

    cores = os.cpu_count() or 1
    if args.only_models:
        models_section(args)
        return
    print(f"trainer benchmark: LeNet-5 on digits, global batch {args.batch}, {args.steps} steps, best of "
          f"{args.repeats}; torch {torch.__version__}, {cores} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}")

    # 1. DDP scaling (1 thread per worker)
    one, two = best_pair(lambda: run_trainer(1, args.steps, args.batch, threads=1),
                         lambda: run_trainer(2, args.steps, args.batch, threads=1), args.repeats)
    p_one, p_two = best_pair(lambda: run_plain(args.steps, args.batch, threads=1),
                             lambda: run_plain(args.steps, args.batch, threads=1, nproc=2), args.repeats)
    eff, p_eff = two / (2 * one), p_two / (2 * p_one)
    print(f"\n1. DDP scaling, same global batch: 1 process {one:,.0f} samples/s, 2 processes {two:,.0f} samples/s")
    print(f"   speed-up {two / one:.2f}x, scaling efficiency {eff:.0%}  (anchors: CPU/gloo 55-78%, GPU/NCCL 93-97%)")
    print(f"   the textbook DDP loop on this machine now: {p_one:,.0f} -> {p_two:,.0f} samples/s, efficiency "
          f"{p_eff:.0%}; trainer/textbook efficiency ratio {eff / p_eff:.2f}")
    out = _python(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
                   "--ddp-interleaved", "--batch", str(args.batch)], dict(os.environ, OMP_NUM_THREADS="1"))
    ddp = next(r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")) if r["rank"] == 0)
    print(f"   trainer vs textbook DDP step in one 2-process job, interleaved: {ddp['trainerMs']:.2f} ms vs "
          f"{ddp['textbookMs']:.2f} ms -> {ddp['textbookMs'] / ddp['trainerMs']:.2f}x")

    # 2. overhead against a plain loop (one process, one thread: on a shared machine more threads than free
    # cores turn every small op's OpenMP region into a scheduling lottery)
    trainer_sps, plain_sps = best_pair(lambda: run_trainer(1, args.steps, args.batch, threads=1),
                                       lambda: run_plain(args.steps, args.batch, threads=1), args.repeats)
    print("\n2. trainer vs plain PyTorch loop (1 process, 1 thread): trainer "
          f"{trainer_sps:,.0f} samples/s, plain {plain_sps:,.0f} samples/s -> {trainer_sps / plain_sps:.2f}x "
          "(target >= 0.95x)")

    ours_ms, plain_ms = interleaved_step_ratio(args.batch)
    print(f"   same comparison per step, in one process, interleaved (robust to machine load): trainer "
          f"{ours_ms:.2f} ms, plain {plain_ms:.2f} ms -> {plain_ms / ours_ms:.2f}x")

    # 3. FLOP/s as a fraction of the measured matmul peak
    flops = flops_per_step(args.batch)
    peak = matmul_peak()
    achieved = flops * trainer_sps / args.batch
    print(f"\n3. LeNet-5 training step: {flops / 1e6:.1f} MFLOP per step of {args.batch}; achieved "
          f"{achieved / 1e9:.2f} GFLOP/s vs measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s -> "
          f"{achieved / peak:.1%} of peak")
    print(json.dumps({"ddpScalingEfficiency": round(eff, 3), "plainDdpScalingEfficiency": round(p_eff, 3),
                      "ddpStepVsTextbookInterleaved": round(ddp["textbookMs"] / ddp["trainerMs"], 3), "trainerVsPlain": round(trainer_sps / plain_sps, 3),
                      "trainerVsPlainInterleaved": round(plain_ms / ours_ms, 3),
                      "fractionOfMatmulPeak": round(achieved / peak, 4), "samplesPerSecond1": round(one),
                      "samplesPerSecond2": round(two), "trainerSamplesPerSecond": round(trainer_sps),
                      "plainSamplesPerSecond": round(plain_sps), "stepFlops": flops,
                      "matmulPeakFlops": round(peak)}))
    models_section(args)


def models_section(args: argparse.Namespace) -> None:
    """4. the language model and 5. the ResNet as fractions of the matmul peak; 6. DDP vs textbook DDP (LM)."""
    lm = engine_throughput("lm", args.lm_batch, args.lm_preset, args.lm_context)
    tokens = args.lm_batch * args.lm_context
    print(f"\n4. language model {args.lm_preset} ({lm['parameters'] / 1e6:.2f} M parameters), batch "
          f"{args.lm_batch} x {args.lm_context} characters, 1 thread: {tokens / lm['secondsPerStep']:,.0f} "
          f"tokens/s, {lm['stepFlops'] / 1e9:.1f} GFLOP per step -> {lm['achievedFlops'] / 1e9:.1f} GFLOP/s vs "
          f"matmul peak {lm['peakFlops'] / 1e9:.1f} GFLOP/s = {lm['fractionOfPeak']:.1%} (goal >= 30%)")
    rn = engine_throughput("resnet", args.resnet_batch, None, 0)
    print(f"5. ResNet-18 small ({rn['parameters'] / 1e6:.2f} M parameters), batch {args.resnet_batch} x 32x32, "
          f"1 thread: {args.resnet_batch / rn['secondsPerStep']:,.0f} images/s, {rn['stepFlops'] / 1e9:.1f} GFLOP "
          f"per step -> {rn['achievedFlops'] / 1e9:.1f} GFLOP/s = {rn['fractionOfPeak']:.1%} of the matmul peak")
    out = _python(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
                   "--ddp-interleaved", "--kind", "lm", "--batch", str(args.lm_batch)],
                  dict(os.environ, OMP_NUM_THREADS="1"))
    ddp = next(r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")) if r["rank"] == 0)
    print(f"6. language model (lm-1m, context 128, global batch {args.lm_batch}), trainer vs textbook DDP step in "
          f"one 2-process job, interleaved: {ddp['trainerMs']:.0f} ms vs {ddp['textbookMs']:.0f} ms -> "
          f"{ddp['textbookMs'] / ddp['trainerMs']:.2f}x (keep >= 0.95x)")
    print(json.dumps({"lmTokensPerSecond": round(tokens / lm["secondsPerStep"]),
                      "lmFractionOfPeak": round(lm["fractionOfPeak"], 3),
                      "resnetImagesPerSecond": round(args.resnet_batch / rn["secondsPerStep"]),
                      "resnetFractionOfPeak": round(rn["fractionOfPeak"], 3),
                      "lmDdpVsTextbook": round(ddp["textbookMs"] / ddp["trainerMs"], 3)}))


if __name__ == "__main__":
    main()
