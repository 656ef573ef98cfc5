"""GenMD4 (shared/MATH.md, "GenMD4") against exact answers on enumerable toys.

- w = 1 for every token is MD4 with the linear schedule, draw for draw.
- Exactness: with the exact denoiser of the state-dependent forward process, the expected
  continuous NELBO (mask patterns enumerated, t integrated by Gauss-Legendre) is -log p(x0) up to
  the eps clipping, over [0, 1] and over [t1, 1] plus the exact decoder's term for [0, t1]; the
  library's bound with the cut-off (its own reconstruction term) is above it on average, and the
  Monte-Carlo estimator is unbiased for it.
- The time cut-off: no time below t1 is ever used, and every estimate is below an analytic bound.
- The training loss's gradient for w is unbiased: exactly (all pairs of mask patterns enumerated at
  fixed t) and by Monte Carlo against the quadrature gradient of the expected NELBO.
- The sampler's exact law (propagated over all (V+1)^N states) and chi-square tests of its draws,
  with the alternatives (MD4's reverse step, MD4's denoiser) shown to be rejected.
- Training, save/load and `md4 inspect` end to end.
"""

import itertools
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import md4
from md4 import MD4, GenMD4, checkpoint
from md4.build import Bundle, build, model_metadata
from md4.cli import main
from md4.config import load_config
from md4.errors import UserError
from md4.sampling import time_grid
from md4.toy import ToyDistribution

EPS = 1e-4
Z = 4.5  # z-tests fail beyond this (two-sided 7e-6)
ALPHA = 1e-5  # chi-square tests fail below this p-value
W = [0.5, 1.0, 2.5]  # unequal exponents for V = 3


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
_X, _W = (torch.tensor(v) for v in np.polynomial.legendre.leggauss(20))
MESH = [0.0] + [10.0**k for k in range(-6, 0)] + [i / 10 for i in range(2, 11)]  # graded towards 0


def integrate_t(f, lo=0.0):
    """integral_lo^1 f(t) dt with t = lo + (1 - lo) u^2 (smooths t^(w-1) singularities), composite
    20-point Gauss-Legendre in u over MESH; f maps t [K] float64 to [K] (autograd passes through)."""
    e = torch.tensor(MESH, dtype=torch.float64)
    a, b = e[:-1, None], e[1:, None]
    u = ((b - a) / 2 * _X + (b + a) / 2).flatten()
    weights = ((b - a) / 2 * _W).flatten()
    return (f(lo + (1 - lo) * u**2) * (1 - lo) * 2 * u * weights).sum()


def mask_patterns(N):
    return torch.tensor(list(itertools.product([False, True], repeat=N)))  # [2^N, N]


def expected_given_t(model, den, x0, t):
    """E_{x_t ~ q(.|x0, t)} [masked NELBO terms] for each t [K] by enumerating the 2^N mask patterns:
    [K], differentiable in w (the pattern probabilities and the terms both depend on it)."""
    masks = mask_patterns(len(x0))
    P, K = len(masks), len(t)
    xt = torch.where(masks, model.mask_id, x0).repeat(K, 1)  # [K*P, N], t-major
    tt = t.repeat_interleave(P)
    x0s = x0.expand(K * P, -1)
    a = model.keep_probability(x0s, tt)  # [K*P, N]
    prob = torch.where(xt == model.mask_id, 1 - a, a).prod(-1)
    f = model.masked_terms(den(xt, tt), x0s, xt, tt)
    return (prob * f).view(K, P).sum(-1)


def expected_nelbo(model, den, x0, lo=0.0):
    """The expected continuous-time NELBO of x0 over [lo, 1], without a reconstruction term (a scalar tensor)."""
    return integrate_t(lambda t: expected_given_t(model, den, x0, t), lo)


def bound_with_cutoff(model, den, x0):
    """What model.nelbo estimates: the integral over [t1, 1] plus the model's reconstruction term."""
    return expected_nelbo(model, den, x0, model.t1) + model.reconstruction(x0[None])[0]


