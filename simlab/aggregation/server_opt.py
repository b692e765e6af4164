"""Server optimisers: adaptive federated optimisation (Reddi et al. 2021, "Adaptive Federated
Optimization", ICLR; FedOpt, Algorithm 2), as Flower 1.41 implements it
(``flwr.serverapp.strategy.FedOpt`` and its ``FedAdam``, ``FedYogi``, ``FedAdagrad``).

The rule's aggregate of round t (FedAvg by default, any registered rule otherwise) is not the new
global model but a step direction: with θ_t the model the hospitals were sent,

    Δ_t = aggregate_t − θ_t                                   pseudo-gradient
    m_t = β₁ m_{t−1} + (1 − β₁) Δ_t                           m_0 = 0
    v_t = v_{t−1} + Δ_t²                                      FedAdagrad
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²                          FedAdam
    v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)        FedYogi          v_0 = 0
    θ_{t+1} = θ_t + η_t m_t / (√v_t + τ)

element-wise. η_t = η for Adagrad and Yogi. For Adam, Flower (not the paper's Algorithm 2) applies
Kingma & Ba's bias-corrected step size, η_t = η √(1 − β₂^(r+1)) / (1 − β₁^(r+1)) with r Flower's
server round (1, 2, …): the exponent is one more than the number of steps taken. simlab counts the
steps an optimiser state has taken (``OptState.step``, 1 in its first aggregation) and uses the same
exponent, step + 1, so a run whose rounds all aggregate gives Flower's numbers; a skipped round (no
aggregate) advances neither Flower's m, v nor simlab's step, where Flower's round number does go on.
FedAdagrad has no momentum in Flower (β₁ = 0: m_t = Δ_t), nor here.

Defaults are Flower 1.41's: FedAdam η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3; FedYogi η = 0.01,
β₁ = 0.9, β₂ = 0.99, τ = 1e-3; FedAdagrad η = 0.1, τ = 1e-3. (The client learning rate ``eta_l`` of
Flower's strategies is ``federation.lr`` here.)

What is optimised: the floating **trainable parameters** only (BatchNorm's weight and bias included).
Flower steps every array of the record; here BatchNorm's running mean and variance and the integer
``num_batches_tracked`` take the rule's aggregate directly: running statistics are estimates of the
data's moments, not parameters a loss descends on, so Δ is no gradient for them, and a normalised
Adam step of size ≈ η per coordinate can drive a running variance negative (NaN at the next forward);
a counter's "step" is meaningless (the aggregate keeps the maximum, see :mod:`simlab.aggregation.core`).

m and v are kept in float64 whatever the model's dtype and the result is cast back to it. The state
(m, v, step) is what the server must checkpoint to resume bit for bit (:meth:`OptState.to_arrays`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from simlab.config import assemble

Model = dict[str, np.ndarray]


@dataclass
class OptState:
    """One optimiser's state: first and second moments per optimised key, and the steps taken."""

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0

    def copy(self) -> OptState:
        return OptState({k: a.copy() for k, a in self.m.items()}, {k: a.copy() for k, a in self.v.items()}, self.step)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()},
                "step": np.array(self.step, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> OptState:
        m = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("v/")}
        return cls(m, v, int(arrays["step"]) if "step" in arrays else 0)


def server_eta(default: float, help: str):
    """The field of a server learning rate η: > 0 and at most 10, with the reason in the error."""
    return field(default=default, metadata={
        "gt": 0.0, "le": 10.0, "why": "each round moves every weight by up to about η (m/(√v + τ) is about ±1): "
                                      "a larger η throws the model far from anything trained",
        "help": help})


def adaptivity():
    """The field of the adaptivity τ: > 0 and at most 1, with the reason in the error."""
    return field(default=1e-3, metadata={
        "gt": 0.0, "le": 1.0, "why": "τ only keeps √v + τ away from zero; past 1 it outweighs √v of any normal "
                                     "update and the optimiser is momentum SGD",
        "help": "adaptivity τ in √v + τ (Flower: 1e-3)"})


