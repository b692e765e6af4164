"""EWC's Fisher: per-image log-likelihood gradients (checked against an explicit loop of backward
passes), not the square of a mini-batch-mean gradient; BatchNorm in eval mode; the penalty."""

from __future__ import annotations

import numpy as np
import torch

from simlab.continual.ewc import EWC, EwcParams, fisher_diagonal, image_log_likelihood
from simlab.continual.training import TrainConfig, train_local
from simlab.models.unet import ModelSpec, build_model, state_to_numpy

CFG = TrainConfig(steps=4, batch_size=3, lr=0.01)


def tiny(n=5, size=16, seed=0):
    """A trained tiny U-Net (BatchNorm running statistics not at their initial values) and data."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, size=(n, size, size)).astype(np.uint8)
    x = (y[:, None] / 2 + 0.2 * g.standard_normal((n, 1, size, size))).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(ModelSpec(channels=[4, 8]), 3)
    train_local(model, x, y, CFG, seed=1)
    return model, x, y


def loop_fisher(model, x, y, per_image=True):
    """By hand: one backward pass per image (per_image) or one of the mean over the images."""
    model.eval()
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    batches = [(xs[i:i + 1], ys[i:i + 1]) for i in range(len(x))] if per_image else [(xs, ys)]
    for bx, by in batches:
        model.zero_grad()
        image_log_likelihood(model(bx), by).mean().backward()
        for n, p in params.items():
            out[n] += p.grad.detach() ** 2 / len(batches)
    model.zero_grad()
    return {n: v.numpy() for n, v in out.items()}


def test_fisher_is_the_mean_squared_per_image_log_likelihood_gradient():
    model, x, y = tiny()
    model.train()
    before = state_to_numpy(model)
    fisher = fisher_diagonal(model, x, y, CFG, chunk=2)  # chunks of 2, 2 and 1 images
    assert model.training and all(np.array_equal(v, state_to_numpy(model)[k]) for k, v in before.items())
    expected = loop_fisher(model, x, y)
    assert fisher.keys() == expected.keys() == {n for n, _ in model.named_parameters()}
    for n in fisher:
        np.testing.assert_allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-12, err_msg=n)
    # one image's log-likelihood by hand: mean over pixels of log softmax at the true class
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x[:1]))
    probs = torch.softmax(logits, 1)[0].numpy()
    by_hand = np.mean(np.log(np.take_along_axis(probs, y[:1].astype(np.int64), 0)))
    assert abs(image_log_likelihood(logits, torch.from_numpy(y[:1].astype(np.int64))).item() - by_hand) < 1e-5


def test_the_square_of_the_mini_batch_mean_gradient_is_another_smaller_quantity():
    model, x, y = tiny()
    per_image = fisher_diagonal(model, x, y, CFG)
    mean_batch = loop_fisher(model, x, y, per_image=False)
    total = sum(float(v.sum()) for v in per_image.values())
    assert sum(float(v.sum()) for v in mean_batch.values()) < 0.9 * total  # mean of squares ≥ square of mean
    one = fisher_diagonal(model, x[:1], y[:1], CFG)  # with one image the two coincide
    for n, v in loop_fisher(model, x[:1], y[:1], per_image=False).items():
        np.testing.assert_allclose(one[n], v, rtol=1e-4, atol=1e-12)


def test_penalty_is_half_lambda_fisher_weighted_distance_and_fisher_consolidates_online():
    model, x, y = tiny()
    ewc = EWC(EwcParams(strength=10.0, decay=0.5))
    state = ewc.after_round(model, x, y, [1], {}, CFG, seed=0)
    state = ewc.after_round(model, x, y, [2], state, CFG, seed=0)
    fisher = fisher_diagonal(model, x, y, CFG)
    for n in fisher:
        np.testing.assert_allclose(state[f"fisher.{n}"], 1.5 * fisher[n], rtol=1e-6)  # F <- 0.5 F + F_window
    ewc.before_training(model, state, CFG)
    assert float(ewc.loss_term(model, None, None, None).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = 0.5 * 10.0 * sum(float((state[f"fisher.{n}"] * 0.1 ** 2).sum()) for n in fisher)
    assert abs(float(ewc.loss_term(model, None, None, None).detach()) - expected) < 1e-4 * expected
