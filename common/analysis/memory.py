"""How much memory a run's statistics take, decided from the model's config before any weight is loaded.

Routing statistics are flat in the number of tokens but grow with the model: the three vocabulary × expert token
tables take vocab · E · layers cells each, and the indicator Gram matrices (L·E)² each. `plan_routing_counts`
sizes every accumulator of `RoutingCounts` (built on the meta device, so the numbers are the real ones), keeps what
fits within the device budget on the device, moves the token tables to the host when they do not, and refuses in
one line, naming the flags that would make the run fit, when even that is not enough.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.analysis.specialization import RoutingCounts
from common.errors import InputError
from common.model import MoELayer

GiB = 2**30
DEFAULT_DEVICE_BUDGET_GIB = 4.0


def default_host_budget_gib() -> float:
    """Half of this machine's physical memory: the model's own host copy and the metrics need the rest."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / GiB
    except (ValueError, OSError, AttributeError):
        return 16.0


def _is_table(name: str) -> bool:
    return name.startswith(("token_", "occurrences_"))


@dataclass(frozen=True)
class StatsPlan:
    """Where each accumulator lives and what it takes (bytes)."""

    device: torch.device
    on_device: dict[str, int]
    on_host: dict[str, int]

    @property
    def tables_on_host(self) -> bool:
        return any(_is_table(name) for name in self.on_host)

    @property
    def table_device(self) -> torch.device:
        return torch.device("cpu") if self.tables_on_host else self.device

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "device_bytes": sum(self.on_device.values()),
            "host_bytes": sum(self.on_host.values()),
            "device_accumulators": self.on_device,
            "host_accumulators": self.on_host,
        }


def plan_routing_counts(
    layers: Sequence[MoELayer],
    domains: Sequence[str],
    vocab_size: int,
    device: torch.device,
    *,
    token_tables: bool = True,
    device_budget_gib: float = DEFAULT_DEVICE_BUDGET_GIB,
    host_budget_gib: float | None = None,
) -> StatsPlan:
    """Placement of `RoutingCounts`' accumulators within the budgets, or an `InputError` naming what would fit."""
    host_budget_gib = default_host_budget_gib() if host_budget_gib is None else host_budget_gib
    sizes = RoutingCounts(layers, domains, vocab_size, torch.device("meta"), token_tables=token_tables).nbytes()
    tables = {k: v for k, v in sizes.items() if _is_table(k)}
    rest = {k: v for k, v in sizes.items() if not _is_table(k)}
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    if device.type == "cpu":  # one memory: no spilling, the statistics budget is the whole budget
        if sum(sizes.values()) > device_budget_gib * GiB:
            raise InputError(
                f"--stats_memory {device_budget_gib:g}: the routing statistics need {gib(sum(sizes.values()))} "
                f"({gib(sum(tables.values()))} of token tables); raise --stats_memory, pass --no-token-tables or "
                "select fewer --layers"
            )
        return StatsPlan(device, sizes, {})
    if sum(sizes.values()) <= device_budget_gib * GiB:
        return StatsPlan(device, sizes, {})
    if sum(rest.values()) > device_budget_gib * GiB:
        raise InputError(
            f"--stats_memory {device_budget_gib:g}: even with the token tables on the host the routing statistics need "
            f"{gib(sum(rest.values()))} on the device (indicator Gram matrices grow with (layers × experts)²); "
            "select fewer --layers or raise --stats_memory"
        )
    if sum(tables.values()) > host_budget_gib * GiB:
        raise InputError(
            f"--host_stats_memory {host_budget_gib:g}: the token tables need {gib(sum(tables.values()))} on the host "
            f"(and do not fit the device budget, --stats_memory {device_budget_gib:g}); pass --no-token-tables, "
            "select fewer --layers, or raise either budget"
        )
    return StatsPlan(device, rest, tables)
