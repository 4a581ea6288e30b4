"""The promotion gate: may the challenger go to canary? A pure function, table-tested.

The champion comparison is statistical: each compared metric comes with the paired bootstrap's
challenger-minus-champion difference, its confidence interval and the one-sided p-value of H0 "the
difference is at or below the threshold" (see bootstrap.py). A metric passes when H0 is rejected at
alpha = (1 - confidence) / 2, which for one metric is the interval's lower end lying above the threshold.

With several metrics no correction is needed, and none is the default: the challenger passes only if every
metric passes, so the gate is an intersection-union test (Berger 1982). A challenger truly worse than its
margin on some metric passes only if that metric's own test errs, which happens with probability at most
alpha, however many other metrics there are. Holm's step-down (`gate.correction: holm`) bounds the chance
of wrongly passing even one of the metrics, which a gate would need if any one metric passing were enough;
for this gate it only makes each added metric a further hurdle for a challenger as good as the champion.
"""

from __future__ import annotations

from canaryflow.config import GateConfig
from canaryflow.decision import Check, Decision
from canaryflow.evaluation.bootstrap import Comparison, holm


def _floors(challenger: dict[str, float], gate: GateConfig) -> list[Check]:
    """A metric named in the gate but missing from the results fails: a gate that silently skips a check
    it was told to make would pass models nobody judged."""
    checks = []
    for metric, floor in sorted(gate.floors.items()):
        value = challenger.get(metric)
        if value is None:
            checks.append(Check(f"{metric} floor", False, f"metric {metric!r} was not computed"))
            continue
        ok = value >= floor
        checks.append(Check(f"{metric} floor", ok, f"{value:.2f} {'>=' if ok else '<'} floor {floor:.2f}"))
    return checks


def decide(challenger: dict[str, float], comparisons: dict[str, Comparison] | None, gate: GateConfig) -> Decision:
    """Judge the challenger: absolute floors, then each compared metric against the champion."""
    checks = _floors(challenger, gate)
    if comparisons is None:
        checks.append(Check("champion comparison", True, "no champion yet: floors alone decide"))
        return Decision.of(checks)
    alpha = (1 - gate.confidence) / 2
    wanted = gate.thresholds()
    missing = sorted(set(wanted) - set(comparisons))
    checks += [Check(f"{m} vs champion", False, f"metric {m!r} was not compared") for m in missing]
    compared = {m: comparisons[m] for m in sorted(wanted) if m in comparisons}
    p_values = {m: c.p_value for m, c in compared.items()}
    limits = holm(p_values, alpha) if gate.correction == "holm" else dict.fromkeys(p_values, alpha)
    # Holm steps down from the smallest p-value and stops at the first metric it cannot pass.
    stopped = False
    for metric in sorted(compared, key=lambda m: (p_values[m], m)):
        c = compared[metric]
        ok = not stopped and c.p_value <= limits[metric]
        stopped = gate.correction == "holm" and (stopped or not ok)
        rule = "improvement" if metric in gate.improvement else "non-inferiority"
        detail = (
            f"{c.challenger:.2f} vs champion {c.champion:.2f}, diff {c.diff:+.2f} "
            f"[{c.confidence:.0%} CI {c.ci_low:+.2f}, {c.ci_high:+.2f}]; {rule}: H0 diff <= {c.threshold:+.2f}, "
            f"p={c.p_value:.4f} {'<=' if c.p_value <= limits[metric] else '>'} {limits[metric]:.4f}; "
            f"{c.items} test inputs resolve ±{c.resolution:.2f}"
        )
        if not ok and c.p_value <= limits[metric]:
            detail += " (Holm stopped at a metric before it)"
        checks.append(Check(f"{metric} vs champion", ok, detail))
    return Decision.of(checks)


def resolution_warnings(comparisons: dict[str, Comparison] | None, gate: GateConfig) -> list[str]:
    """One line per compared metric whose margin or required improvement is finer than the test set resolves.

    Such a gate still errs on the safe side, but it rejects challengers as good as the champion most of the
    time, and a retraining pipeline that rejects equal-or-better models without saying why gets switched off.
    """
    lines = []
    for metric, c in sorted((comparisons or {}).items()):
        limit = f"what {c.items} test inputs can resolve (±{c.resolution:.2f} at {c.confidence:.0%})"
        margin, gain = gate.non_inferiority.get(metric), gate.improvement.get(metric)
        if margin is not None and margin < c.resolution:
            lines.append(
                f"gate: {metric}'s margin {margin:.2f} is below {limit}: an equal challenger fails more often than "
                "it passes; widen the margin or the test set"
            )
        elif gain is not None and gain < c.resolution:
            lines.append(
                f"gate: {metric}'s required improvement {gain:.2f} is below {limit}: only a challenger about "
                f"{gain + c.resolution:.2f} better passes as often as it fails; widen the test set"
            )
    return lines
