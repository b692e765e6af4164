"""Shifting source: the intake moves through ``domains[0] → domains[1] → … → domains[-1]`` between
``start`` and ``end``, each neighbouring pair mixed linearly, as the case mix of the ODEx paper's
*shifting source* stream moves from one dataset to the next (its Appendix A). With n domains the
n − 1 transitions take equal shares of ``[start, end]``: pure ``domains[0]`` until ``start``, pure
``domains[k]`` at ``start + k·(end − start)/(n − 1)``, pure ``domains[-1]`` from ``end``; in between
every image of a window draws its domain from the two neighbours, with the share of the next one
growing linearly. Two domains are the ``gradual`` drift's ``mix`` mode."""

from __future__ import annotations

from simlab.data.drifts.base import SpanDrift, WindowPlan


class Shifting(SpanDrift):
    name = "shifting"
    help = "``domains[0]`` → … → ``domains[-1]`` between ``start`` and ``end``, neighbours mixed linearly"
    fields = []

    @staticmethod
    def check(spec):
        p = []
        if len(spec.domains) < 2:
            p.append(("domains", f"a shifting source moves through at least 2 domains, found {len(spec.domains)}"))
        return p + SpanDrift.span_problems(spec)

    @staticmethod
    def describe(spec):
        return f"a case mix shifting {' → '.join(spec.domains)} over rounds {spec.start}–{spec.end}"

    @staticmethod
    def plan(spec, t):
        n = len(spec.domains) - 1
        pos = min(max((t - spec.start) / (spec.end - spec.start), 0.0), 1.0) * n  # in [0, n]
        k = min(int(pos), n - 1)
        s = pos - k
        a, b = spec.domains[k], spec.domains[k + 1]
        if s in (0.0, 1.0):
            return WindowPlan(weights={b if s == 1.0 else a: 1.0})
        return WindowPlan(weights={a: 1.0 - s, b: s})
