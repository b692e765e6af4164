"""Gradual drift: ``domains[0]`` until ``start``, ``domains[1]`` from ``end``; in between a mixture
whose share of ``domains[1]`` grows linearly (mode ``mix``) or images whose scanner and population
parameters are interpolated (mode ``interpolate``)."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from simlab.data.drifts.base import SpanDrift, WindowPlan, ramp


class Gradual(SpanDrift):
    name = "gradual"
    help = "``domains[0]`` to ``domains[1]`` between ``start`` and ``end``, mixed or interpolated"
    fields = [("mode", Literal["mix", "interpolate"], field(
        default="mix", metadata={"help": "gradual: mix the two domains' images, or interpolate their parameters"}))]

    @staticmethod
    def check(spec):
        p = []
        if len(spec.domains) != 2:
            p.append(("domains", f"gradual drift goes from one domain to another: 2 domains, found {len(spec.domains)}"))
        return p + SpanDrift.span_problems(spec)

    @staticmethod
    def describe(spec):
        how = "mixed" if spec.mode == "mix" else "interpolated"
        return f"{spec.domains[0]} to {spec.domains[1]} ({how}) over rounds {spec.start}–{spec.end}"

    @staticmethod
    def plan(spec, t):
        a, b = spec.domains
        s = ramp(t, spec.start, spec.end)
        if s in (0.0, 1.0):
            return WindowPlan(weights={b if s == 1.0 else a: 1.0})
        if spec.mode == "interpolate":
            return WindowPlan(interpolate=(a, b, s))
        return WindowPlan(weights={a: 1.0 - s, b: s})
