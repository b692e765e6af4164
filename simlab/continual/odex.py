"""ODEx, federated: a pool of models that grows when Mahalanobis shift detection says a hospital's
data left every member's history; inference routes each image to its closest member.

The pieces here know nothing about Flower: the server keeps a :class:`Pool` of :class:`Member`\\ s and
decides per hospital (:func:`Pool.decide`); hospitals compute features and scores with
:func:`window_features` / :func:`member_scores`. ``simlab.federated`` moves them between the two.

Choices (each a scenario option where a researcher would vary it):

- **Features** (``features``): per-channel spatial mean and std of the *input* of the network's first
  normalisation layer (d = 2C = 32 for the default U-Net), i.e. the first convolution's response.
  Every history entry keeps the first-block weights it was computed with (a few hundred numbers),
  and windows are scored under *those* weights. Without that, training the first convolution
  would move every feature away from the stored Gaussians and cause false alarms.
- **Statistics**: hospitals send sufficient statistics of their window. Per member and round the
  server merges, exactly, the statistics of hospitals whose windows agree (each one's expected
  normalised score under the other's Gaussian within the other's threshold); windows that do not
  agree stay separate entries, so a member's history is a set of Gaussians rather than one broad
  Gaussian over unlike hospitals. Hospitals with clearly different data therefore train different
  members, and a hospital that later leaves its domain leaves behind a member that nobody trains
  any more, which is what keeps that domain from being forgotten.
  Ledoit-Wolf by default, distances D² (squared) by Cholesky solves
  (see :mod:`simlab.continual.mahalanobis`).
- **Calibration**: each hospital cross-fits in-distribution scores of its own window under its own
  statistics; the server merges calibrations (min of mins, max of maxes, count-weighted mean). With
  several hospitals this is an approximation: the merged Gaussian is wider than each hospital's.
- **Score and threshold**: a window's score under an entry is the mean of its images' normalised
  scores û (min / doubled-max of ID scores); a member combines its entries by ``shift.history``
  (``sum`` as in ODEx Eq. 4, ``mean``, ``min``, ``last``) and compares with its entries' ξ = 2·mean
  ID û combined by the same rule. Members are compared by score / threshold, so a member's history
  length does not bias the choice; with this, ``sum`` and ``mean`` take the same decisions.
- **First round**: there is no history to score against, so hospitals send the statistics of their
  first window; hospitals whose windows agree share the initial member and every other group starts
  its own copy of the initial model (not counted as forks).
- **Fork**: when the best member's score is over its threshold the hospital trains a copy of it (a
  fork). ``fork_history: fresh`` (default) starts the fork's history with the window that caused it;
  ``inherit`` copies the parent's history first. Inheriting makes a fork score the next window of
  the new domain against the parent's old entries too, which with ``sum``/``mean`` forks again on
  the next round; ``fresh`` keeps the parent's history with the parent, where it still routes the
  old domain.
- **Merging forks**: forks of the same parent in the same round merge when each window's expected
  normalised score under the other's Gaussian is within the other's threshold (expected D² from the
  sufficient statistics: tr(Σ_a⁻¹S_b) + (μ_b−μ_a)ᵀΣ_a⁻¹(μ_b−μ_a)).
- **Cap**: at ``max_members`` no fork is created; the hospital's update goes to the parent.
- **Routing**: each test image goes to the member with the smallest per-image score / threshold.
- **Ablations**: ``expansion: oracle`` forks exactly at every true domain boundary of a hospital
  (the simulator's knowledge); ``expansion: dice`` is DiceEx: fork when the Dice of the hospital's
  current member on the new window drops by more than ``dice_drop`` (relative) below its last value;
  ``shift.history: last`` is the last-entry-only ablation.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Self

import numpy as np
import torch

from simlab.continual.features import FeatureSpec, reduce_activation, resolve_layer
from simlab.continual.mahalanobis import Calibration, GaussianStats, HistoryEntry, ShiftParams, _combine


@dataclass(frozen=True)
class OdexParams:
    features: FeatureSpec = field(default_factory=FeatureSpec)
    shift: ShiftParams = field(default_factory=ShiftParams)
    expansion: Literal["detect", "oracle", "dice"] = field(
        default="detect", metadata={"help": "detect: Mahalanobis (ODEx); oracle: fork at every true boundary; "
                                            "dice: DiceEx (fork when training Dice drops)"})
    fork_history: Literal["fresh", "inherit"] = field(
        default="fresh", metadata={"help": "a fork's history starts fresh, or copies its parent's first"})
    max_members: int = field(default=6, metadata={"ge": 1, "help": "pool size cap"})
    merge_forks: bool = field(default=True, metadata={"help": "merge same-round forks whose statistics agree"})
    dice_drop: float = field(default=0.10, metadata={"gt": 0.0, "lt": 1.0,
                                                     "help": "DiceEx: relative Dice drop that forks"})


# ------------------------------------------------------------------------------ features (torch)
class _Stop(Exception):
    pass


def first_block_keys(model: torch.nn.Module, spec: FeatureSpec, sample: torch.Tensor) -> list[str]:
    """State-dict keys of the modules that run before the feature layer (what its input depends on)."""
    _, layer = resolve_layer(model, spec)
    ran: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: ran.append(names[mod]))
             for m in model.modules() if m is not layer and not list(m.children())]

    def stop(mod, inp):
        raise _Stop

    hooks.append(layer.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(sample[:1])
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    prefixes = tuple(f"{n}." for n in ran)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


class _FirstBlock:
    """A model set up for many first-block feature passes (``with`` block).

    The first block is two small convolutions, so what surrounds a pass dominates its cost unless
    it is paid once: the feature layer is resolved, the model put in eval mode and the stopping hook
    registered once per ``with`` block, not once per pass; first-block weights are copied into the
    existing tensors (:meth:`load`) instead of going through ``load_state_dict`` on the whole model; and when the feature layer's input is the
    output of one leaf module applied to the model's input as given (the first convolution of a
    U-Net), each batch runs that module alone (:meth:`_producer`): same module, same input tensor,
    so the same bits as the forward pass, without the modules the layer input does not depend on
    (the residual path of the first unit). Otherwise batches run the model's forward pass up to the
    layer. On exit the hook is removed and every submodule gets back its own train/eval flag.

    When that module is a plain ``Conv2d`` (zero padding, one group) and the reduction is ``mean`` or
    ``mean_std``, the convolution does not run at all: its response is linear in the image patches it
    sees, so a channel's spatial mean is ``w·μ + b`` and its variance ``wᵀΣw``, with μ and Σ the mean
    and (population) covariance of the patches over the output positions (:func:`patch_moments`).
    The moments depend on the images only, so a ``with`` block computes them once per image array
    and every first block loaded afterwards costs a few small matrix products (:func:`conv_features`),
    where a convolution and a reduction of the whole response cost milliseconds per entry. The
    result is the float64 convolution's mean and std up to rounding (about 1e-12 relative); the
    float32 forward pass agrees to a few 1e-6. On the ready scenarios every decision, route and Dice
    stays the same; the logged shift ratios move by < 1e-7 relative. The image array must not
    change while the block holds its moments.
    """

    def __init__(self, model: torch.nn.Module, spec: FeatureSpec, device: str = "cpu"):
        self.model, self.spec, self.device = model, spec, device
        self.layer_name, self.layer = resolve_layer(model, spec)
        self._out: list[torch.Tensor] = []
        self._tensors: dict[str, torch.Tensor] | None = None
        self._shortcut: torch.nn.Module | None | bool = False  # False: not looked for yet
        self._moments: tuple[np.ndarray, int, list] | None = None  # (images, batch size, per-batch moments)

    def _grab(self, mod, inp):
        self._out.append(reduce_activation(inp[0].detach(), self.spec).cpu())
        raise _Stop

    def __enter__(self) -> Self:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._handle = self.layer.register_forward_pre_hook(self._grab)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._moments = None
        for m, training in self._modes:
            m.training = training

    def load(self, first_block: dict[str, np.ndarray]) -> None:
        """Copy first-block weights into the model's parameters / buffers of the same names (what
        ``load_state_dict(strict=False)`` does for these keys; an unknown name or a shape mismatch
        raises)."""
        if self._tensors is None:
            self._tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for k, v in first_block.items():
                if k not in self._tensors:
                    raise KeyError(f"first-block weight {k!r} is not a parameter or buffer of the model")
                dst, src = self._tensors[k], torch.as_tensor(v)
                if dst.shape != src.shape:
                    raise ValueError(f"first-block weight {k!r} has shape {tuple(src.shape)}, the model's "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)

    def _producer(self, x: torch.Tensor) -> torch.nn.Module | None:
        """The leaf module whose output *is* the layer's input in a forward pass of ``x`` and whose
        only input *is* ``x`` itself, if there is one, it has no hooks of its own and running it alone
        on ``x`` gives the layer's input bit for bit (found once, by a traced forward pass of ``x``
        with every leaf module's output recorded)."""
        calls: list[tuple[torch.nn.Module, tuple, object]] = []
        seen: list[torch.Tensor] = []

        def record(mod, inp, out):
            calls.append((mod, inp, out))

        def stop(mod, inp):
            seen.append(inp[0])
            raise _Stop

        leaves = [m for m in self.model.modules() if m is not self.layer and not list(m.children())]
        hooks = [m.register_forward_hook(record) for m in leaves]
        hooks.append(self.layer.register_forward_pre_hook(stop, prepend=True))
        try:
            with torch.no_grad():
                self.model(x)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        found = [(m, inp) for m, inp, out in calls if seen and out is seen[0]]
        if len(found) != 1:
            return None
        mod, inp = found[0]
        if len(inp) != 1 or inp[0] is not x or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        with torch.no_grad():
            same = torch.equal(mod(x), seen[0])  # e.g. nothing changed x in place before the module ran
        return mod if same else None

    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Reduced input of the feature layer for every image [n, d] (float64), batches of
        ``batch_size`` from the first image on (the batch composition is part of the result's bits)."""
        self._out = []
        with torch.no_grad():
            for n, i in enumerate(range(0, len(images), batch_size)):
                held = self._moments
                if not (held is not None and held[0] is images and held[1] == batch_size and n < len(held[2])):
                    x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(self.device)
                    if self._shortcut is False:
                        self._shortcut = self._producer(x[:1])
                    if self._shortcut is None or not _linear_response(self._shortcut, self.spec):
                        self._run(x)
                        continue
                    if n == 0:
                        self._moments = held = (images, batch_size, [])
                    held[2].append(patch_moments(self._shortcut, x))
                self._out.append(conv_features(self._shortcut, *held[2][n], self.spec).cpu())
        out, self._out = self._out, []
        return torch.cat(out).numpy().astype(np.float64)

    def _run(self, x: torch.Tensor) -> None:
        """Features of one batch by running the layer's producer alone, or the model up to the layer."""
        if self._shortcut is not None:
            self._out.append(reduce_activation(self._shortcut(x), self.spec).cpu())
            return
        try:
            self.model(x)  # the hook appends the features and stops the pass
        except _Stop:
            pass


def _linear_response(module: torch.nn.Module, spec: FeatureSpec) -> bool:
    """Whether the features of ``module``'s response follow from patch moments (:func:`patch_moments`)."""
    return (type(module) is torch.nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str) and spec.reduction in ("mean", "mean_std"))


