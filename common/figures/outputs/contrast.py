"""What contrast.py (behaviour experts): experts whose activation rates separate two data specs A and B, and the SteerMoE check of forcing them off / on writes, one `Output` per file (assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import EXPERT, LAYER, Output

SCRIPT = ("contrast",)
ANCHOR = "behaviour-experts"
STEERING = "steering-check"

_RATES = {
    "layer": LAYER, "expert": EXPERT,
    "routed_a": "counted tokens of A whose top-k includes the expert with w ≠ 0 (count)",
    "routed_b": "the same for B (count)",
    "p_a": "activation rate p_A = routed_a / tokens_a (fraction)",
    "p_b": "activation rate p_B = routed_b / tokens_b (fraction)",
    "delta": "Δ = p_A − p_B (fraction; > 0: fires more for A)",
    "ci_low": "lower end of Newcombe's hybrid score 95% interval of Δ (tokens treated as independent)",
    "ci_high": "upper end of that interval",
    "boot_low": "lower end of the 95% document-bootstrap percentile interval of Δ (empty without --bootstrap or with "
                "fewer than 2 documents in a set)",
    "boot_high": "upper end of that interval",
    "log_odds_ratio": "ln[(x_A + ½)/(n_A − x_A + ½)] − ln[(x_B + ½)/(n_B − x_B + ½)] (nats; Haldane-corrected)",
    "z": "pooled two-proportion z statistic of Δ (0 where the pooled variance is 0)",
    "p_value": "two-sided p-value of the z-test (1 where the pooled variance is 0)",
    "q_value": "Benjamini–Hochberg adjusted p-value over all layer × expert tests of the run",
    "p_bonferroni": "Bonferroni-adjusted p-value min(1, m·p) over the m layer × expert tests",
    "significant": "q_value ≤ --alpha",
    "candidate": "'A' (significant, Δ > 0 and the bootstrap interval above 0 where there is one), 'B' (the same "
                 "below 0) or empty",
}

# fmt: off
OUTPUTS: tuple[Output, ...] = (
    Output("contrast_experts.csv", "per MoE layer and routed expert: activation rates on A and B, their difference "
           "with two 95% intervals, the two-proportion z-test with BH and Bonferroni corrections, candidacy and "
           "whether it was steered", ANCHOR, SCRIPT,
           columns={**_RATES,
                    "tokens_a": "counted tokens of A (n_A, count; the same in every row)",
                    "tokens_b": "counted tokens of B (n_B, count)",
                    "steered": "'A' (switched off in the steering check), 'B' (switched on) or empty"},
           integers=frozenset({"layer", "expert", "tokens_a", "tokens_b", "routed_a", "routed_b"})),
    Output("contrast_top.csv", "the steered experts: the top --top A-experts and B-experts over all layers, in rank "
           "order, with their rows of contrast_experts.csv", ANCHOR, SCRIPT,
           columns={"side": "'A' (largest Δ > 0; switched off) or 'B' (most negative Δ; switched on)",
                    "rank": "rank within its side (1 = largest |Δ|)", **_RATES},
           integers=frozenset({"rank", "layer", "expert", "routed_a", "routed_b"})),
    Output("contrast_rates.npy", "activation rates p_A and p_B of every layer and expert", ANCHOR, SCRIPT,
           axes="[set (A, B), MoE layer (as in contrast_experts.csv), expert]",
           dtype="float64, fraction (NaN past a layer's expert count)"),
    Output("contrast_steering.csv", "the steering check, one row per condition and random draw: the classifier's "
           "scores of the A-prompted continuations, and the teacher-forced next-token NLL and KL on held-out A and "
           "B windows; rows 'reference A' / 'reference B' score the true continuations", STEERING, SCRIPT,
           columns={"condition": "none, A off, B on, A off + B on, random off, random on, random off + on, "
                                 "reference A or reference B (the held-out text's own continuations)",
                    "draw": "random draw (0-based; 0 for the other conditions)",
                    "experts_off": "experts switched off, 'L<layer>:E<expert>' space-separated (empty: none)",
                    "experts_on": "experts switched on, the same notation",
                    "continuations": "continuations scored (count: one per prompt)",
                    "tokens_scored": "generated tokens scored, special tokens and tokens after EOS left out (count)",
                    "b_token_share": "share of the scored tokens whose naive Bayes log-odds favour B (λ > 0; fraction)",
                    "p_b_mean": "mean over the continuations of P(B | continuation) = σ(Σ λ) (fraction)",
                    "nll_a": "mean next-token NLL on the held-out A windows under the condition (nats / token; empty "
                             "for the references)",
                    "nll_b": "the same on the held-out B windows",
                    "kl_a": "mean KL(p_none ‖ p_condition) of the next-token distributions at every position of the "
                            "held-out A windows (nats)",
                    "kl_b": "the same on the held-out B windows",
                    "delta_nll_a": "nll_a − nll_a of 'none' (nats / token)",
                    "delta_nll_b": "nll_b − nll_b of 'none' (nats / token)"},
           integers=frozenset({"draw", "continuations", "tokens_scored"})),
    Output("contrast_generations.csv", "every continuation generated in the steering check (prompt × condition × "
           "draw) with its classifier scores", STEERING, SCRIPT,
           columns={"prompt": "prompt number (0-based: held-out A window)",
                    "condition": "none, A off, B on, A off + B on, random off, random on or random off + on",
                    "draw": "random draw (0-based; 0 for the others)",
                    "prompt_text": "the prompt's first --prompt_len tokens, decoded (special tokens left out)",
                    "continuation": "the --max_new_tokens generated (up to EOS), decoded",
                    "tokens": "tokens generated (count)",
                    "tokens_scored": "of those, scored by the classifier (count; specials left out)",
                    "b_token_share": "share of the scored tokens favouring B (fraction; empty if none scored)",
                    "log_odds_b": "Σ λ over the scored tokens: ln P(B | text) − ln P(A | text) (nats)",
                    "p_b": "P(B | continuation) = σ(log_odds_b) (fraction)"},
           integers=frozenset({"prompt", "draw", "tokens", "tokens_scored"})),
    Output("figures/contrast_delta.{ext}", "Δ = p_A − p_B per layer and expert (diverging colours), candidates "
           "dotted, steered experts boxed", ANCHOR, SCRIPT),
    Output("figures/contrast_volcano.{ext}", "Δ against −log10 q of every layer × expert, candidates coloured by "
           "side, the α line, steered experts labelled", ANCHOR, SCRIPT),
    Output("figures/contrast_top.{ext}", "the steered experts' Δ with Newcombe's and the document bootstrap's 95% "
           "intervals", ANCHOR, SCRIPT),
    Output("figures/contrast_steering.{ext}", "B-token share, mean P(B | text), ΔNLL and KL on A and B by condition, "
           "each steered condition beside its random draws (mean ± sd), the references' levels as lines", STEERING,
           SCRIPT),
)
# fmt: on
