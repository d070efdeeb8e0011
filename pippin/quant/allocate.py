"""Mixed-bit allocation under a bits-per-weight budget (a multiple-choice knapsack).

Each layer has a cost for each candidate bit width (its estimated loss increase when it alone is
quantized to that width) and a size in bits (indices + LUTs). Greedy by marginal utility: start every
layer at its fewest bits, then repeatedly take the upgrade with the largest cost drop per extra bit that
still fits the budget. Fixed costs (embedding, norms) are counted too, so the budget is the true
average over every stored weight. The result is a plan: {layer name: bits}, editable JSON.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pippin.errors import PippinError


@dataclass(kw_only=True)
class LayerChoice:
    name: str
    n_weights: int
    sizes: dict[int, int]
    """bits -> stored bits of the layer at that width (indices + LUT)."""
    costs: dict[int, float]
    """bits -> estimated loss increase."""


def allocate(layers: list[LayerChoice], *, budget_bits: float, fixed_bits: float) -> dict[str, int]:
    """Choose bits per layer so that fixed_bits + sum(sizes) <= budget_bits at least total cost."""
    plan = {ly.name: min(ly.sizes) for ly in layers}
    used = fixed_bits + sum(ly.sizes[plan[ly.name]] for ly in layers)
    if used > budget_bits:
        raise PippinError(
            f"The budget is impossible: even with every layer at its fewest bits the model needs "
            f"{used / 1e6:.1f} Mbit, over the {budget_bits / 1e6:.1f} Mbit allowed. Raise --bpw, or allow fewer bits."
        )
    by_name = {ly.name: ly for ly in layers}

    def best_upgrade(ly: LayerChoice, cur: int) -> tuple[float, int] | None:
        options = []
        for b in ly.sizes:
            if b > cur:
                extra = ly.sizes[b] - ly.sizes[cur]
                gain = ly.costs[cur] - ly.costs[b]
                options.append((gain / max(extra, 1), b))
        return max(options) if options else None

    heap = []
    for ly in layers:
        up = best_upgrade(ly, plan[ly.name])
        if up:
            heapq.heappush(heap, (-up[0], ly.name, up[1]))
    while heap:
        _, name, b = heapq.heappop(heap)
        ly = by_name[name]
        extra = ly.sizes[b] - ly.sizes[plan[name]]
        if used + extra <= budget_bits:
            used += extra
            plan[name] = b
        else:
            # Too big: consider this layer's smaller upgrades instead, if any.
            smaller = {k: v for k, v in ly.sizes.items() if k < b}
            ly_small = LayerChoice(name=name, n_weights=ly.n_weights, sizes=smaller, costs=ly.costs)
            up = best_upgrade(ly_small, plan[name]) if len(smaller) > 1 else None
            if up:
                heapq.heappush(heap, (-up[0], name, up[1]))
            continue
        up = best_upgrade(ly, plan[name])
        if up:
            heapq.heappush(heap, (-up[0], name, up[1]))
    return plan