def exact_decoder_term(model, toy, x0, t):
    """E_{q(x_t|x0)} [-log p(x0 | x_t)] with the exact posterior of the toy under the model's forward
    process at time t (float): the reconstruction term that makes the bound with a cut-off tight."""
    masks = mask_patterns(toy.length)  # [P, N]
    a = model.schedule.alpha(torch.tensor(t, dtype=torch.float64)).detach().double()[toy.sequences]  # [K, N]
    seen = masks[:, None] | (toy.sequences[None] == x0)  # [P, K, N]: x_t consistent with each sequence
    q = (torch.where(masks[:, None], 1 - a, a) * seen).prod(-1)  # q(x_t | x0') [P, K]
    k = toy.index(x0[None])[0]
    posterior = toy.probs[k] * q[:, k] / (toy.probs * q).sum(-1)  # p(x0 | x_t) [P]
    return (q[:, k] * -posterior.log()).sum()


def exact(toy, model):
    """The exact denoiser E[x_0 | x_t] under the model's state-dependent forward process."""
    return toy.denoiser(alpha=lambda t: model.schedule.alpha(t).detach())


def mc_mean(draw, batches):
    means = torch.stack([draw().double().mean() for _ in range(batches)])
    return means.mean().item(), (means.std() / math.sqrt(batches)).item()


# ----------------------------------------------------------------------------- schedule and basics
def test_schedule_is_a_polynomial_per_token_and_w_one_is_linear():
    model = GenMD4(3, w=W)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    a = model.schedule.alpha(t)
    assert a.shape == (4, 3) and a.dtype == torch.float64
    expect = (1 - 2 * EPS) * (1 - t[:, None] ** torch.tensor(W, dtype=torch.float64)) + EPS
    torch.testing.assert_close(a, expect, rtol=1e-6, atol=0)
    # lambda = -alpha'/(1-alpha) against a central finite difference
    h = 1e-6
    d = (model.schedule.alpha(t[1:3] + h) - model.schedule.alpha(t[1:3] - h)) / (2 * h)
    torch.testing.assert_close(model.schedule.weight(t[1:3]), d / (1 - a[1:3]), rtol=1e-5, atol=0)
    assert model.schedule.alpha(torch.rand(2, 5)).shape == (2, 5, 3)
    lin, gen = md4.schedules.Linear(), GenMD4(4)
    t32 = torch.rand(100)
    assert torch.equal(gen.schedule.alpha(t32), lin.alpha(t32)[:, None].expand(-1, 4))
    assert torch.equal(gen.schedule.weight(t32), lin.weight(t32)[:, None].expand(-1, 4))


def test_forward_sample_keeps_each_token_with_its_own_probability():
    model, n = GenMD4(3, w=W), 60000
    x0 = torch.arange(3).repeat(n // 3)[None]
    t = torch.tensor([0.4])
    xt = model.forward_sample(x0, t, torch.Generator().manual_seed(0))
    a = model.schedule.alpha(t)[0]
    for i in range(3):
        kept = (xt[x0 == i] == i).double()
        assert ((xt[x0 == i] == i) | (xt[x0 == i] == 3)).all()
        p = a[i].item()
        assert abs(kept.mean().item() - p) < Z * math.sqrt(p * (1 - p) / kept.numel())


@pytest.mark.parametrize("timesteps", [0, 7])
def test_all_w_one_is_md4_linear_on_the_same_draws(timesteps):
    V = 5
    gen, base = GenMD4(V, t1=0), MD4(V, "linear")  # MD4 has no time cut-off
    table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(0))
    den = lambda xt, t: table[xt] * (1 + t[:, None, None])
    x0 = torch.randint(0, V, (64, 20), generator=torch.Generator().manual_seed(1))
    a = gen.nelbo(den, x0, timesteps=timesteps, generator=torch.Generator().manual_seed(2))
    b = base.nelbo(den, x0, timesteps=timesteps, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.detach(), b, rtol=2e-6, atol=0)
    t = torch.rand(64)
    assert torch.equal(gen.forward_sample(x0, t, torch.Generator().manual_seed(3)),
                       base.forward_sample(x0, t, torch.Generator().manual_seed(3)))
    assert gen.reconstruction(x0).tolist() == pytest.approx([base.reconstruction(20)] * 64, rel=1e-5)
    # the training loss is the mean of two draws at the same times: equal to MD4's on those draws
    loss = gen.loss(den, x0, generator=torch.Generator().manual_seed(4), t=t)
    twice = base.nelbo(den, torch.cat([x0, x0]), generator=torch.Generator().manual_seed(4), t=torch.cat([t, t]))
    assert loss.item() == pytest.approx(twice.mean().item(), rel=2e-6)


