"""Sequential fine-tuning: train the received model on this round's window only. No data and no
state are kept, so it forgets when the distribution moves: the lower reference of every table."""

from __future__ import annotations

from simlab.continual.method import Method


class Sequential(Method):
    name = "sequential"
    help = "train the received model on each window only"
