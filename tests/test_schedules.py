"""Masking schedules against the closed forms of shared/MATH.md ("MD4"), in float64."""

import math

import pytest
import torch

from md4 import MD4, schedules
from md4.errors import UserError

EPS = 1e-4

# name -> (alpha~_t, d alpha~_t / dt), written out from the table in MATH.md
RAW = {
    "linear": (lambda t: 1 - t, lambda t: -torch.ones_like(t)),
    "cosine": (lambda t: 1 - torch.cos(math.pi / 2 * (1 - t)), lambda t: -(math.pi / 2) * torch.sin(math.pi / 2 * (1 - t))),
    "poly3": (lambda t: 1 - t**3, lambda t: -3 * t**2),
    "poly2": (lambda t: 1 - t**2, lambda t: -2 * t),
    "poly0.5": (lambda t: 1 - t**0.5, lambda t: -0.5 * t**-0.5),
}
ALL = {
    "linear": schedules.Linear(),
    "cosine": schedules.Cosine(),
    "poly3": schedules.Poly(3),
    "poly2": schedules.Poly(),
    "poly0.5": schedules.Poly(0.5),
}
NAMES = list(ALL)


def grid(n=1001, lo=0.0, hi=1.0):
    return torch.linspace(lo, hi, n, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_and_derivative_are_the_clipped_closed_forms(name):
    s, (raw, draw) = ALL[name], RAW[name]
    t = grid(lo=1e-3)
    torch.testing.assert_close(s.alpha(t), (1 - 2 * EPS) * raw(t) + EPS, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s.dalpha(t), (1 - 2 * EPS) * draw(t), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_are_one_minus_eps_and_eps(name):
    s = ALL[name]
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), torch.tensor([1 - EPS, EPS], dtype=torch.float64), rtol=0, atol=1e-15)


def test_eps_is_a_parameter():
    s = schedules.Linear(eps=0.3)
    torch.testing.assert_close(s.alpha(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.7, 0.5, 0.3]))
    assert schedules.Poly(3, eps=0.25).alpha(torch.tensor(1.0)).item() == pytest.approx(0.25)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_strictly_decreases_inside_eps_and_one_minus_eps(name):
    a = ALL[name].alpha(grid())
    assert (a[1:] < a[:-1]).all()
    assert (a >= EPS - 1e-15).all() and (a <= 1 - EPS + 1e-15).all()


@pytest.mark.parametrize("name", NAMES)
def test_dalpha_matches_central_finite_differences(name):
    s, h = ALL[name], 1e-6
    t = grid(99, 0.01, 0.99)
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(t), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_dalpha_over_one_minus_alpha_and_never_positive(name):
    s = ALL[name]
    t = grid()
    w = s.weight(t)
    assert not w.isnan().any()
    assert (w <= 0).all()
    inner = t > 0  # poly0.5 has an infinite slope at t = 0
    torch.testing.assert_close(w[inner], (s.dalpha(t) / (1 - s.alpha(t)))[inner], rtol=1e-13, atol=0)


def test_linear_weight_is_minus_one_over_t_up_to_the_clipping():
    t = grid(lo=0.01)
    w = schedules.Linear().weight(t)
    # exactly: w = -(1 - 2 eps) / ((1 - 2 eps) t + eps), so 1 + w t = eps / ((1 - 2 eps) t + eps)
    torch.testing.assert_close(w, -(1 - 2 * EPS) / ((1 - 2 * EPS) * t + EPS), rtol=1e-13, atol=0)
    gap = 1 + w * t
    assert (gap > 0).all() and (gap <= 1.001 * EPS / t).all()
    torch.testing.assert_close(w[t >= 0.1], -1 / t[t >= 0.1], rtol=2e-3, atol=0)


def test_poly_weight_is_minus_k_over_t_where_t_to_the_k_dominates_eps():
    t = grid(lo=0.01)
    w = schedules.Poly(3).weight(t)
    torch.testing.assert_close(w, -3 * t**2 * (1 - 2 * EPS) / ((1 - 2 * EPS) * t**3 + EPS), rtol=1e-10, atol=0)  # 1 - alpha cancels
    torch.testing.assert_close(w[t >= 0.5], -3 / t[t >= 0.5], rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_have_the_shape_and_dtype_of_t(name, shape, dtype):
    s = ALL[name]
    t = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dtype) * 0.9 + 0.05
    for f in (s.alpha, s.dalpha, s.weight):
        out = f(t)
        assert out.shape == t.shape and out.dtype == dtype


def test_get_by_name():
    assert isinstance(schedules.get("linear"), schedules.Linear)
    assert isinstance(schedules.get("cosine"), schedules.Cosine)
    assert isinstance(schedules.get(" Cosine "), schedules.Cosine)
    p3 = schedules.get("poly3")
    assert isinstance(p3, schedules.Poly) and p3.k == 3.0 and p3.name == "poly3"
    assert schedules.get("poly").k == 2.0
    assert schedules.get("poly1.5").k == 1.5
    t = grid()
    torch.testing.assert_close(p3.alpha(t), ALL["poly3"].alpha(t), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["quadratic", "cos", "", "linear2", "cosine3", "poly-1", "poly0", "poly1.2.3", "poly.", "3poly"])
def test_unknown_names_are_user_errors(name):
    with pytest.raises(UserError):
        schedules.get(name)


@pytest.mark.parametrize("k", [0, -1.5])
def test_poly_exponent_must_be_positive(k):
    with pytest.raises(UserError):
        schedules.Poly(k)


def test_md4_takes_a_name_or_a_schedule():
    assert isinstance(MD4(3, "cosine").schedule, schedules.Cosine)
    p = schedules.Poly(3)
    assert MD4(3, p).schedule is p
    with pytest.raises(UserError):
        MD4(3, "bogus")
