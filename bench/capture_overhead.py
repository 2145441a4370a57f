"""What does collecting routing statistics cost over a bare forward pass? (the goal: ≤ 1.05×, and below the naive way.)

    uv run bench/capture_overhead.py                              # CPU defaults: 1 thread, 4 × 256 tokens, 7 repeats
    uv run bench/capture_overhead.py --device cuda --batch_size 16 --seq_len 512

On a random model with OLMoE-1B-7B's structure (64 SwiGLU experts, top-8, softmax routing without top-k
renormalisation, qk-norm attention), scaled down to run on a small CPU, one process times on the same batch, in
interleaved repeats after a warm-up (median of N, under `torch.inference_mode()`; on CPU the clock is the process's
CPU time, which other processes on a shared machine barely move; on a GPU it is the synchronised wall clock):

  bare      the forward pass alone, no hooks;
  capture   the forward with the capture hooks (logits + top-k) but no accumulation: the hooks' own cost;
  stats     what the routing scripts do per batch (`pipeline.captured_batches`): capture logits + top-k of every
            selected MoE layer and stream `DecisivenessStats`, per-(layer, domain) expert selection counts
            (`BinCount`) and `DistributionStats` on the device, with no host sync per batch;
  naive     the original study scripts' way: `output_router_logits=True`, every layer's logits copied to a growing
            host store per batch, and the same entropies / top-k / counts / histograms computed with numpy
            afterwards (timed per batch as `naive fwd+store` + `naive numpy`).

It checks once that both ways agree (mean entropy per layer to 1e-6 relative; every quantity's histograms on the
accumulators' own edges: equal totals and at most 1e-5 of the entries in another bin; selection counts are
reported), prints the ratios to `bare`, tokens/s, memory held by each way, a per-accumulator
breakdown of the stats update (time and aten ops dispatched: on a GPU each is about one kernel launch) and — when
the stats cost more than the goal, or with --profile — the torch profiler's most expensive ops in the update.
Exit status 1 if the mean entropies or any quantity's histograms disagree (the quantity is named).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `common` importable

from common.analysis.routing import DecisivenessStats, DistributionStats
from common.cli import pipeline
from common.data import Batch
from common.hooks import Capture, capture
from common.measure import count_ops
from common.model import MoELayer, MoEModel
from common.stats import Accumulator, BinCount

GOAL = 1.05  # the speed goal: routing statistics cost at most 5% over a bare forward pass (issue 20)
DOMAINS = ("domain_a", "domain_b")  # rows alternate between two domains, so (layer, domain) groups are exercised
MODES = ("bare", "capture", "stats", "naive")

# OLMoE-1B-7B-0924's structure (hidden 2048, 16 layers, 16 heads, expert intermediate 1024, vocab 50304, 64 experts,
# top-8, norm_topk_prob False), with the sizes divided so that one forward of ~1k tokens takes ~1 s on one CPU core.
OLMOE_SCALED = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "clip_qkv": None,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}


# --------------------------------------------------------------------------------------------- setup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", "-l", nargs="+", default=None, metavar="L", help="decoder-layer indices or 'all' (default)")
    p.add_argument("--batch_size", type=int, default=4, help="rows per forward pass")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats per mode before timing")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable on a shared machine)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--experts_implementation", default=None, help="transformers experts kernel (default: its own choice)")
    p.add_argument("--bins", type=int, default=200, help="histogram bins, as in the routing scripts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops of the stats update")
    return p


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MoEModel:
    torch.manual_seed(args.seed)
    config = OlmoeConfig(**OLMOE_SCALED)
    kwargs = {} if args.experts_implementation is None else {"experts_implementation": args.experts_implementation}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs).to(device).eval()
    return MoEModel(model, tokenizer=None, name="random OLMoE-shaped (scaled)")


def parameter_counts(moe: MoEModel) -> tuple[int, int]:
    """(total, active per token): active counts top_k of each MoE layer's routed experts."""
    total = sum(p.numel() for p in moe.model.parameters())
    inactive = 0
    for m in moe.layers:
        per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
        inactive += (m.num_experts - m.top_k) * per_expert
    return total, total - inactive