def test_bad_exponents_and_schedules_are_user_errors():
    for w in ([1.0, -1.0, 1.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0]):
        with pytest.raises(UserError, match="exponent"):
            GenMD4(3, w=w)
    with pytest.raises(UserError, match="polynomial"):
        build(load_config("tiny", ["method=genmd4", "schedule=cosine", "model.time_cond=true"]), 27)
    diffusion, _ = build(load_config("tiny", ["diffusion=genmd4", "schedule=poly2", "model.time_cond=true"]), 27)
    assert isinstance(diffusion, GenMD4) and torch.allclose(diffusion.schedule.w, torch.full((27,), 2.0))
    assert load_config("tiny", ["diffusion=genmd4"]).method == "genmd4"


def test_method_and_diffusion_disagreeing_in_a_file_is_a_user_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: md4\ndiffusion: genmd4\n")
    with pytest.raises(UserError, match="disagree"):
        load_config(path)
    path.write_text("diffusion: genmd4\n")
    assert load_config(path).method == "genmd4"


# ----------------------------------------------------------------------------- exactness
TOY = ToyDistribution.random(3, 3, seed=0)


def test_exact_denoiser_depends_on_t_for_unequal_w_and_is_the_posterior():
    model = GenMD4(3, w=W)
    den = exact(TOY, model)
    xt = torch.tensor([[3, 3, 3], [0, 3, 2], [3, 1, 3]])
    t = torch.full((3,), 0.5, dtype=torch.float64)
    mu = torch.softmax(den(xt, t).double(), -1)
    # by hand for the first row and position 0: sum over x0 of p(x0) prod_n (1 - alpha_{t,x0^n})
    a = model.schedule.alpha(t[:1])[0].detach().double()
    post = TOY.probs * (1 - a[TOY.sequences]).prod(-1)
    by_hand = torch.zeros(3, dtype=torch.float64).index_add_(0, TOY.sequences[:, 0], post)
    torch.testing.assert_close(mu[0, 0], by_hand / by_hand.sum(), rtol=0, atol=1e-6)
    assert (mu - torch.softmax(den(xt, t / 5).double(), -1)).abs().max() > 1e-2


def test_expected_continuous_nelbo_with_the_exact_denoiser_is_minus_log_likelihood():
    """The identity that makes GenMD4's objective a likelihood bound: tight for the exact denoiser,
    over [0, 1], and over [t1, 1] with the exact decoder's term for [0, t1] (-log p(x0) = E[-log
    p(x0 | x_t1)] + KL(q(x_t1 | x0) || p(x_t1)), the latter being the integral). The model's own
    reconstruction term guesses tokens independently of the data, so its bound is above the exact one
    on average over the data (Gibbs), by little. A wrong denoiser (MD4's, which ignores w) is a
    different model: averaged over the data its bound is larger than the entropy."""
    model = GenMD4(3, w=W)
    den, md4_den = exact(TOY, model), TOY.denoiser()
    with torch.no_grad():
        right = torch.stack([expected_nelbo(model, den, x0) for x0 in TOY.sequences])
        wrong = torch.stack([expected_nelbo(model, md4_den, x0) for x0 in TOY.sequences])
        above_t1 = torch.stack([expected_nelbo(model, den, x0, model.t1) for x0 in TOY.sequences])
        decoder = torch.stack([exact_decoder_term(model, TOY, x0, model.t1) for x0 in TOY.sequences])
        own = model.reconstruction(TOY.sequences).double()
    nll = -TOY.probs.log()
    assert ((right - nll).abs() < 1e-3 * nll).all(), (right - nll).abs().max()
    assert ((above_t1 + decoder - nll).abs() < 1e-3 * nll).all(), (above_t1 + decoder - nll).abs().max()
    assert ((above_t1 - nll).abs() > 1e-3 * nll).any()  # the term for [0, t1] weighs more than the tolerance
    entropy = (TOY.probs * nll).sum()
    gap = TOY.probs @ (own - decoder)
    assert 0 < gap < 2e-3, gap
    assert (TOY.probs * wrong).sum() > entropy + 0.01


