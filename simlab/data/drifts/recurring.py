"""Recurring drift: cycle through ``domains``, ``period`` rounds each."""

from __future__ import annotations

from dataclasses import field

from simlab.data.drifts.base import DriftType, WindowPlan


class Recurring(DriftType):
    name = "recurring"
    help = "cycles through ``domains``, ``period`` rounds each"
    fields = [("period", int | None, field(default=None, metadata={"ge": 1, "help": "recurring: rounds per visit"}))]

    @staticmethod
    def check(spec):
        return [] if spec.period is not None else [("period", "drift type 'recurring' needs 'period' (rounds per visit)")]

    @staticmethod
    def describe(spec):
        return f"{', '.join(spec.domains)} in turn, {spec.period} rounds each, repeated"

    @staticmethod
    def plan(spec, t):
        return WindowPlan(weights={spec.domains[((t - 1) // spec.period) % len(spec.domains)]: 1.0})
