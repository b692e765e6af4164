"""Local training: determinism, the episodic (FedDG) step, corrupted hospitals, replay and the static
upper bound."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from simlab.augment.frequency import FrequencyAugmenter, FrequencyParams
from simlab.continual.replay import Replay
from simlab.continual.sequential import Sequential
from simlab.continual.upper_bound import UpperBound
from simlab.data.streams import Window
from simlab.continual.training import TrainConfig, train_local
from simlab.data.streams import corrupt_labels
from simlab.models.unet import build_model, state_to_numpy
from simlab.data.drift import DriftSpec
from simlab.data.specs import HospitalSpec
from simlab.models.unet import ModelSpec

SMALL = ModelSpec(channels=[4, 8, 16])


def data(n=8, size=32, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, size=(n, size, size)).astype(np.uint8)
    x = (y[:, None] / 2 + 0.1 * g.standard_normal((n, 1, size, size))).astype(np.float32)
    return x, y


def trained(cfg, seed=1, augment=None):
    torch.manual_seed(0)
    m = build_model(SMALL, 3)
    x, y = data()
    out = train_local(m, x, y, cfg, seed, augment=augment)
    return state_to_numpy(m), out


def test_training_is_deterministic_and_learns():
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.01)
    a, out = trained(cfg)
    b, _ = trained(cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c, _ = trained(cfg, seed=2)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert out["steps"] == 6 and out["num_examples"] == 8


def test_epochs_cover_the_data():
    _, out = trained(TrainConfig(steps=1, batch_size=3, lr=0.01, epochs=2))
    assert out["steps"] == 2 * 3  # ceil(8/3) batches per epoch


def test_episodic_step_differs_from_plain_and_needs_augmentation():
    bank = {"other": torch.rand(4, 1, 3, 3) * 50}
    params = FrequencyParams(enabled=True, alpha=0.05, prob=1.0)
    def aug():
        return FrequencyAugmenter(params, bank, "me", torch.Generator().manual_seed(0))
    plain, _ = trained(TrainConfig(steps=3, batch_size=4, lr=0.01), augment=aug())
    epi, out = trained(TrainConfig(steps=3, batch_size=4, lr=0.01, episodic=True), augment=aug())
    assert np.isfinite(out["train_loss"])
    assert any(not np.allclose(plain[k], epi[k]) for k in plain if plain[k].dtype.kind == "f")
    with pytest.raises(ValueError, match="episodic step needs an augmentation"):
        trained(TrainConfig(steps=1, batch_size=4, lr=0.01, episodic=True))


def test_corrupted_labels_swap_or_randomise_only_the_chosen_share():
    y = np.tile(np.array([0, 1, 2], np.uint8), (10, 4, 1))
    h = HospitalSpec(id="bad", drift=DriftSpec(domain="A"), corruption="swap_labels", corruption_fraction=1.0)
    z = corrupt_labels(y, h, np.random.default_rng(0), 3)
    assert (z[y == 1] == 2).all() and (z[y == 2] == 1).all() and (z[y == 0] == 0).all()
    half = HospitalSpec(id="bad", drift=DriftSpec(domain="A"), corruption="random_labels", corruption_fraction=0.5)
    z = corrupt_labels(y, half, np.random.default_rng(0), 3)
    changed = [(z[i] != y[i]).any() for i in range(10)]
    assert 2 <= sum(changed) <= 8
    clean = HospitalSpec(id="ok", drift=DriftSpec(domain="A"))
    assert corrupt_labels(y, clean, np.random.default_rng(0), 3) is y


def test_replay_rehearses_every_seen_window_sequential_does_not():
    seq, replay = Sequential(), Replay()
    assert seq.training_rounds(3, {}) == [3]
    state = replay.after_round(None, None, None, replay.training_rounds(1, {}), {}, None, 0)
    state = replay.after_round(None, None, None, replay.training_rounds(2, state), state, None, 0)
    assert replay.training_rounds(3, state) == [1, 2, 3]
    assert replay.breaks_no_rehearsal and not seq.breaks_no_rehearsal


def tagged_window(t: int, n: int = 10) -> Window:
    """Round t's window: image i is filled with 100·t + i; images 0, 2, 4, ... carry a label."""
    images = (100.0 * t + np.arange(n, dtype=np.float32)).reshape(n, 1, 1, 1) * np.ones((1, 1, 4, 4), np.float32)
    return Window(images, np.zeros((n, 4, 4), np.uint8), np.arange(n) % 2 == 0, "A")


def test_upper_bound_samples_the_whole_stream_iid_from_round_one():
    ub, T = UpperBound(), 6
    assert ub.breaks_no_rehearsal and ub.uses_future_data and not ub.keeps_state
    drawn = {}
    for t in range(1, T + 1):
        images, _, rounds = ub.training_set(tagged_window, t, {}, seed=40 + t, last_round=T)
        tags = images[:, 0, 0, 0].astype(int)
        assert len(tags) == tagged_window(t).n_labeled == len(set(tags))  # the window's size, no repeats
        assert all(tag % 2 == 0 and 1 <= tag // 100 <= T for tag in tags)  # labelled images of rounds 1..T
        assert rounds == sorted({tag // 100 for tag in tags})
        drawn[t] = tags
    assert max(drawn[1]) // 100 > 1  # round 1 already trains on later windows
    assert len({tag // 100 for tags in drawn.values() for tag in tags}) == T
    again, _, _ = ub.training_set(tagged_window, 3, {}, seed=43, last_round=T)
    assert (again[:, 0, 0, 0].astype(int) == drawn[3]).all()  # seeded per hospital and round
    other, _, _ = ub.training_set(tagged_window, 3, {}, seed=44, last_round=T)
    assert (other[:, 0, 0, 0].astype(int) != drawn[3]).any()
    with pytest.raises(ValueError, match="last round"):
        ub.training_set(tagged_window, 3, {}, seed=1, last_round=None)


CPU_ISA_PROBE = ("import os, torch, simlab; x = torch.randn(4, 8); (x @ x.T).sum(); "
                 "print(os.environ['ATEN_CPU_CAPABILITY'], os.environ['ONEDNN_MAX_CPU_ISA'], "
                 "torch.backends.cpu.get_cpu_capability())")


def _isa_probe(**env_vars) -> list[str]:
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_vars)
    out = subprocess.run([sys.executable, "-c", CPU_ISA_PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "avx2" not in open("/proc/cpuinfo").read(), reason="x86-64 with AVX2 only")
def test_importing_simlab_pins_cpu_kernels_to_avx2_unless_the_environment_says_otherwise():
    """AVX-512 kernels round differently from AVX2 ones, so without the pin the same seed gives other
    numbers on another CPU (the regression baseline's replay-ida forgetting: 0.014 vs 0.079)."""
    assert _isa_probe() == ["avx2", "AVX2", "AVX2"]
    assert _isa_probe(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41") == ["default", "SSE41", "DEFAULT"]
