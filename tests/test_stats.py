"""Tests of common/stats against independent numpy references (np.mean/np.std, np.histogram,
np.quantile, np.bincount), plus merge / all_reduce / resume equivalences and the no-host-sync contract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.stats import (
    Axes,
    BinCount,
    Distribution,
    Histogram,
    Moments,
    StatSet,
    accumulator_from_state_dict,
    flat_groups,
    histogram_quantiles,
)

DTYPES = [torch.float32, torch.bfloat16]


def _data(n: int = 4000, groups: int = 5, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Values (rounded to `dtype`), group ids and a 0/1 mask, plus their float64 numpy twins."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 2 + 0.5).to(dtype)
    grp = torch.randint(0, groups, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    return x, grp, mask, x.double().numpy(), grp.numpy(), mask.numpy()


# ---------------------------------------------------------------------------------------------------
# Moments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_match_numpy(dtype: torch.dtype) -> None:
    x, grp, mask, xn, gn, mn = _data(dtype=dtype)
    acc = Moments(6)  # group 5 never occurs... (data uses 0..4)
    for sl in torch.arange(len(x)).split(700):  # several batches
        acc.update(x[sl], grp[sl], mask[sl])
    r = acc.result()
    for k in range(5):
        sel = xn[(gn == k) & mn]
        assert r.count[k] == len(sel)
        np.testing.assert_allclose(r.mean[k], sel.mean(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r.std[k], sel.std(), rtol=1e-12)
        assert r.min[k] == sel.min() and r.max[k] == sel.max()
    assert r.count[5] == 0 and np.isnan([r.mean[5], r.std[5], r.min[5], r.max[5]]).all()


def test_moments_float_weights_and_stability() -> None:
    # Large offset, tiny spread: Σx² − n·mean² would lose every digit here; Chan's update does not.
    rng = np.random.default_rng(1)
    xn = 1e7 + rng.standard_normal(5000) * 1e-3
    wn = rng.random(5000)
    acc = Moments()
    for part in np.array_split(np.arange(5000), 7):
        acc.update(torch.from_numpy(xn[part]), weight=torch.from_numpy(wn[part]))
    r = acc.result()
    mean = np.average(xn, weights=wn)
    std = np.sqrt(np.average((xn - mean) ** 2, weights=wn))
    np.testing.assert_allclose(r.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(r.std, std, rtol=1e-6)
    np.testing.assert_allclose(r.count, wn.sum(), rtol=1e-12)


def test_moments_nonfinite_excluded() -> None:
    acc = Moments(2)
    x = torch.tensor([1.0, float("nan"), float("inf"), 3.0, -float("inf"), 5.0])
    acc.update(x, torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1, 1, 1, 1, 1, 0]))
    r = acc.result()
    assert r.count.tolist() == [2.0, 0.0]
    assert r.mean[0] == 2.0 and r.std[0] == 1.0 and r.min[0] == 1.0 and r.max[0] == 3.0
    assert r.nonfinite.tolist() == [2.0, 1.0]  # the masked 5.0 counts nowhere


# ---------------------------------------------------------------------------------------------------
# Histogram and quantiles
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_matches_np_histogram(dtype: torch.dtype) -> None:
    x, grp, mask, xn, gn, mn = _data(dtype=dtype)
    # Exact edge hits: bf16/fp32 values such as 0.5 and 1.0 sit on edges of linspace(-4, 4, 33).
    x = torch.cat([x, torch.tensor([-4.0, 4.0, 0.5, 1.0, 0.25, -0.25], dtype=dtype)])
    grp = torch.cat([grp, torch.zeros(6, dtype=torch.long)])
    mask = torch.cat([mask, torch.ones(6, dtype=torch.bool)])
    xn, gn, mn = x.double().numpy(), grp.numpy(), mask.numpy()
    acc = Histogram(5, bins=32, lo=-4.0, hi=4.0)
    for sl in torch.arange(len(x)).split(1000):
        acc.update(x[sl], grp[sl], mask[sl])
    r = acc.result()
    for k in range(5):
        sel = xn[(gn == k) & mn]
        expect, _ = np.histogram(np.clip(sel, -4.0, 4.0), bins=r.edges)  # edge bins take the clamped
        np.testing.assert_array_equal(r.counts[k], expect)
        assert r.below[k] == (sel < -4).sum() and r.above[k] == (sel > 4).sum()
    np.testing.assert_array_equal(r.edges, np.linspace(-4.0, 4.0, 33))


def test_histogram_exact_at_bin_edges() -> None:
    # A non-dyadic range: (x - lo) * bins / (hi - lo) puts dozens of these edge values in the wrong bin.
    edges = np.linspace(-3.0, 3.0, 31)
    xn = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    xn = xn[(xn >= -3) & (xn <= 3)]
    acc = Histogram(bins=30, lo=-3.0, hi=3.0)
    acc.update(torch.from_numpy(xn))
    np.testing.assert_array_equal(acc.result().edges, edges)
    np.testing.assert_array_equal(acc.result().counts, np.histogram(xn, bins=edges)[0])


def test_histogram_clamps_inf_and_skips_nan() -> None:
    acc = Histogram(bins=4, lo=0.0, hi=1.0)
    acc.update(torch.tensor([-float("inf"), -3.0, 0.1, float("nan"), 1.0, 7.0, float("inf")]))
    r = acc.result()
    assert r.counts.tolist() == [3.0, 0.0, 0.0, 3.0]
    assert (r.below, r.above, r.nan) == (2.0, 2.0, 1.0)


@pytest.mark.parametrize(
    "sample",
    [
        lambda rng: rng.standard_normal(3001),
        lambda rng: rng.exponential(0.3, 2000).clip(max=4.99),  # skewed, piled up at the left edge
        lambda rng: np.concatenate([rng.uniform(-5, -4.9, 50), rng.uniform(4.8, 5, 7)]),  # a wide gap
        lambda rng: rng.integers(-4, 5, 501).astype(float),  # many ties, all on bin edges
        lambda rng: np.array([0.3]),
    ],
)
def test_quantiles_within_one_bin_width(sample) -> None:
    xn = sample(np.random.default_rng(2))
    acc = Histogram(bins=40, lo=-5.0, hi=5.0)
    acc.update(torch.from_numpy(xn))
    qs = np.linspace(0, 1, 101)
    est = acc.quantiles(qs)
    width = 10.0 / 40
    err = np.abs(est - np.quantile(xn, qs))
    assert err.max() < width, err.max()


def test_quantiles_per_group_and_empty() -> None:
    counts = np.array([[0, 2, 0, 0], [0, 0, 0, 0]], dtype=float)
    q = histogram_quantiles(counts, np.array([0.0, 1, 2, 3, 4]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(q[0], [1.25, 1.5, 1.75])  # two stand-ins at 1.25 and 1.75
    assert np.isnan(q[1]).all()


# ---------------------------------------------------------------------------------------------------
# BinCount
# ---------------------------------------------------------------------------------------------------
def test_bincount_matches_np_bincount_topk() -> None:
    g = torch.Generator().manual_seed(3)
    E, k, D, N = 8, 2, 3, 1000
    topk = torch.rand(N, E, generator=g).topk(k, dim=-1).indices  # [N, k] distinct experts per token
    dom = torch.randint(0, D, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    acc = BinCount({"domain": ["a", "b", "c"]}, {"expert": E})
    acc.update(topk, dom, mask)  # [N] groups and weight apply to both columns
    counts = acc.result()
    for d in range(D):
        rows = ((dom == d) & mask).numpy()
        np.testing.assert_array_equal(counts[d], np.bincount(topk.numpy()[rows].ravel(), minlength=E))
    df = acc.frame()
    assert list(df.columns) == ["domain", "expert", "count"] and len(df) == D * E
    assert df.loc[(df.domain == "b") & (df.expert == 3), "count"].item() == counts[1, 3]


def test_bincount_cooccurrence_pairs() -> None:
    E = 4
    topk = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 1]])
    acc = BinCount(bins={"i": E, "j": E})
    acc.update(Axes.of({"i": E, "j": E}, "").index(i=topk[:, 0], j=topk[:, 1]))
    c = acc.result()
    assert c.shape == (E, E) and c[0, 1] == 2 and c[1, 0] == 1 and c[2, 3] == 1 and c.sum() == 4


# ---------------------------------------------------------------------------------------------------
# Groups, broadcasting, index errors
# ---------------------------------------------------------------------------------------------------
def test_rankwise_groups_left_alignment_and_axes_index() -> None:
    g = torch.Generator().manual_seed(4)
    N, k, D = 500, 3, 2
    w = torch.rand(N, k, generator=g).to(torch.bfloat16)  # e.g. top-k weights, one column per rank
    dom = torch.randint(0, D, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.5
    axes = Axes.of({"layer": [3, 9], "domain": ["x", "y"], "rank": k}, "")
    acc = Distribution(axes, bins=10, lo=0, hi=1)
    idx = axes.index(layer=1, domain=dom[:, None], rank=torch.arange(k)[None, :])
    assert idx.shape == (N, k)
    acc.update(w, idx, mask)  # mask [N] is left-aligned to [N, k]
    acc.update(w, {"layer": 0, "domain": dom[:, None], "rank": torch.arange(k)}, mask)
    m = acc.moments.result()
    wn, dn, mn = w.double().numpy(), dom.numpy(), mask.numpy()
    for d in range(D):
        for r in range(k):
            sel = wn[(dn == d) & mn, r]
            np.testing.assert_allclose(m.mean[:, d, r], sel.mean(), rtol=1e-12)
            assert (m.count[:, d, r] == len(sel)).all()
    df = acc.frame()
    assert {"layer", "domain", "rank", "mean", "q0.5", "below"} <= set(df.columns)
    assert set(df.layer) == {3, 9} and len(df) == 2 * D * k


def test_flat_groups_marks_out_of_range() -> None:
    out = flat_groups([torch.tensor([0, 1, 2, -1]), 1], [2, 3])
    assert out.tolist() == [1, 4, -1, -1]
    assert flat_groups([1, 2], [2, 3]) == 5
    with pytest.raises(IndexError):
        flat_groups([2, 0], [2, 3])


@pytest.mark.parametrize("make", [lambda: Moments(3), lambda: Histogram(3, 4), lambda: BinCount(3, 4)])
def test_out_of_range_index_is_reported_unless_masked(make) -> None:
    acc = make()
    vals = torch.tensor([0, 1, 2, 3])
    acc.update(vals, torch.tensor([0, 7, -1, 2]), torch.tensor([1, 0, 0, 1]))  # bad groups masked
    acc.result()
    acc.update(vals, torch.tensor([0, 7, 1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        acc.result()


def test_bincount_out_of_range_category_reported() -> None:
    acc = BinCount(2, 4)
    acc.update(torch.tensor([0, 4]), torch.tensor([0, 0]))  # category 4 would alias group 1, bin 0
    with pytest.raises(ValueError, match="out of range"):
        acc.result()


# ---------------------------------------------------------------------------------------------------
# Merge, marginalize, save/resume, inference mode
# ---------------------------------------------------------------------------------------------------
def _fill(acc, x, grp, mask):
    if isinstance(acc, BinCount):
        acc.update((x.float().abs() * 3).long().clamp(max=7), grp, mask)
    else:
        acc.update(x, grp, mask)
    return acc


MAKERS = {
    "moments": lambda: Moments(5),
    "histogram": lambda: Histogram(5, bins=16, lo=-3, hi=3),
    "bincount": lambda: BinCount(5, 8),
    "distribution": lambda: Distribution(5, bins=16, lo=-3, hi=3),
}


def _assert_same(a, b) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:  # spare slots hold nothing in valid runs; compare real groups and bins
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("kind", MAKERS)
def test_merge_halves_equals_one_pass(kind: str) -> None:
    x, grp, mask, *_ = _data(dtype=torch.bfloat16)
    whole = _fill(MAKERS[kind](), x, grp, mask)
    a = _fill(MAKERS[kind](), x[:1500], grp[:1500], mask[:1500])
    b = _fill(MAKERS[kind](), x[1500:], grp[1500:], mask[1500:])
    _assert_same(a.merge(b), whole)


def test_merge_rejects_other_kind_or_config() -> None:
    with pytest.raises(TypeError):
        Moments(5).merge(Histogram(5))
    with pytest.raises(ValueError):
        Histogram(5, bins=16).merge(Histogram(5, bins=8))
    with pytest.raises(ValueError):
        BinCount({"domain": ["a", "b"]}, 4).merge(BinCount({"domain": ["a", "c"]}, 4))


def test_marginalize_equals_pooled_groups() -> None:
    x, grp, mask, *_ = _data()
    layer = grp % 2  # two "layers"
    dom = grp // 2  # three "domains"
    axes = {"layer": 2, "domain": 3}
    for make in (
        lambda a: Distribution(a, bins=16, lo=-3, hi=3),
        lambda a: BinCount(a, 8),
    ):
        full = _fill(make(axes), x, Axes.of(axes, "").index(layer=layer, domain=dom), mask)
        pooled = _fill(make({"layer": 2}), x, layer, mask)
        _assert_same(full.marginalize("domain"), pooled)


def test_state_dict_resume_and_statset_save(tmp_path: Path) -> None:
    x, grp, mask, *_ = _data()
    whole = StatSet({k: _fill(m(), x, grp, mask) for k, m in MAKERS.items()})
    first = StatSet({k: _fill(m(), x[:2000], grp[:2000], mask[:2000]) for k, m in MAKERS.items()})
    first.save(tmp_path / "stats.pt")
    resumed = StatSet.load(tmp_path / "stats.pt")  # kinds and configs come from the file
    for k, acc in resumed.items():
        _fill(acc, x[2000:], grp[2000:], mask[2000:])
        _assert_same(acc, whole[k])
    fresh = StatSet({k: m() for k, m in MAKERS.items()})
    fresh.load_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    _assert_same(fresh["distribution"], first["distribution"])
    with pytest.raises(ValueError):
        Histogram(5, bins=8, lo=-3, hi=3).load_state_dict(first["histogram"].state_dict())
    copy = accumulator_from_state_dict(whole["bincount"].state_dict())
    np.testing.assert_array_equal(copy.result(), whole["bincount"].result())


def test_inference_mode_both_ways() -> None:
    x, grp, mask, *_ = _data(n=200)
    with torch.inference_mode():
        acc = Distribution(5, bins=8, lo=-3, hi=3)  # built inside, used outside
        other = Distribution(5, bins=8, lo=-3, hi=3)
        other.update(x, grp, mask)
    acc.update(x, grp, mask)
    acc.merge(other)
    with torch.inference_mode():
        acc.update(x, grp, mask)
    assert acc.moments.result().count.sum() == 3 * mask.sum().item()


# ---------------------------------------------------------------------------------------------------
# No host sync inside update
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAKERS)
def test_update_never_syncs(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, grp, mask, *_ = _data(n=300, dtype=torch.bfloat16)
    x2 = torch.stack([x, x], 1)  # [N, 2] with per-token groups
    acc = MAKERS[kind]()

    def boom(*_args, **_kwargs):
        raise AssertionError("host sync in update")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    _fill(acc, x, grp, mask)
    _fill(acc, x2, grp, mask.float())
    _fill(acc, x, 3, None)
    monkeypatch.undo()
    # The updates made under the guard counted exactly what an unguarded accumulator counts.
    reference = MAKERS[kind]()
    _fill(reference, x, grp, mask)
    _fill(reference, x2, grp, mask.float())
    _fill(reference, x, 3, None)
    _assert_same(acc, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", MAKERS)
def test_update_never_syncs_cuda(kind: str) -> None:
    x, grp, mask, *_ = _data(n=3000, dtype=torch.bfloat16)
    x, grp, mask = x.cuda(), grp.cuda(), mask.cuda()
    acc = MAKERS[kind]().to("cuda")
    ref = _fill(MAKERS[kind](), x.cpu(), grp.cpu(), mask.cpu())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fill(acc, x, grp, mask)
        _fill(acc, x, {"group": 2}, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _fill(ref, x.cpu(), 2, None)
    _assert_same(acc.to("cpu"), ref)


# ---------------------------------------------------------------------------------------------------
# all_reduce across two real processes (gloo)
# ---------------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: keep clear of the parent's OpenMP pool
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        x, grp, mask, *_ = _data(dtype=torch.bfloat16)
        part = torch.arange(len(x)).tensor_split(world)[rank]  # each rank its own slice
        stats = StatSet({k: _fill(m(), x[part], grp[part], mask[part]) for k, m in MAKERS.items()})
        stats.all_reduce()
        torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_equals_one(tmp_path: Path) -> None:
    # fork, not spawn: a spawned child spends seconds re-importing torch, pandas and pytest.
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    x, grp, mask, *_ = _data(dtype=torch.bfloat16)
    single = StatSet({k: _fill(m(), x, grp, mask) for k, m in MAKERS.items()}).all_reduce()  # no-op
    for rank in range(2):
        got = StatSet.from_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        for k in MAKERS:
            _assert_same(got[k], single[k])
            assert got[k].reduced
    with pytest.raises(RuntimeError, match="double-count"):
        single.all_reduce()
    with pytest.raises(RuntimeError, match="double-count"):
        _fill(single["moments"], x, grp, mask)


def _rows_case(kind: str, seed: int = 0):
    """Values [R, C] with per-row groups and weights: plain (all finite, unit weights) or awkward (NaN, ±inf, values
    on and one ulp off bin edges, out of range, weights 0, fractional and whole, an out-of-range group)."""
    gen = torch.Generator().manual_seed(seed)
    rows, choices = 600, 16
    values = torch.rand(rows, choices, generator=gen, dtype=torch.float64).to(torch.float32).double()
    layer = torch.randint(0, 3, (rows,), generator=gen)
    domain = torch.randint(0, 2, (rows,), generator=gen)
    weight = torch.ones(rows, dtype=torch.float64)
    if kind == "awkward":
        edges = torch.from_numpy(np.linspace(0.0, 1.0, 51))
        values[:40, 0] = edges[torch.randint(0, 51, (40,), generator=gen)]
        values[40:80, 1] = torch.nextafter(values[:40, 0], torch.tensor(2.0, dtype=torch.float64))
        values[80:90, 2] = torch.nextafter(values[:10, 0], torch.tensor(-2.0, dtype=torch.float64))
        values[5, 3], values[6, 4], values[7, 5], values[8, :] = float("nan"), float("inf"), -float("inf"), float("nan")
        values[9, 6], values[10, 7] = 1.5, -0.25
        weight[::7] = 0.0
        weight[::11] = 2.0
        weight[::13] = 0.375
        layer[3] = 99  # out of range: the spare group
    return values, layer, domain, weight


@pytest.mark.parametrize("kind", ["plain", "awkward"])
@pytest.mark.parametrize("growing", [False, True])
def test_rows_update_equals_the_elementwise_update(kind, growing) -> None:
    """`Distribution.update_rows` (values reduced per row first) gives `update`'s histogram, count, min, max,
    non-finite weight, below and above exactly, and its mean and std to float64 rounding."""
    from common.analysis.routing import GrowingDistribution

    values, layer, domain, weight = _rows_case(kind)
    axes = {"layer": [0, 1, 2], "domain": ["a", "b"]}
    make = (lambda: GrowingDistribution(axes, bins=50)) if growing else (lambda: Distribution(axes, bins=50))
    rows, elements = make(), make()
    for half in (slice(0, 300), slice(300, None)):  # two batches: the growing grid moves in between
        rows.update_rows(values[half], {"layer": layer[half], "domain": domain[half]}, weight[half])
        elements.update(values[half], {"layer": layer[half].view(-1, 1), "domain": domain[half].view(-1, 1)},
                        weight[half].view(-1, 1))
    # states compared directly: result() refuses the out-of-range group's weight (as it should), counted alike here
    assert rows.invalid == elements.invalid
    for name in ("histogram.counts", "histogram.extra", "moments.count", "moments.min", "moments.max",
                 "moments.nonfinite", *(("histogram.span", "histogram.grid") if growing else ())):
        np.testing.assert_array_equal(rows._state[name].numpy(), elements._state[name].numpy(), err_msg=name)
    for name, rtol in (("moments.mean", 1e-12), ("moments.m2", 1e-10)):
        np.testing.assert_allclose(rows._state[name].numpy(), elements._state[name].numpy(), rtol=rtol, atol=1e-13)
    counts = elements._state["histogram.counts"].numpy()
    assert counts.sum() > 0 and (kind == "plain") == (elements._state["histogram.extra"].numpy().sum() == 0)