def patch_moments(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the mean μ [B, D] and population covariance Σ [B, D, D] (float64, two-pass) of the
    patches ``conv`` multiplies with its weights (D = in_channels·kh·kw), over its output positions:
    zero padding, stride and dilation as the convolution's."""
    p = torch.nn.functional.unfold(x.to(torch.float64), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    mu = p.mean(dim=2)
    centred = p - mu[:, :, None]
    return mu, centred @ centred.transpose(1, 2) / p.shape[2]


def conv_features(conv: torch.nn.Conv2d, mu: torch.Tensor, cov: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """``reduce_activation(conv(x))`` from the patch moments of ``x``: per output channel c the spatial
    mean ``w_c·μ + b_c`` and (``mean_std``) the population std ``sqrt(w_cᵀ Σ w_c)``, float64."""
    w = conv.weight.detach().to(device=mu.device, dtype=torch.float64).reshape(conv.out_channels, -1)
    mean = mu @ w.T
    if conv.bias is not None:
        mean = mean + conv.bias.detach().to(device=mu.device, dtype=torch.float64)
    if spec.reduction == "mean":
        return mean
    var = ((cov @ w.T) * w.T).sum(dim=1).clamp_min_(0.0)
    return torch.cat([mean, var.sqrt_()], dim=1)


def window_features(model: torch.nn.Module, spec: FeatureSpec, images: np.ndarray, batch_size: int = 64,
                    device: str = "cpu") -> np.ndarray:
    """Reduced input of the feature layer for every image [n, d] (float64); only the first block runs."""
    with _FirstBlock(model, spec, device) as fb:
        return fb.features(images, batch_size)


# ------------------------------------------------------------------------------ history entries
@dataclass
class Entry:
    """One history entry: Gaussian of a round's training windows of a member, its calibration, and the
    first-block weights the features were computed with."""

    first_block: dict[str, np.ndarray]
    stats: GaussianStats
    calibration: Calibration
    round: int

    def history_entry(self) -> HistoryEntry:
        if not hasattr(self, "_he"):
            self._he = HistoryEntry(self.stats, self.calibration)
        return self._he

    def threshold(self, params: ShiftParams) -> float:
        return self.calibration.threshold(params.threshold_factor)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"fb.{k}": v for k, v in self.first_block.items()}
        out.update({f"st.{k}": np.asarray(v) for k, v in self.stats.to_arrays().items()})
        cal = self.calibration.to_dict()
        out["cal.num"] = np.array([cal["min_id"], cal["max_id"], cal["mean_norm_id"], cal["n_id"],
                                   cal["max_factor"], self.round], dtype=np.float64)
        out["cal.kind"] = np.frombuffer(f"{cal['estimator']}|{cal['distance']}".encode(), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Entry:
        fb = {k[3:]: v for k, v in arrays.items() if k.startswith("fb.")}
        st = GaussianStats.from_arrays({k[3:]: v for k, v in arrays.items() if k.startswith("st.")})
        num = arrays["cal.num"]
        estimator, distance = bytes(arrays["cal.kind"]).decode().split("|")
        cal = Calibration(min_id=float(num[0]), max_id=float(num[1]), mean_norm_id=float(num[2]), n_id=int(num[3]),
                          max_factor=float(num[4]), estimator=estimator, distance=distance)
        return cls(fb, st, cal, int(num[5]))


def fit_entry(z: np.ndarray, first_block: dict[str, np.ndarray], params: ShiftParams, t: int) -> Entry:
    he = HistoryEntry.fit(z, params)
    return Entry(first_block, he.stats, he.calibration, t)


def merge_entries(entries: list[Entry]) -> Entry:
    """Entries of one member and round from several hospitals (same first block): exact statistics,
    merged calibration."""
    stats, cal = entries[0].stats, entries[0].calibration
    for e in entries[1:]:
        stats = GaussianStats.merge(stats, e.stats)
        cal = Calibration.merge(cal, e.calibration)
    return Entry(entries[0].first_block, stats, cal, entries[0].round)


# ------------------------------------------------------------------------------ scoring (client)
def _content_key(arrays: dict[str, np.ndarray] | np.ndarray) -> bytes:
    """SHA-256 of arrays' names, dtypes, shapes and bytes (one array: no name)."""
    h = hashlib.sha256()
    items = sorted(arrays.items()) if isinstance(arrays, dict) else [("", arrays)]
    for k, v in items:
        a = np.ascontiguousarray(v)
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data if a.size else b"")
    return h.digest()


class ScoreCache:
    """Bounded least-recently-used store of what scoring computes from content alone, for a process
    that scores the same images again and again (a hospital's test sets at every evaluation, in a
    long-lived simulation worker that may serve several hospitals).

    Two kinds of values, both keyed by content hashes, never by names or rounds:

    - the features of a set of images under a first block: key = (first-block content, image
      content, how the features are taken: feature spec, layer, model structure (its ``repr``) and
      parameter dtypes, device, batch size, torch threads and determinism flag);
    - an entry's normalised scores of those features: key = that feature key, the entry's whole
      content (first block, statistics, calibration) and the shift parameters.

    A value is stored as the cold computation returned it (same function, same batches), so a hit
    returns the same bits as a miss, and a process where nothing ever hits (every message a fresh
    process, as in a deployment) computes exactly what it would without a cache. As everywhere in
    scoring, an entry's first block must hold every tensor the feature layer's input depends on
    (what :func:`first_block_keys` gives); the rest of the template does not enter the key.

    The bound is on the bytes of stored arrays (``max_bytes``; 0 stores nothing); the least recently
    used values go first. Stored arrays are read-only.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._store: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._store.get(key)
            if value is None:
                self.misses += 1
                return None
            self._store.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: np.ndarray) -> np.ndarray:
        value = np.array(value, copy=True)
        value.setflags(write=False)
        with self._lock:
            if key in self._store or value.nbytes > self.max_bytes:
                return value
            self._store[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._store.popitem(last=False)
                self.nbytes -= old.nbytes
        return value

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self.nbytes = 0


def _setting_key(fb: _FirstBlock, batch_size: int) -> tuple:
    """Everything besides first block and images that the features' bits depend on."""
    model = fb.model
    dtypes = tuple(sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers())}))
    return (fb.spec, fb.layer_name, hashlib.sha256(repr(model).encode()).digest(), dtypes, str(fb.device),
            int(batch_size), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())


