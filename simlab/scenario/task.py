"""What one hospital is given: its own stream, the domains it reads or is tested on, and the settings.

A :class:`HospitalTask` is the part of a scenario that travels to a hospital (as JSON in every
message), so the same hospital code runs in simulation and at a real site. Other hospitals, the arm
list and the output section stay at the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from simlab.config import build, to_plain
from simlab.continual.registry import ContinualSpec
from simlab.data.specs import DataSpec, DomainSpec, HospitalSpec
from simlab.models.unet import ModelSpec
from simlab.scenario.schema import (AugmentationSpec, DerivedFacts, EngineSpec, EvaluationSpec, FederationSpec,
                                    Scenario)


@dataclass(frozen=True)
class HospitalTask(DerivedFacts):
    hospital: HospitalSpec
    domains: dict[str, DomainSpec]
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    continual: ContinualSpec = field(default_factory=ContinualSpec)
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)


def task_of(scenario: Scenario, hospital_id: str) -> HospitalTask:
    """Hospital ``hospital_id``'s task: only the domains its drift reads or evaluation tests on, with
    the evaluation domains written out (they no longer default to "all" once others are left out)."""
    spec = next(h for h in scenario.hospitals if h.id == hospital_id)
    wanted = set(spec.drift.referenced_domains()) | set(scenario.eval_domains)
    evaluation = to_plain(scenario.evaluation) | {"domains": list(scenario.eval_domains)}
    plain = {"hospital": to_plain(spec), "domains": {k: to_plain(v) for k, v in scenario.domains.items() if k in wanted},
             "seed": scenario.seed, "evaluation": evaluation,
             **{s: to_plain(getattr(scenario, s)) for s in ("data", "model", "federation", "continual", "augmentation",
                                                           "engine")}}
    return build(HospitalTask, plain, f"<task of hospital {hospital_id}>")


def task_json(task: HospitalTask) -> str:
    return json.dumps(to_plain(task), sort_keys=True)


def task_from_json(text: str, source: str = "<task sent by the server>") -> HospitalTask:
    return build(HospitalTask, json.loads(text), source)
