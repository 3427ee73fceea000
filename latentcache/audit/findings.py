"""What the integrity checks found: failures (each names its kind and what is wrong) and notes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_LISTED_FAILURES = 200  # per kind, in summary.json; the counts are always complete


@dataclass
class Findings:
    """Integrity failures (each names its kind and what is wrong) and informational notes."""

    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.failures.append({"kind": kind, "detail": detail})

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(f["kind"] for f in self.failures))

    def listed(self) -> list[dict[str, str]]:
        seen: Counter = Counter()
        out = []
        for f in self.failures:
            seen[f["kind"]] += 1
            if seen[f["kind"]] <= MAX_LISTED_FAILURES:
                out.append(f)
        return out


def examples(items: list[str], n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")
