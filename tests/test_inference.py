"""Tests of the reproduction protocols' networks and whole-volume inference (examples/bual_demo:
model.VNet, UNet2D(dropout=...), inference.predict_slices / predict_sliding_window), each
against an independent implementation of SSL4MIS's and UA-MT's loops."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("examples.bual_demo")
pytest.importorskip("scipy")
from scipy.ndimage import zoom  # noqa: E402

from bual_losses import mc_dropout_uncertainty  # noqa: E402
from examples.bual_demo.inference import (  # noqa: E402
    _fit,
    predict_slices,
    predict_sliding_window,
)
from examples.bual_demo.model import SSL4MIS_DROPOUT, UNet2D, VNet  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


# ------------------------------------------------------------------------------ networks


def test_vnet_maps_a_volume_to_logits_of_its_shape():
    model = VNet(1, 3, base=4).eval()
    out = model(torch.randn(2, 1, 32, 32, 16))
    assert out.shape == (2, 3, 32, 32, 16)
    assert torch.isfinite(out).all()


def test_vnet_default_widths_are_ua_mts():
    model = VNet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    widths = [m.out_channels for m in convs if m.kernel_size == (3, 3, 3)]
    # encoder 1, 2, 3, 3, 3 convs at 16 .. 256 channels; decoder 3, 3, 2, 1 at 128 .. 16
    assert widths == [16] + [32] * 2 + [64] * 3 + [128] * 3 + [256] * 3 + [128] * 3 + [64] * 3 \
        + [32] * 2 + [16]  # fmt: skip
    # UA-MT's VNet(n_channels=1, n_classes=2, normalization="batchnorm") has this many
    assert sum(p.numel() for p in model.parameters()) == 9_448_866


def test_vnet_dropout_runs_on_the_bottleneck_and_the_last_features_and_mc_dropout_samples_it():
    torch.manual_seed(0)
    model = VNet(1, 2, base=4, dropout=0.5).eval()
    (dropout,) = _dropouts(model)
    assert isinstance(dropout, nn.Dropout3d) and dropout.p == 0.5
    seen: list[tuple[int, ...]] = []
    dropout.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # eval: deterministic
    assert seen == [(1, 16 * 4, 2, 2, 1), (1, 4, 32, 32, 16)] * 2  # bottleneck, last decoder
    est = mc_dropout_uncertainty(model, x, passes=4)
    assert est.variance.amax() > 1e-6  # the passes differ
    assert not model.training and not dropout.training  # modes restored


def test_vnet_without_dropout_has_no_dropout_module():
    model = VNet(1, 2, base=4, dropout=0.0)
    assert _dropouts(model) == []
    x = torch.randn(2, 1, 16, 16, 16)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))


@pytest.mark.parametrize("shape", [(1, 1, 32, 24, 16), (1, 1, 8, 16, 16), (1, 32, 32, 16)])
def test_vnet_rejects_an_input_not_divisible_by_16_naming_its_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"divisible by 16, got {shape}.")):
        VNet(1, 2, base=2)(torch.zeros(shape))


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_vnet_rejects_a_dropout_rate_outside_0_1(dropout):
    with pytest.raises(ValueError, match=r"`dropout` must be a rate in \[0, 1\)"):
        VNet(dropout=dropout)


def _unet_rates(model: UNet2D) -> list[float]:
    return [m.p for m in _dropouts(model)]


def test_unet2d_dropout_sets_the_rate_of_every_level():
    model = UNet2D(1, 4, base=4, levels=5, dropout=SSL4MIS_DROPOUT)
    assert all(isinstance(m, nn.Dropout2d) for m in _dropouts(model))
    # encoder levels 0..4, then the decoder blocks of levels 3..0
    assert _unet_rates(model) == [0.05, 0.1, 0.2, 0.3, 0.5, 0.3, 0.2, 0.1, 0.05]
    assert model.eval()(torch.randn(1, 1, 16, 16)).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("levels", [3, 5])
def test_unet2d_without_dropout_keeps_the_old_rates_and_weights(levels):
    old = [min(0.05 * 2**i, 0.3) for i in range(levels)]
    torch.manual_seed(0)
    default = UNet2D(1, 3, base=4, levels=levels)
    torch.manual_seed(0)
    explicit = UNet2D(1, 3, base=4, levels=levels, dropout=old)
    assert _unet_rates(default) == _unet_rates(explicit) == old + old[-2::-1]
    for (n, p), (m, q) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert n == m and torch.equal(p, q)


@pytest.mark.parametrize(
    "dropout", [(0.1, 0.2), (0.1, 0.2, 0.3, 0.4), (0.1, 1.0, 0.2), (-0.1, 0, 0)]
)
def test_unet2d_rejects_a_bad_dropout_naming_it(dropout):
    with pytest.raises(ValueError, match=r"`dropout` must be 3 rates in \[0, 1\).*got"):
        UNet2D(1, 3, base=4, levels=3, dropout=dropout)


# ------------------------------------------------------------------------------ predict_slices


def _threshold_net() -> nn.Module:
    """Logits (0.5, x) of an image x: class 1 where x > 0.5 (a known pointwise function)."""
    net = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.5, 0.0]))
    return net


def _conv_net2d(seed: int = 0) -> nn.Module:
    """A small deterministic spatial net (its labels depend on neighbourhoods and position
    through the zero padding), BatchNorm with non-trivial running statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1))  # fmt: skip
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def _ssl4mis_reference(net: nn.Module, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """SSL4MIS's test_single_volume loop, one slice at a time."""
    net.eval()
    prediction = np.zeros(image.shape, dtype=np.int64)
    for ind in range(image.shape[0]):
        x, y = image[ind].shape
        s = zoom(image[ind], (size[0] / x, size[1] / y), order=0)
        with torch.no_grad():
            logits = net(torch.from_numpy(s).unsqueeze(0).unsqueeze(0).float())
            out = torch.argmax(torch.softmax(logits, dim=1), dim=1).squeeze(0).numpy()
        prediction[ind] = zoom(out, (x / size[0], y / size[1]), order=0)
    return prediction


def test_predict_slices_without_size_applies_the_model_to_each_slice():
    image = np.random.default_rng(0).random((5, 12, 10))
    labels = predict_slices(_threshold_net(), image, batch=2)
    assert labels.dtype == np.int64 and labels.shape == image.shape
    np.testing.assert_array_equal(labels, (image > 0.5).astype(np.int64))


@pytest.mark.parametrize("shape", [(3, 37, 29), (2, 64, 48), (2, 20, 32)])
def test_predict_slices_zooms_to_size_and_back_as_ssl4mis(shape):
    image = np.random.default_rng(1).random(shape)
    net = _threshold_net()
    seen: list[tuple[int, ...]] = []
    net.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    labels = predict_slices(net, image, (32, 32), batch=2)
    assert labels.shape == shape and labels.dtype == np.int64
    assert all(s[1:] == (1, 32, 32) for s in seen) and sum(s[0] for s in seen) == shape[0]
    expected = np.stack([zoom((zoom(s, (32 / shape[1], 32 / shape[2]), order=0) > 0.5)
                              .astype(np.int64), (shape[1] / 32, shape[2] / 32), order=0)
                         for s in image])  # fmt: skip
    np.testing.assert_array_equal(labels, expected)


def test_predict_slices_equals_ssl4mis_loop_for_a_spatial_net_at_any_batch():
    image = np.random.default_rng(2).normal(size=(5, 37, 29))
    net = _conv_net2d().train()
    expected = _ssl4mis_reference(net, image, (32, 32))
    assert len(np.unique(expected)) > 1
    net.train()
    for batch in (1, 3, 16):
        np.testing.assert_array_equal(predict_slices(net, image, (32, 32), batch=batch), expected)
    assert net.training  # the caller's mode is restored


def test_a_zoom_a_voxel_off_is_cropped_or_edge_padded_to_the_wanted_shape():
    a = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(_fit(a, (4, 3)), [[0, 1, 2], [4, 5, 6], [8, 9, 10], [8, 9, 10]])
    np.testing.assert_array_equal(_fit(a, (3, 4)), a)


def test_predict_slices_runs_in_eval_mode_without_gradients():
    net = _conv_net2d()
    modes: list[tuple[bool, bool]] = []
    net.register_forward_hook(
        lambda m, args, out: modes.append((m.training, torch.is_grad_enabled()))
    )
    net.train()
    predict_slices(net, np.zeros((2, 8, 8)))
    assert modes == [(False, False)] and net.training


def test_predict_slices_under_bf16_autocast_gives_labels_of_the_shape():
    labels = predict_slices(_conv_net2d(), np.random.default_rng(3).random((2, 20, 20)),
                            (16, 16), amp="bf16")  # fmt: skip
    assert labels.shape == (2, 20, 20) and labels.dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((8, 8))}, r"`image` must be a non-empty 3D volume, got shape \(8, 8\)"),
        ({"image": np.zeros((0, 8, 8))}, r"`image` must be .*got shape \(0, 8, 8\)"),
        ({"size": (32, 0)}, r"`size` must be 2 positive integers, got \(32, 0\)"),
        ({"size": (32,)}, r"`size` must be 2 positive integers, got \(32,\)"),
        ({"size": (32.0, 32)}, r"`size` must be 2 positive integers"),
        ({"batch": 0}, r"`batch` must be a positive integer, got 0"),
        ({"amp": "fp8"}, r"`amp` must be \"none\", \"bf16\" or \"fp16\", got 'fp8'"),
    ],
)
def test_predict_slices_rejects_bad_arguments_naming_them(kwargs, match):
    args = {"image": np.zeros((2, 8, 8)), "size": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        predict_slices(_threshold_net(), args.pop("image"), args.pop("size"), **args)


def test_predict_slices_rejects_a_model_that_changes_the_slice_shape():
    with pytest.raises(ValueError, match=r"`model` must map \(2, 1, 8, 8\) slices"):
        predict_slices(nn.Conv2d(1, 2, 3), np.zeros((2, 8, 8)))


# ------------------------------------------------------------------------------ sliding window


def _conv_net3d(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, classes, 3, padding=1))  # fmt: skip
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def _ua_mt_reference(net, image, patch, stride, num_classes):
    """UA-MT's test_single_case, one window at a time, in numpy (stride per axis)."""
    net.eval()
    shape = image.shape
    pads = [(max(p - n, 0) // 2, max(p - n, 0) - max(p - n, 0) // 2) for n, p in zip(shape, patch)]
    image = np.pad(image, pads, mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride[0]) + 1
    sy = math.ceil((hh - patch[1]) / stride[1]) + 1
    sz = math.ceil((dd - patch[2]) / stride[2]) + 1
    score_map = np.zeros((num_classes, *image.shape), dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride[0] * x, ww - patch[0])
        for y in range(sy):
            ys = min(stride[1] * y, hh - patch[1])
            for z in range(sz):
                zs = min(stride[2] * z, dd - patch[2])
                win = (slice(xs, xs + patch[0]), slice(ys, ys + patch[1]), slice(zs, zs + patch[2]))
                t = torch.from_numpy(image[win][None, None].astype(np.float32))
                with torch.no_grad():
                    y1 = torch.softmax(net(t), dim=1)[0].numpy()
                score_map[(slice(None), *win)] += y1
                cnt[win] += 1
    label_map = np.argmax(score_map / cnt[None], axis=0)
    return label_map[tuple(slice(a, a + n) for (a, _), n in zip(pads, shape))]


@pytest.mark.parametrize(
    ("shape", "patch", "stride"),
    [
        ((40, 13, 7), (16, 16, 8), (6, 6, 4)),  # x larger than the patch, y and z padded
        ((23, 30, 20), (16, 16, 8), (18, 18, 4)),  # UA-MT's strides, no padding
        ((16, 9, 11), (16, 12, 8), (5, 3, 2)),  # x exactly the patch, y padded (odd)
    ],
)
def test_predict_sliding_window_equals_ua_mts_loop_at_any_batch(shape, patch, stride):
    image = np.random.default_rng(4).normal(size=shape)
    net = _conv_net3d()
    expected = _ua_mt_reference(net, image, patch, stride, 3)
    assert expected.shape == shape and len(np.unique(expected)) > 1
    net.train()
    for batch in (1, 4):
        labels = predict_sliding_window(net, image, patch, stride, 3, batch=batch)
        assert labels.dtype == np.int64 and labels.shape == shape
        np.testing.assert_array_equal(labels, expected)
    assert net.training


@pytest.mark.parametrize(("batch", "calls"), [(1, 80), (4, 20), (7, 12)])
def test_predict_sliding_window_runs_ua_mts_window_grid(batch, calls):
    # ceil((40 - 16) / 6) + 1 = 5, ceil((30 - 16) / 6) + 1 = 4, ceil((20 - 8) / 4) + 1 = 4
    # windows (y starts at 0, 6, 12 and min(18, 30 - 16) = 14), by ceil(80 / batch) calls
    net = _conv_net3d(2)
    sizes: list[int] = []
    net.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    predict_sliding_window(net, np.zeros((40, 30, 20)), (16, 16, 8), (6, 6, 4), batch=batch)
    assert sum(sizes) == 5 * 4 * 4 and len(sizes) == calls


def test_predict_sliding_window_with_a_vnet():
    model = VNet(1, 2, base=2)
    labels = predict_sliding_window(model, np.random.default_rng(5).random((20, 14, 17)),
                                    (16, 16, 16), (8, 8, 8), batch=2)  # fmt: skip
    assert labels.shape == (20, 14, 17) and labels.dtype == np.int64 and model.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((1, 8, 8, 8))}, r"`image` must be a non-empty 3D volume"),
        ({"patch": (8, 8)}, r"`patch` must be 3 positive integers, got \(8, 8\)"),
        ({"patch": (8, -8, 8)}, r"`patch` must be 3 positive integers, got \(8, -8, 8\)"),
        ({"stride": (0, 4, 4)}, r"`stride` must be 3 positive integers, got \(0, 4, 4\)"),
        ({"num_classes": 0}, r"`num_classes` must be a positive integer, got 0"),
        ({"batch": -1}, r"`batch` must be a positive integer, got -1"),
        ({"amp": "half"}, r"`amp` must be"),
        ({"num_classes": 3}, r"`model` must map \(1, 1, 8, 8, 8\) windows to .*\(N, 3, 8, 8, 8\)"),
    ],
)
def test_predict_sliding_window_rejects_bad_arguments_naming_them(kwargs, match):
    args = {"image": np.zeros((8, 8, 8)), "patch": (8, 8, 8), "stride": (4, 4, 4),
            "num_classes": 2, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        predict_sliding_window(_conv_net3d(2), args.pop("image"), args.pop("patch"),
                               args.pop("stride"), args.pop("num_classes"), **args)  # fmt: skip
