"""All-pairs CKA (common/analysis/similarity.py) against the per-pair loop, and its peak memory against --block_mb.

    uv run bench/sim_speed.py                                   # E = 64, n = 2048, H = 256, every pair timed
    uv run bench/sim_speed.py --baseline_pairs 200              # time 200 random pairs of the loop, extrapolate
    uv run bench/sim_speed.py --device cuda

Random expert outputs Y [E, n, H] (a shared component plus noise, so the CKAs are not all ~0). Two ways to get
linear CKA and debiased CKA for every pair i < j:

- all pairs: `expert_similarities` with the token blocks `plan_blocks` sizes for --block_mb (kernel blocks of all
  experts at once, reduced with matrix products; no loop over pairs);
- per pair (the straightforward approach of the MoE-spec thesis code): for each pair its own n × n Grams
  K = YᵢYᵢᵀ, L = YⱼYⱼᵀ, the biased HSIC from the centred Grams HKH and HLH, the unbiased HSIC from Song et al.'s
  formula on K̃, L̃, then CKA.

Prints both times (wall; on CPU also process CPU time, steadier on a shared machine), the speed-up against its goal
(≥ 20x), the largest difference between the two results over the pairs the loop computed (the all-pairs result read
from `SimilarityResult.matrices`; at most 1e-5 allowed, a NaN on either side is a difference), and the all-pairs
computation's peak memory above its inputs against the bound: torch.cuda.max_memory_allocated on GPU, the
resident-set high-water mark (reset through /proc/self/clear_refs) on CPU. Exit status 1, naming it, if the results
differ, the speed-up misses its goal or the peak exceeds --block_mb. Not a test: the loop takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.analysis.similarity import SimilarityResult, TensorOutputs, expert_similarities, plan_blocks

GOAL = 20.0  # speed-up of all pairs over the per-pair loop, wall clock
# Largest |all pairs - per pair| allowed for linear and debiased CKA: both ways build float32 Grams of the same outputs
# (the all-pairs sums in float64), so they differ by float32 rounding only. Measured: at most 1e-7 (CPU, defaults).
TOLERANCE = 1e-5
METHODS = ("cka", "cka-debiased")  # the per-pair loop's (linear, debiased) in this order


def pair_cka(yi: torch.Tensor, yj: torch.Tensor) -> tuple[float, float]:
    """(linear CKA, debiased CKA) of one pair from its own n × n Gram matrices."""
    n = yi.shape[0]
    ki, kj = yi @ yi.T, yj @ yj.T

    def centred(g):  # H G H
        return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()

    ci, cj = centred(ki), centred(kj)
    biased = (ci * cj).sum() / ((ci * ci).sum() * (cj * cj).sum()).sqrt()

    def unbiased_hsic(a, b):  # Song et al. (2012), eq. 5
        a, b = a.clone(), b.clone()
        a.fill_diagonal_(0)
        b.fill_diagonal_(0)
        trace = (a * b).sum()
        path = (a.sum(1) * b.sum(0)).sum()  # 1ᵀÃB̃1
        return (trace + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * path / (n - 2)) / (n * (n - 3))

    debiased = unbiased_hsic(ki, kj) / (unbiased_hsic(ki, ki) * unbiased_hsic(kj, kj)).sqrt()
    return float(biased), float(debiased)


def largest_difference(result: SimilarityResult, reference: dict[tuple[int, int], tuple[float, float]]) -> float:
    """max over the pairs (i, j) of `reference` and both methods of |result - reference|; NaN if either side is NaN
    (not finite) anywhere, so that an undefined value cannot hide behind a smaller finite one."""
    worst = 0.0
    for (i, j), values in reference.items():
        for method, expected in zip(METHODS, values, strict=True):
            difference = abs(float(result.matrices[method][i, j]) - expected)
            if not math.isfinite(difference):
                return math.nan
            worst = max(worst, difference)
    return worst


def agreement_failure(worst: float, pairs: int) -> str | None:
    """Why the two ways disagree (None when they agree within TOLERANCE)."""
    if math.isnan(worst):
        return f"results: a value is NaN or infinite on one side (over {pairs} pairs)"
    if worst > TOLERANCE:
        return f"results: largest |difference| {worst:.2e} > {TOLERANCE:g} (over {pairs} pairs)"
    return None


def rss_reset() -> int | None:
    """Current resident set (bytes) after resetting the kernel's high-water mark; None where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--block_mb", type=float, default=512)
    parser.add_argument("--baseline_pairs", type=int, default=0,
                        help="time this many random pairs of the per-pair loop and extrapolate (0 = every pair)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    E, n, H = args.experts, args.tokens, args.width

    g = torch.Generator().manual_seed(args.seed)
    common = torch.randn(n, H, generator=g)
    mix = torch.rand(E, 1, 1, generator=g)
    y = (mix * common + torch.randn(E, n, H, generator=g)).to(device)
    plan = plan_blocks(E, n, H, masked=False, rbf=False, budget_mb=args.block_mb)
    print(f"device: {torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    print(f"E = {E}, n = {n}, H = {H}; --block_mb {args.block_mb:g}: token blocks of {plan.block} "
          f"({-(-n // plan.block)} per side), planned peak {plan.estimate_mb:.0f} MiB incl. the outputs")

    # warm-up (allocator, kernels), then the timed all-pairs run with its memory high-water mark
    expert_similarities(TensorOutputs(y[:4, :64]), ["cka", "cka-debiased"], device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_reset()
    wall, cpu = clocks()
    result = expert_similarities(TensorOutputs(y), list(METHODS), block=plan.block,
                                 token_block=plan.token_block, device=device)
    if cuda:
        torch.cuda.synchronize()
    all_wall, all_cpu = clocks()[0] - wall, clocks()[1] - cpu
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else (
        _status("VmHWM") - base if base is not None else None)

    pairs = [(i, j) for i in range(E) for j in range(i + 1, E)]
    timed = pairs
    if 0 < args.baseline_pairs < len(pairs):
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))[: args.baseline_pairs]
        timed = [pairs[int(p)] for p in chosen]
    pair_cka(y[0], y[1])  # warm-up
    wall, cpu = clocks()
    reference = {(i, j): pair_cka(y[i], y[j]) for i, j in timed}
    if cuda:
        torch.cuda.synchronize()
    scale = len(pairs) / len(timed)
    loop_wall, loop_cpu = (clocks()[0] - wall) * scale, (clocks()[1] - cpu) * scale
    note = "" if scale == 1 else f" (extrapolated from {len(timed)} of {len(pairs)} pairs)"

    print(f"all pairs (blocked):  wall {all_wall:8.2f} s" + ("" if cuda else f", CPU {all_cpu:8.2f} s"))
    print(f"per-pair loop:        wall {loop_wall:8.2f} s" + ("" if cuda else f", CPU {loop_cpu:8.2f} s") + note)
    failures = []
    ratio = loop_wall / all_wall
    line = f"speed-up: {ratio:.1f}x wall" + ("" if cuda else f", {loop_cpu / all_cpu:.1f}x CPU time")
    print(f"{line}  (goal ≥ {GOAL:g}x: {'PASS' if ratio >= GOAL else 'FAIL'})")
    if ratio < GOAL:
        failures.append(f"speed-up: {ratio:.1f}x wall < {GOAL:g}x")
    worst = largest_difference(result, reference)
    disagreement = agreement_failure(worst, len(timed))
    print(f"largest |difference| between the two (linear and debiased CKA), over {len(timed)} pairs: {worst:.2e} "
          f"(≤ {TOLERANCE:g} allowed: {'PASS' if disagreement is None else 'FAIL'})")
    if disagreement is not None:
        failures.append(disagreement)
    if peak is None:
        print("peak memory: not measurable here (/proc/self/clear_refs not writable)")
    else:
        what = "torch.cuda.max_memory_allocated" if cuda else "RSS high-water mark"
        verdict = "PASS" if peak / 2**20 <= args.block_mb else "FAIL"
        print(f"peak memory above the inputs ({what}): {peak / 2**20:.0f} MiB; bound --block_mb {args.block_mb:g} "
              f"MiB: {verdict}")
        if verdict == "FAIL":
            failures.append(f"peak memory: {peak / 2**20:.0f} MiB > --block_mb {args.block_mb:g}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
