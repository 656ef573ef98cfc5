"""The heuristic samplers and what they promise (issue 17): ReMDM (md4.remdm) with no remasking is
the ancestral sampler draw for draw and keeps the schedule's masked fraction with remasking;
confidence orders pick the positions they name and a threshold reveals what exceeds it (at least
one per step); prompt guidance with w = 0 is the conditional model and otherwise masks the prompt
in its unconditional pass; sampler options are checked; the cached sampler truncates only the
predictions that changed."""

import json
import math

import pytest
import torch
from test_cli import user_error
from test_sampling import TOY, tabulated

import md4
from md4 import MD4
from md4.cli import main
from md4.errors import UserError
from md4.guidance import Guided, guided_logits
from md4.nn import Transformer
from md4.remdm import Remasking
from md4.reveal import entropy_confidence, margin_confidence, top_confidence
from md4.sampling import ancestral, cached, remdm, sample, sampler_options, time_grid
from md4.toy import ToyDistribution
from md4.truncation import Truncation

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def fixed(table: torch.Tensor):
    """A denoiser whose prediction ignores x_t and t: table [N, V] probabilities."""
    logits = table.double().log().float()

    def den(xt, t):
        return logits.expand(len(xt), -1, -1)

    return den


def states_of(run):
    """Run `run(callback)` and return the states it reported, stacked: [steps + 2, B, N]."""
    states = []
    run(lambda x, t: states.append(x.clone()))
    return torch.stack(states)


# ----------------------------------------------------------------------------- ReMDM
@pytest.mark.parametrize("remask", ["cap", "rescale", "conf"])
@pytest.mark.parametrize("extra", [{}, {"top_p": 0.8, "temperature": 0.7}])
def test_remdm_without_remasking_gives_the_ancestral_samples(remask, extra):
    model, B = MD4(3, "linear"), 400
    known, known_mask = torch.tensor([2, 0, 1]), torch.tensor([False, True, False])
    for kw in ({}, {"known": known, "known_mask": known_mask}):
        a = sample(model, tabulated(TOY), B, 3, steps=16, generator=seeded(1), **kw, **extra)
        r = sample(model, tabulated(TOY), B, 3, steps=16, generator=seeded(1), sampler="remdm",
                   options={"remask": remask, "eta": 0.0}, **kw, **extra)
        assert torch.equal(a, r)
        moved = sample(model, tabulated(TOY), B, 3, steps=16, generator=seeded(1), sampler="remdm",
                       options={"remask": remask, "eta": 0.5}, **kw, **extra)
        assert not torch.equal(a, moved)  # the comparison has power: remasking changes the samples


def test_remdm_without_remasking_calls_a_time_conditioned_network_as_ancestral_does():
    torch.manual_seed(0)
    net = Transformer(5, dim=16, layers=1, heads=2, time_cond=True, max_len=16).eval()
    model = MD4(5, "cosine")
    a = sample(model, net, 3, 10, steps=12, generator=seeded(2))
    r = sample(model, net, 3, 10, steps=12, generator=seeded(2), sampler="remdm", options={"eta": 0})
    assert torch.equal(a, r)


def test_remdm_loop_without_remasking_is_ancestral_on_its_time_map():
    """The loop walks the model's time tau(u): 1 -> tau_on, tau_on held, tau_on -> 0; with eta = 0
    it is the ancestral sampler on that grid (revealing nothing while alpha is held)."""
    model, B, N = MD4(3, "cosine"), 300, 3
    grid = time_grid(20, "uniform")
    plan = Remasking("loop", 0.0, t_on=0.55, t_off=0.05, alpha_on=0.9)
    tau = plan.times(model, grid)
    alpha = model.schedule.alpha(tau)
    assert tau[-1] == 1 and tau[0] == 0 and (tau[1:] >= tau[:-1]).all()
    held = (grid >= 0.05 - 1e-12) & (grid <= 0.55 + 1e-12)
    assert held.sum() == 11 and torch.allclose(alpha[held], torch.tensor(0.9, dtype=torch.float64), atol=1e-12)
    x = torch.full((B, N), 3)
    a = ancestral(model, tabulated(TOY), x, tau, seeded(3))
    r = remdm(model, tabulated(TOY), x, grid, seeded(3), remask="loop", eta=0.0)
    assert torch.equal(a, r)


