"""No drift: one domain throughout."""

from __future__ import annotations

from simlab.data.drifts.base import DriftType, WindowPlan


class NoDrift(DriftType):
    name = "none"
    help = "``domain`` throughout"
    min_domains = 0

    @staticmethod
    def check(spec):
        return [] if spec.domain else [("domain", "drift type 'none' needs 'domain'")]

    @staticmethod
    def describe(spec):
        return f"{spec.domain} throughout"

    @staticmethod
    def plan(spec, t):
        return WindowPlan(weights={spec.domain: 1.0})

    @staticmethod
    def referenced_domains(spec):
        return [spec.domain] if spec.domain else []
