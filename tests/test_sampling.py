"""The reverse process against exact answers: one reverse step, categorical draws, time grids and
the ancestral sampler (shared/MATH.md, "MD4" and "Sampling").

The sampler's exact output law for T steps is computed by propagating a distribution over all
(V+1)^N partially masked states through the T reverse steps (64 states for V = N = 3). Samples are
compared with it by Pearson chi-square tests whose p-value must exceed 1e-5; each such test also
checks that it would reject the alternatives that matter (the data distribution when the chain
differs from it, the other time grid, a wrong denoiser).
"""

import itertools
import math

import pytest
import torch

from md4 import MD4, schedules
from md4.categorical import categorical
from md4.errors import UserError
from md4.sampling import cosine_grid, sample, time_grid, uniform_grid
from md4.toy import ToyDistribution

ALPHA = 1e-5  # chi-square tests fail below this p-value
Z = 4.5  # z-tests fail beyond this (two-sided 7e-6)


pytestmark = pytest.mark.usefixtures("one_thread")


def chi2_pvalue(counts, probs):
    """Pearson goodness-of-fit p-value of `counts` [K] against exact `probs` [K]: P(chi2_df >= stat)
    = Q(df/2, stat/2), the regularised upper incomplete gamma. A draw in a cell of probability 0 fails."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert abs(probs.sum().item() - 1) < 1e-9
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[support]
    assert expected.min() >= 5, "too few expected draws per cell for the chi-square approximation"
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = torch.tensor(support.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


def noncentrality(n, q, p):
    """n * sum (q - p)^2 / p: the mean shift of the chi-square statistic of n draws from q tested against p."""
    return n * ((q - p) ** 2 / p).sum().item()


def all_states(V, N):
    """Every sequence over {0..V} (V = mask), in the order of the base-(V+1) index: [(V+1)^N, N]."""
    return torch.tensor(list(itertools.product(range(V + 1), repeat=N)))


def tabulated(toy):
    """toy.denoiser() evaluated once on all (V+1)^N states, then looked up: a plain function equal to
    it (for MD4 the exact denoiser does not depend on t) and fast enough for 10^4 samples x 256 steps."""
    V, N = toy.vocab_size, toy.length
    states = all_states(V, N)
    table = toy.denoiser()(states, torch.zeros(len(states)))
    powers = (V + 1) ** torch.arange(N - 1, -1, -1)
    return lambda xt, t: table[(xt * powers).sum(-1)]


def histogram(toy, x):
    return torch.bincount(toy.index(x), minlength=len(toy.sequences))


def chain_distribution(toy, model, steps, grid):
    """The exact law of model.sample(toy's exact denoiser, steps, grid) over the V^N sequences.

    Walks the grid from t = 1 to 0 carrying a distribution over the (V+1)^N states. From state x, each
    masked position independently stays masked with probability (1 - alpha_s) / (1 - alpha_t) or
    becomes j with probability (alpha_s - alpha_t) / (1 - alpha_t) mu(x)_j; at the end masks left are
    filled with the argmax of mu."""
    V, N = toy.vocab_size, toy.length
    states = all_states(V, N)
    mu = torch.softmax(toy.denoiser()(states, torch.zeros(len(states))).double(), -1)  # [S, N, V]
    masked = states == V
    kernel = torch.zeros(len(states), N, V + 1, dtype=torch.float64)  # [x, n, value of y_n]
    kernel[~masked] = torch.nn.functional.one_hot(states[~masked], V + 1).double()
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[-1] = 1.0  # the all-mask state
    times = time_grid(steps, grid)
    for i in range(steps, 0, -1):
        a_t, a_s = model.schedule.alpha(times[i]), model.schedule.alpha(times[i - 1])
        stay = (1 - a_s) / (1 - a_t)
        kernel[masked] = torch.cat([(1 - stay) * mu[masked], stay.expand(int(masked.sum()), 1)], -1)
        dist = dist @ kernel[:, torch.arange(N), states].prod(-1)  # P[x, y] = prod_n kernel[x, n, y_n]
    final = torch.where(masked, mu.argmax(-1), states)
    out = torch.zeros(len(toy.sequences), dtype=torch.float64)
    return out.index_add_(0, toy.index(final), dist)


def marginal_product(toy):
    marginals = torch.einsum("k,knv->nv", toy.probs, toy.onehot)  # [N, V]
    return marginals[torch.arange(toy.length), toy.sequences].prod(-1)


TOY = ToyDistribution.random(3, 3, seed=0)
OTHER = ToyDistribution.random(3, 3, seed=1)
SAMPLES = 20000


# ----------------------------------------------------------------------------- one reverse step
@pytest.mark.parametrize("schedule, t, s", [("linear", 0.7, 0.4), ("cosine", 0.5, 0.45), ("linear", 1.0, 0.0), ("poly3", 0.2, 0.1)])
def test_reverse_step_unmasks_with_the_right_probabilities(schedule, t, s):
    V = 4
    model = MD4(V, schedule)
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0])
    xt = torch.full((400, 500), V)
    xs = model.reverse_step(xt, logits.expand(400, 500, V), t, s, torch.Generator().manual_seed(0))
    a_t, a_s = (model.schedule.alpha(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
    stay = (1 - a_s) / (1 - a_t)
    probs = torch.cat([(1 - stay) * torch.softmax(logits.double(), -1), stay[None]])
    assert chi2_pvalue(torch.bincount(xs.flatten(), minlength=V + 1), probs) > ALPHA


def test_reverse_step_stay_probability_by_hand():
    """Linear schedule, t = 0.7, s = 0.4: stay = (1 - alpha_s) / (1 - alpha_t), alpha_u = (1 - 2 eps)(1 - u) + eps."""
    eps, n = 1e-4, 200000
    stay = (1 - ((1 - 2 * eps) * 0.6 + eps)) / (1 - ((1 - 2 * eps) * 0.3 + eps))
    xs = MD4(2, "linear").reverse_step(torch.full((n, 1), 2), torch.zeros(n, 1, 2), 0.7, 0.4, torch.Generator().manual_seed(1))
    k = (xs == 2).sum().item()
    assert abs(k - n * stay) < Z * math.sqrt(n * stay * (1 - stay))


def test_reverse_step_never_changes_unmasked_positions():
    V = 5
    model = MD4(V, "linear")
    gen = torch.Generator().manual_seed(2)
    xt = torch.randint(0, V + 1, (300, 40), generator=gen)
    xs = model.reverse_step(xt, torch.randn(300, 40, V, generator=gen), 0.9, 0.1, gen)
    kept = xt != V
    assert xs.dtype == torch.long and xs.shape == xt.shape
    assert torch.equal(xs[kept], xt[kept])
    assert ((xs >= 0) & (xs <= V)).all()
    assert (xs[~kept] < V).any() and (xs[~kept] == V).any()


def test_categorical_follows_the_softmax_including_a_tiny_probability():
    probs = torch.tensor([0.6, 0.399, 0.001], dtype=torch.float64)
    logits = (probs.log() + 50).float()  # a large shift: the softmax must stay exact
    n = 10**6
    x = categorical(logits.expand(1000, 1000, 3), torch.Generator().manual_seed(3))
    assert x.shape == (1000, 1000) and x.dtype == torch.long
    counts = torch.bincount(x.flatten(), minlength=3)
    assert chi2_pvalue(counts, probs) > ALPHA
    assert abs(counts[2].item() - n * 1e-3) < Z * math.sqrt(n * 1e-3 * (1 - 1e-3))


def test_categorical_many_tokens_and_impossible_ones():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(50, generator=gen) * 2
    logits[[3, 17]] = -math.inf  # probability 0: never drawn
    x = categorical(logits.expand(200000, 50), gen)
    assert chi2_pvalue(torch.bincount(x, minlength=50), torch.softmax(logits.double(), -1)) > ALPHA


# ----------------------------------------------------------------------------- time grids
@pytest.mark.parametrize("steps", [1, 2, 7, 1000])
def test_time_grids(steps):
    i = torch.arange(steps + 1, dtype=torch.float64)
    for name, grid, expected in [("uniform", uniform_grid, i / steps), ("cosine", cosine_grid, torch.cos(math.pi / 2 * (1 - i / steps)))]:
        t = grid(steps)
        assert t.shape == (steps + 1,) and t.dtype == torch.float64
        assert t[0].item() == 0.0 and t[-1].item() == 1.0
        assert (t.diff() > 0).all()
        torch.testing.assert_close(t[1:], expected[1:], rtol=1e-15, atol=1e-15)
        assert torch.equal(time_grid(steps, name), t)


def test_cosine_grid_with_the_linear_schedule_is_the_cosine_schedule():
    """Why the paper uses the cosine grid for the linear schedule: the alphas it visits are the
    cosine schedule's on the uniform grid, so few tokens are revealed in the first steps (t near 1)."""
    torch.testing.assert_close(schedules.Linear().alpha(cosine_grid(64)), schedules.Cosine().alpha(uniform_grid(64)), rtol=0, atol=1e-15)
    assert (cosine_grid(64).diff()[-8:] < 1 / 64).all() and (cosine_grid(64).diff()[:8] > 1 / 64).all()


def test_bad_grid_steps_or_sampler_are_user_errors():
    model = MD4(3)
    den = tabulated(TOY)
    for call in [lambda: time_grid(4, "bogus"), lambda: time_grid(0), lambda: time_grid(-3, "uniform"),
                 lambda: model.sample(den, 2, 3, steps=0), lambda: model.sample(den, 2, 3, steps=4, grid="linear"),
                 lambda: sample(model, den, 2, 3, steps=4, sampler="bogus")]:
        with pytest.raises(UserError):
            call()


# ----------------------------------------------------------------------------- the sampler
def test_sampler_takes_a_plain_function_and_returns_long_tokens_without_masks():
    def uniform(xt, t):  # a plain function, not an nn.Module
        return torch.zeros(*xt.shape, 7)

    noise = torch.Generator().manual_seed(5)
    for V, N, den in [(7, 11, uniform), (5, 4, lambda xt, t: torch.randn(*xt.shape, 5, generator=noise)), (3, 3, tabulated(TOY))]:
        x = MD4(V, "linear").sample(den, num_samples=5, length=N, steps=10, generator=torch.Generator().manual_seed(5))
        assert x.shape == (5, N) and x.dtype == torch.long
        assert ((x >= 0) & (x < V)).all()
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    model = MD4(3, "linear")
    assert torch.equal(model.sample(tabulated(TOY), 50, 3, steps=8, generator=g1), sample(model, tabulated(TOY), 50, 3, steps=8, generator=g2))


def test_sampler_walks_the_grid_backwards_and_unmasks_on_schedule():
    """Position n is still masked when the sampler calls the denoiser at grid time t with probability
    prod over later steps of (1 - alpha_s)/(1 - alpha_t) = (1 - alpha_t) / (1 - alpha_1)."""
    model, steps, n, N = MD4(3, "cosine"), 8, SAMPLES, 3
    exact = tabulated(TOY)
    calls = []

    def recording(xt, t):
        calls.append((t.clone(), (xt == 3).sum().item()))
        return exact(xt, t)

    model.sample(recording, n, N, steps=steps, grid="uniform", generator=torch.Generator().manual_seed(7))
    grid = uniform_grid(steps)
    assert len(calls) >= steps
    for (t, masked), expected_t in zip(calls, grid.flip(0)[:-1]):
        assert t.shape == (n,) and (t == t[0]).all() and t[0].item() == pytest.approx(expected_t.item())
        p = ((1 - model.schedule.alpha(expected_t)) / (1 - model.schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))).item()
        if p == 1.0:
            assert masked == n * N
        else:
            assert abs(masked - n * N * p) < 5 * math.sqrt(n * N * p * (1 - p)), (expected_t, masked, n * N * p)


