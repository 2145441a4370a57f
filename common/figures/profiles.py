"""The figure of one expert profile (profiles.py): domain mix, routing weight when chosen, top tokens by count and by
lift, top next tokens, the tokens its mean output promotes and suppresses, and its top contexts — all from the
profile's JSON dict."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from common.analysis.profile_json import REPLACEMENT, token_display
from common.plots import PAGE_WIDTH, bar_values, label, plt, text_label

if TYPE_CHECKING:  # the run folder is one floor up; figures only write into it
    from common.run import Run

SHOWN = 12  # entries per token panel
CONTEXTS_SHOWN = 8  # top contexts written out
CONTEXT_CHARS = 42  # characters of text kept on each side of a context's token
PANEL_HEIGHT = 2.45  # inches per row of panels


def token_tick(item: dict) -> str:
    """A token's tick label: its repr, or for a fragment of a UTF-8 character (every one of which decodes to '�')
    its bytes and id, so that such tokens stay apart."""
    if REPLACEMENT in item["token"]:
        return f"{token_display(item)} (id {item['token_id']})" if item.get("bytes") else token_display(item)
    return text_label(item["token"])


def _no_data(ax: plt.Axes, title: str, why: str = "none (the expert was never chosen)") -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def _token_bars(ax: plt.Axes, items: list[dict], value: str, title: str, xlabel: str, colour: str = "C0") -> None:
    """Horizontal bars of a count, largest on top, one per token (labelled as `token_tick` says)."""
    items = items[:SHOWN]
    if not items:
        _no_data(ax, title)
        return
    y = np.arange(len(items))[::-1]
    values = [item[value] for item in items]
    bars = ax.barh(y, values, color=colour, height=0.7)
    bar_values(ax, bars, "{:.0f}", fontsize=6)
    ax.set_yticks(y, [token_tick(item) for item in items], fontsize=6.5)
    ax.set_xlim(0, max(values) * 1.35 if max(values) > 0 else 1)
    label(ax, xlabel, None, title)


def _lift(ax: plt.Axes, profile: dict) -> None:
    """Top tokens by lift. Lift tops out at N / n_e (= 1 / f_e), where every occurrence of the token went to this
    expert: often many tokens sit on that ceiling, ranked by count, so the panel draws the ceiling, writes each
    token's count as 'routed here / occurrences' and states the minimum count on its axis."""
    title = "Top input tokens by lift over their base rate"
    items = profile["top_tokens_by_lift"][:SHOWN]
    if not items:
        _no_data(ax, title, "none (no token occurs often enough)" if profile["selected_topk"] else
                 "none (the expert was never chosen)")
        return
    ceiling, minimum = profile["lift_ceiling"], profile["lift_min_count"]
    y = np.arange(len(items))[::-1]
    values = [item["lift"] for item in items]
    bars = ax.barh(y, values, color="C1", height=0.7)
    ax.bar_label(bars, labels=[f"{item['count']:.0f}/{item['occurrences']:.0f}" for item in items], fontsize=6,
                 padding=1.5)
    ax.axvline(ceiling, color="C3", linestyle="--", linewidth=1)
    ax.set_yticks(y, [token_tick(item) for item in items], fontsize=6.5)
    ax.set_xlim(0, max(max(values), ceiling) * 1.35)
    on_ceiling = sum(np.isclose(v, ceiling) for v in values)
    ties = (f"\n{profile['lift_at_ceiling']} tokens reach it; shown: the {on_ceiling} most frequent"
            if on_ceiling > 1 else "")
    ax.set_title(f"{title}\ndashed: ceiling 1 / f_e = {ceiling:.3g} (every occurrence routed here){ties}",
                 fontsize=7.5)
    ax.set_xlabel(f"lift (× base rate) of tokens seen ≥ {minimum}× (--min_count)\nties ranked by count; labels: "
                  "routed here / occurrences", fontsize=7)


