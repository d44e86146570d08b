"""Comparison helpers shared by the tests: tolerance tables by dtype and error measures."""
import torch

# Element-wise tolerances of a kernel's output against a float64 reference. Outputs are
# rounded to the dtype once, so the bound is a few ulps of the dtype at the output's scale.
OUT_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# Relative error ||a - b|| / ||b|| for gradients: reductions in fp32, one rounding to the dtype.
GRAD_REL_TOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_error(actual, expected, floor=0.1, denom_floor=0.0):
    """||actual - expected|| / ||expected||, with the denominator floored at floor * sqrt(numel)
    and at `denom_floor`. A gradient that is a difference of much larger terms (LayerNorm's dx
    over one element is exactly 0, computed as rstd * (g - mean(g)) with rstd = 1/sqrt(eps)) can
    only be judged relative to the size of those terms, which the caller passes as denom_floor."""
    actual = actual.double()
    expected = expected.double()
    denom = max(expected.norm().item(), floor * max(expected.numel(), 1) ** 0.5, denom_floor)
    return (actual - expected).norm().item() / denom


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten element?)"
    torch.testing.assert_close(actual.double(), expected.double(), **OUT_TOL[dtype], msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what, scale=1.0, denom_floor=0.0):
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten element?)"
    err = rel_error(actual, expected, denom_floor=denom_floor)
    assert err <= GRAD_REL_TOL[dtype] * scale, f"{what}: relative error {err:.3g} > {GRAD_REL_TOL[dtype] * scale:.3g}"