def make_batch(args: argparse.Namespace, vocab: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.seq_len)
    ids = torch.randint(0, vocab, shape, generator=g)
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones(shape, dtype=torch.long),
        count_mask=torch.ones(shape, dtype=torch.bool),
        domain_ids=torch.arange(args.batch_size) % len(DOMAINS),
        doc_ids=torch.arange(args.batch_size).view(-1, 1).expand(shape).clone(),
    ).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- streamed (device)


@dataclass
class RoutingStats:
    """The per-batch work of the routing scripts: decisiveness, selection counts and distributions, streamed."""

    layers: list[MoELayer]
    decisiveness: DecisivenessStats
    selections: BinCount
    distributions: DistributionStats

    @classmethod
    def create(cls, layers: Sequence[MoELayer], device: torch.device, bins: int) -> RoutingStats:
        axes = {"layer": [m.layer for m in layers], "domain": list(DOMAINS)}
        return cls(
            layers=list(layers),
            decisiveness=DecisivenessStats(layers, DOMAINS, device, bins=bins),
            selections=BinCount(axes, {"expert": max(m.num_choices for m in layers)}, device=device),
            distributions=DistributionStats(layers, DOMAINS, device, bins=bins),
        )

    def update_selections(self, records: Capture, token_domain: torch.Tensor, token_weight: torch.Tensor) -> None:
        for li, m in enumerate(self.layers):
            index = records[m.layer].topk_index
            self.selections.update(index, {"layer": li, "domain": token_domain}, token_weight)

    def updaters(self) -> dict[str, Callable[[Capture, torch.Tensor, torch.Tensor], None]]:
        return {
            "DecisivenessStats.update": self.decisiveness.update,
            "BinCount.update (selections)": self.update_selections,
            "DistributionStats.update": self.distributions.update,
        }

    def update(self, records: Capture, token_domain: torch.Tensor, token_weight: torch.Tensor) -> None:
        for fn in self.updaters().values():
            fn(records, token_domain, token_weight)

    def state_bytes(self) -> int:
        accs: list[Accumulator] = [self.selections, *self.decisiveness.stats.values(), *self.distributions.stats.values()]
        return sum(t.numel() * t.element_size() for acc in accs for t in acc.state_dict()["state"].values())


# --------------------------------------------------------------------------------------------- naive (host, numpy)


