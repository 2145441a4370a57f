"""What the statistics of `router_metrics.py --layers all` take on the device and on the host, for real model sizes.

    uv run bench/stats_memory.py

Each configuration is built on the meta device from its published vocabulary, routed-expert count and number of MoE
layers (no download, no weights), and sized by the same `plan_routing_counts` the script runs before loading a
model. Printed: the old layout (float64 token tables on the device) beside the new plan (int32 tables; moved to the
host when they do not fit the default device budget of 4 GiB), and whether the plan's bytes (`StatsPlan.to_dict`)
fit those budgets; a configuration the planner refuses (the script's one-line error) is printed as not fitting,
with the reason. Exit status 1 if a plan the planner returned exceeds the budgets it was made for. Not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `common` importable

from common.analysis.memory import DEFAULT_DEVICE_BUDGET_GIB, GiB, plan_routing_counts
from common.analysis.specialization import RoutingCounts
from common.errors import InputError
from common.model import MoEModel

# name: (vocab, routed experts, MoE layers), from the published configurations.
CONFIGS = {
    "OLMoE-1B-7B": (50_304, 64, 16),
    "DeepSeek-V2-Lite": (102_400, 64, 26),
    "Qwen3-30B-A3B": (151_936, 128, 48),
    "gpt-oss-120b": (201_088, 128, 36),
    "DeepSeek-V3": (129_280, 256, 58),
}
DOMAINS = ["d1", "d2", "d3", "d4", "d5"]
HOST_BUDGET_GIB = 512.0  # half the RAM of a typical 8-GPU box (1 TiB); the script defaults to half of this machine's


def skeleton(vocab: int, experts: int, layers: int) -> MoEModel:
    """A weightless MoE with the routing shape of the real model (tiny hidden size: routing statistics do not see it)."""
    config = OlmoeConfig(vocab_size=vocab, num_experts=experts, num_experts_per_tok=8, num_hidden_layers=layers,
                         hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    with torch.device("meta"):
        return MoEModel(OlmoeForCausalLM(config))


def main() -> int:
    device = torch.device("cuda")  # the plan for a GPU run (nothing is allocated: sizes come from the meta device)
    print(f"{'model':18} {'old: device':>12} {'new: device':>12} {'new: host':>10}  fits (device ≤ {DEFAULT_DEVICE_BUDGET_GIB:g} GiB,"
          f" host ≤ {HOST_BUDGET_GIB:g} GiB)")
    over = []
    for name, (vocab, experts, layers) in CONFIGS.items():
        moe = skeleton(vocab, experts, layers)
        old = RoutingCounts(moe.layers, DOMAINS, vocab, torch.device("meta"), table_dtype="float64").nbytes()
        try:
            plan = plan_routing_counts(moe.layers, DOMAINS, vocab, device, host_budget_gib=HOST_BUDGET_GIB)
        except InputError as refused:
            print(f"{name:18} {sum(old.values()) / GiB:10.2f} G {'-':>12} {'-':>10}  NO, the planner refuses: {refused}")
            continue
        info = plan.to_dict()
        fits = info["device_bytes"] <= DEFAULT_DEVICE_BUDGET_GIB * GiB and info["host_bytes"] <= HOST_BUDGET_GIB * GiB
        if not fits:
            over.append(name)
        print(f"{name:18} {sum(old.values()) / GiB:10.2f} G {info['device_bytes'] / GiB:10.2f} G "
              f"{info['host_bytes'] / GiB:8.2f} G  {'yes' if fits else 'NO, over the budgets the plan was made for'}"
              f"{'  (token tables on the host)' if plan.tables_on_host else ''}")
    if over:
        print(f"FAIL plans over their budgets: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
