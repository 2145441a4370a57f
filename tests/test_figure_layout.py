"""Figures that must not mislead, checked on the drawn figure (matplotlib text extents, axis limits, colour norms,
paths) with synthetic tables shaped like the demo model's (16 experts, top-2, six domains, four layers):

* dim_reduc: expert labels never overlap, a few far points do not set the frame (the frame is exactly the stated
  quantiles), and 16..64 experts get colours that differ at a glance (CIEDE2000);
* logit_lens: the cosine figure's y label stays clear of the titles;
* router_metrics: every expert of the 16-expert bar charts has a tick, and the coverage colour scale spans the
  data (white at the uniform share), not 0..1;
* router_stats: a histogram that ends inside its range (rank 2 of p̃ ends at 0.5) is not closed by a full-height
  vertical line.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from common.figures.embedding import plot_embedding
from common.figures.lens import plot_cosine
from common.figures.routing import plot_distributions
from common.figures.specialization import plot_coverage, plot_expert_specialization, plot_frequency
from common.plots import colour_difference, plt, srgb_to_lab

DOMAINS = ["code", "prose", "legal", "bible", "french", "math"]


def _extents(fig: plt.Figure, artists) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def _overlapping(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)]


# ------------------------------------------------------------------------------------------------ dim_reduc


def _crowded_classes(n_classes: int, per_class: int = 60, outliers: int = 0, seed: int = 0):
    """Classes whose medians all lie within a fraction of a point spread of each other (PCA of the demo model's
    layer 1 looks like this), plus `outliers` far points of class 0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 0.15, (n_classes, 2))
    coords = np.concatenate([rng.normal(c, 1.0, (per_class, 2)) for c in centres])
    labels = np.repeat(np.arange(n_classes), per_class)
    if outliers:
        far = rng.normal(0.0, 1.0, (outliers, 2)) + np.array([60.0, -45.0])
        coords = np.concatenate([coords, far])
        labels = np.concatenate([labels, np.zeros(outliers, dtype=int)])
    return coords, labels


def _embedding(coords, labels, n_classes) -> plt.Figure:
    return plot_embedding(coords, labels, [str(e) for e in range(n_classes)], title="PCA of expert outputs",
                          subtitle="10-NN accuracy", method="pca", legend_title="expert", explained=[0.08, 0.05])


@pytest.mark.parametrize("n_classes", [16, 64])
def test_expert_labels_do_not_overlap(n_classes):
    coords, labels = _crowded_classes(n_classes, per_class=40 if n_classes > 20 else 60)
    fig = _embedding(coords, labels, n_classes)
    ax = fig.axes[0]
    names = {str(e) for e in range(n_classes)}
    written = [t for t in ax.texts if t.get_text() in names]
    assert sorted(t.get_text() for t in written) == sorted(names)  # every class is labelled ...
    boxes = _extents(fig, written)
    assert _overlapping(boxes) == []  # ... and no two labels overlap
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    for box in boxes:  # inside the axes, where nothing clips them
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    plt.close(fig)


def test_frame_is_the_stated_quantiles_when_a_few_points_are_far():
    coords, labels = _crowded_classes(16, outliers=4)  # 4 of 964 points far out: they set the full range
    fig = _embedding(coords, labels, 16)
    ax = fig.axes[0]
    x_low, x_high = np.quantile(coords[:, 0], [0.005, 0.995])
    y_low, y_high = np.quantile(coords[:, 1], [0.005, 0.995])
    np.testing.assert_allclose(ax.get_xlim(), (x_low, x_high), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ax.get_ylim(), (y_low, y_high), rtol=0, atol=1e-9)
    outside = ((coords[:, 0] < x_low) | (coords[:, 0] > x_high) | (coords[:, 1] < y_low) | (coords[:, 1] > y_high))
    (note,) = [t.get_text() for t in ax.texts if "outside" in t.get_text()]
    assert "0.5th–99.5th percentile" in note and f"{outside.sum()} of {len(coords)} points" in note
    assert 4 <= outside.sum() < 30  # the far points and a few tail points, not the bulk
    plt.close(fig)


def test_frame_shows_every_point_without_outliers():
    coords, labels = _crowded_classes(16)
    fig = _embedding(coords, labels, 16)
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < coords[:, 0].min() and coords[:, 0].max() < x1 and y0 < coords[:, 1].min() and coords[:, 1].max() < y1
    assert not [t for t in ax.texts if "outside" in t.get_text()]
    plt.close(fig)


