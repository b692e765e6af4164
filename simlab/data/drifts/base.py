"""What a drift type is: how a hospital's window distribution moves over rounds (see
:mod:`simlab.data.drift`, which registers the types and assembles ``DriftSpec`` from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class WindowPlan:
    """Round t's window: a *mixture* over named domains (every image of the window draws its domain
    from the weights) or an *interpolation* between two domains' scanner and population parameters."""

    weights: dict[str, float] | None = None  # mixture over domains (sums to 1)
    interpolate: tuple[str, str, float] | None = None  # (from, to, t in (0, 1))

    @property
    def contributing(self) -> tuple[str, ...]:
        """The domains the window draws on: a mixture's domains with a positive weight, or both ends of an
        interpolation (whose parameter lies strictly between them)."""
        if self.interpolate is not None:
            return self.interpolate[:2]
        assert self.weights is not None
        return tuple(d for d, w in self.weights.items() if w > 0)

    @property
    def true_domain(self) -> str:
        if self.interpolate is not None:
            a, b, t = self.interpolate
            return a if t < 0.5 else b
        assert self.weights is not None
        best = max(self.weights.values())
        return next(d for d, w in self.weights.items() if w == best)


def ramp(t: int, start: int, end: int) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between (end > start)."""
    if t <= start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


class DriftType:
    """One drift type. ``name`` is the value of ``drift.type``; ``fields`` are the keys it adds to the
    spec beyond the shared ``domain``, ``domains``, ``start`` and ``end`` (``(name, type, field)``
    tuples, as for :func:`dataclasses.make_dataclass`); ``min_domains`` how many ``domains`` it needs.
    :meth:`check` returns ``(key, message)`` problems; :meth:`plan` the window of round t."""

    name: ClassVar[str]
    help: ClassVar[str]
    fields: ClassVar[list[tuple]] = []
    min_domains: ClassVar[int] = 2

    @staticmethod
    def check(spec) -> list[tuple[str, str]]:
        return []

    @staticmethod
    def plan(spec, t: int) -> WindowPlan:
        raise NotImplementedError

    @staticmethod
    def referenced_domains(spec) -> list[str]:
        return list(spec.domains)

    @staticmethod
    def round_problems(spec, last: int) -> list[tuple[str, str]]:
        """``(key, message)`` for a schedule that changes after the stream's last round ``last``."""
        return []

    @classmethod
    def describe(cls, spec) -> str:
        """The schedule in words, for the report and the run's story (e.g. ``A, then B from round 4``)."""
        return f"{cls.name}: {' → '.join(spec.domains)}"


class SpanDrift(DriftType):
    """A change between ``start`` and ``end`` (gradual, population, shifting)."""

    @staticmethod
    def span_problems(spec) -> list[tuple[str, str]]:
        return [] if spec.end > spec.start else [("end", f"expected end > start ({spec.start}), found {spec.end}")]

    @staticmethod
    def round_problems(spec, last):
        return [("start", f"start {spec.start} is after the last round ({last})")] if spec.start > last else []
