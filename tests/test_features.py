"""Shift-detection features at the first normalisation layer of the segmentation UNet, and the plain
forward-hook extractor (tests/feature_reference.py) that ODEx's features are checked against."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from simlab.continual.features import FeatureSpec, first_norm_layer, reduce_activation, resolve_layer
from tests.feature_reference import capture_features, extract_features, feature_dim


def _unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
        strides=(2, 2, 2), num_res_units=1, norm="batch",
    )


def _images(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    # give images different brightness and contrast so features vary across the batch
    return x * torch.linspace(0.5, 2.0, n).view(n, 1, 1, 1) + torch.linspace(-1.0, 1.0, n).view(n, 1, 1, 1)


def _manual_first_bn_input(model: UNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model[0].conv.unit0.conv(x)


def test_first_norm_layer_of_the_unet_is_the_first_batchnorm():
    model = _unet()
    name, layer = first_norm_layer(model)
    assert name == "model.0.conv.unit0.adn.N"
    assert isinstance(layer, nn.BatchNorm2d) and layer.num_features == 16
    assert layer is model.model[0].conv.unit0.adn.N
    assert resolve_layer(model, FeatureSpec()) == (name, layer)


def test_first_norm_layer_other_norms_and_errors():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4))
    assert first_norm_layer(seq) == ("2", seq[2])
    seq2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4))
    assert first_norm_layer(seq2)[0] == "1"
    with pytest.raises(ValueError):
        first_norm_layer(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(KeyError):
        resolve_layer(seq, FeatureSpec(layer="no.such.module"))


def test_mean_std_features_equal_manual_first_bn_input():
    model = _unet()
    x = _images(10)
    feats = extract_features(model, x, FeatureSpec(), batch_size=4)
    assert feats.shape == (10, 32) and feats.dtype == np.float64
    assert feature_dim(16, FeatureSpec()) == 32
    a = _manual_first_bn_input(model, x).double().flatten(2)  # [n, 16, H*W]
    assert a.shape[2] == 16 * 16  # stride-2 first convolution
    manual = torch.cat([a.mean(2), a.std(2, correction=0)], dim=1).numpy()
    np.testing.assert_allclose(feats, manual, rtol=1e-5, atol=1e-6)
    # the std half is a population std: check one entry with numpy
    v = a[3, 5].numpy()
    assert feats[3, 16 + 5] == pytest.approx(np.sqrt(np.mean((v - v.mean()) ** 2)), rel=1e-5)
    # features actually vary with the images' contrast
    assert np.std(feats[:, 16:], axis=0).min() > 0


def test_mean_and_pooled_reductions():
    model = _unet()
    x = _images(6)
    full = extract_features(model, x, FeatureSpec())
    mean = extract_features(model, x, FeatureSpec(reduction="mean"))
    np.testing.assert_allclose(mean, full[:, :16], rtol=1e-12)
    spec = FeatureSpec(reduction="pooled", pool_size=4)
    pooled = extract_features(model, x, spec)
    assert pooled.shape == (6, 16 * 4 * 4) == (6, feature_dim(16, spec))
    manual = nn.functional.adaptive_avg_pool2d(_manual_first_bn_input(model, x).double(), 4).flatten(1)
    np.testing.assert_allclose(pooled, manual.numpy(), rtol=1e-5, atol=1e-6)
    # pooled cells average to the channel mean (16x16 map, 4x4 cells of equal size)
    np.testing.assert_allclose(pooled.reshape(6, 16, 16).mean(2), full[:, :16], rtol=1e-9, atol=1e-12)


def test_gram_reduction_is_the_channel_gram_matrix_and_frobenius_in_euclidean_form():
    model = _unet()
    x = _images(4)
    g = extract_features(model, x, FeatureSpec(reduction="gram"))
    assert g.shape == (4, 16 * 17 // 2)
    act = _manual_first_bn_input(model, x).double().flatten(2)  # [B, C, N]
    full = (act @ act.transpose(1, 2) / act.shape[2]).numpy()  # G = F Fᵀ / N
    rows, cols = np.triu_indices(16)
    np.testing.assert_allclose(g[:, rows == cols], full[:, rows[rows == cols], cols[rows == cols]], rtol=1e-6)
    # ‖g_a − g_b‖² is the squared Frobenius distance of the symmetric matrices
    np.testing.assert_allclose(((g[0] - g[1]) ** 2).sum(), ((full[0] - full[1]) ** 2).sum(), rtol=1e-6)


def test_module_path_layer_uses_that_layers_input():
    model = _unet()
    x = _images(5)
    spec = FeatureSpec(layer="model.0.conv.unit0.conv")  # input of the first conv = the image
    feats = extract_features(model, x, spec)
    flat = x.double().flatten(2)
    np.testing.assert_allclose(feats, torch.cat([flat.mean(2), flat.std(2, correction=0)], 1).numpy(), rtol=1e-12)


def test_reduce_activation_rejects_bad_shapes_and_handles_3d():
    with pytest.raises(ValueError):
        reduce_activation(torch.zeros(4, 3), FeatureSpec())
    a = torch.arange(2 * 3 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4, 4)
    out = reduce_activation(a, FeatureSpec(reduction="pooled", pool_size=2))
    assert out.shape == (2, 3 * 8) and out.dtype == torch.float64
    assert out[0, 0].item() == pytest.approx(a[0, 0, :2, :2, :2].double().mean().item())


def _exact_population_std(values: list[float]) -> float:
    """Population std of float64 values: exact rational mean and variance, then one float sqrt."""
    v = [Fraction(x) for x in values]
    m = sum(v) / len(v)
    return math.sqrt(float(sum((x - m) ** 2 for x in v) / len(v)))


def test_two_pass_std_matches_torch_std_and_leaves_the_input_alone():
    g = torch.Generator().manual_seed(3)
    act = torch.randn(6, 5, 17, 13, generator=g) * torch.linspace(0.01, 30.0, 5).view(1, 5, 1, 1) + 1e3
    act[0, 0] = 2.5  # a constant channel: std exactly 0
    flat = act.double().flatten(2)
    exact = np.array([[_exact_population_std(flat[i, c].tolist()) for c in range(5)] for i in range(6)])
    for a in (act, act.double()):
        before = a.clone()
        out = reduce_activation(a, FeatureSpec())
        assert out.dtype == torch.float64 and not out.requires_grad
        assert torch.equal(a, before)  # a float64 input is the working copy: it must not be squared in place
        assert torch.equal(out[:, :5], flat.mean(2))
        # std/mean down to 1e-5 here: still within a few ulps of the exact value (torch.std's batched
        # Welford loop is ~1e-12 off on the smallest channel)
        np.testing.assert_allclose(out[:, 5:].numpy(), exact, rtol=1e-14)
        np.testing.assert_allclose(out[:, 5:].numpy(), flat.std(2, correction=0).numpy(), rtol=1e-10)
        assert out[0, 5].item() == 0.0
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    assert not reduce_activation(x * 2, FeatureSpec()).requires_grad


def test_extract_restores_modes_removes_hook_and_keeps_bn_stats():
    model = _unet()
    model.train()
    model.model[1].eval()  # a submodule in a different mode must come back as it was
    before = {n: m.training for n, m in model.named_modules()}
    _, bn = first_norm_layer(model)
    running = bn.running_mean.clone()
    feats_a = extract_features(model, _images(7), FeatureSpec(), batch_size=3)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert len(bn._forward_pre_hooks) == 0 and len(bn._forward_hooks) == 0
    assert torch.equal(bn.running_mean, running)
    # batch size does not change the values
    feats_b = extract_features(model, _images(7).numpy(), FeatureSpec(), batch_size=64)
    np.testing.assert_allclose(feats_a, feats_b, rtol=1e-5, atol=1e-6)


def test_hook_removed_when_block_raises():
    model = _unet()
    _, bn = first_norm_layer(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_features(model, FeatureSpec()):
            assert len(bn._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(bn._forward_pre_hooks) == 0


def _train_step(model: UNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_capture_during_training_leaves_training_bitwise_unchanged():
    x = _images(6)
    y = (x[:, 0] > x.mean()).long()
    plain, hooked = _unet(3), _unet(3)
    hooked.load_state_dict(copy.deepcopy(plain.state_dict()))
    loss_a, grads_a = _train_step(plain, x, y)
    with capture_features(hooked, FeatureSpec()) as col:
        loss_b, grads_b = _train_step(hooked, x, y)
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b))
    for (na, ba), (_, bb) in zip(plain.named_buffers(), hooked.named_buffers()):
        assert torch.equal(ba, bb), na
    # the collected features are those of the first BN input (train mode = eval mode there)
    assert len(col) == 6
    got = col.features()
    assert got.shape == (6, 32)
    np.testing.assert_allclose(got, extract_features(plain, x, FeatureSpec()), rtol=1e-5, atol=1e-6)
    col.clear()
    assert col.features().shape == (0, 0)