def test_continuous_nelbo_estimator_is_unbiased_for_minus_log_likelihood():
    model = GenMD4(3, w=W)
    den = exact(TOY, model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for x0 in TOY.sequences[[5, 13]]:
            target = bound_with_cutoff(model, den, x0).item()
            mean, se = mc_mean(lambda x0=x0: model.nelbo(den, x0.expand(512, -1), generator=gen), 40)
            assert abs(mean - target) < Z * se, (mean, target, se)
            # with the exact decoder's term instead of the model's, -log p(x0) up to the eps clipping
            exact_bound = mean - model.reconstruction(x0[None]).item() + exact_decoder_term(model, TOY, x0, model.t1)
            assert abs(exact_bound + TOY.log_prob(x0[None]).item()) < Z * se + 3e-3


def expected_discrete(model, den, x0, T):
    """sum_i of the expected T-step terms at t = i/T, enumerating mask patterns (no reconstruction)."""
    masks = mask_patterns(len(x0))
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    xt = torch.where(masks, model.mask_id, x0).repeat(T, 1)
    tt = t.repeat_interleave(len(masks))
    x0s = x0.expand(len(xt), -1)
    a = model.keep_probability(x0s, tt)
    prob = torch.where(xt == model.mask_id, 1 - a, a).prod(-1)
    return (prob * model.masked_terms(den(xt, tt), x0s, xt, tt, timesteps=T)).sum().item() / T


def test_discrete_nelbo_decreases_to_the_continuous_one_and_its_estimator_is_unbiased():
    """As for MD4 (tests/test_diffusion.py): one step reveals every position from its marginal; averaged
    over the data the T-step bound is above the continuous one and decreases along nested grids."""
    model = GenMD4(3, w=W)
    den = exact(TOY, model)
    steps = [1, 2, 8, 64, 256]
    with torch.no_grad():
        cont = torch.tensor([expected_nelbo(model, den, x0).item() for x0 in TOY.sequences], dtype=torch.float64)
        disc = torch.tensor([[expected_discrete(model, den, x0, T) for T in steps] for x0 in TOY.sequences],
                            dtype=torch.float64)
    marginals = torch.einsum("k,knv->nv", TOY.probs, TOY.onehot)
    one_step = -marginals[torch.arange(3), TOY.sequences].log().sum(-1)
    torch.testing.assert_close(disc[:, 0], one_step, rtol=1e-3, atol=0)
    gap = TOY.probs @ disc - TOY.probs @ cont
    assert (gap > 0).all() and (gap[1:] < gap[:-1]).all(), gap
    assert gap[-1] < 0.01 * gap[0]
    gen = torch.Generator().manual_seed(6)
    for i in (5, 13):
        x0 = TOY.sequences[i]
        with torch.no_grad():
            mean, se = mc_mean(lambda x0=x0: model.nelbo(den, x0.expand(512, -1), timesteps=8, generator=gen), 30)
        assert abs(mean - disc[i, 2].item() - model.reconstruction(x0[None], at=0.0).item()) < Z * se


# ----------------------------------------------------------------------------- time cut-off
def test_the_estimator_given_u_is_the_bound_with_the_cutoff_by_hand():
    """nelbo(t=u) calls the denoiser at t = t1 + (1 - t1) u and returns (1 - t1) x the masked terms
    there plus sum_n (1 - alpha_{t1,i}) (-log d_i), d = (1 - alpha_{t1}) / sum_j (1 - alpha_{t1,j})."""
    V, N, t1 = 4, 6, 1e-3
    model = GenMD4(V, w=[0.4, 1.0, 2.0, 3.0]).double()
    assert model.t1 == t1  # the reference code's default
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []

    def den(xt, t):
        calls.append((xt.clone(), t.clone()))
        return logits.expand(len(xt), -1, -1)

    x0 = torch.randint(0, V, (5, N), generator=torch.Generator().manual_seed(1))
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    with torch.no_grad():
        out = model.nelbo(den, x0, t=u, generator=torch.Generator().manual_seed(2))
        (xt, t), = calls
        torch.testing.assert_close(t, t1 + (1 - t1) * u, rtol=1e-12, atol=0)
        mu, lam = torch.softmax(logits, -1), -model.schedule.weight(t)  # [N, V], [B, V]
        masked_sum = torch.zeros(5, dtype=torch.float64)
        for b, n in itertools.product(range(5), range(N)):
            if xt[b, n] == V:
                i = x0[b, n]
                masked_sum[b] += -lam[b, i] * mu[n, i].log() + (mu[n] * (lam[b] - lam[b, i])).sum()
        m = 1 - model.schedule.alpha(torch.tensor(t1, dtype=torch.float64))  # [V]
        recon = (m[x0] * -(m[x0] / m.sum()).log()).sum(-1)
    assert (xt == V).any()
    torch.testing.assert_close(out, (1 - t1) * masked_sum + recon, rtol=1e-9, atol=0)


def test_no_time_below_t1_is_used_and_every_estimate_is_below_the_analytic_bound():
    """Issue 13, item 6. For w <= 0.5 the rate lambda_t = w t^(w-1) / (t^w + eps) (about) is unbounded
    as t -> 0 and the one-sample estimator's second moment diverges. With the cut-off every time the
    denoiser sees (in nelbo and in the loss) is >= t1, and since lambda_{t,j} decreases in t for
    w_j <= 1, every masked position's term is at most max_j lambda_{t1,j} (log V + 1) (for any mu:
    -lambda_i log mu_i <= lambda_i log V with uniform mu, sum_j mu_j (lambda_j - lambda_i) <= max lambda),
    so every estimate is at most (1 - t1) N that + the reconstruction term: also at u = 0, the worst
    draw, where the old code's estimate was about 1e25 for any position masked at t = 0."""
    V, N, B = 2, 256, 256
    model = GenMD4(V, w=[0.4, 1.0])
    times = []

    def uniform(xt, t):
        times.append(t.min().item())
        return torch.zeros(*xt.shape, V)

    x0 = torch.zeros(B, N, dtype=torch.long)  # every token is the one with w = 0.4
    lam_max = -model.schedule.weight(torch.tensor([model.t1, 0.01, 0.5, 1.0])).max(-1).values  # decreasing in t
    assert (lam_max[1:] < lam_max[:-1]).all()
    bound = (1 - model.t1) * N * lam_max[0].item() * (math.log(V) + 1) + model.reconstruction(x0[:1]).item()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        worst = model.nelbo(uniform, x0, t=torch.zeros(B), generator=gen)
        assert torch.isfinite(worst).all() and worst.max() <= bound, (worst.max().item(), bound)
        assert worst.max() > 0.1 * bound / N  # some positions were masked at u = 0: the bound is not vacuous
        small = x0[:, :1]
        for _ in range(200):
            assert model.nelbo(uniform, small, generator=gen).max() <= bound
            model.loss(uniform, small, generator=gen)
    assert min(times) >= model.t1


# ----------------------------------------------------------------------------- gradient for w
def fixed_denoiser(V, N, seed=0):
    """A denoiser that does not depend on w: random logits per state, varying with t."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, (V + 1) ** N, N, V, generator=g, dtype=torch.float64)
    powers = (V + 1) ** torch.arange(N - 1, -1, -1)
    return lambda xt, t: a[(xt * powers).sum(-1)] + t.double()[:, None, None] * b[(xt * powers).sum(-1)]


def test_loss_gradient_for_w_is_exactly_unbiased_given_t(monkeypatch):
    """At fixed t, E over the two independent draws (all 4^N pairs of mask patterns, weighted by their
    probabilities) of d loss / d w equals d/dw E_{x_t}[NELBO] computed by enumeration, to rounding
    (the NELBO with the cut-off: the masked terms at t1 + (1 - t1) t times (1 - t1), plus the
    reconstruction term, whose gradient is exact). Without the REINFORCE term the check fails."""
    V, N = 3, 2
    model, den = GenMD4(V, w=[0.6, 1.0, 1.8]).double(), fixed_denoiser(V, N)  # float64 for a tight check
    x0 = torch.tensor([[2, 0]])
    masks = mask_patterns(N)
    for tv in (0.0, 0.05, 0.4, 0.9):
        t = torch.tensor([tv], dtype=torch.float64)  # the uniform draw, at time model.cutoff_times(t)
        time = model.cutoff_times(t)
        expected = (1 - model.t1) * expected_given_t(model, den, x0[0], time) + model.reconstruction(x0)
        truth, = torch.autograd.grad(expected.sum(), model.schedule.log_w)
        a = model.keep_probability(x0, time).detach()[0]
        prob = torch.where(masks, 1 - a, a).prod(-1)  # [P]
        estimate = torch.zeros(V, dtype=torch.float64)
        no_reinforce = torch.zeros(V, dtype=torch.float64)
        for i, j in itertools.product(range(len(masks)), repeat=2):
            xt = torch.where(torch.stack([masks[i], masks[j]]), model.mask_id, x0[0])
            monkeypatch.setattr(model, "forward_sample", lambda x, tt, g, xt=xt: xt)
            grad, = torch.autograd.grad(model.loss(den, x0, t=t), model.schedule.log_w)
            estimate += prob[i] * prob[j] * grad
            tt = time.expand(2)
            L = (1 - model.t1) * model.masked_terms(den(xt, tt), x0.expand(2, -1), xt, tt).mean()
            L = L + model.reconstruction(x0).sum()
            no_reinforce += prob[i] * prob[j] * torch.autograd.grad(L, model.schedule.log_w)[0]
        torch.testing.assert_close(estimate, truth, rtol=1e-9, atol=1e-12)
        assert (no_reinforce - truth).abs().max() > 1e-3 * truth.abs().max()


def test_loss_gradient_for_w_is_unbiased_by_monte_carlo():
    """Mean of many draws of d loss / d log w (random t, random masks) against the gradient of the
    expected NELBO, t integrated by quadrature with autograd through the integrand."""
    V, N = 3, 2
    # w > 1 here: the REINFORCE draws have lighter tails (for w < 1 the rare masks near t = 0 weigh
    # ~1/t and the mean of a few hundred draws is visibly skewed); the exact test above covers w < 1
    model, den = GenMD4(V, w=[1.3, 1.6, 2.2]), fixed_denoiser(V, N, seed=1)
    x0s = torch.tensor([[2, 0], [1, 1]])
    truth, = torch.autograd.grad(sum(bound_with_cutoff(model, den, x) for x in x0s) / 2, model.schedule.log_w)
    x0 = x0s.repeat(256, 1)  # the batch mean of the loss is the mean over the two sequences
    gen = torch.Generator().manual_seed(7)
    draws = torch.stack([torch.autograd.grad(model.loss(den, x0, generator=gen), model.schedule.log_w)[0]
                         for _ in range(300)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - truth).abs() < Z * se).all(), (mean, truth, se)
    assert (truth.abs() > 10 * se).any()  # the gradient is not lost in the noise: the test has power


# ----------------------------------------------------------------------------- sampler
def all_states(V, N):
    return torch.tensor(list(itertools.product(range(V + 1), repeat=N)))


def tabulated_in_t(toy, den):
    """den evaluated once per step on all (V+1)^N states, then looked up (a sampler calls it with one t)."""
    V, N = toy.vocab_size, toy.length
    states, powers = all_states(V, N), (V + 1) ** torch.arange(N - 1, -1, -1)

    def lookup(xt, t):
        return den(states, t[:1].expand(len(states)))[(xt * powers).sum(-1)]

    return lookup


def chain_law(toy, den, alpha, steps, grid):
    """The exact law over V^N of the ancestral sampler whose masked positions become j with probability
    mu_j (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}) and else stay masked, alpha(t) -> [V] (a
    token-independent alpha gives MD4's step); masks left at t = 0 take the argmax of mu."""
    V, N = toy.vocab_size, toy.length
    states = all_states(V, N)
    masked = states == V
    kernel = torch.zeros(len(states), N, V + 1, dtype=torch.float64)
    kernel[~masked] = torch.nn.functional.one_hot(states[~masked], V + 1).double()
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[-1] = 1.0
    times = time_grid(steps, grid)
    for i in range(steps, 0, -1):
        mu = torch.softmax(den(states, times[i].expand(len(states))).double(), -1)
        a_t, a_s = alpha(times[i]), alpha(times[i - 1])
        p = mu * (a_s - a_t) / (1 - a_t)
        kernel[masked] = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)[masked]
        dist = dist @ kernel[:, torch.arange(N), states].prod(-1)
    mu0 = torch.softmax(den(states, torch.zeros(len(states), dtype=torch.float64)).double(), -1)
    final = torch.where(masked, mu0.argmax(-1), states)
    return torch.zeros(len(toy.sequences), dtype=torch.float64).index_add_(0, toy.index(final), dist)