def pool_scores(model: torch.nn.Module, spec: FeatureSpec, params: ShiftParams, histories: dict[int, list[Entry]],
                images: np.ndarray, device: str = "cpu", cache: ScoreCache | None = None,
                batch_size: int = 64) -> dict[int, np.ndarray]:
    """:func:`member_scores` of several members at once: member → û [entries, n].

    ``model`` is a template whose first block is overwritten by every entry's; it is set up once
    (eval mode, hook) for all members, and entries that share a first block (one member's entries of
    a round; entries a fork inherited) share one feature pass. Features are always taken over the
    whole of ``images`` in batches of ``batch_size`` from the first image, with or without ``cache``
    (see :class:`ScoreCache`), so the result is the same bits either way.
    """
    out: dict[int, np.ndarray] = {}
    feats: dict[bytes, np.ndarray] = {}
    with _FirstBlock(model, spec, device) as fb:
        if cache is not None:
            setting, image_key = _setting_key(fb, batch_size), _content_key(images)
        for m, history in histories.items():
            rows = []
            for e in history:
                fb_key = _content_key(e.first_block)
                if cache is not None:
                    score_key = ("scores", setting, image_key, _content_key(e.to_arrays()), params)
                    u = cache.get(score_key)
                    if u is not None:
                        rows.append(u)
                        continue
                if fb_key not in feats:
                    z = cache.get(("features", setting, image_key, fb_key)) if cache is not None else None
                    if z is None:
                        fb.load(e.first_block)
                        z = fb.features(images, batch_size)
                        if cache is not None:
                            z = cache.put(("features", setting, image_key, fb_key), z)
                    feats[fb_key] = z
                u = e.history_entry().normalized_scores(feats[fb_key], params)
                rows.append(cache.put(score_key, u) if cache is not None else u)
            out[m] = np.stack(rows)
    return out


