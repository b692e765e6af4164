"""ODEx features and scores at the hospital (torch): the statistics of the first normalisation
layer's input under a history entry's own first block, computed from patch moments where the layer
is a plain convolution, and the normalised scores of images under every entry of a pool.

See :mod:`simlab.continual.odex` for what the features are and why each entry keeps its first block.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Self

import numpy as np
import torch

from simlab.continual.features import FeatureSpec, reduce_activation, resolve_layer
from simlab.continual.mahalanobis import ShiftParams

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


def pool_scores(model: torch.nn.Module, spec: FeatureSpec, params: ShiftParams, histories: dict[int, list],
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


def member_scores(model: torch.nn.Module, spec: FeatureSpec, params: ShiftParams, history: list,
                  images: np.ndarray, device: str = "cpu", cache: ScoreCache | None = None) -> np.ndarray:
    """Per-entry, per-image normalised scores û [entries, n] of ``images`` under one member's history,
    each entry scored with the features of its own first block (see :func:`pool_scores`)."""
    return pool_scores(model, spec, params, {0: history}, images, device, cache)[0]
