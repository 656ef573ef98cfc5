"""Class conditioning, classifier-free guidance and infilling, checked against exact answers on
enumerable toy distributions (md4.toy) where the answer is a distribution."""

import pytest
import torch

from md4 import MD4, guidance
from md4.nn import Transformer
from md4.toy import ToyDistribution


def test_guided_logits_formula():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    pc, pu = cond.softmax(-1).double(), uncond.softmax(-1).double()
    for w in (0.0, 0.5, 2.0, -0.5):
        p = guidance.guided_logits(cond, uncond, w).double().softmax(-1)
        expect = pc ** (1 + w) / pu**w
        assert torch.allclose(p, expect / expect.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(guidance.guided_logits(cond, uncond, 0.0), cond.log_softmax(-1))


class LabelNet:
    """A fake conditional network: logits depend on the label only; counts its calls."""

    num_classes = 3

    def __init__(self):
        self.calls = []
        self.table = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # label -> logits over V=6

    def __call__(self, xt, t, labels=None):
        self.calls.append(labels.clone())
        return self.table[labels][:, None, :].expand(-1, xt.shape[1], -1)


def test_guided_wrapper():
    net = LabelNet()
    labels = torch.tensor([0, 2])
    xt, t = torch.zeros(2, 7, dtype=torch.long), torch.full((2,), 0.5)
    out = guidance.Guided(net, labels, 0.0)(xt, t)
    assert len(net.calls) == 1 and torch.equal(out, net.table[labels][:, None].expand(-1, 7, -1))  # w = 0: conditional
    out = guidance.Guided(net, labels, 1.5)(xt, t)
    assert len(net.calls) == 2 and net.calls[-1].tolist() == [0, 2, 3, 3]  # one batch: labels, then null labels
    expect = guidance.guided_logits(net.table[labels], net.table[[3, 3]], 1.5)
    assert torch.allclose(out[:, 0], expect) and out.shape == (2, 7, 6)


def test_drop_labels_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (20000,), generator=g)
    d = guidance.drop_labels(y, 0.25, 10, g)
    dropped = d == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.015
    assert torch.equal(d[~dropped], y[~dropped])
    assert torch.equal(guidance.drop_labels(y, 0.0, 10, g), y)


def test_transformer_label_conditioning():
    torch.manual_seed(0)
    net = Transformer(5, dim=32, layers=1, heads=2, time_cond=False, cond_dim=16, num_classes=3, image_shape=(2, 2, 1))
    x, t = torch.randint(0, 6, (3, 4)), torch.rand(3)
    # adaLN-zero: at initialisation every block is the identity, so the label cannot matter yet
    assert torch.allclose(net(x, t, torch.tensor([0, 1, 2])), net(x, t, torch.tensor([1, 2, 0])))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    a, b = net(x, t, torch.tensor([0, 0, 0])), net(x, t, torch.tensor([1, 1, 1]))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t), net(x, t, torch.full((3,), 3)))  # no labels = the null label
    assert torch.equal(net(x, t, torch.tensor([0, 1, 1]))[0], a[0])  # each row sees its own label


def test_pixel_positions_know_rows_and_columns():
    net = Transformer(5, dim=32, layers=1, heads=2, time_cond=False, image_shape=(3, 4, 2))
    pos = net.positions
    e = pos(24)
    for n in (0, 9, 23):
        r, c, k = n // 8, n // 2 % 4, n % 2
        assert torch.allclose(e[n], pos.row.weight[r] + pos.col.weight[c] + pos.channel.weight[k])


def class_toys():
    """Two classes of sequences (V = 2, N = 3) and their mixture: exact denoisers per label."""
    toys = [ToyDistribution.random(2, 3, seed=s) for s in (0, 1)]
    mix = ToyDistribution(0.5 * toys[0].probs + 0.5 * toys[1].probs, 2, 3)
    dens = [toys[0].denoiser(), toys[1].denoiser(), mix.denoiser()]

    def net(xt, t, labels=None):
        labels = torch.full((len(xt),), 2) if labels is None else labels
        out = torch.empty(len(xt), 3, 2)
        for k in range(3):
            rows = labels == k
            if rows.any():
                out[rows] = dens[k](xt[rows], t[rows])
        return out

    net.num_classes = 2
    return toys, mix, net