def member_scores(model: torch.nn.Module, spec: FeatureSpec, params: ShiftParams, history: list[Entry],
                  images: np.ndarray, device: str = "cpu", cache: ScoreCache | None = None) -> np.ndarray:
    """Per-entry, per-image normalised scores û [entries, n] of ``images`` under one member's history,
    each entry scored with the features of its own first block (see :func:`pool_scores`)."""
    return pool_scores(model, spec, params, {0: history}, images, device, cache)[0]


def combine(per_entry: np.ndarray, params: ShiftParams) -> np.ndarray:
    """Combine per-entry values (axis 0) by the history rule."""
    return _combine(np.asarray(per_entry, dtype=np.float64), params.history)


def member_threshold(history: list[Entry], params: ShiftParams) -> float:
    return max(float(combine(np.array([e.threshold(params) for e in history]), params)), 1e-12)


# ------------------------------------------------------------------------------ the pool (server)
@dataclass
class Member:
    id: int
    state: dict[str, np.ndarray]
    history: list[Entry] = field(default_factory=list)
    parent: int | None = None
    born: int = 0
    trained_on: Counter = field(default_factory=Counter)  # true domain → rounds (evaluation only)
    last_dice: dict[str, float] = field(default_factory=dict)  # DiceEx: hospital → Dice


