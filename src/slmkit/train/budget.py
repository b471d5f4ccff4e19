"""Stop rules: a run ends at the first budget it reaches (steps, tokens, FLOPs or wall-clock minutes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    max_steps: int | None = None
    max_tokens: int | None = None
    max_flops: float | None = None
    max_minutes: float | None = None

    def fractions(self, step: int, tokens: int, flops: float, seconds: float) -> dict[str, float]:
        """Share of each set budget already spent."""
        out = {}
        if self.max_steps:
            out["steps"] = step / self.max_steps
        if self.max_tokens:
            out["tokens"] = tokens / self.max_tokens
        if self.max_flops:
            out["flops"] = flops / self.max_flops
        if self.max_minutes:
            out["minutes"] = seconds / (60.0 * self.max_minutes)
        return out

    def progress(self, step: int, tokens: int, flops: float, seconds: float) -> float:
        fractions = self.fractions(step, tokens, flops, seconds)
        return min(max(fractions.values(), default=0.0), 1.0)

    def done(self, step: int, tokens: int, flops: float, seconds: float) -> str | None:
        """The name of the budget that is spent, or None."""
        for name, fraction in self.fractions(step, tokens, flops, seconds).items():
            if fraction >= 1.0:
                return name
        return None

    def planned_steps(self, tokens_per_step: int, flops_per_step: float) -> int | None:
        """Steps the run will take when the budget is not time-based (for ETA and the schedule)."""
        limits = []
        if self.max_steps:
            limits.append(self.max_steps)
        if self.max_tokens:
            limits.append(-(-self.max_tokens // tokens_per_step))
        if self.max_flops:
            limits.append(int(-(-self.max_flops // flops_per_step)))
        return min(limits) if limits else None
