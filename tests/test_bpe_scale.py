"""What the GPT-2-scale path (V = 50257, length 1024) needs beyond correctness: samplers invert the
CDF only where a position is revealed (a float64 softmax over V at every position of every step
cost more than the network at length 1024; issue 14, item 3), with the same tokens as before."""

import torch

from md4 import MD4
from md4.categorical import categorical
from md4.sampling import sample


class CountingSoftmax:
    """Replaces torch.softmax; records the rows of each call (here only the draws call it: MD4's
    reveal and the lambda denoisers below do not)."""

    def __init__(self, monkeypatch):
        self.rows, self.real = [], torch.softmax
        monkeypatch.setattr(torch, "softmax", self)

    def __call__(self, x, dim=-1, **kw):
        self.rows.append(x.shape[:-1].numel())
        return self.real(x, dim=dim, **kw)


def test_reverse_step_draws_tokens_only_at_positions_that_unmask(monkeypatch):
    model, gen, V = MD4(7, "linear"), torch.Generator().manual_seed(0), 7
    xt = torch.full((3, 40), V)
    xt[:, :10] = 2  # already revealed: stay
    logits = torch.randn(3, 40, V, generator=gen)
    draws = CountingSoftmax(monkeypatch)
    xs = model.reverse_step(xt, logits, 0.6, 0.5, torch.Generator().manual_seed(1))
    revealed = ((xt == V) & (xs != V)).sum().item()
    assert 0 < revealed < 90 and draws.rows == [revealed]
    # the same tokens as a draw at every position with the same generator (seeds keep their samples)
    g = torch.Generator().manual_seed(1)
    unmask = (xt == V) & (torch.rand(xt.shape, generator=g, dtype=torch.float64) < 1 - 0.5 / 0.6)
    assert torch.equal(xs, torch.where(unmask, categorical(logits, g), xt))


def test_jump_draws_each_position_once_when_it_is_revealed(monkeypatch):
    model, B, N = MD4(5, "linear"), 4, 30
    draws = CountingSoftmax(monkeypatch)
    x = sample(model, lambda xt, t: torch.zeros(*xt.shape, 5), B, N, steps=50,
               generator=torch.Generator().manual_seed(1), sampler="jump")
    assert (x < 5).all()
    # every masked position is revealed exactly once (the linear schedule leaves none masked at t = 0)
    assert sum(draws.rows) == B * N and len(draws.rows) > 1


def test_remdm_draws_tokens_only_where_it_reveals(monkeypatch):
    """ReMDM's step inverts the CDF only at the positions it reveals, like MD4.reverse_step."""
    model, B, N = MD4(5, "linear"), 4, 30
    draws = CountingSoftmax(monkeypatch)
    x = sample(model, lambda xt, t: torch.zeros(*xt.shape, 5), B, N, steps=20,
               generator=torch.Generator().manual_seed(1), sampler="remdm", options={"remask": "cap", "eta": 0.0})
    assert (x < 5).all()
    # eta = 0: no remasking, so every position is revealed exactly once over the walk
    assert sum(draws.rows) == B * N and len(draws.rows) > 1