def chi2_pvalue(counts, probs):
    counts, probs = counts.double(), probs.double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[support]
    assert expected.min() >= 5
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = torch.tensor(support.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


def noncentrality(n, q, p):
    return n * ((q - p) ** 2 / p).sum().item()


def histogram(toy, x):
    return torch.bincount(toy.index(x), minlength=len(toy.sequences))


def genmd4_alpha(model):
    return lambda t: model.schedule.alpha(torch.as_tensor(t, dtype=torch.float64)).detach()


def md4_alpha(t):
    return md4.schedules.Linear().alpha(torch.as_tensor(t, dtype=torch.float64)).expand(3)


@pytest.mark.parametrize("grid, steps", [("uniform", 2), ("cosine", 3)])
def test_few_steps_follow_the_exact_law_of_the_state_dependent_chain(grid, steps):
    model, n = GenMD4(3, w=W), 30000
    den = exact(TOY, model)
    q = chain_law(TOY, den, genmd4_alpha(model), steps, grid)
    md4_step = chain_law(TOY, den, md4_alpha, steps, grid)  # MD4's reverse step, same denoiser
    for alternative in (TOY.probs, md4_step):
        assert noncentrality(n, q, alternative) > 150
    x = model.sample(tabulated_in_t(TOY, den), n, 3, steps=steps, grid=grid, generator=torch.Generator().manual_seed(8))
    assert chi2_pvalue(histogram(TOY, x), q) > ALPHA


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_many_steps_with_the_exact_denoiser_reproduce_the_data(grid):
    model, n, steps = GenMD4(3, w=W), 8000, 128
    den = exact(TOY, model)
    q = chain_law(TOY, den, genmd4_alpha(model), steps, grid)
    assert noncentrality(n, q, TOY.probs) < 1
    x = model.sample(tabulated_in_t(TOY, den), n, 3, steps=steps, grid=grid, generator=torch.Generator().manual_seed(9))
    assert x.shape == (n, 3) and x.dtype == torch.long and (x < 3).all()
    assert chi2_pvalue(histogram(TOY, x), TOY.probs) > ALPHA


@pytest.mark.parametrize("wrong", ["MD4's reverse step", "MD4's denoiser"])
def test_a_wrong_sampler_or_denoiser_fails_the_same_test(wrong):
    model, n, steps = GenMD4(3, w=W), 5000, 64
    den = exact(TOY, model)
    if wrong == "MD4's reverse step":
        sampler_model, den_used, alpha = MD4(3, "linear"), den, md4_alpha
    else:
        sampler_model, den_used, alpha = model, TOY.denoiser(), genmd4_alpha(model)
    assert noncentrality(n, chain_law(TOY, den_used, alpha, steps, "cosine"), TOY.probs) > 150
    x = sampler_model.sample(tabulated_in_t(TOY, den_used), n, 3, steps=steps, grid="cosine",
                             generator=torch.Generator().manual_seed(10))
    assert chi2_pvalue(histogram(TOY, x), TOY.probs) < ALPHA


def test_reverse_step_leaves_unmasked_positions_alone():
    model = GenMD4(3, w=W)
    xt = torch.tensor([[0, 1, 2, 3]] * 500)
    out = model.reverse_step(xt, torch.zeros(500, 4, 3), 0.5, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], xt[:, :3]) and (out[:, 3] < 3).float().mean() > 0.9


