"""The baselines against exact answers: the autoregressive model's likelihood by the chain rule
computed one prefix at a time, and SEDD's score entropy against its definition on an enumerable
toy (all mask patterns, all neighbouring states)."""

import itertools
import math

import numpy as np
import pytest
import torch

from md4 import MD4
from md4.ar import AR
from md4.errors import UserError
from md4.nn import Transformer
from md4.sedd import SEDD, LogLinear, score_entropy
from md4.toy import ToyDistribution

pytestmark = pytest.mark.usefixtures("one_thread")


def causal_net(V, seed=0, time_cond=False):
    torch.manual_seed(seed)
    net = Transformer(V, dim=16, layers=2, heads=2, mlp_ratio=2.0, time_cond=time_cond, cond_dim=8, max_len=16,
                      causal=True)
    with torch.no_grad():  # larger weights than the init, so the conditionals are far from uniform,
        for p in net.parameters():  # and open adaLN-zero gates, so that attention matters
            p.mul_(4.0) if p.abs().sum() > 0 else p.normal_(0, 0.3)
    return net.eval()


# ----------------------------------------------------------------------------- AR
@pytest.mark.parametrize("time_cond", [False, True])
def test_ar_nll_is_the_chain_rule_over_prefixes(time_cond):
    """nelbo (one call on the shifted sequence) equals sum_n -log p(x^n | x^<n), where each
    conditional comes from a separate call on the prefix [BOS, x^0..x^{n-1}] alone: this also
    checks that the causal mask hides the future."""
    V, N = 5, 7
    net, ar = causal_net(V, time_cond=time_cond), AR(V)
    x0 = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ar.nelbo(net, x0, t=torch.rand(3))
        want = torch.zeros(3, dtype=torch.float64)
        for n in range(N):
            prefix = torch.cat([torch.full((3, 1), V), x0[:, :n]], dim=1)
            logp = torch.log_softmax(net(prefix, torch.zeros(3))[:, -1].double(), -1)
            want -= logp.gather(-1, x0[:, n : n + 1]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.min() > 0


def test_ar_probabilities_sum_to_one_and_sampler_draws_from_them():
    """exp(-nelbo) over all V^N sequences sums to 1 (a bidirectional network would not), and the
    left-to-right sampler's frequencies match those probabilities (chi-square)."""
    V, N = 2, 4
    net, ar = causal_net(V, seed=3), AR(V)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        p = torch.exp(-ar.nelbo(net, seqs).double())
    assert abs(p.sum().item() - 1) < 1e-5
    bidirectional = Transformer(V, dim=16, layers=2, heads=2, mlp_ratio=2.0, time_cond=False, max_len=16)
    bidirectional.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert abs(torch.exp(-ar.nelbo(bidirectional, seqs).double()).sum().item() - 1) > 1e-3
    n = 4000
    x = ar.sample(net, n, N, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, N) and x.dtype == torch.long
    counts = np.bincount((x * 2 ** torch.arange(N - 1, -1, -1)).sum(-1).numpy(), minlength=V**N)
    expected = n * p.numpy()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45, chi2  # 15 degrees of freedom: P(chi2 > 45) < 1e-4


# ----------------------------------------------------------------------------- SEDD
def direct_score_entropy(logit_fn, x0, t, eps=1e-3):
    """E_{x_t ~ q(.|x_0)} of the denoising score entropy at time t, from its definition:

        sum over neighbours y of x_t (one position changed) of Q_t(x_t, y) [s(x_t)_y - r log s(x_t)_y + K(r)],
        r = p_t|0(y | x_0) / p_t|0(x_t | x_0),  K(r) = r log r - r,

    where Q_t(x_t, y) is the rate of jumping from y to x_t (sigma(t) when x_t has the mask where
    y has a token, else 0) and s(x_t)_y = exp(logit_y) / (exp(sigma_bar) - 1). Sequence
    probabilities are products over positions; every mask pattern is enumerated."""
    V, N = logit_fn.V, len(x0)
    sbar = -math.log(1 - (1 - eps) * t)
    sigma = (1 - eps) / (1 - (1 - eps) * t)
    keep = math.exp(-sbar)

    def q(seq):  # p_t|0(seq | x_0)
        out = 1.0
        for n in range(N):
            out *= keep if seq[n] == x0[n] else (1 - keep) if seq[n] == V else 0.0
        return out

    total = 0.0
    for pattern in itertools.product([False, True], repeat=N):
        xt = [V if m else int(x0[n]) for n, m in enumerate(pattern)]
        q_xt = q(xt)
        logits = logit_fn(xt)  # [N, V]
        for n in range(N):
            for y in range(V + 1):
                if y == xt[n] or xt[n] != V:  # only states that jump into x_t: a token into the mask
                    continue
                nb = list(xt)
                nb[n] = y
                r = q(nb) / q_xt
                s = math.exp(logits[n][y]) / math.expm1(sbar)
                k = r * math.log(r) - r if r > 0 else 0.0
                total += q_xt * sigma * (s - r * math.log(s) + k)
    return total


class TableLogits:
    """A 'network' with fixed random logits for every possible x_t (unnormalised, as SEDD's are)."""

    def __init__(self, V, N, seed=0, exact=None):
        self.V, self.N, self.exact = V, N, exact
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn((V + 1) ** N, N, V, generator=g, dtype=torch.float64)

    def index(self, xt):
        return int(sum(int(v) * (self.V + 1) ** i for i, v in enumerate(xt)))

    def __call__(self, xt):
        return self.table[self.index(xt)].tolist()

    def batched(self, xt, t):
        return torch.stack([self.table[self.index(row.tolist())] for row in xt]).float()


@pytest.mark.parametrize("t", [0.07, 0.5, 0.93])
def test_sedd_score_entropy_matches_the_definition(t):
    V, N = 3, 3
    net = TableLogits(V, N, seed=int(100 * t))
    x0 = torch.tensor([2, 0, 1])
    noise = LogLinear()
    patterns = torch.tensor(list(itertools.product([False, True], repeat=N)))
    xt = torch.where(patterns, V, x0)
    probs = torch.where(patterns, 1 - noise.alpha(torch.tensor(t, dtype=torch.float64)),
                        noise.alpha(torch.tensor(t, dtype=torch.float64))).prod(-1)
    tt = torch.full((len(xt),), t)
    got = (probs * score_entropy(net.batched(xt, tt), x0.expand_as(xt), xt, tt, noise, V).double()).sum()
    assert got.item() == pytest.approx(direct_score_entropy(net, x0.tolist(), t), rel=1e-5)
    # and the model's one-sample estimator (random mask at this t) averages to it; the network's
    # outputs are the logits plus log V (md4.sedd.log_ratio)
    sedd, gen = SEDD(V), torch.Generator().manual_seed(0)
    network = lambda x, tt: net.batched(x, tt) + math.log(V)  # noqa: E731
    draws = torch.cat([sedd.nelbo(network, x0.expand(400, N), t=torch.full((400,), t), generator=gen)
                       for _ in range(5)]).double() - sedd.prior(N)
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - got.item()) < 4.5 * se