def expected_masked(model, grid, plan):
    """E[fraction masked] after each step and E[remaskings per position] in each step, by hand: from
    the fraction m at t, a masked position is revealed with probability
    (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) and a revealed one remasked with probability
    sigma, so m_s = m (1 - P(reveal)) + (1 - m) sigma (positions evolve independently when the
    prediction ignores x and sigma is one number per step)."""
    tau = plan.times(model, grid)
    m, masked, remasked = 1.0, [], []
    for i in range(len(grid) - 1, 0, -1):
        a_t, a_s = (model.schedule.alpha(tau[j]).item() for j in (i, i - 1))
        sigma_max = min(1.0, (1 - a_s) / a_t)
        sigma = {"cap": min(plan.eta, sigma_max), "rescale": plan.eta * sigma_max,
                 "loop": plan.eta if a_s == a_t else 0.0}[plan.remask]
        remasked.append((1 - m) * sigma)
        m = m * (1 - (a_s - (1 - sigma) * a_t) / (1 - a_t)) + (1 - m) * sigma
        masked.append(m)
    return masked, remasked


@pytest.mark.parametrize("remask, eta", [("cap", 0.05), ("rescale", 0.5), ("loop", 0.1)])
def test_remdm_remasks_and_keeps_the_schedules_masked_fraction(remask, eta):
    V, N, B, steps = 4, 6, 2000, 20
    model = MD4(V, "linear")
    den = fixed(torch.softmax(torch.randn(N, V, generator=seeded(4)), -1))
    grid = time_grid(steps, "uniform")
    states = states_of(lambda cb: sample(model, den, B, N, steps=steps, grid="uniform", generator=seeded(5),
                                         sampler="remdm", options={"remask": remask, "eta": eta}, callback=cb))
    masked = (states == V).double()
    expect, remasks = expected_masked(model, grid, Remasking(remask, eta))
    for k, m in enumerate(expect):
        sd = math.sqrt(max(m * (1 - m), 1e-12) / (B * N))
        assert abs(masked[k + 1].mean().item() - m) < 4.5 * sd + 1e-9, (k, masked[k + 1].mean().item(), m)
    remasked = ((states[:-2] != V) & (states[1:-1] == V)).sum().item()
    assert 0.9 < remasked / (B * N * sum(remasks)) < 1.1 and remasked > 500
    if remask == "loop":  # the masked fraction is held at 1 - alpha_on = 0.1 through the loop
        assert all(abs(m - 0.1) < 0.01 for m in expect[8:19])


def test_remdm_never_remasks_the_prompt():
    V, N, B = 4, 8, 200
    model = MD4(V, "linear")
    known = torch.randint(0, V, (B, N), generator=seeded(6))
    known_mask = torch.rand(B, N, generator=seeded(7)) < 0.4
    den = fixed(torch.full((N, V), 1 / V))
    for remask, eta in (("cap", 1.0), ("rescale", 1.0), ("conf", 1.0), ("loop", 0.1)):
        states = states_of(lambda cb: sample(model, den, B, N, steps=10, generator=seeded(8), sampler="remdm",
                                             options={"remask": remask, "eta": eta}, known=known,
                                             known_mask=known_mask, callback=cb))
        assert (states[:, known_mask] == known[known_mask]).all()
        assert (states[-1] < V).all()


def test_remdm_conf_spreads_sigma_by_low_confidence():
    """sigma^l = eta sigma_max softmax(-psi)^l over the revealed generated positions of each sample."""
    plan = Remasking("conf", 0.5)
    psi = torch.tensor([[0.9, 0.2, 0.5, 0.7], [0.1, 0.1, 0.3, 0.8]], dtype=torch.float64)
    revealed = torch.tensor([[True, True, False, True], [False, False, False, False]])
    a_t, a_s = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    sigma = plan.sigma(a_t, a_s, revealed, psi)
    w = torch.exp(-psi[0, [0, 1, 3]])
    expect = 0.5 * min(1.0, 0.3 / 0.4) * w / w.sum()
    assert torch.allclose(sigma[0, [0, 1, 3]], expect) and (sigma[1] == 0).all()
    assert torch.allclose(sigma[0, 2], expect.mean())  # a masked position: the mean, for its reveal probability
    assert sigma[0, 1] > sigma[0, 3] > sigma[0, 0]  # the least confident first