def _entr(p: np.ndarray) -> np.ndarray:
    """-p ln p with 0 at p = 0 (torch.special.entr), in p's dtype."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, -p * np.log(p), 0.0).astype(p.dtype)


def naive_statistics(
    store: list[np.ndarray], domain: np.ndarray, top_k: int, edges: dict[str, np.ndarray]
) -> dict[str, dict]:
    """The study scripts' post-processing of stored logits [T, C] per layer, with numpy: per token softmax, top-k,
    the `decisiveness` quantities and the `distribution_values`; per (layer, domain) — and per rank for the ranked
    top-k quantities — mean, std, min, max and a histogram of each on `edges[quantity]` (values outside clamped into
    the edge bins, as the project's histograms count them), and the expert selection counts."""
    num_domains, choices = len(DOMAINS), store[0].shape[-1]
    moments: dict[tuple, tuple[float, ...]] = {}  # (quantity, layer, domain[, rank]) -> mean, std, min, max
    hists: dict[tuple, np.ndarray] = {}
    counts = np.zeros((len(store), num_domains, choices), dtype=np.int64)
    for li, z in enumerate(store):
        e = np.exp(z - z.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        index = np.argpartition(-p, top_k - 1, axis=-1)[:, :top_k]
        p_topk = np.take_along_axis(p, index, -1)
        mass = p_topk.sum(-1)
        renormalised = p_topk / np.maximum(mass, np.finfo(p.dtype).tiny)[:, None]
        top2 = np.partition(p, choices - 2, axis=-1)[:, -2:]
        entropy, topk_entropy = _entr(p).sum(-1), _entr(renormalised).sum(-1)
        pooled = {
            "entropy": entropy,
            "entropy_normalized": entropy / math.log(choices),
            "topk_entropy": topk_entropy,
            "topk_entropy_normalized": topk_entropy / math.log(top_k),
            "top1_prob": top2.max(-1),
            "top1_top2_margin": top2.max(-1) - top2.min(-1),
            "topk_mass": mass,
            "logit": z,
            "softmax": p,
        }
        ranked = {
            "topk_renormalized": -np.sort(-renormalised, axis=-1),
            "weight": -np.sort(-p_topk, axis=-1),  # norm_topk_prob False: the experts get the top-k probabilities
        }
        for d in range(num_domains):
            rows = domain == d
            if not rows.any():  # a domain with no rows in this batch (batch size 1)
                continue
            counts[li, d] = np.bincount(index[rows].ravel(), minlength=choices)
            columns = [((name, li, d), v[rows]) for name, v in pooled.items()]
            columns += [((name, li, d, r), v[rows, r]) for name, v in ranked.items() for r in range(top_k)]
            for key, values in columns:
                x = values.astype(np.float64)
                moments[key] = (x.mean(), x.std(), x.min(), x.max())
                bounds = edges[key[0]]
                hists[key] = np.histogram(np.clip(x, bounds[0], bounds[-1]), bins=bounds)[0]
    return {"moments": moments, "histograms": hists, "counts": counts}


def naive_mean_entropy(result: dict[str, dict], num_layers: int, domain: np.ndarray) -> np.ndarray:
    """Mean entropy per layer over all tokens, from the per-domain means."""
    share = np.bincount(domain, minlength=len(DOMAINS)) / len(domain)
    present = [d for d in range(len(DOMAINS)) if share[d] > 0]
    return np.array([sum(share[d] * result["moments"]["entropy", li, d][0] for d in present) for li in range(num_layers)])


# --------------------------------------------------------------------------------------------- the measured steps


class Bench:
    """The model, one batch, the streamed accumulators and the naive host store; one method per timed mode."""

    def __init__(self, moe: MoEModel, layers: list[MoELayer], batch: Batch, bins: int) -> None:
        self.moe, self.layers, self.batch, self.bins = moe, layers, batch, bins
        self.device = moe.device
        self.stats = RoutingStats.create(layers, self.device, bins)
        self.store: list[list[np.ndarray]] = [[] for _ in layers]  # naive: per layer, one [T, C] array per batch
        self.naive_batch: list[np.ndarray] = []  # the naive store's latest batch, for the per-batch numpy step
        self.positions = [m.layer for m in moe.layers]  # output_router_logits covers every MoE layer
        self.host_domain = batch.to("cpu").token_domains().numpy()
        self.edges: dict[str, np.ndarray] | None = None

    def bare(self) -> None:
        batch = self.batch.to(self.device)
        self.moe.forward(batch.input_ids, batch.attention_mask)

    def capture_only(self) -> None:
        for _ in pipeline.captured_batches(self.moe, iter([self.batch]), self.layers, ("logits", "topk")):
            pass

    def stats_step(self) -> None:
        for records, batch, *_ in pipeline.captured_batches(self.moe, iter([self.batch]), self.layers, ("logits", "topk")):
            self.stats.update(records, batch.token_domains(), batch.token_weights())

    def naive_forward_store(self) -> None:
        batch = self.batch.to(self.device)
        out = self.moe.forward(batch.input_ids, batch.attention_mask, output_router_logits=True)
        # .to("cpu", copy=True) is `.cpu()` on a GPU (a synchronising device-to-host copy); on CPU it still copies,
        # so the store never aliases the model's outputs.
        self.naive_batch = [
            out.router_logits[self.positions.index(m.layer)].float().to("cpu", copy=True).numpy() for m in self.layers
        ]
        for li, logits in enumerate(self.naive_batch):
            self.store[li].append(logits)

    def naive_numpy(self) -> dict[str, dict]:
        """The numpy post-processing of the latest stored batch (its share of the study scripts' final pass), binned
        on the edges the streamed accumulators report (read once by `read_edges`, outside the timed steps)."""
        if self.edges is None:
            self.read_edges()
        return naive_statistics(self.naive_batch, self.host_domain, self.layers[0].top_k, self.edges)

    def accumulators(self) -> dict[str, object]:
        """Every streamed distribution accumulator by quantity name."""
        return {**self.stats.decisiveness.stats, **self.stats.distributions.stats}

    def read_edges(self) -> dict[str, np.ndarray]:
        """Each accumulator's bin edges as its result reports them: fixed ranges, or the range grown with the data
        (a growing histogram's `lo`/`hi` are only its fallback before data arrives)."""
        self.edges = {name: acc.histogram.result().edges for name, acc in self.accumulators().items()}
        return self.edges

    def store_bytes(self) -> int:
        return sum(a.nbytes for per_layer in self.store for a in per_layer)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of fn(); on a GPU the wall clock waits for the device."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def clock_name(device: torch.device) -> str:
    """The clock the ratios use: CPU time on CPU (other processes on a shared machine barely move it), else wall."""
    return "process CPU time" if device.type == "cpu" else "wall clock"


def pick(timing: tuple[float, float], device: torch.device) -> float:
    return timing[1] if device.type == "cpu" else timing[0]


# Histogram entries that may land in another bin than numpy puts them in, as a share of each quantity's entries:
# float32 arithmetic (the streamed softmax and entropies) against numpy's float64 puts a value that sits within a few
# ulp of a bin edge on the other side of it. Measured on the defaults: 1 entry in 1,236,992.
MOVED_TOLERANCE = 1e-5


@dataclass
class Agreement:
    entropy_rel_diff: float  # max over layers of |streamed - numpy| / numpy, mean entropy
    count_diffs: int  # (layer, domain, expert) selection counts that differ
    moved: dict[str, int]  # per quantity: histogram entries in another bin than numpy's on the same edges
    entries: dict[str, int]  # per quantity: entries numpy binned
    streamed_entries: dict[str, int]  # per quantity: entries the streamed histograms hold for the same groups

    def histogram_failures(self) -> list[str]:
        """One phrase per quantity whose histograms disagree beyond the tolerance (or whose totals differ)."""
        failures = []
        for name, entries in self.entries.items():
            if self.streamed_entries[name] != entries:
                failures.append(f"{name}: {self.streamed_entries[name]} entries streamed vs {entries} in numpy")
            elif self.moved[name] > MOVED_TOLERANCE * entries:
                failures.append(f"{name}: {self.moved[name]} of {entries} entries in another bin")
        return failures


def check_agreement(bench: Bench) -> Agreement:
    """After exactly one stats step and one naive step on the same batch: do both ways give the same numbers? The
    histograms are compared on the accumulators' own edges: same totals, then entries per bin."""
    bench.read_edges()
    naive = bench.naive_numpy()
    streamed = bench.stats.decisiveness.stats["entropy"].marginalize("domain").moments.result().mean
    naive_mean = naive_mean_entropy(naive, len(bench.layers), bench.host_domain)
    moved: dict[str, int] = {}
    entries: dict[str, int] = {}
    streamed_entries: dict[str, int] = {}
    results = {name: acc.histogram.result() for name, acc in bench.accumulators().items()}
    for key, naive_hist in naive["histograms"].items():
        name, li, *rest = key
        counts = results[name].counts[(li, *rest)]
        # Equal totals make Σ|diff| twice the entries that changed bin; unequal ones are reported as such.
        moved[name] = moved.get(name, 0) + round(float(np.abs(counts - naive_hist).sum())) // 2
        entries[name] = entries.get(name, 0) + int(naive_hist.sum())
        streamed_entries[name] = streamed_entries.get(name, 0) + round(float(counts.sum()))
    return Agreement(
        entropy_rel_diff=float(np.max(np.abs(streamed - naive_mean) / np.abs(naive_mean))),
        count_diffs=int(np.sum(bench.stats.selections.result() != naive["counts"])),
        moved=moved,
        entries=entries,
        streamed_entries=streamed_entries,
    )


# --------------------------------------------------------------------------------------------- reporting


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_header(args: argparse.Namespace, moe: MoEModel, layers: list[MoELayer], dtype: torch.dtype) -> None:
    total, active = parameter_counts(moe)
    m0 = moe.layers[0]
    print("model: random OlmoeForCausalLM with OLMoE-1B-7B's structure, scaled down")
    print(f"  parameters: {total / 1e6:.1f} M total, {active / 1e6:.1f} M active per token")
    print("  config: " + ", ".join(f"{k}={v}" for k, v in OLMOE_SCALED.items() if not k.endswith("token_id")))
    print(
        f"  MoE layers: {len(moe.layers)} ({m0.num_experts} experts, top-{m0.top_k}); "
        f"measured: {len(layers)} ({', '.join(str(m.layer) for m in layers)})"
    )
    print(f"  experts implementation: {moe.config._experts_implementation}, dtype {str(dtype).removeprefix('torch.')}")
    tokens = args.batch_size * args.seq_len
    print(
        f"run: device {moe.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size} × {args.seq_len} "
        f"= {tokens} tokens, {args.warmup} warm-up + {args.repeats} timed repeats per mode (interleaved), "
        f"torch {torch.__version__}"
    )


def print_times(times: dict[str, list[float]], walls: dict[str, list[float]], tokens: int) -> dict[str, float]:
    """Table of the modes; '× bare' is the ratio of medians, 'paired' the median of the per-repeat ratios (each
    repeat runs every mode back to back, so paired ratios are less sensitive to load drifting on a shared machine)."""

    def with_naive(t: dict[str, list[float]]) -> dict[str, list[float]]:
        return {**t, "naive": [a + b for a, b in zip(t["naive fwd+store"], t["naive numpy"], strict=True)]}

    times, walls = with_naive(times), with_naive(walls)
    median = {k: statistics.median(v) for k, v in times.items()}
    bare = median["bare"]
    header = f"{'mode':<28}{'median s':>10}{'min s':>9}{'max s':>9}{'tokens/s':>11}{'× bare':>9}{'paired':>9}{'wall s':>9}"
    print(header)
    for name in ("bare", "capture", "stats", "naive fwd+store", "naive numpy", "naive"):
        values = times[name]
        paired = statistics.median(v / b for v, b in zip(values, times["bare"], strict=True))
        label = {"naive": "naive (fwd+store + numpy)", "capture": "capture hooks only"}.get(name, name)
        print(
            f"{label:<28}{median[name]:10.3f}{min(values):9.3f}{max(values):9.3f}{tokens / median[name]:11.0f}"
            f"{median[name] / bare:9.3f}{paired:9.3f}{statistics.median(walls[name]):9.3f}"
        )
        median[f"{name} paired"] = paired
    return median


# --------------------------------------------------------------------------------------------- main


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu"))
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, args.dtype)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args)
    moe = build_model(args, device, dtype)
    layers = moe.select(args.layers)
    print_header(args, moe, layers, dtype)
    batch = make_batch(args, moe.config.vocab_size, device)
    tokens = args.batch_size * args.seq_len
    bench = Bench(moe, layers, batch, args.bins)

    with torch.inference_mode():
        # Warm-up; the first stats and naive steps are also the agreement check (and fix the histogram ranges).
        bench.stats_step()
        bench.naive_forward_store()
        agreement = check_agreement(bench)
        for _ in range(args.warmup):
            for fn in (bench.bare, bench.capture_only, bench.stats_step, bench.naive_forward_store, bench.naive_numpy):
                fn()

        steps: dict[str, list[tuple[str, Callable[[], object]]]] = {
            "bare": [("bare", bench.bare)],
            "capture": [("capture", bench.capture_only)],
            "stats": [("stats", bench.stats_step)],
            "naive": [("naive fwd+store", bench.naive_forward_store), ("naive numpy", bench.naive_numpy)],
        }
        times: dict[str, list[float]] = {name: [] for parts in steps.values() for name, _ in parts}
        walls: dict[str, list[float]] = {name: [] for name in times}
        for r in range(args.repeats):
            shift = r % len(MODES)  # rotate the modes so that none always runs first or after the same one
            for mode in MODES[shift:] + MODES[:shift]:
                for name, fn in steps[mode]:
                    timing = timed(fn, device)
                    times[name].append(pick(timing, device))
                    walls[name].append(timing[0])

        print(f"\ntimes: {clock_name(device)} per batch (wall clock in the last column)")
        median = print_times(times, walls, tokens)
        stats_ratio, naive_ratio = median["stats"] / median["bare"], median["naive"] / median["bare"]
        print(
            f"\nstats / bare = {stats_ratio:.3f} (paired {median['stats paired']:.3f})   "
            f"naive / bare = {naive_ratio:.3f} (paired {median['naive paired']:.3f})"
        )
        verdict = "PASS" if stats_ratio <= GOAL else "FAIL"
        print(f"statistics ≤ {GOAL:.2f}× bare forward: {verdict} ({stats_ratio:.3f}×); below the naive way: "
              f"{'PASS' if stats_ratio < naive_ratio else 'FAIL'} ({stats_ratio:.3f}× vs {naive_ratio:.3f}×)")

        # Selection counts are reported, not required: with bf16 logits, ties are broken differently.
        failures = agreement.histogram_failures()
        ok = agreement.entropy_rel_diff <= 1e-6 and not failures
        moved, entries = sum(agreement.moved.values()), sum(agreement.entries.values())
        print(
            f"\nagreement, streamed vs numpy on one batch, histograms on the accumulators' own edges: mean entropy per "
            f"layer max rel. diff {agreement.entropy_rel_diff:.1e} (≤ 1e-6 required); selection counts differing: "
            f"{agreement.count_diffs}; histogram entries in another bin: {moved} of {entries} (≤ {MOVED_TOLERANCE:g} "
            f"of each quantity's entries allowed: float32 rounding next to a bin edge) -> {'OK' if ok else 'MISMATCH'}"
        )
        for failure in failures:
            print(f"  MISMATCH {failure}")

        print_memory(bench, tokens)
        print_breakdown(bench, args.repeats, median["bare"], tokens)
        if args.profile or stats_ratio > GOAL:
            print_profile(bench)
    return 0 if ok else 1