def test_sedd_bound_is_tight_with_the_exact_denoiser_and_unnormalised_scores_cost_more():
    """With logits = log E[x_0 | x_t] the integral over t (Gauss-Legendre, exact for this
    polynomial integrand) of the expected score entropy, plus the prior term, is -log p(x_0) up
    to O(eps N log V); scaling the scores by c != 1 adds c - log c - 1 > 0 per masked token."""
    V, N = 3, 3
    toy = ToyDistribution.random(V, N, seed=4)
    exact = toy.denoiser()
    sedd, noise = SEDD(V), LogLinear()
    patterns = torch.tensor(list(itertools.product([False, True], repeat=N)))
    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts = torch.tensor((nodes + 1) / 2)
    for idx in (0, 13, 26):
        x0 = toy.sequences[idx]
        xt = torch.where(patterns, V, x0)

        def bound(shift):
            total = 0.0
            for t, w in zip(ts, weights / 2):
                a = noise.alpha(t)
                probs = torch.where(patterns, 1 - a, a).prod(-1)
                tt = torch.full((len(xt),), t.item())
                logits = exact(xt, tt) + shift
                total += w * (probs * score_entropy(logits, x0.expand_as(xt), xt, tt, noise, V).double()).sum().item()
            return total + sedd.prior(N)

        nll = -toy.log_prob(x0[None]).item()
        assert bound(0.0) == pytest.approx(nll, abs=0.02)
        c = 1.5
        extra = (c - math.log(c) - 1) * N * (1 - noise.eps)  # int_0^1 (1/t) E[#masked] dt = N (1 - eps)
        assert bound(math.log(c)) - bound(0.0) == pytest.approx(extra, rel=1e-4)


