"""The scenario schema: typed sections with defaults; validation in :mod:`simlab.config`.

Rounds are numbered 1..``federation.rounds``. Round 0 is the untrained initial model (evaluated once,
for forward transfer). A drift ``at: [11]`` means the new domain starts *in* round 11.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simlab.adaptation.registry import ADAPTATIONS, adaptation_class, adaptation_field, param_sections
from simlab.augment.frequency import FrequencyParams
from simlab.continual.registry import ContinualSpec, method_class
from simlab.continual.semi_supervised import SemiSupervisedSpec
from simlab.continual.training import loss_weight
from simlab.data.specs import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, DataSpec, DomainSpec, HospitalSpec, num_classes_of
from simlab.models.unet import ModelSpec
from simlab.aggregation import AggregationParams, ServerOptimizerParams
from simlab.config import ScenarioError, assemble, build, read_yaml, set_dotted, to_plain
from simlab.runlog import RESERVED_IDS


@dataclass(frozen=True)
class FederationSpec:
    rounds: int = field(default=30, metadata={
        "ge": 1, "le": 10_000, "why": "every round's windows are generated and cached before round 1, one file per "
                                      "hospital and round",
        "help": "federated rounds (at most 10,000: each hospital's window of every round is generated and cached "
                "before round 1)"})
    clients_per_round: int | None = field(default=None, metadata={"ge": 1, "help": "default: every hospital"})
    local_steps: int = field(default=4, metadata={"ge": 1, "le": 1_000_000, "why": "optimiser steps per round",
                                                  "help": "optimiser steps per round"})
    local_epochs: int | None = field(default=None, metadata={"ge": 1, "le": 10_000, "why": "epochs per round",
                                                             "help": "if set: epochs over the training set instead of steps"})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "le": 1e3, "why": "a step this large only diverges",
                                              "help": "local learning rate (finite, > 0)"})
    batch_size: int = field(default=16, metadata={"ge": 1, "le": 65_536, "why": "one batch is held in memory",
                                                  "help": "local training batch size"})
    optimizer: Literal["adam", "sgd"] = "adam"
    aggregation: AggregationParams = field(default_factory=AggregationParams)
    server_optimizer: ServerOptimizerParams = field(
        default_factory=ServerOptimizerParams, metadata={"help": "FedOpt (Reddi et al. 2021): the aggregate is a "
                                                                 "pseudo-gradient for a server optimiser (none: it is the new model)"})
    proximal_mu: float = loss_weight(0.0, "FedProx (Li et al. 2020): (mu/2)·‖w − w_t‖² added to the local loss, w_t the "
                                          "model received this round (0: off; the paper tries 0.001, 0.01, 0.1, 1)")
    semi_supervised: SemiSupervisedSpec = field(
        default_factory=SemiSupervisedSpec, metadata={"help": "unlabelled images in local training, with any continual "
                                                              "method: mean teacher or pseudo-labels (none: off)"})
    norm: Literal["shared", "local"] = field(
        default="shared", metadata={"help": "shared: normalisation layers are aggregated like every weight; local: FedBN "
                                            "(Li et al. 2021), each hospital keeps its own normalisation weights and "
                                            "statistics, never sent, and its deployed model uses them"})
    round_timeout_s: float = field(default=600.0, metadata={"gt": 0.0, "le": 604_800.0, "why": "one week",
                                                            "help": "wait at most this long for replies"})
    connect_timeout_s: float = field(default=300.0, metadata={"gt": 0.0, "le": 604_800.0, "why": "one week",
                                                              "help": "at the start, wait at most this long for every "
                                                                      "hospital's node to connect"})
    min_replies: int = field(default=1, metadata={
        "ge": 1, "le": 100_000, "why": "no round samples that many hospitals",
        "help": "fewer replies: the round is skipped (at most the hospitals sampled per round)"})


@dataclass(frozen=True)
class AugmentationSpec:
    flip: bool = field(default=False, metadata={"help": "random left-right flips during local training"})
    frequency: FrequencyParams = field(default_factory=FrequencyParams)
    frequency_refresh: int | None = field(
        default=None, metadata={"ge": 1, "le": 10_000, "why": "federation.rounds ≤ 10,000: a longer period never "
                                                              "re-shares",
                                "help": "re-share amplitude blocks every k rounds (default: once, "
                                                 "from each hospital's first window)"})


EvaluationSpec = assemble(
    "EvaluationSpec",
    "When and on what the deployed model is evaluated, and the test-time adaptation applied first "
    "(``adaptation``, with each registered adaptation's params in ``evaluation.<name>``).",
    [
        ("every", int, field(default=5, metadata={
            "ge": 1, "le": 10_000, "why": "federation.rounds ≤ 10,000: a longer period never comes",
            "help": "evaluate every k rounds (and at boundaries)"})),
        ("at_boundaries", bool, field(default=True)),
        ("test_size", int, field(default=64, metadata={
            "ge": 1, "le": 100_000, "why": "each domain's test set is held in memory: 100,000 images of 128² px take 6.6 GB",
            "help": "held-out test images per domain (at most 100,000: each test set is held in memory)"})),
        ("domains", list[str] | None, field(default=None, metadata={"help": "domains to test on (default: all)"})),
        ("batch_size", int, field(default=64, metadata={"ge": 1, "le": 65_536, "why": "one batch is held in memory"})),
        adaptation_field(),
    ],
    ADAPTATIONS,
)


@dataclass(frozen=True)
class EngineSpec:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_client: float = field(default=1.0, metadata={
        "gt": 0.0, "le": 1024.0, "why": "Ray places each virtual hospital on one node, and no node has more cores",
        "help": "CPU cores reserved per virtual hospital"})
    gpus_per_client: float | None = field(default=None, metadata={"ge": 0.0, "le": 1.0,
                                                                  "help": "GPU share per hospital (default: 1/hospitals on a GPU machine)"})
    deterministic: bool = field(default=True, metadata={"help": "deterministic torch algorithms"})
    ray_address: str | None = field(default=None, metadata={
        "help": "address of a running Ray cluster to simulate on (`ray start --head` prints it; 'auto': the "
                "one on this machine); default: $RAY_ADDRESS if set, else Ray is started on this machine"})
    launcher: Literal["in-process", "flwr-run"] = field(
        default="in-process", metadata={"help": "how an arm is started on Flower's simulation runtime: in-process "
                                                "(progress bar per round, errors raised as they happen) or "
                                                "flwr-run (`flwr run` against a private local simulation "
                                                "SuperLink, which starts Ray on this machine; the same run "
                                                "directory)"})

    def check(self):
        if self.launcher != "flwr-run":
            return []
        if self.cpus_per_client != int(self.cpus_per_client):
            return [("cpus_per_client", f"launcher 'flwr-run' reserves whole CPU cores per hospital (Flower's "
                                        f"federation config takes an integer), found {self.cpus_per_client}")]
        if self.ray_address:
            return [("ray_address", "launcher 'flwr-run' starts Ray on this machine; a Ray cluster is used by "
                                    "launcher 'in-process' only")]
        return []


@dataclass(frozen=True)
class OutputSpec:
    dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<name>-<time>)"})
    checkpoint: bool = field(default=True, metadata={"help": "write a checkpoint after every round, so that "
                                                            "`simlab run --resume RUN_DIR` can continue after a crash"})


@dataclass(frozen=True)
class ArmSpec:
    name: str
    set: dict[str, Any] = field(default_factory=dict,
                                metadata={"help": "dotted overrides of continual/federation/model/augmentation/engine"})


_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
"""Arm names, hospital ids and domain names become file and directory names in the run directory
(``R/<arm>/<hospital>.csv``, checkpoints, hospital state): no path separator, no leading dot."""

MAX_IMAGE_BYTES = 32 * 2**30
"""Memory for the images of one window or one test set (image and label), generous for one machine."""

ARM_SECTIONS = ("continual", "federation", "model", "augmentation", "engine")
ARM_KEYS = ("evaluation.adaptation", *param_sections())  # keys (and sections) outside those an arm may set:
# the test sets stay the same


class DerivedFacts:
    """What follows from the sections of a scenario or a hospital's task."""

    @property
    def eval_domains(self) -> list[str]:
        return list(self.evaluation.domains or self.domains)

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.data)


