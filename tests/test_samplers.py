"""The samplers beyond `ancestral` (cached, mean, jump, confidence), truncation, infilling and
blocks, against exact answers: the exact law of the discretised chain and the exact (conditional)
toy distribution (helpers from test_sampling)."""

import math

import pytest
import torch
from test_sampling import (
    ALPHA,
    OTHER,
    SAMPLES,
    TOY,
    chain_distribution,
    chi2_pvalue,
    histogram,
    noncentrality,
    tabulated,
)

from md4 import MD4, GenMD4
from md4.conditional import initial_state, text_condition
from md4.data import CharTokenizer
from md4.errors import UserError
from md4.nn import Transformer
from md4.reveal import survival
from md4.sampling import sample, time_grid
from md4.sedd import SEDD
from md4.toy import ToyDistribution
from md4.truncation import Truncation, top_p_logits

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLERS = ["ancestral", "cached", "mean", "jump", "confidence"]


class Counting:
    """Wraps a denoiser; counts calls and rows (samples) evaluated."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.rows = denoiser, 0, 0

    def __call__(self, xt, t):
        self.calls += 1
        self.rows += xt.shape[0]
        return self.denoiser(xt, t)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- cached
@pytest.mark.parametrize("steps, truncation", [(64, {}), (1024, {}), (256, {"top_p": 0.8, "temperature": 0.7})])
def test_cached_returns_exactly_the_ancestral_samples_with_fewer_calls(steps, truncation):
    model, B, N = MD4(3, "linear"), 300, 3
    full, cheap = Counting(tabulated(TOY)), Counting(tabulated(TOY))
    changes = torch.zeros(B, dtype=torch.long)
    last = {}

    def count_changes(x, t):  # steps in which each sample changed, except the last step's
        if "x" in last and t[0] > 0:
            changes.add_((x != last["x"]).any(-1).long())
        last["x"] = x.clone()

    a = sample(model, full, B, N, steps=steps, generator=seeded(1), **truncation)
    c = sample(model, cheap, B, N, steps=steps, generator=seeded(1), sampler="cached", time_independent=True,
               callback=count_changes, **truncation)
    assert torch.equal(a, c)
    assert B * steps <= full.rows <= B * (steps + 1)  # ancestral: every sample, every step (+ argmax fills)
    # cached: a first call, then one per step in which the sample changed (fills at t = 0 are extra)
    fills = cheap.rows - (B + changes.sum().item())
    assert 0 <= fills <= B and (changes <= N).all()
    assert cheap.rows <= B * (N + 2)


def test_cached_with_a_network_that_ignores_t_matches_ancestral_and_detects_it():
    torch.manual_seed(0)
    net = Transformer(5, dim=32, layers=2, heads=2, time_cond=False, max_len=64).eval()
    model = MD4(5, "linear")
    a = sample(model, net, 6, 24, steps=200, generator=seeded(2))
    counted = Counting(net)
    c = sample(model, counted, 6, 24, steps=200, generator=seeded(2), sampler="cached", time_independent=True)
    c2 = sample(model, net, 6, 24, steps=200, generator=seeded(2), sampler="cached")  # detected on the net
    assert torch.equal(a, c) and torch.equal(a, c2)
    assert counted.rows <= 6 * 26 < 6 * 200


def test_cached_refuses_a_time_conditioned_denoiser():
    net = Transformer(5, dim=32, layers=1, heads=2, time_cond=True, max_len=16)
    with pytest.raises(UserError, match="ignores t"):
        sample(MD4(5), net, 2, 8, steps=4, sampler="cached")
    with pytest.raises(UserError, match="ignores t"):
        sample(MD4(3), tabulated(TOY), 2, 3, steps=4, sampler="cached")  # a plain function: say so


# ----------------------------------------------------------------------------- mean and jump: same law
@pytest.mark.parametrize("sampler, steps, grid", [("mean", 2, "uniform"), ("jump", 2, "cosine"), ("jump", 3, "uniform")])
def test_mean_and_jump_follow_the_exact_law_of_the_ancestral_chain(sampler, steps, grid):
    model, n = MD4(3, "linear"), 50000
    q = chain_distribution(TOY, model, steps, grid)
    assert noncentrality(n, q, TOY.probs) > 150 and noncentrality(n, q, chain_distribution(TOY, model, steps + 1, grid)) > 150
    x = sample(model, tabulated(TOY), n, 3, steps=steps, grid=grid, generator=seeded(3), sampler=sampler)
    assert chi2_pvalue(histogram(TOY, x), q) > ALPHA


def test_jump_with_a_huge_T_is_exact_and_costs_at_most_one_call_per_position():
    model, steps = MD4(3, "linear"), 10**6
    counted = Counting(tabulated(TOY))
    x = sample(model, counted, SAMPLES, 3, steps=steps, generator=seeded(4), sampler="jump")
    assert counted.calls <= 3 + 1 and counted.rows <= SAMPLES * 3 + SAMPLES  # + the rare argmax fill
    assert chi2_pvalue(histogram(TOY, x), TOY.probs) > ALPHA
    wrong = sample(model, tabulated(OTHER), SAMPLES, 3, steps=steps, generator=seeded(4), sampler="jump")
    assert chi2_pvalue(histogram(TOY, wrong), TOY.probs) < ALPHA


@pytest.mark.parametrize("sampler", ["jump", "ancestral"])
def test_jump_calls_a_time_conditioned_denoiser_at_each_reveal_time(sampler):
    """A denoiser that predicts token 0 for t > 0.35 and token 1 below: a position gets 0 when it
    is revealed going from t(j) > 0.35 (j >= 4 on a uniform grid of 10), which has probability
    1 - S_3 = 1 - (1 - alpha_0.3) / (1 - alpha_1); calling it at t = 1 would give all zeros."""
    model, n, N = MD4(2, "linear"), 4000, 8
    S = survival(model, time_grid(10, "uniform"))

    def den(xt, t):
        return torch.where((t > 0.35)[:, None, None], torch.tensor([0.0, -50.0]), torch.tensor([-50.0, 0.0])).expand(*xt.shape, 2)

    x = sample(model, den, n, N, steps=10, grid="uniform", generator=seeded(5), sampler=sampler)
    p, zeros = 1 - S[3].item(), (x == 0).sum().item()
    assert abs(zeros - n * N * p) < 4.5 * math.sqrt(n * N * p * (1 - p))


# ----------------------------------------------------------------------------- truncation
def test_top_p_keeps_the_smallest_set_with_enough_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()

    def kept(p):
        return torch.isfinite(top_p_logits(logits, p)).nonzero().flatten().tolist()

    assert kept(0.4) == [0] and kept(0.5) == [0] and kept(0.51) == [0, 1] and kept(0.79) == [0, 1]
    assert kept(0.81) == [0, 1, 2] and kept(0.96) == [0, 1, 2, 3] and kept(1.0) == [0, 1, 2, 3]
    shuffled = logits[[2, 0, 3, 1]]  # order does not matter
    assert torch.isfinite(top_p_logits(shuffled, 0.79)).tolist() == [False, True, False, True]


def test_truncation_top_k_temperature_and_their_limits():
    g = seeded(6)
    logits = torch.randn(200, 7, generator=g) * 2
    assert torch.equal(Truncation()(logits), logits.double())  # the default changes nothing
    top1 = Truncation(top_k=1)(logits)
    assert torch.equal(torch.isfinite(top1), torch.nn.functional.one_hot(logits.argmax(-1), 7).bool())
    top3 = torch.isfinite(Truncation(top_k=3)(logits))
    assert (top3.sum(-1) == 3).all() and torch.equal(top3, logits >= logits.topk(3).values[:, -1:])
    zero = Truncation(temperature=0)(logits)
    assert torch.equal(torch.softmax(zero, -1), torch.softmax(top1, -1))
    spaced = torch.rand(200, 7, generator=g).argsort(-1).float() * 0.5  # gaps of 0.5 between tokens
    far = [(torch.softmax(Truncation(temperature=tau)(spaced), -1) - torch.softmax(Truncation(temperature=0)(spaced), -1))
           .abs().max().item() for tau in (1.0, 0.3, 0.1, 0.01)]
    assert far[0] > 0.3 and far[0] > far[1] > far[2] > far[3] and far[3] < 1e-20  # tau -> 0: the argmax
    hot = torch.softmax(Truncation(temperature=1e6)(logits), -1)
    torch.testing.assert_close(hot, torch.full_like(hot, 1 / 7), atol=1e-5, rtol=0)
    t2 = Truncation(temperature=2.0)(logits)
    torch.testing.assert_close(torch.softmax(t2, -1), torch.softmax(logits.double() / 2, -1))


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"temperature": math.nan}, {"top_k": -2}, {"top_k": 1.5},
                                 {"top_p": 0}, {"top_p": 1.2}])
def test_bad_truncation_is_a_user_error(bad):
    with pytest.raises(UserError):
        sample(MD4(3), tabulated(TOY), 2, 3, steps=2, **bad)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_applies_truncation(sampler):
    """A denoiser with the same prediction everywhere: top-k = 1 and temperature 0 give its argmax
    at every position; top-k = 2 only its two most likely tokens, in the renormalised proportions."""
    probs = torch.tensor([0.1, 0.35, 0.05, 0.5], dtype=torch.float64)

    def den(xt, t):
        return probs.log().float().expand(*xt.shape, 4)

    model = MD4(4, "linear")
    for kw in ({"top_k": 1}, {"temperature": 0}):
        x = sample(model, den, 20, 16, steps=32, generator=seeded(7), sampler=sampler, time_independent=True, **kw)
        assert (x == 3).all()
    x = sample(model, den, 500, 16, steps=32, generator=seeded(7), sampler=sampler, time_independent=True, top_k=2)
    counts = torch.bincount(x.flatten(), minlength=4)
    assert counts[0] == counts[2] == 0
    if sampler != "confidence":  # confidence prefers the likelier token: not the model's law
        assert chi2_pvalue(counts[[1, 3]], probs[[1, 3]] / 0.85) > ALPHA


def stay_probability(model, out: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """P(a position masked at t is still masked at s) for fixed network outputs out [N, V], by hand
    from each method's reverse step, untruncated: [N] float64."""
    out = out.double()
    if isinstance(model, SEDD):  # score s_y = e^{out_y - log V} / (e^{sigma_bar(t)} - 1)
        sb_t, sb_s = (model.schedule.sigma_bar(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        unmask = torch.expm1(sb_t - sb_s) * (out - math.log(out.shape[-1])).exp().sum(-1) / torch.expm1(sb_t)
        stay = torch.expm1(-sb_s) / torch.expm1(-sb_t)
        return stay / (unmask + stay)
    a_t, a_s = (model.schedule.alpha(torch.tensor(v, dtype=torch.float64)).detach() for v in (t, s))
    if isinstance(model, GenMD4):  # sum_j mu_j (1 - alpha_{s,j}) / (1 - alpha_{t,j})
        return (torch.softmax(out, -1) * (1 - a_s) / (1 - a_t)).sum(-1)
    return ((1 - a_s) / (1 - a_t)).expand(len(out))


METHODS = {"md4": lambda V: MD4(V, "linear"), "genmd4": lambda V: GenMD4(V, w=torch.linspace(0.3, 3.0, V)),
           "sedd": SEDD}


@pytest.mark.parametrize("truncation", [{"top_k": 3}, {"top_p": 0.5}, {"temperature": 0.5}, {"temperature": 0}])
@pytest.mark.parametrize("method, sampler", [("md4", "ancestral"), ("md4", "mean"), ("md4", "cached"),
                                             ("genmd4", "ancestral"), ("sedd", "ancestral"), ("sedd", "cached")])
def test_truncation_changes_which_token_is_revealed_never_when(method, sampler, truncation):
    """Issue 13, item 8: temperature, top-k and top-p act on the distribution of the token a position
    becomes, not on the probability that it unmasks. With network outputs that ignore x and t, each
    position's chance of being still masked after k steps is the product of the untruncated model's
    stay probabilities (by hand above); the fraction of masked positions after every step matches it
    (z-test), truncated or not. (SEDD's unnormalised scores and GenMD4's token-dependent schedule made
    truncation change it: top-k 3 left 16% of positions masked at the last step instead of 0.6%.)"""
    V, N, B, steps = 8, 6, 3000, 8
    model = METHODS[method](V)
    out = torch.randn(N, V, generator=seeded(11)) * 1.5 - 1  # e^{out - log V} does not sum to 1: SEDD's scale matters

    def den(xt, t):
        return out.expand(len(xt), -1, -1)

    masked = []
    for kw in ({}, truncation):
        fractions = []
        sample(model, den, B, N, steps=steps, generator=seeded(12), sampler=sampler, time_independent=True,
               callback=lambda x, t: fractions.append((x == V).double().mean().item()), **kw)
        masked.append(fractions[1:-1])  # after each step (the first call is the start, the last after filling)
    grid = time_grid(steps, "cosine")
    alive = torch.ones(N, dtype=torch.float64)
    for k, i in enumerate(range(steps, 0, -1)):
        alive = alive * stay_probability(model, out, grid[i].item(), grid[i - 1].item())
        sd = math.sqrt(B * (alive * (1 - alive)).sum().item()) / (B * N)
        for fractions in masked:
            assert abs(fractions[k] - alive.mean().item()) < 4.5 * sd + 1e-12, (k, fractions[k], alive.mean().item())
    assert 0.1 < masked[0][steps // 2] < 0.9  # the test has power: half way, many positions are masked


def test_mean_sampler_with_truncation_is_refused_for_a_token_dependent_schedule():
    """For GenMD4 the mean sampler's reveal probability depends on the drawn x_0, so truncating it would
    change when tokens are revealed; the ancestral sampler keeps the timing (test above)."""
    model, den = GenMD4(4, w=[0.5, 1.0, 2.0, 3.0]), lambda xt, t: torch.zeros(*xt.shape, 4)
    with pytest.raises(UserError, match="mean sampler.*ancestral"):
        sample(model, den, 2, 3, steps=4, sampler="mean", top_k=2)
    assert sample(model, den, 2, 3, steps=4, sampler="mean").shape == (2, 3)


# ----------------------------------------------------------------------------- confidence
def test_confidence_reveals_on_schedule_and_most_confident_first():
    V, N, steps = 5, 12, 6
    peak = torch.linspace(0.2, 0.95, N)[torch.randperm(N, generator=seeded(8))]  # each position's confidence
    probs = torch.stack([peak] + [(1 - peak) / (V - 1)] * (V - 1), -1).double()  # token 0 most likely

    def den(xt, t):
        return probs.log().float().expand(xt.shape[0], N, V)

    model = MD4(V, "cosine")
    states = []
    x = sample(model, den, 3, N, steps=steps, grid="uniform", generator=seeded(8), sampler="confidence",
               temperature=0, callback=lambda x, t: states.append(x.clone()))
    S = survival(model, time_grid(steps, "uniform"))
    masked = [int((s[0] == V).sum()) for s in states]
    expected = [N] + [round(N * S[j].item()) for j in range(steps - 1, 0, -1)] + [0, 0]
    assert masked == expected
    order = torch.stack(states)[:, 0].eq(V).sum(0)  # how many states each position stayed masked in
    assert all(order[i] <= order[j] for i in range(N) for j in range(N) if peak[i] > peak[j])
    assert len(set(order.tolist())) > 3  # and the positions were revealed over several steps
    assert (x == 0).all()


# ----------------------------------------------------------------------------- infilling
def smooth_toy(seed):
    """V = 3, N = 4 (81 sequences) with probabilities within a factor 3 of each other, so that every
    cell of a conditional holds enough draws for the chi-square test."""
    return ToyDistribution(0.5 + torch.rand(81, generator=seeded(seed), dtype=torch.float64), 3, 4)


TOY4, OTHER4 = smooth_toy(2), smooth_toy(3)


def conditional(toy, known, known_mask):
    ok = (toy.sequences[:, known_mask] == known[known_mask]).all(-1)
    p = toy.probs * ok
    return p / p.sum()


PATTERNS = {"prefix": [True, False, False, False], "suffix": [False, False, True, True],
            "scattered": [False, True, False, True]}


@pytest.mark.parametrize("pattern, sampler, steps", [(p, "jump", 10**6) for p in PATTERNS] + [("scattered", "cached", 256)])
def test_infilling_follows_the_true_conditional(pattern, sampler, steps):
    """jump with T = 10^6 reveals one position at a time: exact any-order autoregressive sampling
    of p(unknown | known). cached (the ancestral chain) with T = 256 is within O(1/T) of it."""
    known_mask = torch.tensor(PATTERNS[pattern])
    known = torch.tensor([2, 1, 0, 2])
    target = conditional(TOY4, known, known_mask)
    x = sample(MD4(3, "linear"), tabulated(TOY4), SAMPLES, 4, steps=steps, generator=seeded(9), sampler=sampler,
               known=known, known_mask=known_mask, time_independent=True)
    assert (x[:, known_mask] == known[known_mask]).all()
    assert chi2_pvalue(histogram(TOY4, x), target) > ALPHA
    assert chi2_pvalue(histogram(TOY4, x), conditional(OTHER4, known, known_mask)) < ALPHA
    if sampler != "jump":
        return  # the slower chain: the rejection of a wrong denoiser is checked with jump
    wrong = sample(MD4(3, "linear"), tabulated(OTHER4), SAMPLES, 4, steps=steps, generator=seeded(9),
                   sampler=sampler, known=known, known_mask=known_mask, time_independent=True)
    assert chi2_pvalue(histogram(TOY4, wrong), target) < ALPHA


def test_each_sample_keeps_its_own_known_positions():
    g = seeded(10)
    known = torch.randint(0, 3, (40, 4), generator=g)
    known_mask = torch.rand(40, 4, generator=g) < 0.5
    for sampler in SAMPLERS:
        x = sample(MD4(3), tabulated(TOY4), 40, 4, steps=16, generator=g, sampler=sampler, known=known,
                   known_mask=known_mask, time_independent=True)
        assert torch.equal(x[known_mask], known[known_mask]) and (x < 3).all()


def test_bad_known_positions_are_user_errors():
    model, den = MD4(3), tabulated(TOY4)
    ok_known, ok_mask = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool)
    for kw in [{"known": ok_known}, {"known_mask": ok_mask}, {"known": ok_known, "known_mask": ok_mask[:, :3]},
               {"known": ok_known, "known_mask": torch.zeros(3, 4, dtype=torch.bool)},
               {"known": ok_known, "known_mask": ok_mask.long()}, {"known": ok_known.float(), "known_mask": ok_mask},
               {"known": ok_known + 3, "known_mask": ~ok_mask}, {"sampler": "bogus"}, {"block": 5, "window": 4},
               {"known": ok_known[:, :2], "known_mask": ok_mask[:, :2]}]:
        with pytest.raises(UserError):
            sample(model, den, 2, 4, steps=4, **kw)
    x = initial_state(2, 4, 3, torch.tensor([1, 2, 0, 1]), torch.tensor([True, False, False, True]))
    assert x.tolist() == [[1, 3, 3, 1]] * 2


def test_text_conditions_from_prompts_and_infill_patterns():
    tok = CharTokenizer()
    known, mask = text_condition(tok, "The ____ sat")
    assert len(known) == 12 and mask.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert tok.decode(torch.where(mask, known, tok.mask_id)) == "the ____ sat"
    known, mask = text_condition(tok, "to be", 10)
    assert mask.tolist() == [True] * 5 + [False] * 5 and tok.decode(known[:5]) == "to be"
    for text, length in [("far too long", 5), ("caf\u00e9", None), ("r2d2", None), ("", None)]:
        with pytest.raises(UserError):
            text_condition(tok, text, length)


# ----------------------------------------------------------------------------- blocks
def test_blocks_extend_a_markov_chain_exactly():
    """A stationary order-1 Markov chain: its exact denoiser on windows of 3 positions, with blocks
    of 2 new positions (context 1 or 2), generates sequences of 6 that follow the chain exactly."""
    pi, P = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    assert torch.allclose(pi @ P, pi)

    def chain(n):
        toy = ToyDistribution(torch.ones(2**n), 2, n)
        s = toy.sequences
        toy.probs = pi[s[:, 0]] * P[s[:, :-1], s[:, 1:]].prod(-1)
        return toy

    window, long = chain(3), chain(6)
    widths = []
    den = tabulated(window)

    def windowed(xt, t):
        widths.append(xt.shape[1])
        return den(xt, t)

    x = sample(MD4(2, "linear"), windowed, SAMPLES, 6, steps=10**6, generator=seeded(11), sampler="jump",
               block=2, window=3)
    assert set(widths) == {3} and x.shape == (SAMPLES, 6)
    assert chi2_pvalue(histogram(long, x), long.probs) > ALPHA
    wrong = sample(MD4(2, "linear"), windowed, SAMPLES, 6, steps=10**6, generator=seeded(11), sampler="jump",
                   block=3, window=3)  # no context: independent windows
    assert chi2_pvalue(histogram(long, wrong), long.probs) < ALPHA
