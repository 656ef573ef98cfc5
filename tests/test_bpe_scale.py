"""What the GPT-2-scale path (V = 50257, length 1024) needs beyond correctness: samplers draw
tokens only where a position is revealed (a float64 draw over V at every position of every step
cost several times the network at length 1024; issue 14, item 3)."""

import torch

import md4.diffusion
import md4.reveal
from md4 import MD4
from md4.sampling import sample


class CountingDraws:
    """Wraps md4.categorical.categorical where a module imported it; records rows drawn per call."""

    def __init__(self, monkeypatch, module):
        self.rows, self.real = [], module.categorical
        monkeypatch.setattr(module, "categorical", self)

    def __call__(self, logits, generator=None):
        self.rows.append(logits.shape[:-1].numel())
        return self.real(logits, generator)


def test_reverse_step_draws_tokens_only_at_positions_that_unmask(monkeypatch):
    draws = CountingDraws(monkeypatch, md4.diffusion)
    model, gen, V = MD4(7, "linear"), torch.Generator().manual_seed(0), 7
    xt = torch.full((3, 40), V)
    xt[:, :10] = 2  # already revealed: stay
    xs = model.reverse_step(xt, torch.randn(3, 40, V, generator=gen), 0.6, 0.5, gen)
    revealed = ((xt == V) & (xs != V)).sum().item()
    assert 0 < revealed < 90 and draws.rows == [revealed]
    assert (xs[:, :10] == 2).all() and (xs < V + 1).all()


def test_jump_draws_each_position_once_when_it_is_revealed(monkeypatch):
    draws = CountingDraws(monkeypatch, md4.reveal)
    model, B, N = MD4(5, "linear"), 4, 30
    x = sample(model, lambda xt, t: torch.zeros(*xt.shape, 5), B, N, steps=50,
               generator=torch.Generator().manual_seed(1), sampler="jump")
    assert (x < 5).all()
    # every masked position is revealed exactly once (the never-revealed ones, probability
    # S_0 = 0 for the linear schedule, would be filled by argmax outside jump)
    assert sum(draws.rows) == B * N and len(draws.rows) > 1

