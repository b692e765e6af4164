"""Stable seeds derived from the scenario seed and names (hospital, round, domain, purpose).

Python's ``hash`` is salted per process, so seeds come from SHA-256 of the parts instead: the same
scenario seed gives the same numbers in every process (driver, Ray actors, SuperNodes).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np


def derive_seed(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
