"""The result type of every automatic decision: a verdict plus every reason behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, checks: list[Check]) -> Decision:
        return cls(passed=all(c.passed for c in checks), checks=tuple(checks))

    @property
    def reasons(self) -> list[str]:
        return [f"{'ok' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}