def test_sedd_reverse_step_is_md4s_for_normalised_scores():
    """For outputs with logits l = log mu (outputs log mu + log V, md4.sedd.log_ratio) the Tweedie step
    unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t), as MD4's does, and then takes y with
    probability mu_y; for other outputs P(unmask) = U / (U + stay) with U = (e^{sb_t - sb_s} - 1)
    sum_y e^{l_y} / (e^{sb_t} - 1) and stay = (1 - e^{-sb_s}) / (1 - e^{-sb_t})."""
    V = 4
    sedd = SEDD(V)
    mu = torch.softmax(torch.randn(2, 3, V, dtype=torch.float64), -1)
    scaled = torch.randn(2, 3, V, dtype=torch.float64)
    for t, s in ((0.9, 0.6), (0.3, 0.0), (1.0, 0.999)):
        a_t, a_s = (sedd.schedule.alpha(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        p_unmask, token_logits = sedd.reveal(mu.log() + math.log(V), t, s)
        torch.testing.assert_close(p_unmask, ((a_s - a_t) / (1 - a_t)).expand(2, 3))
        torch.testing.assert_close(torch.softmax(token_logits, -1), mu)
        sb_t, sb_s = (sedd.schedule.sigma_bar(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        U = math.expm1(sb_t - sb_s) * (scaled - math.log(V)).exp().sum(-1) / math.expm1(sb_t)
        stay = -math.expm1(-sb_s) / -math.expm1(-sb_t)
        torch.testing.assert_close(sedd.reveal(scaled, t, s)[0], U / (U + stay))


def test_sedd_sampler_leaves_no_mask_and_keeps_given_tokens():
    V, N = 5, 6
    sedd = SEDD(V)
    net = Transformer(V, dim=16, layers=1, heads=2, time_cond=False, max_len=16).eval()
    x = sedd.sample(net, 3, N, steps=10, grid="uniform", generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, N) and x.max() < V and x.min() >= 0
    xt = torch.tensor([[1, V, 2, V, V, 0]])
    xs = sedd.reverse_step(xt, torch.randn(1, N, V), 0.5, 0.0)  # s = 0: every mask is filled
    assert (xs[xt != V] == xt[xt != V]).all() and (xs < V).all()


def test_sedd_rejects_other_schedules_and_discrete_time():
    with pytest.raises(UserError, match="log-linear"):
        SEDD(5, "cosine")
    with pytest.raises(UserError, match="continuous time"):
        SEDD(5).nelbo(lambda x, t: torch.zeros(*x.shape, 5), torch.zeros(2, 3, dtype=torch.long), timesteps=10)


def test_loglinear_is_md4s_linear_schedule_up_to_eps():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    noise = LogLinear()
    torch.testing.assert_close(noise.alpha(t), torch.exp(-noise.sigma_bar(t)))
    torch.testing.assert_close(noise.sigma(t[1:]) / torch.expm1(noise.sigma_bar(t[1:])), 1 / t[1:])  # weight 1/t
    assert (noise.alpha(t) - MD4(3).schedule.alpha(t)).abs().max() < 2e-3
