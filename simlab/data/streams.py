"""Per-hospital data streams and per-domain test sets, from the phantom or from NIfTI folders.

A stream is a pure function of (scenario data sections, hospital, round, seed): ``window(t)`` returns
the fresh training images a hospital sees in round t. Each round's window is new (phantom: new
patients and acquisitions; NIfTI: slices drawn without replacement from the hospital's own permutation
of the domain's training cases), so a method that keeps no data never sees a past window again. Test
sets are fixed per named domain and disjoint from training data (phantom: their own seeds; NIfTI:
held-out cases).

The window's true domain is carried for evaluation and logging only; the continual methods never read
it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from simlab.data import phantom
from simlab.data.appearance import ScannerParams, apply_scanner
from simlab.data.cache import ArrayCache
from simlab.data.drift import WindowPlan, plan
from simlab.config import to_plain
from simlab.data.specs import DataSpec, DomainSpec, HospitalSpec, num_classes_of
from simlab.seeding import derive_seed, rng


@dataclass(frozen=True)
class Window:
    images: np.ndarray  # float32 [n, 1, S, S]
    labels: np.ndarray  # uint8 [n, S, S]
    labeled: np.ndarray  # bool [n]: which images carry a label (label_fraction)
    true_domain: str  # evaluation/logging only

    @property
    def n_labeled(self) -> int:
        return int(self.labeled.sum())


class DataFactory:
    """Makes windows and test sets for one scenario's data sections; caches everything on disk."""

    def __init__(self, data: DataSpec, domains: dict[str, DomainSpec], seed: int, test_size: int):
        self.data = data
        self.domains = domains
        self.seed = seed
        self.test_size = test_size
        self.cache = ArrayCache(data.cache_dir)
        self._windows: dict[tuple[str, int], Window] = {}  # in-process, for rehearsal baselines

    MEMORY_WINDOWS = 64

    @cached_property
    def num_classes(self) -> int:
        return num_classes_of(self.data)

    # ----------------------------------------------------------------- shared pieces
    def _spec(self, **extra) -> dict:
        return {"data": to_plain(self.data) | {"cache_dir": None}, "seed": self.seed, **extra}

    def test_set(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        dom = self.domains[domain]
        spec = self._spec(kind="test", domain=to_plain(dom), n=self.test_size)

        def make():
            s = derive_seed(self.seed, "test", domain)
            if self.data.source == "phantom":
                x, y = phantom.generate(dom.population, dom.scanner, self.test_size, self.data.image_size, s)
            else:
                x, y = self._nifti_draw(domain, "test", np.arange(self.test_size), s)
            return {"images": x, "labels": y}

        z = self.cache.get_or_make(spec, make)
        return z["images"], z["labels"]

    def window(self, hospital: HospitalSpec, t: int) -> Window:
        key = (hospital.id, t)
        if key not in self._windows:
            if len(self._windows) >= self.MEMORY_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            self._windows[key] = self._load_window(hospital, t)
        return self._windows[key]

    def _load_window(self, hospital: HospitalSpec, t: int) -> Window:
        p = plan(hospital.drift, t)
        plain = {k: v for k, v in to_plain(hospital).items() if k != "participates"}  # not a data setting
        spec = self._spec(kind="window", hospital=plain,
                          domains={d: to_plain(self.domains[d]) for d in hospital.drift.referenced_domains()}, t=t)

        def make():
            x, y = self._make_window(hospital, t, p)
            order = rng(self.seed, "labeled", hospital.id, t).permutation(len(x))
            labeled = np.zeros(len(x), bool)
            labeled[order[: labelled_count(hospital.label_fraction, len(x))]] = True
            y = corrupt_labels(y, hospital, rng(self.seed, "corrupt", hospital.id, t), self.num_classes)
            return {"images": x, "labels": y, "labeled": labeled}

        z = self.cache.get_or_make(spec, make)
        return Window(z["images"], z["labels"], z["labeled"], p.true_domain)

    def _assign(self, hospital: HospitalSpec, t: int, p: WindowPlan) -> dict[str, int]:
        """How many of round t's images come from each domain (mixture plans)."""
        assert p.weights is not None
        names = list(p.weights)
        probs = np.array([p.weights[d] for d in names])
        draw = rng(self.seed, "assign", hospital.id, t).choice(len(names), size=hospital.size, p=probs / probs.sum())
        return {d: int((draw == i).sum()) for i, d in enumerate(names)}

    def _make_window(self, hospital: HospitalSpec, t: int, p: WindowPlan) -> tuple[np.ndarray, np.ndarray]:
        size = self.data.image_size
        if p.interpolate is not None:
            a, b, frac = p.interpolate
            s = derive_seed(self.seed, "window", hospital.id, t, "interp")
            if self.data.source == "phantom":
                A, B = self.domains[a], self.domains[b]
                return phantom.generate_interpolated(A.population, A.scanner, B.population, B.scanner, frac,
                                                     hospital.size, size, s)
            # Real images: the first domain's slices acquired with interpolated scanner parameters
            # (the scenario check requires both domains to read the same dataset).
            from simlab.data.appearance import interpolate

            x, y = self._nifti_window_part(hospital, t, a, hospital.size, raw=True)
            scanner = interpolate(self.domains[a].scanner, self.domains[b].scanner, frac)
            return self._apply_scanner(x, scanner, s), y
        parts_x, parts_y = [], []
        for domain, count in self._assign(hospital, t, p).items():
            if count == 0:
                continue
            s = derive_seed(self.seed, "window", hospital.id, t, domain)
            if self.data.source == "phantom":
                dom = self.domains[domain]
                x, y = phantom.generate(dom.population, dom.scanner, count, size, s)
            else:
                x, y = self._nifti_window_part(hospital, t, domain, count)
            parts_x.append(x)
            parts_y.append(y)
        x, y = np.concatenate(parts_x), np.concatenate(parts_y)
        perm = rng(self.seed, "shuffle", hospital.id, t).permutation(len(x))
        return x[perm], y[perm]

    # ----------------------------------------------------------------- NIfTI source
    @cached_property
    def _nifti_pools(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        return {}

    def _nifti_pool(self, domain: str, split: str) -> dict[str, np.ndarray]:
        """Slices of the domain's dataset for ``split`` ('train' or 'test'), split by case."""
        from simlab.data import nifti

        pools = self._nifti_pools.setdefault(domain, {})
        if split in pools:
            return pools[split]
        dom = self.domains[domain]
        ds = self.data.datasets[dom.dataset]
        spec = {"kind": "nifti-slices", "dataset": to_plain(ds), "size": self.data.image_size,
                "test_fraction": self.data.test_case_fraction, "seed": self.seed}

        def make():
            info = nifti.read_dataset_json(ds.root)
            cases = ds.cases or [c.case_id for c in nifti.list_cases(ds.root, info)]
            order = rng(self.seed, "cases", dom.dataset).permutation(len(cases))
            n_test = max(1, round(self.data.test_case_fraction * len(cases)))
            if n_test >= len(cases):
                raise nifti.NiftiDataError(f"{ds.root}: {len(cases)} case(s) cannot be split into train and test")
            test_cases = sorted(cases[i] for i in order[:n_test])
            train_cases = sorted(cases[i] for i in order[n_test:])
            label_map = {int(k): v for k, v in ds.label_map.items()} if ds.label_map else None
            out = {}
            for name, chosen in (("train", train_cases), ("test", test_cases)):
                sl = nifti.load_slices(ds.root, chosen, self.data.image_size, axis=ds.axis,
                                       min_foreground=ds.min_foreground, channel=ds.channel, label_map=label_map)
                out[f"{name}_images"], out[f"{name}_labels"] = sl.images, sl.labels
            return out

        z = self.cache.get_or_make(spec, make)
        for name in ("train", "test"):
            pools[name] = {"images": z[f"{name}_images"], "labels": z[f"{name}_labels"]}
        return pools[split]

    def _apply_scanner(self, images: np.ndarray, scanner: ScannerParams, seed: int) -> np.ndarray:
        """Real images keep their per-volume normalisation unless the domain sets a scanner."""
        if scanner == ScannerParams():
            return images
        return apply_scanner(images, scanner, np.random.default_rng(seed))

    def _nifti_draw(self, domain: str, split: str, index: np.ndarray, seed: int,
                    raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        pool = self._nifti_pool(domain, split)
        n_pool = len(pool["images"])
        if split == "test" and len(index) > n_pool:
            raise ValueError(f"domain {domain!r}: evaluation.test_size {len(index)} exceeds the {n_pool} test slices")
        x = pool["images"][index % n_pool]
        y = pool["labels"][index % n_pool]
        return (x, y) if raw else (self._apply_scanner(x, self.domains[domain].scanner, seed), y)

    def _nifti_window_part(self, hospital: HospitalSpec, t: int, domain: str, count: int, raw: bool = False):
        """Next ``count`` slices of the hospital's own permutation of the domain's training slices."""
        used = 0
        for r in range(1, t):
            p = plan(hospital.drift, r)
            if p.interpolate is not None:
                used += hospital.size if p.interpolate[0] == domain else 0
            else:
                used += self._assign(hospital, r, p).get(domain, 0)
        n_pool = len(self._nifti_pool(domain, "train")["images"])
        if used + count > n_pool and not self.data.allow_repeat:
            raise ValueError(
                f"hospital {hospital.id!r} needs more than the {n_pool} training slices of domain {domain!r} by "
                f"round {t}; use fewer rounds or a smaller size, or set data.allow_repeat: true")
        perm = rng(self.seed, "perm", hospital.id, domain).permutation(n_pool)
        index = perm[np.arange(used, used + count) % n_pool]
        return self._nifti_draw(domain, "train", index, derive_seed(self.seed, "acq", hospital.id, t, domain), raw)


def labelled_count(label_fraction: float, n: int) -> int:
    """Labelled images of a window of n: round(fraction · n), at least one when the fraction is > 0
    (a hospital with labels labels something in every window), none at fraction 0."""
    return max(1, round(label_fraction * n)) if label_fraction > 0 else 0


def corrupt_labels(labels: np.ndarray, hospital: HospitalSpec, gen: np.random.Generator,
                   num_classes: int) -> np.ndarray:
    """A broken hospital's training labels (never its test sets): on a ``corruption_fraction`` share
    of the images, swap_labels exchanges foreground classes 1 and 2; random_labels draws each pixel's
    label uniformly from all classes."""
    if hospital.corruption == "none" or hospital.corruption_fraction == 0:
        return labels
    y = labels.copy()
    hit = gen.random(len(y)) < hospital.corruption_fraction
    if hospital.corruption == "swap_labels":
        one, two = y[hit] == 1, y[hit] == 2
        sub = y[hit]
        sub[one], sub[two] = 2, 1
        y[hit] = sub
    else:
        y[hit] = gen.integers(0, num_classes, size=y[hit].shape, dtype=y.dtype)
    return y


class HospitalStream:
    """What one hospital's ClientApp sees: its windows, round by round."""

    def __init__(self, factory: DataFactory, hospital: HospitalSpec):
        self.factory = factory
        self.hospital = hospital

    def window(self, t: int) -> Window:
        return self.factory.window(self.hospital, t)