def print_memory(bench: Bench, tokens: int) -> None:
    batches = len(bench.store[0])
    per_token = bench.store_bytes() / (batches * tokens)
    print("\nmemory:")
    print(
        f"  naive host store: {fmt_bytes(bench.store_bytes())} after {batches} batches = {per_token:.0f} B/token "
        f"(grows with tokens: {fmt_bytes(per_token * 1e6)} per 1M tokens)"
    )
    print(f"  streamed accumulators: {fmt_bytes(bench.stats.state_bytes())}, flat in the number of tokens")
    if bench.device.type == "cuda":
        records = _captured(bench)
        torch.cuda.reset_peak_memory_stats(bench.device)
        before = torch.cuda.memory_allocated(bench.device)
        bench.stats.update(records, *_domain_weight(bench))
        peak = torch.cuda.max_memory_allocated(bench.device) - before
        print(f"  transient peak of one stats update: {fmt_bytes(peak)}")


def _captured(bench: Bench) -> Capture:
    with capture(bench.moe, bench.layers, ("logits", "topk")) as records:
        bench.bare()
    return records


def _domain_weight(bench: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    return bench.batch.token_domains(), bench.batch.token_weights()


def print_breakdown(bench: Bench, repeats: int, bare: float, tokens: int) -> None:
    """Median time and aten-op count of each accumulator's update on one captured batch, into scratch accumulators."""
    records = _captured(bench)
    domain, weight = _domain_weight(bench)
    scratch = RoutingStats.create(bench.layers, bench.device, bench.bins)
    for fn in scratch.updaters().values():  # first call: DistributionStats sets its ranges (one host sync)
        fn(records, domain, weight)
    print(
        f"\nstats update breakdown ({len(bench.layers)} layers, {tokens} tokens; median {clock_name(bench.device)} "
        f"of {repeats}):"
    )
    total, total_ops = 0.0, 0
    for name, fn in scratch.updaters().items():
        step = functools.partial(fn, records, domain, weight)
        t = statistics.median(pick(timed(step, bench.device), bench.device) for _ in range(repeats))
        ops = count_ops(step)
        total, total_ops = total + t, total_ops + ops
        print(f"  {name:<32}{t * 1e3:9.1f} ms  {t / bare * 100:6.1f}% of bare  {ops:7d} aten ops")
    print(f"  {'sum':<32}{total * 1e3:9.1f} ms  {total / bare * 100:6.1f}% of bare  {total_ops:7d} aten ops")
    print(f"  (the bare forward dispatches {count_ops(bench.bare)} aten ops)")


def print_profile(bench: Bench, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    records = _captured(bench)
    domain, weight = _domain_weight(bench)
    scratch = RoutingStats.create(bench.layers, bench.device, bench.bins)
    scratch.update(records, domain, weight)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for name, fn in scratch.updaters().items():
            with record_function(name):
                fn(records, domain, weight)
    sync(bench.device)
    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch profiler, one stats update, top {rows} ops by self time:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
