"""Which figure shows each table: every CSV a script writes (by name) has at least one of its figures (PNG stems).
Used by tests/test_figures.py (routing scripts on a tiny model) and tests/test_report.py (every script's default
run on the demo model)."""

from __future__ import annotations

import re
from pathlib import Path

# table (regex on the CSV name) -> figures (regexes on the PNG stems), each of which must match at least one PNG
TABLE_FIGURES = {
    r"entropy_summary": [r"decisiveness_by_layer"],
    r"entropy_histograms": [r"entropy_violin"],
    r"distribution_summary": [r"distributions_layer\d+"],
    r"distribution_histograms": [r"distributions_layer\d+"],
    r"frequency": [r"frequency_layer\d+", r"domain_heatmap_layer\d+"],
    r"expert_specialization": [r"expert_specialization"],
    r"coverage50": [r"coverage50"],
    r"load_balance": [r"load_balance"],
    r"coactivation": [r"coactivation_layer\d+"],
    r"transitions": [r"transitions_\d+_\d+"],
    r"indicator_correlation_summary": [r"indicator_correlation"],
    r"token_overlap": [r"token_overlap_layer\d+"],
    r"token_specialization": [r"token_specialization"],
    r"saturation": [r"saturation"],
    r"profiles_layer(\d+)": [r"profile_layer{0}_expert\d+"],
    # the other scripts' tables (checked on their default runs by tests/test_report.py)
    r"similarity": [r"similarity_[a-z-]+_layer\d+"],
    r"cluster_order": [r"similarity_[a-z-]+_layer\d+"],
    r"similarity_summary": [r"similarity_by_layer"],
    r"embedding_coords": [r"(umap|pca)_layer\d+_by_expert", r"(umap|pca)_layer\d+_by_domain"],
    r"separation": [r"(umap|pca)_layer\d+_by_expert"],
    r"router_cosine": [r"router_cosine"],
    r"router_spectra|router_summary": [r"router_spectra"],
    r"cross_layer|principal_angles": [r"cross_layer"],
    r"expert_weight_cosine|expert_weight_summary": [r"expert_weight_cosine_(gate|up|down)"],
    r"router_expert_alignment": [r"router_expert_alignment"],
    r"importance_layer(\d+)": [r"importance_heatmap_layer{0}"],
    r"audit_layer(\d+)|audit_correlation_layer(\d+)": [r"audit_layer\d+"],
    r"prune_scores": [r"prune_scores"],
    r"expert_peaks|super_experts": [r"expert_peaks"],
    r"massive_activations": [r"massive_activations"],
    r"sink_mass": [r"sink_mass"],
    r"outlier_perplexity": [r"outlier_perplexity"],
    r"prune_perplexity|prune_importance": [r"prune_perplexity"],
    r"importance_summary_layer(\d+)": [r"importance_vs_frequency_layer{0}"],
    r"cosine_summary": [r"cosine_by_layer"],
    r"perplexity": [r"perplexity_vs_k"],
    r"probing": [r"probing_f1_vs_k"],
    r"probing_best_layer|probing_examples": [r"probing_concepts"],
    r"cluster_scores": [r"cluster_scores_by_layer", r"cluster_scores_layer\d+"],
    r"cluster_sizes": [r"cluster_sizes"],
    r"labels_layer(\d+)": [r"labels_layer{0}"],
    r"stability_summary": [r"stability_by_layer"], r"stability_margin": [r"stability_margin"], r"stability_consistency|stability_tokens": [r"stability_consistency", r"stability_consistency_tokens"],
    r"contrast_experts|contrast_top": [r"contrast_delta", r"contrast_volcano", r"contrast_top"],
    r"contrast_steering|contrast_generations": [r"contrast_steering"],
}


def assert_every_table_has_a_figure(folder: Path, name: str) -> None:
    figures = sorted(p.stem for p in (folder / "figures").glob("*.png"))
    tables = sorted(p.stem for p in folder.glob("*.csv"))
    assert tables, f"{name}: no table"
    for table in tables:
        matches = [(pattern, m) for pattern in TABLE_FIGURES if (m := re.fullmatch(pattern, table))]
        assert matches, f"{name}: table {table}.csv has no figure listed in TABLE_FIGURES"
        pattern, match = matches[0]
        wanted = [re.compile(f.format(*match.groups())) for f in TABLE_FIGURES[pattern]]
        for figure in wanted:
            assert any(figure.fullmatch(stem) for stem in figures), f"{name}: no {figure.pattern} for {table}.csv"