def test_masks_left_at_the_end_are_filled_with_the_argmax_at_t_zero():
    """With eps = 0.3, one step from t = 1 to 0 leaves a position masked with probability
    (1 - alpha_0) / (1 - alpha_1) = 0.3 / 0.7; those take the argmax of the prediction at t = 0."""
    V, n, N = 4, 10000, 3
    model = MD4(V, schedules.Linear(eps=0.3))
    at_one = torch.tensor([0.0, -40.0, -40.0, -40.0])  # token 0
    at_zero = torch.tensor([-40.0, -40.0, -40.0, 0.0])  # argmax V - 1

    def den(xt, t):
        return torch.where((t > 0)[:, None, None], at_one, at_zero).expand(*xt.shape, V)

    x = model.sample(den, n, N, steps=1, generator=torch.Generator().manual_seed(8))
    counts = torch.bincount(x.flatten(), minlength=V)
    p = 3 / 7
    assert counts[1] == counts[2] == 0
    assert abs(counts[3].item() - n * N * p) < Z * math.sqrt(n * N * p * (1 - p))


def test_one_step_draws_each_position_from_its_marginal():
    """T = 1 (both grids are [0, 1]): every position is revealed at once from mu(all masks), the
    product of the marginals."""
    model = MD4(3, "linear")
    q1 = chain_distribution(TOY, model, 1, "uniform")
    product = marginal_product(TOY)
    assert noncentrality(SAMPLES, q1, product) < 0.01  # the chain is the product up to O(eps)
    x = model.sample(tabulated(TOY), SAMPLES, 3, steps=1, generator=torch.Generator().manual_seed(9))
    counts = histogram(TOY, x)
    assert chi2_pvalue(counts, product) > ALPHA
    assert chi2_pvalue(counts, TOY.probs) < ALPHA  # and it is not the data distribution


