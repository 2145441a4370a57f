"""router_metrics.py and profiles.py on the shipped demo model show the specialization TRAINING.md records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import profiles
import router_metrics
from common.config import SHIPPED_MODELS
from common.data import resolve_domains, token_batches

NUM_TOKENS = 5000
RECORD = json.loads((SHIPPED_MODELS["demo"] / "heldout_metrics.json").read_text())


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-metrics")
    # numbers only (its figures are tests/test_figures.py's and test_report.py's)
    assert router_metrics.main(["--num_tokens", str(NUM_TOKENS), "--out", str(out), "--no-progress", "--no-figures"]) == 0
    return next(p for p in out.glob("router_metrics/demo/demo/*") if p.is_dir())


def test_heatmap_shows_recorded_domain_experts(metrics_run):
    """The busiest expert TRAINING.md records per domain (layer 1, held-out text) also takes ≥ 2.5× the uniform
    share of that domain's tokens here (training-split text)."""
    freq = pd.read_csv(metrics_run / "frequency.csv")
    layer = 1
    recorded = RECORD["moe"]["routing"]["busiest_expert"][str(layer)]
    for domain, expert in recorded.items():
        row = freq[(freq.layer == layer) & (freq.domain == domain) & (freq.expert == expert)].iloc[0]
        assert row.freq_topk >= 2.5 * row.uniform_topk, (domain, expert, row.freq_topk)
    balance = pd.read_csv(metrics_run / "load_balance.csv")
    assert (balance.dead_experts == 0).all()


def test_code_expert_profile_lists_code_tokens_first(metrics_run, tmp_path):
    spec = pd.read_csv(metrics_run / "expert_specialization.csv")
    code = spec[(spec.top_domain == "code") & (spec.assignments > 1000)].sort_values("top_domain_share").iloc[-1]
    assert code.top_domain_share > 0.6
    out = tmp_path / "profiles"
    argv = ["--layer", str(int(code.layer)), "--expert_id", str(int(code.expert)), "--num_tokens", str(NUM_TOKENS),
            "--out", str(out), "--no-progress", "--no-figures"]
    assert profiles.main(argv) == 0
    profile = json.loads(next(out.glob(f"profiles/demo/demo/*/profile_layer{int(code.layer)}_expert{int(code.expert)}.json")).read_text())
    assert max(profile["domains"], key=lambda d: d["tokens_routed"])["domain"] == "code"

    # Independent reference: which domain each token id occurs in most, counted from the data stream itself.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODELS["demo"])
    domains = resolve_domains(["demo"])
    per_domain = {d.name: Counter() for d in domains}
    for batch in token_batches(domains, tokenizer, num_tokens=NUM_TOKENS, seq_len=256, batch_size=16, progress=False):
        name = domains[int(batch.domain_ids[0])].name
        per_domain[name].update(batch.input_ids[batch.count_mask].tolist())
    def is_code(token: dict) -> bool:
        return max(per_domain, key=lambda d: per_domain[d][token["token_id"]]) == "code"

    by_count, by_lift = profile["top_tokens_by_count"][:10], profile["top_tokens_by_lift"][:10]
    assert is_code(by_count[0]) and is_code(by_lift[0])
    assert sum(map(is_code, by_count)) >= 7, [t["token"] for t in by_count]  # common words ('s', ' of') also appear
    assert sum(map(is_code, by_lift)) >= 9, [t["token"] for t in by_lift]
