"""Behaviour of the Transformer denoiser backbone (md4.nn.transformer)."""

import shutil

import pytest
import torch

from md4.nn import Transformer
from md4.nn.transformer import apply_rope, rope_tables

V, B, N = 11, 3, 17


def small(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(V, **{"dim": 32, "layers": 2, "heads": 4, "cond_dim": 16, **kw})


def perturb_adaln(model: Transformer):
    """Move the adaLN-zero linears off zero, as training would, so t and the blocks have effect."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name:
                p.normal_(std=0.1)


def tokens(seed: int = 0) -> torch.Tensor:
    """[B, N] long including the mask id V."""
    return torch.randint(0, V + 1, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("time_cond", [True, False])
def test_shape_and_dtype(glu, time_cond):
    model = small(glu=glu, time_cond=time_cond)
    x, t = tokens(), torch.rand(B)
    out = model(x, t)
    assert out.shape == (B, N, V) and out.dtype == torch.float32  # V logits: never a mask logit
    assert model.head.out_features == V and model.embed.num_embeddings == V + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x, t)
    assert out16.shape == (B, N, V) and out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all()


def test_mask_token_accepted_and_out_of_range_rejected():
    model = small()
    assert torch.isfinite(model(torch.full((B, N), V), torch.rand(B))).all()
    with pytest.raises(IndexError):
        model(torch.full((B, N), V + 1), torch.rand(B))


@pytest.mark.parametrize("time_cond", [True, False])
def test_attention_is_bidirectional(time_cond):
    """Changing token j changes the logits at positions before it (a causal mask would not)."""
    model = small(time_cond=time_cond).eval()
    perturb_adaln(model)
    x, t, j = tokens(), torch.rand(B), N - 3
    y = x.clone()
    y[:, j] = (x[:, j] + 1) % V
    before, after = model(x, t), model(y, t)
    for i in (0, j - 1, j + 1):
        assert not torch.allclose(before[:, i], after[:, i], atol=1e-6), i


def test_without_time_cond_t_is_ignored():
    model = small(time_cond=False)
    assert not model.time_cond
    assert not any("time" in n or "ada" in n for n, _ in model.named_parameters())
    x = tokens()
    assert torch.equal(model(x, torch.full((B,), 0.1)), model(x, torch.full((B,), 0.9)))


def test_with_time_cond_t_matters_only_once_adaln_leaves_zero():
    model = small(time_cond=True)
    assert model.time_cond
    x, t0, t1 = tokens(), torch.full((B,), 0.1), torch.full((B,), 0.9)
    assert torch.equal(model(x, t0), model(x, t1))  # adaLN-zero: exactly t-free at init
    perturb_adaln(model)
    assert not torch.allclose(model(x, t0), model(x, t1), atol=1e-4)


def test_rope_scores_depend_on_relative_position_only():
    """<rope(q, m), rope(k, n)> = <rope(q, m + s), rope(k, n + s)>, and it does vary with n - m."""
    L, D, s = 40, 16, 7
    q, k = torch.randn(2, D)
    cos, sin = rope_tables(L, D)
    Q, K = apply_rope(q.expand(L, D), cos, sin), apply_rope(k.expand(L, D), cos, sin)  # row p at p
    scores = Q @ K.T  # [m, n]
    torch.testing.assert_close(scores[:-s, :-s], scores[s:, s:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 2])
    torch.testing.assert_close(Q.norm(dim=1), q.norm().expand(L))  # rotations keep norms
    torch.testing.assert_close(Q[0], q)  # position 0 is not rotated


def test_rope_tables_are_not_saved_and_state_dict_round_trips():
    model = small(time_cond=True)
    perturb_adaln(model)
    assert not any("rope" in k for k in model.state_dict())
    other = small(time_cond=True, max_len=64)
    other.load_state_dict(model.state_dict())
    x, t = tokens(), torch.rand(B)
    torch.testing.assert_close(other(x, t), model(x, t))


def test_dropout_only_in_training_mode():
    model = small(dropout=0.5)
    perturb_adaln(model)
    x, t = tokens(), torch.rand(B)
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))
    no_dropout = small(dropout=0.0).train()
    assert torch.equal(no_dropout(x, t), no_dropout(x, t))


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("time_cond", [True, False])
def test_gradients_reach_every_parameter(glu, time_cond):
    """Without time conditioning at once; with adaLN-zero after one optimiser step opens the gates."""
    model = small(glu=glu, time_cond=time_cond)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t = tokens(), torch.rand(B)
    for _ in range(2 if time_cond else 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, t).transpose(1, 2), x.clamp(max=V - 1)).backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_parameter_and_flop_counts():
    model = Transformer(27, time_cond=False)  # the MD4 text8 size: 6 layers, width 384
    assert model.blocks[0].mlp.fc.out_features == 2 * 1024  # SwiGLU hidden: 2/3 * 4 * 384
    assert model.num_params() - model.num_params(embeddings=False) == 28 * 384
    assert model.flops_per_token(256) == 6 * model.num_params(False) + 12 * 6 * 384 * 256
    timed = Transformer(27, time_cond=True)
    assert timed.num_params() > model.num_params()  # time MLP and adaLN linears ...
    assert timed.flops_per_token(256) < model.flops_per_token(256)  # ... run once per sequence
    assert Transformer(27, glu=False, dim=64, heads=2).blocks[0].mlp.fc.out_features == 256


@pytest.mark.parametrize("time_cond", [True, False])
def test_whole_network_traces_as_one_graph(time_cond):
    """What train.compile runs: dynamo captures the whole network in one graph (fullgraph: a graph break
    is an error) and AOT autograd's functional graph computes what eager does. aot_eager, not inductor:
    inductor's cost is its C++ builds (30-40 CPU-seconds on a cold cache; see the next test)."""
    torch._dynamo.reset()
    model = small(time_cond=time_cond, layers=1).eval()
    perturb_adaln(model)
    x, t = tokens(), torch.rand(B)
    traced = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x, t), model(x, t), atol=1e-5, rtol=1e-5)


@pytest.mark.heavy
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler: g++, c++ or clang++")
def test_compiled_model_matches_eager():
    """What train.compile runs (inductor) traces the whole network in one graph and matches eager.
    One block: the blocks share their generated kernels, and the cost (about 30 CPU-seconds on a
    cold cache) is inductor's start-up and C++ builds, not the model's size. Not in `make test`
    (`make test-heavy` runs it); the test above checks the one graph and its numerics there."""
    model = small(time_cond=True, layers=1).eval()
    perturb_adaln(model)
    x, t = tokens(), torch.rand(B)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, t), model(x, t), atol=1e-5, rtol=1e-5)