# ----------------------------------------------------------------------------- training, files, inspect
@pytest.fixture(scope="module")
def genmd4_run(tmp_path_factory, corpus):
    """A tiny GenMD4 run trained with `--set diffusion=genmd4` and a large schedule learning rate."""
    run = tmp_path_factory.mktemp("runs") / "genmd4"
    argv = ["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={corpus}", "--set",
            "diffusion=genmd4", "--set", "model.time_cond=true", "--set", "train.schedule_lr_scale=20", "--quiet"]
    assert main(argv) == 0
    return run


def test_training_learns_w_and_load_restores_it(genmd4_run):
    cfg = checkpoint.read_json(genmd4_run / "model" / "config.json")["config"]
    assert cfg["method"] == "genmd4"
    saved = load_file(str(genmd4_run / "model" / "model.safetensors"))["method.schedule.log_w"]
    m = md4.load(genmd4_run)
    assert isinstance(m.method, GenMD4)
    assert torch.equal(m.method.schedule.log_w.detach(), saved)
    assert (saved.exp() - 1).abs().max() > 0.05  # trained: w moved away from its initial ones
    x = m.sample(2, steps=8)
    assert x.shape == (2, m.length) and (x < 27).all()


def save_genmd4_model(folder, time_cond=True):
    """A GenMD4 model folder (untrained tiny network) with w = linspace(0.3, 3.0, 27); returns w.
    time_cond=False: as `md4 train` saved GenMD4 models before issue 13."""
    cfg = load_config("tiny", ["method=genmd4", f"model.time_cond={str(time_cond).lower()}"])
    diffusion, net = build(cfg, 27, saved=True)
    w = torch.linspace(0.3, 3.0, 27)
    with torch.no_grad():
        diffusion.schedule.log_w.copy_(w.log())
    checkpoint.save_model(folder, model_metadata(cfg, 27), Bundle(diffusion, net).state_dict())
    return w