def empirical(toy, x):
    return torch.bincount(toy.index(x), minlength=len(toy.probs)).double() / len(x)


def test_conditional_sampling_follows_the_class_distribution():
    toys, mix, net = class_toys()
    model, g = MD4(2), torch.Generator().manual_seed(0)
    n = 3000  # 64 steps: rarely two tokens revealed in one step, so sampling is close to exact
    for k in (0, 1):
        x = model.sample(guidance.conditioned(net, torch.full((n,), k)), n, 3, steps=64, generator=g)
        tv = 0.5 * (empirical(toys[k], x) - toys[k].probs).abs().sum()
        assert tv < 0.04, (k, tv)  # sampling noise alone: TV about 0.02
    # guidance w > 0 moves samples towards the class: P(x | y) / P(x) ratios get sharper
    x0 = model.sample(guidance.conditioned(net, torch.zeros(n, dtype=torch.long), 0.0), n, 3, steps=16, generator=g)
    x3 = model.sample(guidance.conditioned(net, torch.zeros(n, dtype=torch.long), 3.0), n, 3, steps=16, generator=g)
    log_ratio = (toys[0].probs / mix.probs).log()
    assert (empirical(toys[0], x3) * log_ratio).sum() > (empirical(toys[0], x0) * log_ratio).sum() + 0.05


def test_infill_keeps_known_positions_and_follows_the_conditional():
    toy = ToyDistribution.random(3, 3, seed=2)
    model, g = MD4(3), torch.Generator().manual_seed(0)
    n = 3000
    known = torch.tensor([[2, 0, 1]]).expand(n, -1)
    mask = torch.tensor([[False, True, False]]).expand(n, -1)  # position 1 known = 0; fill 0 and 2
    x = guidance.infill(model, toy.denoiser(), known, mask, steps=64, generator=g)
    assert (x[:, 1] == 0).all() and (x != model.mask_id).all()
    cond = toy.probs * (toy.sequences[:, 1] == 0)
    cond = cond / cond.sum()
    tv = 0.5 * (empirical(toy, x) - cond).abs().sum()
    assert tv < 0.04, tv


@pytest.mark.parametrize("steps", [5, 12])
def test_batch_recorder_sees_every_change(steps):
    """md4.trace.Recorder(index=None) keeps the whole batch at the start and after every step that
    changed it (the image strips use it): masks only ever disappear and the last state is the sample."""
    from md4.trace import Recorder

    toy = ToyDistribution.random(2, 4, seed=0)
    rec = Recorder(index=None)
    x = MD4(2).sample(toy.denoiser(), 3, 4, steps=steps, generator=torch.Generator().manual_seed(0), callback=rec)
    assert 2 <= len(rec.states) <= steps + 1 and all(s.shape == (3, 4) for s in rec.states)
    assert (rec.states[0] == 2).all()  # starts all masked
    masked = [int((s == 2).sum()) for s in rec.states]
    assert masked == sorted(masked, reverse=True) and len(set(masked)) == len(masked)  # each state differs
    assert torch.equal(rec.states[-1], x) and (x != 2).all()


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_cached_sampler_keeps_each_rows_label(weight):
    """The cached sampler re-runs the network on the rows that changed only; the labels (and the
    guidance) must follow those rows, so it returns exactly the ancestral sampler's samples."""
    from md4 import MD4
    from md4.nn import Transformer

    torch.manual_seed(0)
    net = Transformer(5, dim=32, layers=1, heads=2, time_cond=False, num_classes=3).eval()
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    den = guidance.conditioned(net, labels, weight)
    model = MD4(5)
    out = {s: model.sample(den, 6, 12, steps=40, generator=torch.Generator().manual_seed(3), sampler=s)
           for s in ("ancestral", "cached")}
    assert torch.equal(out["ancestral"], out["cached"])
