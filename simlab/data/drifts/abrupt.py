"""Abrupt drift: ``domains[0]`` until ``at[0]``, then ``domains[1]`` … (A→B→A is three entries)."""

from __future__ import annotations

from dataclasses import field

from simlab.data.drifts.base import DriftType, WindowPlan


class Abrupt(DriftType):
    name = "abrupt"
    help = "``domains[0]`` until ``at[0]``, then ``domains[1]`` …"
    fields = [("at", list[int], field(default_factory=list,
                                      metadata={"help": "abrupt: the round each new domain starts in"}))]

    @staticmethod
    def check(spec):
        if len(spec.at) != len(spec.domains) - 1:
            return [("at", f"expected {max(len(spec.domains) - 1, 0)} switch rounds (one per change), "
                           f"found {len(spec.at)}")]
        if any(b <= a for a, b in zip(spec.at, spec.at[1:])) or any(r < 2 for r in spec.at):
            return [("at", f"switch rounds must be increasing and >= 2, found {spec.at}")]
        return []

    @staticmethod
    def round_problems(spec, last):
        if spec.at and spec.at[-1] > last:
            return [("at", f"switch round {spec.at[-1]} is after the last round ({last})")]
        return []

    @staticmethod
    def describe(spec):
        return ", then ".join([spec.domains[0]] + [f"{d} from round {r}" for d, r in zip(spec.domains[1:], spec.at)])

    @staticmethod
    def plan(spec, t):
        return WindowPlan(weights={spec.domains[sum(1 for r in spec.at if t >= r)]: 1.0})
