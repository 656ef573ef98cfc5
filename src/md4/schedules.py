"""Masking schedules alpha_t: the expected fraction of unmasked tokens at time t in [0, 1].

Each schedule is a pair of pure functions of t, the raw form alpha~_t and its derivative. As in
the reference implementation, every schedule is clipped away from 0 and 1:

    alpha_t  = (1 - 2 eps) alpha~_t + eps          eps = 1e-4
    alpha'_t = (1 - 2 eps) alpha~'_t

and the MD4 loss weight is w(t) = alpha'_t / (1 - alpha_t) <= 0 (shared/MATH.md, "MD4").
"""

from __future__ import annotations

import math
import re

import torch

from md4.errors import UserError

EPS = 1e-4


class Schedule:
    """Base class: subclasses define `alpha_raw` (alpha~_t) and `dalpha_raw` (d alpha~_t / dt)."""

    name: str = ""
    takes_exponent: bool = False  # a family named NAME or NAMEK, built as cls(K) (e.g. "poly3")

    def __init__(self, eps: float = EPS):
        self.eps = eps

    def alpha_raw(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha_raw(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t, same shape as t."""
        return (1 - 2 * self.eps) * self.alpha_raw(t) + self.eps

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha_t / dt, same shape as t."""
        return (1 - 2 * self.eps) * self.dalpha_raw(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = alpha'_t / (1 - alpha_t) <= 0, the continuous-time loss weight."""
        return self.dalpha(t) / (1 - self.alpha(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Linear(Schedule):
    """alpha~_t = 1 - t; the loss weight is 1/t."""

    name = "linear"

    def alpha_raw(self, t):
        return 1 - t

    def dalpha_raw(self, t):
        return -torch.ones_like(t)


class Cosine(Schedule):
    """alpha~_t = 1 - cos(pi/2 (1 - t))."""

    name = "cosine"

    def alpha_raw(self, t):
        return 1 - torch.cos(math.pi / 2 * (1 - t))

    def dalpha_raw(self, t):
        return -(math.pi / 2) * torch.sin(math.pi / 2 * (1 - t))


class Poly(Schedule):
    """alpha~_t = 1 - t^k (k = 1 is the linear schedule)."""

    takes_exponent = True

    def __init__(self, k: float = 2.0, eps: float = EPS):
        super().__init__(eps)
        if not k > 0:
            raise UserError(f"The exponent of a polynomial schedule must be positive, got {k}.")
        self.k = float(k)
        self.name = f"poly{k:g}"

    def alpha_raw(self, t):
        return 1 - t**self.k

    def dalpha_raw(self, t):
        # for k < 1 the slope is infinite at t = 0; keep it finite there so that 0 masked tokens
        # times the weight is 0, not NaN (antithetic times can round to exactly 0)
        return -self.k * t.clamp(min=torch.finfo(t.dtype).tiny) ** (self.k - 1)


REGISTRY: dict[str, type[Schedule]] = {"linear": Linear, "cosine": Cosine, "poly": Poly}


def names() -> list[str]:
    """The names `get` takes, one per registry entry: "polyK" for a family with an exponent."""
    return [name + ("K" if cls.takes_exponent else "") for name, cls in REGISTRY.items()]


def get(name: str) -> Schedule:
    """A schedule by name: "linear", "cosine", "poly" (k=2) or "polyK" such as "poly3", "poly1.5"."""
    m = re.fullmatch(r"([a-z]+)([0-9.]*)", str(name).strip().lower())
    cls = REGISTRY.get(m.group(1)) if m else None
    exponent = m.group(2) if m else ""
    try:
        if cls is not None and not (exponent and not cls.takes_exponent):
            return cls(float(exponent)) if exponent else cls()
    except ValueError:  # "poly1.2.3"
        pass
    raise UserError(f"Unknown masking schedule {name!r}; choose {', '.join(names())} (e.g. poly3).")
