"""The promotion gate: may the challenger go to canary? A pure function, table-tested."""

from __future__ import annotations

from canaryflow.config import GateConfig
from canaryflow.decision import Check, Decision


def decide(challenger: dict[str, float], champion: dict[str, float] | None, gate: GateConfig) -> Decision:
    """Judge challenger metrics against absolute floors and, when a champion exists, non-inferiority.

    A metric named in the gate but missing from the challenger's results fails: a gate that silently
    skips a check it was told to make would pass models nobody judged.
    """
    checks: list[Check] = []
    for metric, floor in sorted(gate.floors.items()):
        value = challenger.get(metric)
        if value is None:
            checks.append(Check(f"{metric} floor", False, f"metric {metric!r} was not computed"))
            continue
        ok = value >= floor
        checks.append(Check(f"{metric} floor", ok, f"{value:.2f} {'>=' if ok else '<'} floor {floor:.2f}"))
    if champion is None:
        checks.append(Check("champion comparison", True, "no champion yet: floors alone decide"))
        return Decision.of(checks)
    for metric, margin in sorted(gate.non_inferiority.items()):
        value, base = challenger.get(metric), champion.get(metric)
        if value is None or base is None:
            checks.append(Check(f"{metric} vs champion", False, f"metric {metric!r} missing for one model"))
            continue
        ok = value >= base - margin
        checks.append(
            Check(
                f"{metric} vs champion",
                ok,
                f"{value:.2f} vs champion {base:.2f} (diff {value - base:+.2f}, allowed -{margin:.2f})",
            )
        )
    return Decision.of(checks)