# ----------------------------------------------------------------------------- confidence orders and threshold
# three positions where each order prefers another: top A (0.6 > 0.58 > 0.5), margin B (0.4 > 0.25 >
# 0.16), entropy C (0.680 < 0.823 < 1.498 nats)
TABLE = torch.tensor([[0.60, 0.35, 0.05, 0.0, 0.0, 0.0],
                      [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
                      [0.58, 0.42, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64).clamp(min=1e-30)
ORDER_OF = {"top": [0, 2, 1], "margin": [1, 0, 2], "entropy": [2, 0, 1]}


def test_confidence_scores_by_hand():
    p = TABLE / TABLE.sum(-1, keepdim=True)
    tokens = torch.zeros(3, dtype=torch.long)
    assert torch.allclose(top_confidence(p, tokens), torch.tensor([0.6, 0.5, 0.58], dtype=torch.float64))
    assert torch.allclose(margin_confidence(p, tokens), torch.tensor([0.25, 0.4, 0.16], dtype=torch.float64))
    h = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_confidence(p, tokens), torch.exp(-h))


@pytest.mark.parametrize("order", ["top", "margin", "entropy"])
def test_each_order_reveals_the_position_it_promises_one_per_step_above_every_confidence(order):
    model, B = MD4(6, "linear"), 5
    calls = []
    den = fixed(TABLE)

    def counted(xt, t):
        calls.append(t.clone())
        return den(xt, t)

    states = states_of(lambda cb: sample(model, counted, B, 3, steps=50, generator=seeded(9), sampler="confidence",
                                         options={"order": order, "threshold": 1.0}, temperature=0, callback=cb))
    revealed = [((states[k] == 6) & (states[k + 1] != 6)) for k in range(3)]
    for k, pos in enumerate(ORDER_OF[order]):
        assert (revealed[k].sum(-1) == 1).all() and revealed[k][:, pos].all()  # exactly one per step
    assert len(calls) == 3 and len(states) == 3 + 2  # 3 steps whatever T is (+ the start and the fill)
    assert torch.allclose(calls[0], torch.ones(B)) and (calls[1] < 1).all() and (calls[2] < calls[1]).all()
    assert (states[-1] == 0).all()


def test_a_threshold_reveals_every_position_above_it_at_once():
    model = MD4(6, "linear")
    states = states_of(lambda cb: sample(model, fixed(TABLE), 4, 3, steps=50, generator=seeded(10),
                                         sampler="confidence", options={"threshold": 0.55}, temperature=0,
                                         callback=cb))
    assert (states[1][:, [0, 2]] != 6).all() and (states[1][:, 1] == 6).all()  # 0.6 and 0.58 > 0.55
    assert (states[2] != 6).all() and len(states) == 2 + 2
    states = states_of(lambda cb: sample(model, fixed(TABLE), 4, 3, steps=50, generator=seeded(10),
                                         sampler="confidence", options={"threshold": 0.0}, callback=cb))
    assert (states[1] != 6).all() and len(states) == 1 + 2  # everything above 0: one step


def test_confidence_order_without_threshold_follows_the_schedule():
    """T = 3, uniform grid, linear schedule: round(3 S_j) = 2, 1, 0 positions left masked, so one
    position per step, in the order's ranking."""
    model = MD4(6, "linear")
    for order, ranking in ORDER_OF.items():
        states = states_of(lambda cb: sample(model, fixed(TABLE), 2, 3, steps=3, grid="uniform",
                                             generator=seeded(11), sampler="confidence", temperature=0,
                                             options={"order": order}, callback=cb))
        for k, pos in enumerate(ranking):
            revealed = (states[k] == 6) & (states[k + 1] != 6)
            assert (revealed.sum(-1) == 1).all() and revealed[:, pos].all(), (order, k)


# ----------------------------------------------------------------------------- options
def test_sampler_options_are_checked_before_any_work():
    model, calls = MD4(3), []

    def den(xt, t):
        calls.append(1)
        return tabulated(TOY)(xt, t)

    assert sampler_options("remdm") == ["remask", "eta", "t_on", "t_off", "alpha_on"]
    assert sampler_options("confidence") == ["order", "threshold"] and sampler_options("ancestral") == []
    bad = [("ancestral", {"eta": 0.1}, "takes no options"), ("confidence", {"eta": 0.1}, "order, threshold"),
           ("remdm", {"order": "top"}, "remask, eta"), ("remdm", {"remask": "bogus"}, "cap, rescale, conf, loop"),
           ("remdm", {"eta": -1.0}, "eta"), ("remdm", {"remask": "rescale", "eta": 1.5}, "<= 1"),
           ("remdm", {"remask": "loop", "eta": 0.5, "alpha_on": 0.9}, "alpha_on"),
           ("remdm", {"remask": "loop", "t_on": 0.1, "t_off": 0.2}, "t_off < t_on"),
           ("remdm", {"eta": "big"}, "number"), ("confidence", {"order": "bogus"}, "top, margin, entropy"),
           ("confidence", {"threshold": 1.5}, r"\[0, 1\]"), ("confidence", {"threshold": math.nan}, "threshold")]
    for sampler, options, match in bad:
        with pytest.raises(UserError, match=match):
            sample(model, den, 2, 3, steps=4, sampler=sampler, options=options)
    assert not calls


# ----------------------------------------------------------------------------- guidance on a prompt
def test_guidance_zero_is_the_conditional_model_for_every_sampler():
    model = MD4(3, "linear")
    known, known_mask = torch.tensor([1, 0, 2]), torch.tensor([True, False, False])
    for sampler in ("ancestral", "cached", "jump", "confidence", "remdm"):
        kw = dict(steps=16, sampler=sampler, known=known, known_mask=known_mask, time_independent=True)
        a = sample(model, tabulated(TOY), 300, 3, generator=seeded(12), **kw)
        g = sample(model, Guided(tabulated(TOY), None, 0.0), 300, 3, generator=seeded(12), **kw)
        assert torch.equal(a, g)


def test_prompt_guidance_masks_the_prompt_in_the_unconditional_pass():
    """Each row has its own prompt (token 3, which the network never predicts); every call of the
    network is one batch of 2R rows: x_t, then x_t with that row's prompt masked, and the logits
    are guided_logits of the two halves. The cached sampler calls it on changed rows only."""
    V, N, B, w = 4, 6, 8, 1.5
    model = MD4(V, "linear")
    net_logits = torch.randn(N, V + 1, generator=seeded(13))
    net_logits[:, 3] = -30.0
    seen, outputs = [], []

    def net(xt, t):
        out = net_logits[:, :V].expand(len(xt), -1, -1) + (xt == V).float()[..., None]  # depends on x_t
        seen.append(xt.clone())
        outputs.append(out)
        return out

    net.uses_time = False
    known = torch.full((B, N), 3)
    known_mask = torch.rand(B, N, generator=seeded(14)) < 0.5
    known_mask[:, 0] = True
    guided = Guided(net, None, w)
    den = guided.with_prompt(known_mask, V)  # what sample does; one call checked by hand
    xt = torch.where(known_mask, known, V)
    out = den(xt, torch.ones(B))
    cond, uncond = seen[-1].chunk(2)
    assert torch.equal(cond, xt) and torch.equal(uncond, torch.full_like(xt, V))
    assert torch.allclose(out, guided_logits(outputs[-1][:B], outputs[-1][B:], w))
    seen.clear()
    x = sample(model, guided, B, N, steps=32, generator=seeded(15), sampler="cached", known=known,
               known_mask=known_mask)
    assert torch.equal(x[known_mask], known[known_mask]) and (x[~known_mask] != 3).all()
    assert any(len(s) < 2 * B for s in seen)  # sub-batches of changed rows
    for s in seen:
        cond, uncond = s.chunk(2)
        assert torch.equal(uncond, torch.where(cond == 3, V, cond))


def test_prompt_guidance_moves_samples_towards_the_prompt():
    """Exact toy denoiser: guidance w > 0 raises E[log p(x | prompt) - log p(x)] of the generated part."""
    toy = ToyDistribution.random(3, 4, seed=5)
    model, n = MD4(3, "linear"), 3000
    known, known_mask = torch.tensor([2, 0, 0, 0]), torch.tensor([True, False, False, False])
    den = tabulated(toy)
    joint = toy.probs.view(3, 27)  # [first token, rest]
    log_ratio = (joint[2] / joint[2].sum()).log() - joint.sum(0).log()  # log p(rest | first = 2) - log p(rest)

    def score(x):
        index = (x[:, 1:] * torch.tensor([9, 3, 1])).sum(-1)
        return log_ratio[index].mean().item()

    plain = sample(model, den, n, 4, steps=16, generator=seeded(16), known=known, known_mask=known_mask)
    guided = sample(model, Guided(den, None, 3.0), n, 4, steps=16, generator=seeded(16), known=known,
                    known_mask=known_mask)
    assert score(guided) > score(plain) + 0.2  # 0.17 -> 0.52 nats for w = 0 -> 3


def test_guidance_without_label_or_prompt_is_a_user_error():
    with pytest.raises(UserError, match="prompt"):
        sample(MD4(3), Guided(tabulated(TOY), None, 1.0), 2, 3, steps=4)


# ----------------------------------------------------------------------------- cached: truncation once per prediction
class CountingTruncation(Truncation):
    def __call__(self, logits):
        object.__setattr__(self, "rows", getattr(self, "rows", 0) + logits.shape[0])
        return super().__call__(logits)


def test_cached_truncates_only_the_predictions_that_changed():
    model, B, N, steps = MD4(3, "linear"), 50, 3, 256
    x = torch.full((B, N), 3)
    counting = CountingTruncation(top_p=0.8)
    a = ancestral(model, tabulated(TOY), x, time_grid(steps), seeded(17), truncate=Truncation(top_p=0.8))
    c = cached(model, tabulated(TOY), x, time_grid(steps), seeded(17), truncate=counting)
    assert torch.equal(a, c)
    assert counting.rows <= B * (N + 1) < B * steps  # once per prediction, not once per step


# ----------------------------------------------------------------------------- the command line
def cli_samples(capsys, run, *argv) -> list[str]:
    assert main(["sample", str(run), "--json", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)["samples"]


def test_sampler_flags_from_the_command_line(trained_run, capsys):
    m = md4.load(trained_run)
    out = cli_samples(capsys, trained_run, "--num", 2, "--steps", 8, "--sampler", "remdm", "--remask", "loop",
                      "--eta", 0.05, "--t-on", 0.6, "--seed", 3)
    assert out == m.decode(m.sample(2, steps=8, seed=3, sampler="remdm",
                                    options={"remask": "loop", "eta": 0.05, "t_on": 0.6}))
    assert cli_samples(capsys, trained_run, "--num", 2, "--steps", 8, "--sampler", "remdm", "--eta", 0) == \
        cli_samples(capsys, trained_run, "--num", 2, "--steps", 8)
    out = cli_samples(capsys, trained_run, "--num", 2, "--sampler", "confidence", "--order", "margin",
                      "--threshold", 0.9, "--prompt", "the")
    assert out == m.decode(m.sample(2, sampler="confidence", options={"order": "margin", "threshold": 0.9},
                                    **dict(zip(("known", "known_mask"), text_known(m, "the")))))
    guided = cli_samples(capsys, trained_run, "--num", 2, "--steps", 8, "--prompt", "the cat", "--guidance", 2)
    assert all(s.startswith("the cat") for s in guided)
    assert "order, threshold" in user_error(capsys, ["sample", trained_run, "--sampler", "confidence", "--eta", 0.1])
    assert "takes no options" in user_error(capsys, ["sample", trained_run, "--threshold", 0.5])
    assert "prompt" in user_error(capsys, ["sample", trained_run, "--guidance", 1])
    assert "eta" in user_error(capsys, ["sample", trained_run, "--sampler", "remdm", "--remask", "rescale",
                                        "--eta", 2])


def text_known(m, prompt):
    from md4.conditional import text_condition

    return text_condition(m.tokenizer, prompt, m.length)