def test_resumed_genmd4_run_ends_with_the_same_weights_and_w(genmd4_run, corpus, tmp_path):
    """The schedule's parameter, its optimizer group (lr_scale) and the two-draw loss's noise resume exactly."""
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(genmd4_run / "checkpoints" / "step_00000015", run / "checkpoints" / "step_00000015")
    argv = ["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={corpus}", "--set",
            "diffusion=genmd4", "--set", "model.time_cond=true", "--set", "train.schedule_lr_scale=20", "--quiet"]
    assert main(argv) == 0
    ref, got = (load_file(str(r / "model" / "model.safetensors")) for r in (genmd4_run, run))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_genmd4_needs_a_network_that_sees_t(corpus, tmp_path, capsys):
    """Issue 13, item 7: with unequal w the exact denoiser depends on t (test above), so a new GenMD4
    model with model.time_cond=false (the demo and tiny presets' setting) is refused in one sentence
    before anything is written; with time_cond=true it builds. A GenMD4 model saved without time
    conditioning (before this rule) still loads and samples as it was trained."""
    with pytest.raises(UserError, match="needs a network that sees t.*model.time_cond=true"):
        build(load_config("demo", ["diffusion=genmd4"]), 27)
    assert build(load_config("demo", ["diffusion=genmd4", "model.time_cond=true"]), 27)[1].time_cond
    assert not build(load_config("demo"), 27)[1].time_cond  # MD4 keeps its time-independent network
    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={corpus}",
            "--set", "diffusion=genmd4", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("md4: error: ") and len(err.strip().splitlines()) == 1 and "model.time_cond=true" in err
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    save_genmd4_model(tmp_path / "old", time_cond=False)
    old = md4.load(tmp_path / "old")
    assert isinstance(old.method, GenMD4) and not old.net.time_cond
    assert old.sample(1, steps=4).shape == (1, old.length)