@dataclass(frozen=True)
class Scenario(DerivedFacts):
    name: str
    domains: dict[str, DomainSpec]
    hospitals: list[HospitalSpec]
    description: str = ""
    seed: int = field(default=0, metadata={"ge": -(2**63), "le": 2**64 - 1, "why": "torch seeds are 64-bit integers"})
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    continual: ContinualSpec = field(default_factory=ContinualSpec)
    augmentation: AugmentationSpec = field(default_factory=AugmentationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    arms: list[ArmSpec] = field(default_factory=list)

    def check(self):
        p: list[tuple[str, str]] = []
        if (not self.name.strip() or self.name.startswith(".") or len(self.name) > 100
                or any(c in self.name for c in "/\\") or not self.name.isprintable()):
            p.append(("name", f"expected a name of 1 to 100 printable characters, no '/' or '\\' and no leading '.', "
                              f"since it names the default run directory runs/<name>-<time>; found {self.name[:60]!r}"))
        if not self.domains:
            p.append(("domains", "at least one named domain is needed"))
        if not self.hospitals:
            p.append(("hospitals", "at least one hospital is needed"))
        for i, h in enumerate(self.hospitals):
            p += self._hospital_problems(i, h)
        for name, dom in self.domains.items():
            p += self._domain_problems(name, dom)
        for d in self.evaluation.domains or []:
            if d not in self.domains:
                p.append(("evaluation.domains", f"unknown domain {d!r}"))
        cpr, trainers = self.federation.clients_per_round, sum(h.participates for h in self.hospitals)
        if self.hospitals and not trainers:
            p.append(("hospitals", "every hospital has participates: false; at least one must train"))
        elif cpr is not None and cpr > trainers:
            p.append(("federation.clients_per_round", f"expected <= {trainers} (hospitals that participate), found {cpr}"))
        elif trainers and self.federation.min_replies > (cpr or trainers):
            p.append(("federation.min_replies", f"expected <= {cpr or trainers} (the hospitals sampled per round), found "
                                                f"{self.federation.min_replies}: every round would be skipped"))
        return (p + self._size_problems() + self._combination_problems() + self._unlabelled_problems()
                + self._arm_problems())

    def _size_problems(self) -> list[tuple[str, str]]:
        """The image size against the network's depth, and the images held in memory at once (a window,
        a test set) against ``MAX_IMAGE_BYTES``."""
        size = self.data.image_size
        why = self.model.image_size_problem(size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        p = [("data.image_size", why)] if why else []
        held = [(f"hospitals[{i}].size", h.size, "a training window") for i, h in enumerate(self.hospitals)]
        for key, n, what in [*held, ("evaluation.test_size", self.evaluation.test_size, "a test set")]:
            nbytes = n * size * size * 5  # float32 image + uint8 label per pixel
            if nbytes > MAX_IMAGE_BYTES:
                p.append((key, f"{what} of {n} images of {size}² px needs {nbytes / 2**30:.0f} GiB of memory; at "
                               f"most {MAX_IMAGE_BYTES // 2**30} GiB (≤ {MAX_IMAGE_BYTES // (size * size * 5)} "
                               f"images at this size)"))
        return p

    def _hospital_problems(self, i: int, h) -> list[tuple[str, str]]:
        p, last = [], self.federation.rounds
        if [g.id for g in self.hospitals].count(h.id) > 1:
            p.append((f"hospitals[{i}].id", f"duplicate hospital id {h.id!r}"))
        if not _ARM_NAME.fullmatch(h.id):
            p.append((f"hospitals[{i}].id", f"expected letters, digits, '_', '-', '.' or '+' (not first), since it "
                                            f"names files in the run directory; found {h.id!r}"))
        if h.id in RESERVED_IDS:
            p.append((f"hospitals[{i}].id", f"{h.id!r} is reserved: results name rows and files "
                                            f"{', '.join(map(repr, RESERVED_IDS))} that are not a hospital's"))
        for d in h.drift.referenced_domains():
            if d not in self.domains:
                p.append((f"hospitals[{i}].drift", f"unknown domain {d!r} (named domains: {', '.join(self.domains)})"))
        p += [(f"hospitals[{i}].drift.{key}", msg) for key, msg in h.drift.round_problems(last)]
        if (self.data.source == "nifti" and h.drift.type == "gradual" and h.drift.mode == "interpolate"
                and all(d in self.domains for d in h.drift.domains)
                and len({self.domains[d].dataset for d in h.drift.domains}) > 1):
            p.append((f"hospitals[{i}].drift.mode",
                      "interpolation between real-data domains needs both to read the same dataset; use mode 'mix'"))
        return p

    def _domain_problems(self, name: str, dom) -> list[tuple[str, str]]:
        if not _ARM_NAME.fullmatch(name):
            return [(f"domains.{name}", "expected a name of letters, digits, '_', '-', '.' or '+' (not first), "
                                        "since domain names reach result files")]
        if self.data.source != "nifti":
            return [(f"domains.{name}.dataset", "only used with data.source 'nifti'")] if dom.dataset is not None else []
        p = []
        if dom.dataset is None:
            p.append((f"domains.{name}.dataset", "source 'nifti' needs the dataset this domain reads"))
        elif dom.dataset not in self.data.datasets:
            p.append((f"domains.{name}.dataset",
                      f"unknown dataset {dom.dataset!r} (data.datasets: {', '.join(self.data.datasets) or 'none'})"))
        if dom.scanner.contrast == "tissue":
            p.append((f"domains.{name}.scanner.contrast", "'tissue' contrast needs tissue maps (phantom only)"))
        return p

    def _combination_problems(self) -> list[tuple[str, str]]:
        """Settings that each make sense but are not combined (yet)."""
        method, p = method_class(self.continual), []
        if method.server == "pool" and self.federation.norm == "local":
            p.append(("federation.norm", "local normalisation is not combined with a model pool (continual "
                                         f"method {self.continual.method!r}) yet"))
        if method.server == "pool" and self.evaluation.adaptation != "none":
            p.append(("evaluation.adaptation", "test-time adaptation is not combined with a routed model pool "
                                               f"(continual method {self.continual.method!r}) yet"))
        p += method.scenario_problems(self) + adaptation_class(self.evaluation).scenario_problems(self)
        p += self._krum_problems()
        if self.augmentation.frequency.enabled and not method.with_frequency_augmentation:
            p.append(("augmentation.frequency.enabled",
                      f"frequency augmentation is not combined with continual method {self.continual.method!r}"))
        return p

    def _unlabelled_problems(self) -> list[tuple[str, str]]:
        """Hospitals without labels, and what the unlabelled-data settings need (see
        :mod:`simlab.continual.unlabelled`)."""
        ssl, p = self.federation.semi_supervised, []
        odex = self.continual.odex if method_class(self.continual).server == "pool" else None
        for i, h in enumerate(self.hospitals):
            if h.label_fraction > 0 or not h.participates:
                continue
            if ssl.objective == "none":
                p.append((f"hospitals[{i}].label_fraction",
                          f"hospital {h.id!r} has no labelled images (label_fraction 0) and "
                          "federation.semi_supervised.objective is 'none': it has nothing to train on; name an "
                          "objective (mean_teacher, pseudo_label) or set participates: false"))
            elif ssl.weight_by == "labelled":
                p.append(("federation.semi_supervised.weight_by",
                          f"hospital {h.id!r} has no labelled images, so with weight_by 'labelled' it reports 0 "
                          "examples and aggregation rejects its update as 'nothing was trained'; use weight_by: all"))
            if odex is not None and odex.expansion == "dice":
                p.append((f"hospitals[{i}].label_fraction",
                          f"DiceEx (continual.odex.expansion: dice) measures Dice on each window's labelled images; "
                          f"hospital {h.id!r} has none"))
        if ssl.weight_by == "all" and ssl.objective == "none":
            p.append(("federation.semi_supervised.weight_by",
                      "weight_by 'all' counts unlabelled images, which no objective trains on (objective 'none')"))
        if ssl.objective != "none" and ssl.perturbation.kind == "frequency" and not self.augmentation.frequency.enabled:
            p.append(("federation.semi_supervised.perturbation.kind",
                      "'frequency' mixes amplitude blocks other hospitals share: it needs augmentation.frequency.enabled"))
        return p

    def _krum_problems(self) -> list[tuple[str, str]]:
        """Krum with f > 0 needs 2f + 3 updates per aggregation (Blanchard et al.: 2f + 2 < n); a shared
        model aggregates every sampled hospital, so fewer sampled hospitals can never aggregate. (A pool
        member aggregates only the hospitals that trained it: a round with too few is skipped for it.)"""
        agg = self.federation.aggregation
        if agg.rule != "krum" or agg.krum.num_malicious_nodes == 0:
            return []
        f, k = agg.krum.num_malicious_nodes, self.federation.clients_per_round or len(self.hospitals)
        if k < 2 * f + 3:
            return [("federation.aggregation.krum.num_malicious_nodes",
                     f"krum with f={f} needs at least 2f+3 = {2 * f + 3} hospitals per round, the federation "
                     f"samples {k}")]
        return []

    def _arm_problems(self) -> list[tuple[str, str]]:
        p, names = [], [a.name for a in self.arms]
        for i, a in enumerate(self.arms):
            if names.count(a.name) > 1:
                p.append((f"arms[{i}].name", f"duplicate arm name {a.name!r}"))
            if not _ARM_NAME.fullmatch(a.name):
                p.append((f"arms[{i}].name", f"expected letters, digits, '_', '-', '.' or '+' (not first), since it "
                                             f"names files in the run directory; found {a.name!r}"))
            for key in a.set:
                if key.split(".")[0] not in ARM_SECTIONS and not any(key == k or key.startswith(k + ".")
                                                                     for k in ARM_KEYS):
                    p.append((f"arms[{i}].set.{key}",
                              f"arms may only change {', '.join(ARM_SECTIONS + ARM_KEYS)} (streams and test sets "
                              f"stay identical across arms)"))
        return p


@dataclass(frozen=True)
class LoadedScenario:
    """A validated scenario plus one fully resolved Scenario per arm (identical data sections)."""

    source: str
    base: Scenario
    arms: dict[str, Scenario]
    raw: dict


def _arm_name(s: Scenario) -> str:
    return s.continual.method


def load_scenario(path: str | Path, overrides: list[str] | None = None, seed: int | None = None,
                  out: str | None = None) -> LoadedScenario:
    """Read, override (``--set a.b=value``), validate and resolve a scenario file."""
    source = str(path)
    raw = read_yaml(path)
    return load_scenario_dict(raw, source, overrides, seed, out)


def parse_override(text: str, source: str) -> tuple[str, Any]:
    from simlab.config import parse_yaml

    if "=" not in text:
        raise ScenarioError(source, [(text, "--set expects dotted.key=value")])
    key, value = text.split("=", 1)
    parsed = parse_yaml(value, f"--set {key}") if value.strip() else ""
    if isinstance(parsed, str):  # YAML 1.1 reads 1e-6 as text; a command line means the number
        try:
            parsed = int(parsed) if parsed.strip().lstrip("+-").isdigit() else float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def load_scenario_dict(raw: Any, source: str, overrides: list[str] | None = None, seed: int | None = None,
                       out: str | None = None) -> LoadedScenario:
    if not isinstance(raw, dict):
        raise ScenarioError(source, [("", f"expected a mapping at the top level, found {type(raw).__name__}")])
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        key, value = parse_override(item, source)
        set_dotted(raw, key, value, source)
    if seed is not None:
        raw["seed"] = seed
    if out is not None:
        raw.setdefault("output", {})
        if not isinstance(raw["output"], dict):
            raw["output"] = {}
        raw["output"]["dir"] = out
    base: Scenario = build(Scenario, raw, source)
    arms: dict[str, Scenario] = {}
    arm_specs = base.arms or [ArmSpec(name=_arm_name(base))]
    for i, arm in enumerate(arm_specs):
        arm_raw = copy.deepcopy(raw)
        arm_raw.pop("arms", None)
        for key, value in arm.set.items():
            set_dotted(arm_raw, key, copy.deepcopy(value), source)
        try:
            arms[arm.name] = build(Scenario, arm_raw, source)
        except ScenarioError as exc:
            raise ScenarioError(source, [(f"arms[{i}] ({arm.name}): {k}", m) for k, m in exc.problems]) from None
    return LoadedScenario(source=source, base=base, arms=arms, raw=raw)


def resolved_dict(loaded: LoadedScenario) -> dict:
    """The base scenario with every default filled in, plus each arm fully resolved."""
    out = to_plain(loaded.base)
    out["resolved_arms"] = {name: {s: to_plain(getattr(sc, s)) for s in ARM_SECTIONS + ("evaluation",)} for name, sc in loaded.arms.items()}
    return out

