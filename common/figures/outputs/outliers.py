"""What outliers.py (super experts): the peaks entering and leaving each expert, the residual stream's massive
activations, the attention sink, and perplexity with the named experts removed writes, one `Output` per file
(assembled into `common.run.outputs.REGISTRY`)."""

from __future__ import annotations

from common.figures.outputs.entry import DOMAIN, EXPERT, LAYER, Output

SCRIPT = ("outliers",)
ANCHOR = "super-experts"
_TOKEN = {"token_id": "id of the token where the peak occurs", "token": "that token's text (tokenizer.decode)",
          "position": "its position in the window (0-based; 0 = the window's first token)"}


def _at(prefix: str) -> dict[str, str]:
    return {f"{prefix}_{key}": text.replace("the peak", f"the {prefix} peak") for key, text in _TOKEN.items()}


# fmt: off
OUTPUTS: tuple[Output, ...] = (
    Output("expert_peaks.csv", "per MoE layer, routed expert and domain: the largest |activation| entering the "
           "expert's down projection and the largest |output| of the expert over the tokens routed to it, and where "
           "each occurs", ANCHOR, SCRIPT,
           columns={"layer": LAYER, "expert": EXPERT, "domain": DOMAIN,
                    "routed_tokens": "real tokens of the domain routed to the expert, w ≠ 0 (count)",
                    "input_peak": "max over those tokens and the expert's neurons of |act(gate·x)·(up·x)| (the "
                                  "down projection's input; the model's activation units; empty: never routed)",
                    "input_neuron": "the neuron (intermediate unit, 0-based) holding input_peak",
                    **_at("input"),
                    "output_peak": "max over those tokens and hidden dimensions of |E_e(x)|, the expert's own output "
                                   "before its routing weight (hidden-state units)",
                    "output_dim": "the hidden dimension (0-based) holding output_peak",
                    **_at("output")},
           integers=frozenset({"layer", "expert", "routed_tokens", "input_neuron", "input_token_id", "input_position",
                               "output_dim", "output_token_id", "output_position"})),
    Output("expert_peaks.npy", "the peaks of expert_peaks.csv as an array (NaN: the expert saw no token there)", ANCHOR,
           SCRIPT, axes="[MoE layer (run.json layers order), expert, domain (+ all last), (input peak, output peak)]",
           dtype="float64, |activation|"),
    Output("super_experts.csv", "the experts named super: their peak against the median peak of their layer's "
           "experts, and where the peak occurs", ANCHOR, SCRIPT,
           columns={"layer": LAYER, "expert": EXPERT,
                    "rule_on": "which peak the rule read: output (the expert's output) or input (the down "
                               "projection's input), over all domains",
                    "peak": "that peak (|activation|)",
                    "layer_median": "median of that peak over the layer's routed experts that saw a token",
                    "ratio": "peak / layer_median (×)",
                    "named_by": "the rule (peak > --multiple × median) or --remove",
                    "routed_tokens": "real tokens routed to the expert over all domains (count)",
                    "domains_above": "domains in which the expert's peak alone also exceeds --multiple × that "
                                     "domain's layer median (count): a data-agnostic super expert passes in all",
                    "domains_seen": "domains in which the expert saw a token (count)",
                    **_TOKEN,
                    "context": "the text around the peak's token (±4 tokens), the token itself in [[ ]]"},
           integers=frozenset({"layer", "expert", "routed_tokens", "domains_above", "domains_seen", "token_id",
                               "position"})),
    Output("massive_activations.csv", "per decoder layer and domain: the residual stream's three largest |h| after "
           "the layer, with dimension and token, against its median and mean |h|", ANCHOR, SCRIPT,
           columns={"layer": "decoder-layer index (every layer, dense ones included)", "domain": DOMAIN,
                    "rank": "1, 2, 3: the largest, second and third |h| entry (token × dimension)",
                    "value": "that |h| (hidden-state units)", "dim": "its hidden dimension (0-based)", **_TOKEN,
                    "median_abs": "median |h| over every real token and dimension (log-histogram estimate, 0.46% "
                                  "resolution)",
                    "mean_abs": "mean |h| over every real token and dimension",
                    "ratio_to_median": "value / median_abs (×)"},
           integers=frozenset({"layer", "rank", "dim", "token_id", "position"})),
    Output("outlier_perplexity.csv", "next-token perplexity per domain: unedited, with the super experts removed, and "
           "with as many random experts removed in the same layers", ANCHOR, SCRIPT,
           columns={"condition": "none (unedited), super (the named experts removed), random (as many other experts "
                                 "of the same layers, seeded)",
                    "draw": "random: the seeded draw (0..--draws−1); 0 otherwise",
                    "experts_removed": "experts removed over all measured layers (count)", "domain": DOMAIN,
                    "predictions": "next-token predictions averaged (count)",
                    "nll": "mean next-token NLL (nats per token)", "ppl": "perplexity exp(nll)"},
           integers=frozenset({"draw", "experts_removed", "predictions"})),
    Output("sink_mass.csv", "per condition, decoder layer and domain: the attention mass on the window's first token "
           "and the residual stream's peak", ANCHOR, SCRIPT,
           columns={"condition": "none, super or random, as in outlier_perplexity.csv",
                    "draw": "random: the seeded draw; 0 otherwise",
                    "layer": "decoder-layer index (every layer)", "domain": DOMAIN,
                    "sink_mass": "mean over heads and real query tokens at positions ≥ 1 of the attention weight on "
                                 "position 0 (fraction; empty where the architecture returns no attention weights)",
                    "uniform_mass": "the same mean if every query attended uniformly to the real tokens it sees, "
                                    "1/(q + 1) at position q (fraction): sink_mass far above it is an attention sink",
                    "residual_peak": "max |h| of the residual stream after the layer over every real token and "
                                     "dimension (hidden-state units)"},
           integers=frozenset({"draw", "layer"})),
    Output("figures/expert_peaks.{ext}", "peak |activation| per expert and layer, down-projection input and expert "
           "output (log scale), the rule's threshold and the super experts marked", ANCHOR, SCRIPT),
    Output("figures/massive_activations.{ext}", "the residual stream's top-1/2/3 |h| and median |h| per decoder "
           "layer (log scale), the top-1's dimension and token", ANCHOR, SCRIPT),
    Output("figures/sink_mass.{ext}", "attention mass on the first token and the residual peak per layer: unedited, "
           "super experts removed, random experts removed", ANCHOR, SCRIPT),
    Output("figures/outlier_perplexity.{ext}", "perplexity per domain: unedited, super experts removed, random "
           "experts removed (log scale)", ANCHOR, SCRIPT),
)
# fmt: on