@dataclass(frozen=True)
class Decision:
    member: int
    fork: bool
    ratio: float = math.nan  # best score / threshold (detect mode)


def decide(per_member: dict[int, np.ndarray], histories: dict[int, list[Entry]], params: ShiftParams) -> Decision:
    """Which member a window belongs to: ``per_member`` maps member id → the window's per-entry scores
    (mean û); the lowest score / threshold wins (ties: lowest id), and a ratio over 1 forks it. The
    server and the hospitals decide with this one function, from the same numbers."""
    ratios = {m: float(combine(s, params)) / member_threshold(histories[m], params) for m, s in per_member.items()}
    best = min(ratios, key=lambda m: (ratios[m], m))
    return Decision(best, ratios[best] > 1.0, ratios[best])


class Pool:
    def __init__(self, params: OdexParams, init_state: dict[str, np.ndarray]):
        self.params = params
        self.members: dict[int, Member] = {0: Member(0, init_state)}
        self.next_id = 1

    def __len__(self) -> int:
        return len(self.members)

    def decide_detect(self, per_member: dict[int, np.ndarray]) -> Decision:
        """``per_member``: member id → per-entry window scores (mean û); see :func:`decide`."""
        return decide(per_member, {m: self.members[m].history for m in per_member}, self.params.shift)

    def add_member(self, state: dict[str, np.ndarray], t: int) -> Member:
        """A member with an empty history (first round: a group of hospitals unlike the first)."""
        m = Member(self.next_id, state, [], parent=None, born=t)
        self.members[m.id] = m
        self.next_id += 1
        return m

    def add_fork(self, parent: int, state: dict[str, np.ndarray], entry: Entry, t: int) -> Member:
        base = list(self.members[parent].history) if self.params.fork_history == "inherit" else []
        m = Member(self.next_id, state, base + [entry], parent=parent, born=t)
        self.members[m.id] = m
        self.next_id += 1
        return m