# (Lab 1, Lab 2, ΔE00) from Sharma, Wu & Dalal (2005), the CIEDE2000 reference data
SHARMA_PAIRS = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((50.0, 2.5, 0.0), (50.0, 0.0, -2.5), 4.3065),
]


def test_colour_difference_is_ciede2000():
    for lab1, lab2, expected in SHARMA_PAIRS:
        assert float(colour_difference(np.array(lab1), np.array(lab2))) == pytest.approx(expected, abs=1e-4)
    white, black = srgb_to_lab(np.array([1.0, 1.0, 1.0])), srgb_to_lab(np.array([0.0, 0.0, 0.0]))
    np.testing.assert_allclose(white, [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(black, [0.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("n_experts", [16, 20, 32, 48, 64])
def test_expert_colours_differ_at_a_glance(n_experts):
    """Scatter the experts of a 2-D embedding and read their colours back: any two differ by ΔE00 > 10."""
    coords, labels = _crowded_classes(n_experts, per_class=5)
    fig = _embedding(coords, labels, n_experts)
    (points,) = fig.axes[0].collections
    drawn = {tuple(np.round(c[:3], 6)) for c in points.get_facecolors()}
    assert len(drawn) == n_experts
    lab = srgb_to_lab(np.array(sorted(drawn)))
    distance = colour_difference(lab[:, None], lab[None])
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 10.0, f"closest pair ΔE00 = {distance.min():.1f}"
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ logit_lens


def _cosine_table(k_primes=(1,)) -> pd.DataFrame:
    rows = []
    for k_prime, layer, domain in itertools.product(k_primes, range(4), [*DOMAINS, "all"]):
        mean = 0.98 - 0.01 * layer * (1 + DOMAINS.index(domain) % 3 if domain != "all" else 1.5) / k_prime
        rows.append({"k_prime": k_prime, "layer": layer, "restricted": True, "domain": domain, "mean": mean,
                     "q0.05": mean - 0.04 * (layer + 1), "q0.95": min(mean + 0.02, 1.0)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [2, 4])
def test_cosine_y_label_clear_of_the_titles(k):
    """The y label fits beside its axes: it neither reaches up into the band of the panel title and the figure
    title nor overlaps them."""
    fig = plot_cosine(_cosine_table(tuple(range(1, k))), DOMAINS, k)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_ylabel()]
    assert len(panels) == (1 if k == 2 else 2)
    for ax in panels:
        ylabel, title, suptitle, frame = _extents(fig, [ax.yaxis.label, ax.title, fig._suptitle, ax])
        assert not ylabel.overlaps(suptitle) and not ylabel.overlaps(title), (ylabel, title, suptitle)
        assert frame.y0 <= ylabel.y0 and ylabel.y1 <= frame.y1, f"y label {ylabel} beyond its axes {frame}"
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ router_metrics


def _frequency_table(num_experts: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for domain in [*DOMAINS, "all"]:
        share = rng.dirichlet(np.ones(num_experts)) * 2
        rows += [{"layer": 1, "domain": domain, "expert": e, "freq_topk": share[e], "uniform_topk": 2 / num_experts}
                 for e in range(num_experts)]
    return pd.DataFrame(rows)


def _ticks(ax: plt.Axes) -> tuple[set[int], set[int]]:
    """(every x tick inside the view, the labelled ones)."""
    low, high = ax.get_xlim()
    major = {round(v) for v in ax.xaxis.get_majorticklocs() if low <= v <= high}
    minor = {round(v) for v in ax.xaxis.get_minorticklocs() if low <= v <= high}
    labelled = {int(t.get_text()) for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high}
    return major | minor, labelled & major


@pytest.mark.parametrize("num_experts", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_every_expert_has_a_tick_on_the_bar_charts(num_experts):
    experts = set(range(num_experts))
    table = pd.DataFrame([{"layer": layer, "expert": e, "jsd_bits": 0.05 + 0.01 * (e % 7),
                           "top_domain": DOMAINS[e % len(DOMAINS)]} for layer in range(4) for e in experts])
    for fig in (plot_frequency(_frequency_table(num_experts), 1, DOMAINS), plot_expert_specialization(table, DOMAINS)):
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel() == "expert"]
        assert len(panels) in (4, 7)
        for ax in panels:
            ticked, labelled = _ticks(ax)
            assert ticked == experts, sorted(experts - ticked)
            if num_experts == 16:  # 16 experts: every one is named
                assert labelled == experts, sorted(experts - labelled)
            labels = [t for t in ax.get_xticklabels() if t.get_text()]
            assert _overlapping(_extents(fig, labels)) == []
        plt.close(fig)


def _coverage(fractions: np.ndarray, num_experts: int = 16):
    """A coverage50 table for 4 layers × (6 domains + all) with the given fractions of experts."""
    names = [*DOMAINS, "all"]
    rows = [{"layer": layer, "domain": domain, "share": 0.5, "fraction_of_experts": fractions[i, layer],
             "experts_needed": round(fractions[i, layer] * num_experts), "share_handled": 0.5}
            for i, domain in enumerate(names) for layer in range(4)]
    layers = [SimpleNamespace(layer=layer, num_choices=num_experts) for layer in range(4)]
    return plot_coverage(pd.DataFrame(rows), layers, DOMAINS)


def test_coverage_colours_span_the_data_with_white_at_uniform():
    rng = np.random.default_rng(0)
    fractions = rng.integers(2, 7, (7, 4)) / 16  # the demo model: 2..6 of 16 experts, all below uniform (8)
    fractions[0, 0], fractions[1, 1] = 2 / 16, 6 / 16
    fig = _coverage(fractions)
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((0.125, 0.5))  # the data's minimum .. uniform
    colourbar = image.colorbar
    assert colourbar.ax.get_ylim() == pytest.approx((0.125, 0.5))
    rdbu = plt.get_cmap("RdBu_r")
    np.testing.assert_allclose(image.to_rgba(0.125)[:3], rdbu(0.0)[:3], atol=0.01)  # most specialised: darkest
    np.testing.assert_allclose(image.to_rgba(0.5)[:3], rdbu(0.5)[:3], atol=0.01)  # uniform: the white centre
    plt.close(fig)

    fractions = np.full((7, 4), 0.5)
    fractions[0, 0], fractions[2, 3] = 0.25, 0.625  # both sides of uniform: one linear scale centred on it
    fig = _coverage(fractions)
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((0.25, 0.625))
    np.testing.assert_allclose(image.to_rgba(0.5)[:3], rdbu(0.5)[:3], atol=0.01)
    np.testing.assert_allclose(image.to_rgba(0.25)[:3], rdbu(0.0)[:3], atol=0.01)
    np.testing.assert_allclose(image.to_rgba(0.625)[:3], rdbu(0.75)[:3], atol=0.01)  # 0.125 above: half as far
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ router_stats


def _distribution_table() -> pd.DataFrame:
    """Histograms on 200 bins of [0, 1] shaped like the demo's layer 1: p̃ of rank 2 rises to its end at 0.5 and
    rank 1 starts there; the weights likewise."""
    edges = np.linspace(0.0, 1.0, 201)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.where(centres < 0.5, 1.0 + 6.0 * centres, 0.0) * 1000
    rows = []

    def add(quantity, rank, counts, bin_edges=edges):
        rows.extend({"quantity": quantity, "layer": 1, "domain": "all", "rank": rank, "bin": b,
                     "left": bin_edges[b], "right": bin_edges[b + 1], "count": float(c)} for b, c in enumerate(counts))

    add("topk_renormalized", "2", below)
    add("topk_renormalized", "1", below[::-1])
    add("weight", "2", below)
    add("weight", "1", below[::-1])
    add("softmax", "all", 1000 * np.exp(-8 * centres))
    logit_edges = np.linspace(-6.0, 6.0, 201)
    add("logit", "all", 1000 * np.exp(-0.5 * ((logit_edges[:-1] + 0.03) / 1.5) ** 2), logit_edges)
    return pd.DataFrame(rows)


def test_histogram_not_closed_by_a_full_height_line():
    fig = plot_distributions(_distribution_table(), 1)
    (ax,) = [a for a in fig.axes if a.get_title() == "Chosen experts' probabilities, renormalised"]
    steps = {p.get_label(): p for p in ax.patches}
    for rank, end in (("rank 2", 0.5), ("rank 1", 0.5)):  # rank 2 ends at 0.5, rank 1 begins there
        vertices = steps[rank].get_path().vertices
        vertices = vertices[np.isfinite(vertices).all(axis=1)]
        top = vertices[:, 1].max()
        for (x0, y0), (x1, y1) in itertools.pairwise(vertices):
            vertical = abs(x0 - x1) < 1e-12 and abs(x0 - end) < 1e-9
            assert not (vertical and abs(y1 - y0) > 0.5 * top), f"{rank}: a line from {y0:.2f} to {y1:.2f} at {end}"
        occupied = (0.0, 0.5) if rank == "rank 2" else (0.5, 1.0)  # drawn over its own bins, not along zero
        assert (vertices[:, 0].min(), vertices[:, 0].max()) == pytest.approx(occupied)
    plt.close(fig)
