"""Jacobian determinant: against SimpleITK, analytic fields, and torch == NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from neuroexplain.jacobian import det3x3, folded_voxels, jacobian_determinant, log_jacobian


def _grid(shape, spacing=(1.0, 1.0, 1.0)):
    """Physical coordinates (X, Y, Z, 3) of the voxel centres."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _smooth_field(shape, scale, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack(
        [gaussian_filter(rng.normal(size=shape), 3.0) * scale for _ in range(3)], axis=-1
    )


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 2.0, 2.5)])
def test_matches_simpleitk_interior(spacing):
    sitk = pytest.importorskip("SimpleITK")
    u = _smooth_field((26, 22, 18), scale=25.0)
    ours = jacobian_determinant(u, spacing)
    assert ours.min() < 0.9 and ours.max() > 1.1  # a field that really deforms
    # SimpleITK: array (Z, Y, X, 3) <-> image (x, y, z); vector component k is along image axis k
    img = sitk.GetImageFromArray(np.ascontiguousarray(u.transpose(2, 1, 0, 3)), isVector=True)
    img.SetSpacing(spacing)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(img)).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3
    assert np.abs(ours - ref)[inner].max() <= 1e-5
    # float32 input stays float32 and agrees to float32 precision
    ours32 = jacobian_determinant(u.astype(np.float32), spacing)
    assert ours32.dtype == np.float32
    assert np.abs(ours32 - ref)[inner].max() <= 1e-5


def test_matches_numpy_gradient_everywhere():
    u = _smooth_field((9, 7, 5), scale=10.0, seed=3)
    sp = (0.7, 1.3, 2.0)
    grad = np.stack([np.stack(np.gradient(u[..., i], *sp), axis=-1) for i in range(3)], axis=-2)
    ref = np.linalg.det(np.eye(3) + grad)
    np.testing.assert_allclose(jacobian_determinant(u, sp), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a", [-0.3, 0.1, 0.5])
def test_pure_scaling(a):
    spacing = (2.0, 1.0, 1.5)
    u = a * _grid((8, 9, 10), spacing)  # phi(x) = (1 + a) x, displacement in mm
    det = jacobian_determinant(u, spacing)
    np.testing.assert_allclose(det, (1 + a) ** 3, rtol=1e-12)  # linear: exact, border included
    # the same field in voxel units with unit spacing gives the same determinant
    np.testing.assert_allclose(
        jacobian_determinant(u / np.array(spacing)), (1 + a) ** 3, rtol=1e-12
    )


def test_anisotropic_scaling_and_shear():
    x = _grid((6, 7, 8))
    u = x * np.array([0.2, -0.1, 0.3])
    np.testing.assert_allclose(jacobian_determinant(u), 1.2 * 0.9 * 1.3, rtol=1e-12)
    shear = np.zeros_like(x)
    shear[..., 0] = 0.7 * x[..., 1]  # volume preserving
    np.testing.assert_allclose(jacobian_determinant(shear), 1.0, rtol=1e-12)


def test_rotation_has_unit_determinant():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))  # a proper rotation, det +1
    x = _grid((10, 8, 6), (1.2, 1.0, 0.8))
    u = x @ rot.T - x  # u = R x - x
    det = jacobian_determinant(u, (1.2, 1.0, 0.8))
    assert np.abs(det - 1.0).max() < 1e-9
    # a large rotation is not a small deformation: det(I + du/dx) is still det R = 1
    assert np.abs(u).max() > 3.0


def test_folding_and_log():
    x = _grid((5, 5, 5))
    log_det, n_folded = log_jacobian(-2.0 * x, eps=1e-3, return_folded=True)  # det = -1
    assert n_folded == 125
    np.testing.assert_allclose(log_det, np.log(1e-3))
    log_det = log_jacobian(0.25 * x)
    np.testing.assert_allclose(log_det, 3 * np.log(1.25), rtol=1e-12)
    assert folded_voxels(np.array([1.0, 0.0, -1.0])) == 2
    with pytest.raises(ValueError, match="eps"):
        log_jacobian(x, eps=0.0)


def test_torch_matches_numpy_and_is_differentiable():
    u = _smooth_field((12, 10, 8), scale=15.0, seed=2)
    sp = (1.0, 2.0, 1.5)
    ref = jacobian_determinant(u, sp)
    ddf = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0))[None])  # (1, 3, X, Y, Z)
    fast = jacobian_determinant(ddf, sp)
    assert fast.shape == (1, 1, 12, 10, 8) and isinstance(fast, torch.Tensor)
    np.testing.assert_allclose(fast[0, 0].numpy(), ref, atol=1e-12)
    leaf = ddf.clone().requires_grad_(True)
    diff = jacobian_determinant(leaf, sp)  # the autograd path (also used on CUDA)
    np.testing.assert_allclose(diff.detach()[0, 0].numpy(), ref, atol=1e-12)
    diff.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    # batch of two, float32, log path
    batch = torch.cat([ddf, 2 * ddf]).float()
    logj = log_jacobian(batch, sp)
    assert logj.shape == (2, 1, 12, 10, 8) and logj.dtype == torch.float32
    np.testing.assert_allclose(logj[0, 0].numpy(), np.log(ref), atol=1e-5)
    # NumPy channel-first batch
    np_batch = jacobian_determinant(np.moveaxis(u, -1, 0)[None], sp)
    assert np_batch.shape == (1, 1, 12, 10, 8)
    np.testing.assert_allclose(np_batch[0, 0], ref)


def test_det3x3_closed_form():
    m = np.random.default_rng(4).normal(size=(3, 3, 50))
    np.testing.assert_allclose(det3x3(m), np.linalg.det(np.moveaxis(m, -1, 0)), atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(4, 4, 4), (4, 4, 4, 2), (1, 4, 4, 4, 3), (4, 1, 4, 3), (2, 2, 4, 4, 4)]
)
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="expected"):
        jacobian_determinant(np.zeros(shape))


def test_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        jacobian_determinant(np.zeros((3, 3, 3, 3)), spacing=(1.0, 0.0, 1.0))