def _context_text(text: str, keep: str) -> str:
    """Text beside a context's token, its newlines and tabs shown as escapes, cut to CONTEXT_CHARS characters on the
    token's side (`keep`: "end" for the text before it, "start" for the text after)."""
    if len(text) > CONTEXT_CHARS:
        text = "…" + text[-CONTEXT_CHARS:] if keep == "end" else text[:CONTEXT_CHARS] + "…"
    return text_label(text, limit=3 * CONTEXT_CHARS, quoted=False)


def _contexts(ax: plt.Axes, profile: dict) -> None:
    """The top contexts as a keyword-in-context list: the text before each one right-aligned up to its token (in
    red), the text after it following; on the left its domain, routing weight and score."""
    contexts = profile["top_contexts"][:CONTEXTS_SHOWN]
    ax.set_axis_off()
    if not contexts:
        ax.set_title("Top contexts (the largest contributions w_e · ‖E_e(x)‖)", fontsize=8)
        ax.text(0.5, 0.5, "none (the expert was never chosen)", ha="center", va="center", color="grey",
                transform=ax.transAxes)
        return
    rows = len(contexts)
    ax.set_title(f"Top contexts: the {rows} largest contributions w_e · ‖E_e(x)‖, the token in red with ±8 tokens "
                 "around it\n(left: domain, routing weight w_e, score w_e · ‖E_e(x)‖)", fontsize=8)
    for row, context in enumerate(contexts):
        height = 1 - (row + 0.5) / rows
        ax.text(0.0, height, f"{text_label(context['domain'], 12, quoted=False)}, {context['weight']:.2f}, "
                f"{context['score']:.3g}", fontsize=6.5, color="dimgrey", va="center", transform=ax.transAxes)
        ax.text(0.55, height, _context_text(context["before"], "end"), fontsize=6.5, ha="right", va="center",
                transform=ax.transAxes)
        token = ax.text(0.55, height, text_label(context["token"], 16, quoted=False) or "·", fontsize=6.5,
                        ha="left", va="center", color="C3", fontweight="bold", transform=ax.transAxes)
        ax.annotate(_context_text(context["after"], "start"), xy=(1, 0.5), xycoords=token, fontsize=6.5,
                    ha="left", va="center")


def _domains(ax: plt.Axes, profile: dict) -> None:
    title = "Domains: share routed to this expert"
    rows = profile["domains"]
    if not rows or not profile["selected_topk"]:
        _no_data(ax, title)
        return
    y = np.arange(len(rows))[::-1]
    shares = [100 * d["share_of_domain"] for d in rows]
    bars = ax.barh(y, shares, color="C2", height=0.7)
    ax.bar_label(bars, labels=[f"{s:.1f}%  ({100 * d['share_of_expert']:.0f}% of its tokens)"
                               for s, d in zip(shares, rows, strict=True)], fontsize=6, padding=1.5)
    ax.axvline(100 * profile["uniform_topk"], color="C3", linestyle="--", linewidth=1)
    ax.set_yticks(y, [text_label(d["domain"], 24, quoted=False) for d in rows], fontsize=6.5)
    ax.set_xlim(0, max(max(shares), 100 * profile["uniform_topk"]) * 1.6)
    label(ax, "% of the domain's tokens (top-k); dashed: uniform routing k / E", None, title)


