"""One hospital, without Flower: its task, its stream, its device and its continual method.

:class:`Hospital` is what a site does when the server asks: train the model it was sent on this
round's window, evaluate a deployed model (or a routed ODEx pool) on every test domain, share FedDG
amplitude blocks, score its window against a pool's histories. The ClientApp only decodes a message,
calls one of these and encodes the reply; benchmarks and tests call the same object.

Everything random derives from (scenario seed, purpose, hospital id, round), so a hospital gives the
same bits in simulation, in a deployment and in a benchmark.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from simlab.adaptation.base import AdaptationContext
from simlab.adaptation.registry import make_adaptation
from simlab.augment.frequency import FrequencyAugmenter, make_bank_entries
from simlab.continual.odex import Entry, decide, fit_entry, route
from simlab.continual.odex_features import ScoreCache, pool_scores, window_features
from simlab.continual.registry import make_method
from simlab.continual.semi_supervised import make_objective
from simlab.continual.training import TrainConfig, pick_device
from simlab.data.streams import DataFactory, HospitalStream
from simlab.metrics.registry import metric_rows
from simlab.metrics.segmentation import dice_per_class, predict
from simlab.models.norm import norm_state_keys
from simlab.models.unet import build_model, load_numpy_state, state_to_numpy
from simlab.scenario.task import HospitalTask
from simlab.seeding import derive_seed

State = dict[str, np.ndarray]
NORM = "norm."  # prefix of the hospital's own normalisation arrays in its private state (FedBN)


def train_config(task: HospitalTask, device: str) -> TrainConfig:
    """The local optimiser settings of a task (the one place a TrainConfig is made from a scenario)."""
    fed, aug = task.federation, task.augmentation
    return TrainConfig(steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer,
                       epochs=fed.local_epochs, flip=aug.flip, device=device,
                       episodic=aug.frequency.enabled and aug.frequency.episodic, proximal_mu=fed.proximal_mu)


@dataclass
class TrainOutcome:
    state: State  # the trained model
    metrics: dict[str, float]
    method_state: State  # hospital-private, carried to the next round (never sent)
    entry: Entry | None  # ODEx: the window's statistics under the received model (first block left out)


# Scores and features of images this process has scored before, by content (test sets at every
# evaluation; in simulation one long-lived worker process serves several hospitals, which evaluate on the
# same test sets). A hit returns the bits a cold computation would; a process that lives for one message
# (a deployment) never hits. 64 MiB holds the features and scores of thousands of (entry, test set) pairs.
_SCORES = ScoreCache(max_bytes=64 << 20)
_TEMPLATES: dict[tuple[str, int, str], torch.nn.Module] = {}
_TEMPLATE_LOCK = threading.Lock()


class Hospital:
    def __init__(self, task: HospitalTask):
        self.task = task
        self.id = task.hospital.id
        self.factory = DataFactory(task.data, task.domains, task.seed, task.evaluation.test_size)
        self.stream = HospitalStream(self.factory, task.hospital)
        self.method = make_method(task.continual)

    # ------------------------------------------------------------------ set-up
    def device(self) -> str:
        """Torch threads and determinism as the task says, and the device to use."""
        threads = max(1, int(self.task.engine.cpus_per_client))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(self.task.engine.deterministic, warn_only=True)
        return pick_device(self.task.engine.device)

    def model(self, state: State, device: str, private: State | None = None) -> torch.nn.Module:
        """The received model; with ``federation.norm: local`` its normalisation layers are replaced by
        this hospital's own (from ``private``, once it has trained)."""
        model = build_model(self.task.model, self.task.num_classes)
        own = {k[len(NORM):]: v for k, v in (private or {}).items() if k.startswith(NORM)}
        load_numpy_state(model, {**state, **own} if self.task.federation.norm == "local" else state)
        return model.to(device)

    def _seed(self, purpose: str, t: int) -> int:
        return derive_seed(self.task.seed, purpose, self.id, t)

    # ------------------------------------------------------------------ training
    def train(self, state: State, t: int, private: State, bank: dict[str, np.ndarray] | None = None,
              want_entry: bool = False, want_dice: bool = False) -> TrainOutcome:
        """Train the received model on round t's window with the task's continual method; ``private``:
        the hospital's state from its last round (the method's, and with ``federation.norm: local`` its
        own normalisation layers under ``norm.``); ``bank``: the FedDG amplitude bank (hospital →
        blocks) when augmentation is on; ``want_entry``: also return the window's statistics under the
        received model's first block (computed before training); ``want_dice``: also return the received
        model's Dice on the window (metric ``window_dice``, before training; :meth:`window_dice`). With
        local normalisation the returned model leaves the normalisation layers out: they stay in
        ``method_state``."""
        device = self.device()
        model = self.model(state, device, private)
        entry = self.window_entry(model, t, device) if want_entry else None
        dice = {"window_dice": self._window_dice(model, t, device)} if want_dice else {}
        method_state = {k: v for k, v in private.items() if not k.startswith(NORM)}
        ssl = self.task.federation.semi_supervised
        result = self.method.local_update(model, self.stream.window, t, method_state, train_config(self.task, device),
                                          seed=self._seed("train", t), augment=self._augmenter(bank, t),
                                          last_round=self.task.federation.rounds,
                                          unlabelled=make_objective(ssl, self._augmenter(bank, t, "unlabelled")))
        if ssl.weight_by == "all":  # the count FedAvg weighs by: every image trained on, labelled or not
            result.metrics["num_examples"] += result.metrics["num_unlabelled"]
        trained, keep = state_to_numpy(model), dict(result.state)
        if self.task.federation.norm == "local":
            local = set(norm_state_keys(model))
            keep.update({NORM + k: trained[k] for k in trained if k in local})
            trained = {k: v for k, v in trained.items() if k not in local}
        return TrainOutcome(trained, {**result.metrics, **dice}, keep, entry)

    def _augmenter(self, bank: dict[str, np.ndarray] | None, t: int, purpose: str = "augment"
                   ) -> FrequencyAugmenter | None:
        """FedDG's augmenter of round t, its draws seeded by ``purpose`` (the labelled batches', or the
        unlabelled-data objective's perturbation, so that one does not shift the other's draws)."""
        if not self.task.augmentation.frequency.enabled or bank is None:
            return None
        gen = torch.Generator().manual_seed(self._seed(purpose, t))
        return FrequencyAugmenter(self.task.augmentation.frequency, {h: torch.from_numpy(a) for h, a in bank.items()},
                                  self.id, gen)

    def amplitudes(self, t: int) -> np.ndarray:
        """FedDG: low-frequency amplitude blocks of a sample of round t's window. Only these blocks leave
        the hospital; images and phases never do."""
        window = self.stream.window(t)
        return make_bank_entries(torch.from_numpy(window.images), self.task.augmentation.frequency,
                                 np.random.default_rng(self._seed("bank", t))).numpy()

    # ------------------------------------------------------------------ ODEx
    def window_entry(self, model: torch.nn.Module, t: int, device: str) -> Entry:
        """Statistics of round t's whole window (labelled or not) under ``model``'s first block; the
        server adds the first-block weights it sent."""
        odex = self.task.continual.odex
        z = window_features(model, odex.features, self.stream.window(t).images, device=device)
        return fit_entry(z, {}, odex.shift, t)

    def window_decision(self, histories: dict[int, list[Entry]], t: int) -> dict[str, float | list[float]]:
        """Round t's window's mean normalised score under every entry of every member (``m<id>``), the
        member :func:`~simlab.continual.odex.decide` picks (``member``) and the scoring time (``score_s``)."""
        start = time.perf_counter()
        scored = self.scores(histories, self.stream.window(t).images, self.device())
        means = {m: s.mean(axis=1) for m, s in scored.items()}
        d = decide(means, histories, self.task.continual.odex.shift)
        return {**{f"m{m}": [float(v) for v in s] for m, s in means.items()}, "member": d.member,
                "score_s": time.perf_counter() - start}

    def scores(self, histories: dict[int, list[Entry]], images: np.ndarray, device: str) -> dict[int, np.ndarray]:
        """Per-entry scores of ``images`` under every member's history. The model the entries' first
        blocks are loaded into is built once per process and architecture, not per message: scoring
        overwrites every first-block tensor it uses before using it, so what the template held before
        does not matter (the lock keeps two messages of one process from sharing it at once)."""
        odex, key = self.task.continual.odex, (repr(self.task.model), self.task.num_classes, str(device))
        with _TEMPLATE_LOCK:
            if key not in _TEMPLATES:
                if len(_TEMPLATES) >= 4:
                    _TEMPLATES.pop(next(iter(_TEMPLATES)))
                _TEMPLATES[key] = build_model(self.task.model, self.task.num_classes).to(device)
            return pool_scores(_TEMPLATES[key], odex.features, odex.shift, histories, images, device, cache=_SCORES)

    # ------------------------------------------------------------------ evaluation
    def window_dice(self, state: State, t: int) -> float:
        """DiceEx: mean Dice of the received model on round t's labelled window, before training."""
        device = self.device()
        return self._window_dice(self.model(state, device), t, device)

    def _window_dice(self, model: torch.nn.Module, t: int, device) -> float:
        images, labels = self.labelled_window(t)
        pred = predict(model, images, self.task.evaluation.batch_size, device)
        target = torch.from_numpy(labels.astype(np.int64))
        return float(dice_per_class(pred, target, self.task.num_classes).mean())

    def test_sets(self, domains: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The test sets of ``domains`` (every evaluation domain of the task when None), in task order."""
        unknown = sorted(set(domains or ()) - set(self.task.eval_domains))
        if unknown:
            raise ValueError(f"hospital {self.id} was asked to evaluate domain(s) {', '.join(unknown)}, which are "
                             f"not evaluation domains of its task ({', '.join(self.task.eval_domains)})")
        wanted = self.task.eval_domains if domains is None else [d for d in self.task.eval_domains if d in domains]
        return {domain: self.factory.test_set(domain) for domain in wanted}

    def evaluate(self, state: State, private: State | None = None, domains: list[str] | None = None, t: int = 0,
                 bank: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """Every registered metric (:mod:`simlab.metrics.registry`) of the model deployed at this
        hospital on each test domain of ``domains`` (every one when None), in round ``t``: the received
        model, with this hospital's own normalisation layers under ``federation.norm: local``, adapted
        to each test set by ``evaluation.adaptation`` (:mod:`simlab.adaptation`: it sees the test
        images, never their labels, and starts from the deployed model for every test set); ``bank``:
        the FedDG amplitude bank, for adaptations that read it. A test set depends on its domain only,
        so a model deployed the same everywhere scores it the same at any hospital (an adaptation that
        reads the hospital's own window, ``reads_source``, depends on the evaluator too)."""
        device = self.device()
        model, out = self.model(state, device, private), {}
        adaptation = make_adaptation(self.task.evaluation)
        for domain, (images, labels) in self.test_sets(domains).items():
            pred = adaptation.predict(model, images, self.adaptation_context(domain, t, bank, device)).pred
            out.update(metric_rows(domain, pred, torch.from_numpy(labels.astype(np.int64)), self.task.num_classes))
        return out

    def adaptation_context(self, domain: str, t: int, bank: dict[str, np.ndarray] | None, device: str
                           ) -> AdaptationContext:
        """What a test-time adaptation of ``domain``'s test set in round t is given: a seed of the
        scenario, domain and round, the bank, and this hospital's labelled window of round t (round 1
        for the initial model's evaluation), read only by adaptations that declare ``reads_source``."""
        return AdaptationContext(batch_size=self.task.evaluation.batch_size, device=device,
                                 seed=derive_seed(self.task.seed, "adapt", domain, t), bank=bank,
                                 source=lambda: self.labelled_window(max(t, 1)))

    def labelled_window(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The labelled images of round t's window and their labels (unlabelled images left out). A
        window without any (``label_fraction: 0``) is an error: the scenario checks refuse the methods
        that need one (DiceEx, early-feature self-training) at such a hospital."""
        w = self.stream.window(t)
        if not w.n_labeled:
            raise ValueError(f"hospital {self.id}: round {t}'s window has no labelled image")
        return w.images[w.labeled], w.labels[w.labeled]

    def evaluate_pool(self, members: dict[int, State], histories: dict[int, list[Entry]],
                      oracle: dict[str, int], domains: list[str] | None = None) -> dict[str, float]:
        """ODEx, on each test domain of ``domains`` (every one when None): each test image is routed to
        the member with the lowest score / threshold (every registered metric), and also sent to the
        member that trained most on the image's true domain (``dice_oracle``); ``routing_purity`` is
        the share of a domain's images routed to that member. Routing reads the pool and the image
        only, so the routed pool is the same deployed system at every hospital."""
        device, tests, bs = self.device(), self.test_sets(domains), self.task.evaluation.batch_size
        models: dict[int, torch.nn.Module] = {}  # built when an image first needs one

        def member(m: int) -> torch.nn.Module:
            if m not in models:
                models[m] = self.model(members[m], device)
            return models[m]

        routes, out = self._routes(histories, list(members), tests, device), {}
        for domain, (images, labels) in tests.items():
            target, routed = torch.from_numpy(labels.astype(np.int64)), routes[domain]
            pred = torch.zeros_like(target)
            for m in np.unique(routed):
                sel = routed == m
                pred[torch.from_numpy(sel)] = predict(member(int(m)), images[sel], bs, device)
            out.update(metric_rows(domain, pred, target, self.task.num_classes))
            if domain in oracle:  # only for domains some member has trained on
                best = int(oracle[domain])
                pred_o, other = pred.clone(), routed != best  # images routed to the oracle member are done
                if other.any():
                    pred_o[torch.from_numpy(other)] = predict(member(best), images[other], bs, device)
                out.update(metric_rows(domain, pred_o, target, self.task.num_classes, names=("dice",),
                                       suffix="_oracle", per_class=False))
                out[f"routing_purity/{domain}"] = float(np.mean(routed == best))
        return out

    def _routes(self, histories: dict[int, list[Entry]], pool_ids: list[int],
                tests: dict[str, tuple[np.ndarray, np.ndarray]], device: str) -> dict[str, np.ndarray]:
        """The member every test image is routed to. All test sets are scored in one pass: one model
        set-up and one set of patch moments serve every history entry."""
        scored = [m for m in pool_ids if histories.get(m)]
        if not scored:
            return {domain: np.full(len(images), pool_ids[0]) for domain, (images, _) in tests.items()}
        sizes = [len(images) for images, _ in tests.values()]
        per_entry = self.scores({m: histories[m] for m in scored},
                                np.concatenate([images for images, _ in tests.values()]), device)
        routed = route(per_entry, {m: histories[m] for m in scored}, self.task.continual.odex.shift)
        bounds = np.cumsum([0] + sizes)
        return {domain: routed[a:b] for domain, a, b in zip(tests, bounds[:-1], bounds[1:])}

