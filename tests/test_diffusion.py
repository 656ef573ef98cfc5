"""MD4's forward process and negative ELBO against exact answers (shared/MATH.md, "MD4").

The exact answers come from enumerable toy distributions: with the exact denoiser E[x_0 | x_t],
the expected NELBO given that the unmasked fraction is a is the polynomial

    g(a) = sum over mask patterns M of a^(N-|M|) (1-a)^|M| c_M,   c_M = sum_{n in M} -log p(x_0^n | x_0 off M)

so the expected continuous NELBO is integral_0^1 -w(t) g(alpha_t) dt + N eps log V (computed by
quadrature, in float64, from the probability table alone), and the discrete one with T steps is
sum_i (alpha_s - alpha_t) / (1 - alpha_t) g(alpha_t) + N eps log V. Monte Carlo estimates are
compared with these at 4.5 standard errors estimated from the draws (false alarm below 1e-4).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from md4 import MD4, schedules
from md4.diffusion import antithetic_times, masked_cross_entropy
from md4.toy import ToyDistribution

EPS = 1e-4
Z = 4.5  # two-sided normal tail 7e-6; with 63 degrees of freedom (Student) about 3e-5
TOYS = {"V3N3": (3, 3, 0), "V2N4": (2, 4, 1), "V4N2": (4, 2, 2)}


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(name):
    V, N, seed = TOYS[name]
    return ToyDistribution.random(V, N, seed=seed)


# ----------------------------------------------------------------------------- exact answers
def posterior_marginals(toy, states):
    """E[x_0 | x_t = state] per position from the probability table alone: states [S, N] -> [S, N, V].

    p(x_0^n = v | x_t) = mass of the sequences agreeing with the state off its masks and with v at n,
    over the mass of all sequences agreeing with it."""
    V = toy.vocab_size
    agree = ((states[:, None, :] == V) | (states[:, None, :] == toy.sequences[None])).all(-1)  # [S, K]
    w = toy.probs[None] * agree
    return torch.einsum("sk,knv->snv", w / w.sum(-1, keepdim=True), toy.onehot)


def nll_table(toy, x0):
    """All mask patterns M of x0 [N] and c_M = sum_{n in M} -log p(x_0^n | x_0 off M): [2^N, N] bool, [2^N]."""
    N, V = toy.length, toy.vocab_size
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))
    mu = posterior_marginals(toy, torch.where(masks, V, x0))
    nll = -mu.gather(-1, x0.expand(len(masks), N)[..., None]).squeeze(-1).log()
    return masks, (nll * masks).sum(-1)


def g(table, a):
    """E[sum over masked n of -log mu^n_{x_0^n}] when each position is unmasked with probability a."""
    masks, c = table
    k, N = masks.sum(-1), masks.shape[1]
    a = torch.as_tensor(a, dtype=torch.float64)[..., None]
    return (a ** (N - k) * (1 - a) ** k * c).sum(-1)


def h(table, a):
    """g(a) / (1 - a), a polynomial (g vanishes at a = 1)."""
    masks, c = table
    k, N = masks.sum(-1), masks.shape[1]
    a = torch.as_tensor(a, dtype=torch.float64)[..., None]
    return torch.where(k > 0, a ** (N - k) * (1 - a) ** (k - 1).clamp(min=0) * c, 0).sum(-1)


_X, _W = (torch.tensor(v) for v in np.polynomial.legendre.leggauss(20))
MESH = [0.0] + [10.0**k for k in range(-6, 0)] + [i / 10 for i in range(2, 11)]  # graded towards 0


def integrate(f, edges):
    """Composite 20-point Gauss-Legendre rule for a vectorised float64 f over consecutive `edges`."""
    e = torch.tensor(edges, dtype=torch.float64)
    lo, hi = e[:-1, None], e[1:, None]
    return (f((hi - lo) / 2 * _X + (hi + lo) / 2) * (hi - lo) / 2 * _W).sum().item()


def expected_continuous(schedule, table):
    """integral_0^1 -w(t) g(alpha_t) dt with t = u^2 (smooth in u even for poly0.5), without reconstruction."""
    return integrate(lambda u: -schedule.weight(u**2) * g(table, schedule.alpha(u**2)) * 2 * u, MESH)


def expected_discrete(schedule, table, T):
    """sum_{i=1..T} (alpha_s - alpha_t) / (1 - alpha_t) g(alpha_t), t = i/T, s = (i-1)/T."""
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    a_t, a_s = schedule.alpha(t), schedule.alpha(t - 1 / T)
    return ((a_s - a_t) / (1 - a_t) * g(table, a_t)).sum().item()


def reconstruction(V, N):
    return N * EPS * math.log(V)


def pick_x0(toy):
    """Two test sequences: the mode and the one of median probability."""
    order = toy.probs.argsort()
    return [toy.sequences[order[-1]], toy.sequences[order[len(order) // 2]]]


def mc_mean(draw, batches):
    """Mean of `batches` i.i.d. batch means from draw() and its standard error from the draws."""
    means = torch.stack([draw().double().mean() for _ in range(batches)])
    return means.mean().item(), (means.std() / math.sqrt(batches)).item()


# ----------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_sample_keeps_each_token_with_probability_alpha(schedule):
    V, rows, N = 5, 200, 200
    model = MD4(V, schedule)
    gen = torch.Generator().manual_seed(1)
    times = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.8, 0.97, 1.0])
    t = times.repeat_interleave(rows)  # one time per row, `rows` rows per time
    x0 = torch.randint(0, V, (len(t), N), generator=gen)
    xt = model.forward_sample(x0, t, generator=gen)
    assert xt.shape == x0.shape and xt.dtype == torch.long
    masked = xt == V
    assert (xt[~masked] == x0[~masked]).all()  # an unmasked token keeps its value; a mask is V
    kept = (~masked).view(len(times), -1).sum(-1).double()
    n = rows * N
    alpha = model.schedule.alpha(times.double())
    z = (kept - n * alpha) / (n * alpha * (1 - alpha)).sqrt()
    assert (z.abs() < Z).all(), z


def test_forward_sample_masks_positions_independently():
    """Masks per row ~ Binomial(N, 1 - alpha_t): its variance, not only its mean."""
    V, N, B = 3, 64, 20000
    model = MD4(V, "linear")
    gen = torch.Generator().manual_seed(2)
    xt = model.forward_sample(torch.zeros(B, N, dtype=torch.long), torch.full((B,), 0.5), generator=gen)
    counts = (xt == V).sum(-1).double()
    p = 1 - model.schedule.alpha(torch.tensor(0.5, dtype=torch.float64)).item()
    var = N * p * (1 - p)
    # variance of the sample variance of a binomial: (mu4 - var^2 (B-3)/(B-1)) / B
    mu4 = N * p * (1 - p) * (1 + 3 * (N - 2) * p * (1 - p))
    assert abs(counts.var().item() - var) < Z * math.sqrt((mu4 - var**2) / B)


# ----------------------------------------------------------------------------- exact denoiser
@pytest.mark.parametrize("name", TOYS)
def test_toy_denoiser_is_the_posterior_mean_and_ignores_t(name):
    d = toy(name)
    V, N = d.vocab_size, d.length
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=N)))
    den = d.denoiser()
    logits = den(states, torch.full((len(states),), 0.1))
    torch.testing.assert_close(torch.softmax(logits.double(), -1), posterior_marginals(d, states), rtol=0, atol=1e-6)
    torch.testing.assert_close(den(states, torch.full((len(states),), 0.9)), logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the identity
@pytest.mark.parametrize("name", TOYS)
def test_expected_continuous_nelbo_is_minus_log_likelihood(name):
    """integral_0^1 g(a)/(1-a) da = -log p(x0) exactly; any schedule turns it, by a = alpha_t, into
    integral -w(t) g(alpha_t) dt over [alpha_1, alpha_0] = [eps, 1 - eps]: checks w = alpha'/(1-alpha)
    and the clipping to 1e-9, and that the clipping costs at most eps (h(0) + h(1)) < 1e-3 -log p."""
    d = toy(name)
    for x0, logp in zip(d.sequences, d.probs.log()):
        table = nll_table(d, x0)
        assert integrate(lambda a: h(table, a), [0.0, 1.0]) == pytest.approx(-logp.item(), rel=1e-12)
        clipped = integrate(lambda a: h(table, a), [EPS, 1 - EPS])
        bound = EPS * (h(table, 0.0) + h(table, 1.0)).item()
        for s in ["linear", "cosine", "poly3", "poly0.5"]:
            exact = expected_continuous(schedules.get(s), table)
            assert exact == pytest.approx(clipped, rel=1e-9), s
            assert abs(exact + logp.item()) <= 1.001 * bound
            assert abs(exact + logp.item()) < 1e-3 * -logp.item()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "poly3"])
@pytest.mark.parametrize("name", TOYS)
def test_continuous_nelbo_estimator_is_unbiased_for_minus_log_likelihood(name, schedule):
    d = toy(name)
    model, den = MD4(d.vocab_size, schedule), d.denoiser()
    gen = torch.Generator().manual_seed(3)
    for x0 in pick_x0(d):
        exact = expected_continuous(model.schedule, nll_table(d, x0)) + reconstruction(d.vocab_size, d.length)
        batch = x0.expand(1024, -1)
        mean, se = mc_mean(lambda: model.nelbo(den, batch, generator=gen), 64)
        assert abs(mean - exact) < Z * se, (mean, exact, se)
        assert se < 0.01 * exact  # the test has power: 4.5 SE is under 5% of -log p
        assert exact == pytest.approx(-d.log_prob(x0[None]).item(), abs=1e-3)


# ----------------------------------------------------------------------------- discrete time
@pytest.mark.parametrize("schedule", ["linear", "cosine", "poly3"])
@pytest.mark.parametrize("name", TOYS)
def test_exact_discrete_nelbo_decreases_to_the_continuous_one(name, schedule):
    d = toy(name)
    s = schedules.get(schedule)
    steps = [1, 2, 4, 16, 64, 256]
    cont, disc = [], []
    for x0 in d.sequences:
        table = nll_table(d, x0)
        cont.append(expected_continuous(s, table))
        disc.append([expected_discrete(s, table, T) for T in steps])
        # one step reveals every position at once from its marginal: -sum_n log p(x0^n), up to eps
        one_step = -posterior_marginals(d, torch.full((1, d.length), d.vocab_size))[0].gather(-1, x0[:, None]).log().sum()
        assert disc[-1][0] == pytest.approx(one_step.item(), rel=1e-3)
    cont, disc = torch.tensor(cont, dtype=torch.float64), torch.tensor(disc, dtype=torch.float64)
    # Per sequence the error is first order in 1/T: (E_256 - E_inf) / (E_64 - E_inf) ~ 1/4.
    ratio = (disc[:, 5] - cont) / (disc[:, 4] - cont)
    assert ((ratio > 0.2) & (ratio < 0.3)).all(), ratio
    # Averaged over the data (a bound that holds in expectation over x0 ~ p, not for each x0:
    # some sequences have E_1 < E_inf), the discrete NELBO is above the continuous one and
    # decreases along nested grids, because H(x^n | a random context) decreases with the context.
    gap = d.probs @ disc - d.probs @ cont
    assert (gap > 0).all() and (gap[1:] < gap[:-1]).all(), gap
    assert gap[-1] < 0.01 * gap[0]


@pytest.mark.parametrize("T, schedule", [(1, "linear"), (4, "cosine"), (4, "poly3"), (32, "linear")])
def test_discrete_nelbo_estimator_is_unbiased(T, schedule):
    d = toy("V3N3")
    model, den = MD4(d.vocab_size, schedule), d.denoiser()
    gen = torch.Generator().manual_seed(4)
    for x0 in pick_x0(d):
        exact = expected_discrete(model.schedule, nll_table(d, x0), T) + reconstruction(d.vocab_size, d.length)
        batch = x0.expand(1024, -1)
        mean, se = mc_mean(lambda: model.nelbo(den, batch, timesteps=T, generator=gen), 64)
        assert abs(mean - exact) < Z * se, (mean, exact, se)
        assert se < 0.01 * exact


# ----------------------------------------------------------------------------- hand computations
def fixed_logits(V, N, seed=0):
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed))


def test_reconstruction_term_is_N_eps_log_V():
    for V, N in [(3, 7), (50257, 1024)]:
        assert MD4(V).reconstruction(N) == pytest.approx(reconstruction(V, N), rel=1e-3)


def test_nelbo_with_nothing_masked_is_the_reconstruction_term(monkeypatch):
    V, N = 5, 6
    model = MD4(V, "cosine")
    x0 = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model, "forward_sample", lambda x0, t, generator=None: x0.clone())
    out = model.nelbo(lambda xt, t: fixed_logits(V, N).expand(len(xt), -1, -1), x0)
    torch.testing.assert_close(out, torch.full((3,), reconstruction(V, N)), rtol=1e-3, atol=0)


class Recorder:
    """A plain-function denoiser with fixed logits that records what it was given."""

    def __init__(self, V, N):
        self.logits, self.calls = fixed_logits(V, N), []

    def __call__(self, xt, t):
        self.calls.append((xt.clone(), t.clone()))
        return self.logits.expand(len(xt), -1, -1)


def hand_ce(logits, x0, masked):
    """sum over masked n of -log softmax(logits[n])[x0[n]], one row at a time, in float64."""
    out = []
    for row, m in zip(x0, masked):
        out.append(sum(-math.log(torch.softmax(logits[n].double(), -1)[row[n]].item()) for n in range(len(row)) if m[n]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_nelbo_uses_the_given_t_with_a_fixed_mask(monkeypatch, schedule):
    V, N = 3, 4
    model, den = MD4(V, schedule), Recorder(V, N)
    x0 = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    masked = torch.tensor([[True, False, True, False], [False, True, True, True]])
    seen_t = []

    def fixed_mask(x0, t, generator=None):
        seen_t.append(t.clone())
        return torch.where(masked, V, x0)

    monkeypatch.setattr(model, "forward_sample", fixed_mask)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    out = model.nelbo(den, x0, t=t)
    assert torch.equal(seen_t[0], t) and torch.equal(den.calls[0][1], t)
    assert torch.equal(den.calls[0][0], torch.where(masked, V, x0))
    tt = t.double()
    if schedule == "linear":  # -w(t) = (1 - 2 eps) / (1 - alpha_t), alpha_t = (1 - 2 eps)(1 - t) + eps
        minus_w = (1 - 2 * EPS) / (1 - ((1 - 2 * EPS) * (1 - tt) + EPS))
    else:
        alpha = (1 - 2 * EPS) * (1 - torch.cos(math.pi / 2 * (1 - tt))) + EPS
        minus_w = (1 - 2 * EPS) * math.pi / 2 * torch.sin(math.pi / 2 * (1 - tt)) / (1 - alpha)
    expected = minus_w * hand_ce(den.logits, x0, masked) + reconstruction(V, N)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def test_discrete_nelbo_rounds_the_given_t_up_to_the_grid(monkeypatch):
    V, N, T = 3, 4, 4
    model, den = MD4(V, "linear"), Recorder(V, N)
    x0 = torch.tensor([[0, 1, 2, 1]] * 5)
    masked = torch.tensor([[True, False, True, True]] * 5)
    monkeypatch.setattr(model, "forward_sample", lambda x0, t, generator=None: torch.where(masked, V, x0))
    t = torch.tensor([0.0, 0.2, 0.25, 0.3, 0.99])  # bins [(i-1)/T, i/T) -> i/T
    grid_t = torch.tensor([0.25, 0.25, 0.5, 0.5, 1.0], dtype=torch.float64)
    out = model.nelbo(den, x0, timesteps=T, t=t)
    torch.testing.assert_close(den.calls[0][1].double(), grid_t, rtol=0, atol=1e-7)
    alpha = lambda u: (1 - 2 * EPS) * (1 - u) + EPS  # noqa: E731
    weight = T * (alpha(grid_t - 1 / T) - alpha(grid_t)) / (1 - alpha(grid_t))
    expected = weight * hand_ce(den.logits, x0, masked) + reconstruction(V, N)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def test_nelbo_scores_the_masks_the_denoiser_saw():
    """Without patching: cross-entropy exactly on the positions masked in the x_t given to the denoiser."""
    V, N, B = 4, 8, 256
    model, den = MD4(V, "linear"), Recorder(V, N)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, V, (B, N), generator=gen)
    t = torch.rand(B, generator=gen)
    out = model.nelbo(den, x0, t=t, generator=gen)
    xt, seen = den.calls[0]
    assert torch.equal(seen, t)
    masked = xt == V
    assert (xt[~masked] == x0[~masked]).all() and 0 < masked.sum() < B * N
    expected = -model.schedule.weight(t.double()) * hand_ce(den.logits, x0, masked) + reconstruction(V, N)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_cross_entropy(den.logits.expand(B, -1, -1), x0, xt, V).double(),
                               hand_ce(den.logits, x0, masked), rtol=1e-5, atol=1e-6)


def test_loss_is_the_batch_mean_of_the_nelbo():
    d = toy("V3N3")
    model = MD4(3, "linear")
    x0 = d.sample(64, generator=torch.Generator().manual_seed(0))
    a = model.loss(d.denoiser(), x0, generator=torch.Generator().manual_seed(6))
    b = model.nelbo(d.denoiser(), x0, generator=torch.Generator().manual_seed(6)).mean()
    assert a.shape == () and torch.equal(a, b)


# ----------------------------------------------------------------------------- antithetic times
@pytest.mark.parametrize("B", [1, 2, 7, 64, 1000])
def test_antithetic_times_are_equally_spaced_mod_one(B):
    gen = torch.Generator().manual_seed(B)
    for _ in range(20):
        t = antithetic_times(B, gen)
        assert t.shape == (B,) and ((t >= 0) & (t < 1)).all()
        # t_b = (t_0 + b/B) mod 1, so the sorted times, closed round the circle, are 1/B apart
        torch.testing.assert_close(t, torch.remainder(t[0] + torch.arange(B) / B, 1.0), rtol=0, atol=1e-6)
        s = t.sort().values
        gaps = torch.cat([s.diff(), (s[:1] + 1 - s[-1:])])
        torch.testing.assert_close(gaps, torch.full((B,), 1 / B), rtol=0, atol=1e-6)


def test_antithetic_offset_is_uniform_on_zero_one():
    gen = torch.Generator().manual_seed(7)
    u = torch.stack([antithetic_times(8, gen)[0] for _ in range(4000)]).double()
    assert abs(u.mean().item() - 0.5) < Z * math.sqrt(1 / 12 / len(u))
    assert abs((u < 0.125).double().mean().item() - 0.125) < Z * math.sqrt(0.125 * 0.875 / len(u))
    assert abs(u.var().item() - 1 / 12) < Z * math.sqrt((1 / 80 - 1 / 144) / len(u))


def test_antithetic_times_reduce_the_variance_of_the_batch_mean():
    """With poly3 and N = 64 tokens, E[L | t] varies a lot with t while the masking noise averages
    over positions: stratified times remove most of the first part (exact ratio about 0.07)."""
    V, N, B, R = 5, 64, 32, 400
    model = MD4(V, "poly3")
    logits = fixed_logits(V, N, seed=8)
    den = lambda xt, t: logits.expand(len(xt), -1, -1)  # noqa: E731  (any denoiser will do)
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randint(0, V, (B, N), generator=gen)
    anti = torch.stack([model.nelbo(den, x0, generator=gen).mean() for _ in range(R)]).double()
    indep = torch.stack([model.nelbo(den, x0, generator=gen, t=torch.rand(B, generator=gen)).mean() for _ in range(R)]).double()
    assert abs(anti.mean() - indep.mean()) < Z * math.sqrt((anti.var() + indep.var()).item() / R)
    assert anti.var() < 0.3 * indep.var(), (anti.var(), indep.var())