def test_save_load_round_trip_of_w(tmp_path):
    w = save_genmd4_model(tmp_path / "m")
    m = md4.load(tmp_path / "m")
    torch.testing.assert_close(m.method.schedule.w.detach(), w, rtol=1e-6, atol=0)
    m.method.schedule.log_w.data.zero_()  # and the loaded exponents are the saved ones, not defaults
    assert not torch.equal(md4.load(tmp_path / "m").method.schedule.w, m.method.schedule.w)


def test_inspect_lists_the_largest_w_first_and_writes_a_png(tmp_path, capsys):
    save_genmd4_model(tmp_path / "m")  # w = linspace(0.3, 3): "z" (id 26) largest, space smallest
    png = tmp_path / "w.png"
    assert main(["inspect", str(tmp_path / "m"), "--out", str(png), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "unmask first (largest w): z 3.000, y 2.896, x 2.792" in out
    assert "unmask last (smallest w): ␣ 0.300, a 0.404, b 0.508" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_a_trained_run(genmd4_run, capsys):
    assert main(["inspect", str(genmd4_run), "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    ws = [e["w"] for e in r["order"]]
    assert len(ws) == 27 and ws == sorted(ws, reverse=True) and "␣" in {e["token"] for e in r["order"]}
    assert (genmd4_run / "genmd4_exponents.png").exists()


def test_inspect_of_an_md4_model_or_bad_options_is_a_user_error(trained_run, genmd4_run, capsys):
    for argv in (["inspect", str(trained_run)], ["inspect", str(genmd4_run), "--top", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("md4: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