@pytest.mark.parametrize("schedule, grid, steps", [("linear", "uniform", 2), ("linear", "cosine", 2), ("cosine", "uniform", 3)])
def test_few_steps_follow_the_exact_law_of_the_discretised_chain(schedule, grid, steps):
    model, n = MD4(3, schedule), 50000
    q = chain_distribution(TOY, model, steps, grid)
    # The test below would see the difference from the data, from the other grid and from one step
    # more: a noncentrality of 150 puts the statistic's mean 4 standard deviations above its
    # critical value (68.8 for 26 degrees of freedom at 1e-5).
    other_grid = chain_distribution(TOY, model, steps, "cosine" if grid == "uniform" else "uniform")
    one_more = chain_distribution(TOY, model, steps + 1, grid)
    for alternative in [TOY.probs, other_grid, one_more]:
        assert noncentrality(n, q, alternative) > 150
    x = model.sample(tabulated(TOY), n, 3, steps=steps, grid=grid, generator=torch.Generator().manual_seed(10))
    assert chi2_pvalue(histogram(TOY, x), q) > ALPHA


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_many_steps_with_the_exact_denoiser_reproduce_the_data(grid):
    model, steps = MD4(3, "linear"), 256
    q = chain_distribution(TOY, model, steps, grid)
    assert noncentrality(SAMPLES, q, TOY.probs) < 1  # the O(1/T) bias cannot make the test fail
    x = model.sample(tabulated(TOY), SAMPLES, 3, steps=steps, grid=grid, generator=torch.Generator().manual_seed(11))
    assert x.shape == (SAMPLES, 3) and x.dtype == torch.long and (x < 3).all()
    assert chi2_pvalue(histogram(TOY, x), TOY.probs) > ALPHA


@pytest.mark.parametrize("wrong", ["uniform logits", "another toy's exact denoiser"])
def test_a_wrong_denoiser_fails_the_same_test(wrong):
    model = MD4(3, "linear")
    den = (lambda xt, t: torch.zeros(*xt.shape, 3)) if wrong == "uniform logits" else tabulated(OTHER)
    x = model.sample(den, SAMPLES, 3, steps=64, grid="cosine", generator=torch.Generator().manual_seed(12))
    assert chi2_pvalue(histogram(TOY, x), TOY.probs) < ALPHA