@dataclass(frozen=True)
class AdamParams:
    eta: float = server_eta(1e-1, "server learning rate η (Flower's FedAdam: 0.1)")
    beta_1: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0, "help": "momentum β₁ (Flower: 0.9)"})
    beta_2: float = field(default=0.99, metadata={"ge": 0.0, "lt": 1.0, "help": "second-moment decay β₂ (Flower: 0.99)"})
    tau: float = adaptivity()


@dataclass(frozen=True)
class YogiParams(AdamParams):
    """FedAdam's parameters with Flower's FedYogi default η."""

    eta: float = server_eta(1e-2, "server learning rate η (Flower's FedYogi: 0.01)")


@dataclass(frozen=True)
class AdagradParams:
    eta: float = server_eta(1e-1, "server learning rate η (Flower's FedAdagrad: 0.1)")
    tau: float = adaptivity()


class ServerOptimizer:
    """θ_{t+1} = θ_t + η_t m_t / (√v_t + τ) on the optimised keys; subclasses give v_t and η_t."""

    name: ClassVar[str]
    Params: ClassVar[type]
    help: ClassVar[str] = ""

    def __init__(self, own):
        self.own = own

    @property
    def beta_1(self) -> float:
        return getattr(self.own, "beta_1", 0.0)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def eta_t(self, step: int) -> float:
        return self.own.eta

    def apply(self, state: OptState, current: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray],
              keys: Iterable[str]) -> Model:
        """The new model: ``aggregated`` with every key of ``keys`` replaced by the optimiser's step from
        ``current`` (θ_t); ``state`` is advanced in place. Keys not in ``keys`` keep the aggregate."""
        keys = [k for k in aggregated if k in set(keys)]
        state.step += 1
        eta = self.eta_t(state.step)
        out = dict(aggregated)
        for k in keys:
            theta = np.asarray(current[k], dtype=np.float64)
            delta = np.asarray(aggregated[k], dtype=np.float64) - theta
            m = state.m.get(k, np.zeros_like(delta))
            v = state.v.get(k, np.zeros_like(delta))
            state.m[k] = self.beta_1 * m + (1 - self.beta_1) * delta
            state.v[k] = self.second_moment(v, delta)
            out[k] = (theta + eta * state.m[k] / (np.sqrt(state.v[k]) + self.own.tau)).astype(np.asarray(aggregated[k]).dtype)
        return out


class FedAdam(ServerOptimizer):
    name = "adam"
    Params = AdamParams
    help = "FedAdam: v ← β₂v + (1−β₂)Δ², bias-corrected η as Flower"

    def second_moment(self, v, delta):
        return self.own.beta_2 * v + (1 - self.own.beta_2) * delta**2

    def eta_t(self, step):
        b1, b2 = self.own.beta_1, self.own.beta_2
        return self.own.eta * np.sqrt(1 - np.power(b2, step + 1.0)) / (1 - np.power(b1, step + 1.0))


class FedYogi(ServerOptimizer):
    name = "yogi"
    Params = YogiParams
    help = "FedYogi: v ← v − (1−β₂)Δ² sign(v − Δ²)"

    def second_moment(self, v, delta):
        return v - (1.0 - self.own.beta_2) * delta**2 * np.sign(v - delta**2)


class FedAdagrad(ServerOptimizer):
    name = "adagrad"
    Params = AdagradParams
    help = "FedAdagrad: v ← v + Δ², no momentum (as Flower)"

    def second_moment(self, v, delta):
        return v + delta**2


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "adam": FedAdam,
    "yogi": FedYogi,
    "adagrad": FedAdagrad,
}

ServerOptimizerParams = assemble(
    "ServerOptimizerParams",
    "The server optimiser applied to the rule's aggregate (see :mod:`simlab.aggregation.server_opt`).",
    [("name", Literal[("none", *OPTIMIZERS)], field(default="none", metadata={
        "help": "none: the aggregate is the new model; " + "; ".join(f"{k}: {c.help}" for k, c in OPTIMIZERS.items())}))],
    OPTIMIZERS,
)


def make_server_optimizer(params) -> ServerOptimizer | None:
    """The optimiser ``params.name`` names with its own section, or None for ``none``."""
    if params.name == "none":
        return None
    return OPTIMIZERS[params.name](getattr(params, params.name))