def _weights(ax: plt.Axes, profile: dict) -> None:
    title = "Routing weight when chosen"
    w = profile["weight_when_selected"]
    if not w["count"]:
        _no_data(ax, title)
        return
    q = {float(key[1:]): value for key, value in w.items() if key.startswith("q")}

    def at(level: float) -> float:
        return q.get(level, np.nan)

    stats = {"med": at(0.5), "q1": at(0.25), "q3": at(0.75), "whislo": at(0.05), "whishi": at(0.95),
             "fliers": [v for v in (at(0.01), at(0.99)) if np.isfinite(v)], "mean": w["mean"], "label": ""}
    ax.bxp([stats], vert=False, showmeans=True, widths=0.5, patch_artist=True,
           boxprops={"facecolor": "C0", "alpha": 0.35}, medianprops={"color": "black"},
           meanprops={"marker": "D", "markerfacecolor": "C3", "markeredgecolor": "C3", "markersize": 4},
           flierprops={"marker": "|", "markersize": 8})
    ax.set_yticks([])
    ax.text(0.02, 0.97, f"{w['count']:.0f} choices; mean {w['mean']:.3g} ± {w['std']:.2g} (diamond)\n"
            "box: 25–75%, line: median, whiskers: 5–95%, ticks: 1% and 99%",
            transform=ax.transAxes, va="top", fontsize=6)
    ax.set_ylim(0.5, 1.9)
    low, high = (at(0.01), at(0.99)) if np.isfinite(at(0.01)) else (at(0.05), at(0.95))
    span = max(high - low, 0.05 * max(abs(high), 1e-3))
    ax.set_xlim(low - 0.15 * span, high + 0.15 * span)
    label(ax, "routing weight w (the model's scale)", None, title)


def _promoted(ax: plt.Axes, profile: dict) -> None:
    title = "Tokens its mean output promotes / suppresses"
    half = SHOWN // 2
    promoted, suppressed = profile["promoted_tokens"][:half], profile["suppressed_tokens"][:half][::-1]
    items = promoted + suppressed
    if not items or not profile["selected_topk"]:
        _no_data(ax, title)
        return
    y = np.arange(len(items))[::-1]
    values = [item["logit"] for item in items]
    colours = ["C2"] * len(promoted) + ["C3"] * len(suppressed)
    bars = ax.barh(y, values, color=colours, height=0.7)
    bar_values(ax, bars, "{:.2g}", fontsize=6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks(y, [token_tick(item) for item in items], fontsize=6.5)
    extent = max(abs(v) for v in values) * 1.3 or 1.0
    low = min(min(values) * 1.3, 0)
    ax.set_xlim(low if low < 0 else -0.05 * extent, max(max(values) * 1.3, 0.05 * extent))
    label(ax, "logit of the decoded mean output", None, title)


def plot_profile(profile: dict) -> plt.Figure:
    """Six panels (3 rows × 2) and the top contexts across the page, summarising one expert profile (the dict
    written as profile_layer<L>_expert<E>.json)."""
    contexts_height = 0.5 + 0.17 * max(1, min(CONTEXTS_SHOWN, len(profile["top_contexts"])))
    fig = plt.figure(figsize=(PAGE_WIDTH, 3 * PANEL_HEIGHT + contexts_height), layout="constrained")
    grid = fig.add_gridspec(4, 2, height_ratios=[PANEL_HEIGHT] * 3 + [contexts_height])
    axes = [fig.add_subplot(grid[row, column]) for row in range(3) for column in range(2)]
    _domains(axes[0], profile)
    _weights(axes[1], profile)
    _token_bars(axes[2], profile["top_tokens_by_count"], "count", "Top input tokens by count",
                "times routed to this expert (count)")
    _lift(axes[3], profile)
    _token_bars(axes[4], profile["top_next_tokens"], "count", "Tokens that follow its tokens",
                "times the next token (count)", colour="C4")
    _promoted(axes[5], profile)
    _contexts(fig.add_subplot(grid[3, :]), profile)
    model = str(profile.get("model", ""))
    model = model if len(model) <= 40 else "…" + model[-39:]
    fig.suptitle(f"Expert {profile['expert']}, layer {profile['layer']} of {model}\nchosen by "
                 f"{100 * profile['frequency_topk']:.1f}% of tokens (uniform {100 * profile['uniform_topk']:.1f}%), "
                 f"top expert for {100 * profile['frequency_top1']:.1f}% (uniform {100 * profile['uniform_top1']:.1f}%)")
    return fig


def save_profile_figure(out: Run, profile: dict) -> None:
    """`figures/profile_layer<L>_expert<E>` of one profile."""
    out.save_figure(plot_profile(profile), f"profile_layer{profile['layer']}_expert{profile['expert']}")