def expected_normalised_score(a: Entry, b: Entry, params: ShiftParams) -> float:
    """Expected û of b's data under a's Gaussian, from sufficient statistics only."""
    g = a.history_entry().gaussian(params.estimator)
    cov_b = b.stats.empirical_covariance()
    L = g.chol
    import scipy.linalg

    w = scipy.linalg.solve_triangular(L, cov_b, lower=True)
    trace = float(np.trace(scipy.linalg.solve_triangular(L, w.T, lower=True)))
    diff = scipy.linalg.solve_triangular(L, b.stats.mean - g.mean, lower=True)
    d2 = trace + float(diff @ diff)
    u = d2 if params.distance == "squared" else math.sqrt(max(d2, 0.0))
    return float(a.calibration.normalize(np.array([u]))[0])


def forks_agree(a: Entry, b: Entry, params: ShiftParams) -> bool:
    return (expected_normalised_score(a, b, params) <= a.threshold(params)
            and expected_normalised_score(b, a, params) <= b.threshold(params))


def cluster_entries(entries: list[Entry], params: ShiftParams) -> list[list[int]]:
    """Group one round's entries (in hospital order) whose statistics agree with the group's first."""
    groups: list[list[int]] = []
    for i, e in enumerate(entries):
        home = next((g for g in groups if forks_agree(entries[g[0]], e, params)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups
