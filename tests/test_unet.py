"""Behaviour of the U-Net denoiser backbone (md4.nn.unet)."""

import pytest
import torch
import yaml

import md4
from md4 import MD4, UserError
from md4.checkpoint import load_into, read_weights, save_model
from md4.cli import main
from md4.config import Config, from_dict, load_config
from md4.data.images import ImageTokenizer
from md4.nn import UNet
from md4.nn.unet import SelfAttention
from md4.pretrained import build

V, B = 7, 2


def small(shape=(8, 8, 1), vocab=V, seed=0, perturb=True, **kw) -> UNet:
    """A tiny U-Net; `perturb` moves every weight (the zero-initialised ones too) off its start,
    as training would, so that t, labels and every branch have an effect."""
    torch.manual_seed(seed)
    model = UNet(vocab, shape, **{"ch": 16, "res_blocks": 1, "dropout": 0.0, **kw})
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tokens(shape=(8, 8, 1), vocab=V, seed=0) -> torch.Tensor:
    """[B, H * W * C] long including the mask id."""
    H, W, C = shape
    return torch.randint(0, vocab + 1, (B, H * W * C), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("time_cond", [True, False])
def test_shape_dtype_and_bf16_autocast(time_cond):
    model = small((4, 6, 3), time_cond=time_cond)
    x, t = tokens((4, 6, 3)), torch.rand(B)
    out = model(x, t)
    assert out.shape == (B, 72, V) and out.dtype == torch.float32
    assert model.embed.num_embeddings == V + 1 and model.max_len == 72
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x, t)
    assert out16.shape == (B, 72, V) and out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all()
    assert (out16.float() - out).abs().max() < 0.1 * out.abs().max()


def test_starts_as_a_uniform_predictor():
    """The output convolution starts at zero: every logit is 0 before training."""
    model = small(perturb=False, time_cond=True, num_classes=3)
    assert torch.equal(model(tokens(), torch.rand(B)), torch.zeros(B, 64, V))


def test_token_layout_follows_the_image_tokenizer():
    """Token n of the sequence is channel c of pixel (i, j) as md4.data.images lays it out (raster
    order, channels innermost): its embedding enters the first convolution at (i, j) in channel
    block c, and its V logits are output channels c * V .. c * V + V - 1 at (i, j)."""
    H, W, C = 3, 5, 2
    model = small((H, W, C))
    images = torch.randint(0, V, (B, H, W, C), generator=torch.Generator().manual_seed(1))
    x = torch.as_tensor(ImageTokenizer(H, W, C, levels=V).encode(images.numpy()), dtype=torch.long)
    seen = {}
    model.conv_in.register_forward_hook(lambda m, inp, out: seen.update(conv_in=inp[0]))
    model.conv_out.register_forward_hook(lambda m, inp, out: seen.update(conv_out=out))
    logits = model(x, torch.rand(B))
    D, E = model.embed.embedding_dim, model.embed.weight
    for b, i, j, c in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 2, 4, 1), (1, 1, 3, 0), (0, 2, 0, 1)]:
        assert torch.equal(seen["conv_in"][b, c * D:(c + 1) * D, i, j], E[images[b, i, j, c]])
        assert torch.equal(logits[b, (i * W + j) * C + c], seen["conv_out"][b, c * V:(c + 1) * V, i, j])


def test_mask_token_accepted_and_wrong_length_rejected():
    model = small()
    assert torch.isfinite(model(torch.full((B, 64), V), torch.rand(B))).all()
    with pytest.raises(IndexError):
        model(torch.full((B, 64), V + 1), torch.rand(B))
    with pytest.raises(AssertionError, match="takes 64 tokens"):
        model(torch.zeros(B, 63, dtype=torch.long), torch.rand(B))


def test_self_attention_reaches_every_position():
    """Attention alone (no convolution) carries a change at one corner to the opposite one."""
    torch.manual_seed(0)
    attn = SelfAttention(8, heads=2)
    torch.nn.init.normal_(attn.proj.weight, std=0.3)
    x = torch.randn(1, 8, 6, 6)
    y = x.clone()
    y[0, :, 0, 0] += 1.0
    a, b = attn(x), attn(y)
    assert (a[0, :, 5, 5] - b[0, :, 5, 5]).abs().max() > 1e-3


def test_far_pixels_are_seen():
    """With one block per side the convolutions reach 12 pixels; the corner (0, 0) still moves the
    logits at the far corner of a 16 x 16 image (through the middle self-attention and the
    GroupNorm statistics, which span the whole image)."""
    shape = (16, 16, 1)
    model = small(shape)
    x = tokens(shape)
    y = x.clone()
    y[:, 0] = (x[:, 0] + 1) % V
    t = torch.rand(B)
    assert (model(x, t)[:, -1] - model(y, t)[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("time_cond", [True, False])
def test_time_dependence(time_cond):
    model = small(time_cond=time_cond)
    x = tokens()
    a, b = model(x, torch.full((B,), 0.2)), model(x, torch.full((B,), 0.9))
    if time_cond:
        assert (a - b).abs().max() > 1e-3
    else:
        assert torch.equal(a, b)
        assert model.cond_mlp is None and not any("cond" in n for n, _ in model.named_parameters())


def test_class_conditioning():
    """Labels change the output; no labels means the null label (id num_classes)."""
    model = small(time_cond=False, num_classes=3)
    x, t = tokens(), torch.rand(B)
    zero, one = (model(x, t, labels=torch.full((B,), k)) for k in (0, 1))
    assert (zero - one).abs().max() > 1e-3
    assert torch.equal(model(x, t), model(x, t, labels=torch.full((B,), 3)))


@pytest.mark.parametrize("mults,attn_res,shape", [((1,), (), (8, 8, 1)), ((1, 2, 2), (4,), (14, 14, 1))])
def test_gradient_reaches_every_parameter(mults, attn_res, shape):
    """Also for the multi-resolution U-Net on an odd size (14 -> 7 -> 4 and back)."""
    model = small(shape, mults=mults, attn_res=attn_res, heads=2, time_cond=True, num_classes=3).train()
    out = model(tokens(shape), torch.rand(B), labels=torch.tensor([0, 3]))
    assert out.shape == (B, shape[0] * shape[1], V)
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_paper_structure():
    """The CIFAR-10 U-Net: 32 blocks down, block-attention-block, 33 blocks up, one resolution;
    28.4M parameters (the paper reports 28M). Built on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = UNet(256, (32, 32, 3), ch=128, res_blocks=32, dropout=0.1)
    assert len(model.down) == 32 and len(model.up) == 33 and len(model.mid) == 2
    with_attn = [n for n, m in model.named_modules() if isinstance(m, SelfAttention)]
    assert with_attn == ["mid.0.attn"]
    assert model.num_params() == 28_427_520
    assert model.conv_in.in_channels == 3 * 128 and model.conv_out.out_channels == 3 * 256


def test_training_steps_reduce_the_md4_loss():
    """A few AdamW steps on a fixed batch of 8 x 8 images (V = 256) lower the MD4 loss measured
    with the same draws of t and masks."""
    torch.manual_seed(0)
    model = UNet(256, (8, 8, 1), ch=16, res_blocks=1, dropout=0.0, time_cond=False)
    md4 = MD4(vocab_size=256)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.arange(64).view(8, 8) * 3 + torch.randint(0, 8, (4, 8, 8), generator=g)).view(4, 64)

    def fixed_loss():
        return md4.loss(model, x0, generator=torch.Generator().manual_seed(1))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = fixed_loss().item()
    for step in range(6):
        opt.zero_grad()
        md4.loss(model, x0, generator=torch.Generator().manual_seed(100 + step)).backward()
        opt.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.85 * before  # measured: 458 -> 346 nats


def test_safetensors_round_trip(tmp_path):
    model = small(time_cond=True, num_classes=3)
    save_model(tmp_path, {"format": "md4"}, model.state_dict())
    other = small(seed=1, perturb=True, time_cond=True, num_classes=3)
    x, t = tokens(), torch.rand(B)
    assert not torch.equal(model(x, t), other(x, t))
    load_into(other, read_weights(tmp_path / "model.safetensors"), tmp_path)
    assert torch.equal(model(x, t), other(x, t))


# ---- model.arch=unet: config keys, presets, build, end to end ----------------------------------


def test_list_config_keys():
    cfg = load_config("fashion-mnist-unet", ["model.unet_mults=[1, 2]", "model.unet_attn_res=7"])
    assert cfg.model.unet_mults == [1, 2] and cfg.model.unet_attn_res == [7]
    assert from_dict(Config, yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # config.yaml round trip
    for bad in ("model.unet_mults=x", "model.unet_mults=[]", "model.unet_mults=[1, 0]", "model.arch=mlp"):
        with pytest.raises(UserError):
            load_config("fashion-mnist-unet", [bad])


def test_cifar10_unet_preset_is_the_papers():
    cfg = load_config("cifar10-unet")
    m, t = cfg.model, cfg.train
    assert (m.arch, m.unet_ch, m.unet_mults, m.unet_res_blocks, m.unet_attn_res) == ("unet", 128, [1], 32, [])
    assert m.time_cond and m.dropout == 0.1 and cfg.schedule == "linear"
    assert (t.lr, t.batch_size, t.steps, t.warmup, t.ema) == (2e-4, 256, 2_000_000, 100, 0.9999)
    assert (t.beta2, t.weight_decay, t.grad_clip, t.min_lr_ratio) == (0.99, 0.01, 0.0, 0.0)
    with torch.device("meta"):
        _, net = build(cfg, 256)
    assert isinstance(net, UNet) and net.num_params() == 28_427_520 and net.image_shape == (32, 32, 3)


def test_build_chooses_the_backbone_and_rejects_what_a_unet_cannot_do():
    _, net = build(load_config("fashion-mnist-unet", ["model.unet_ch=16", "model.unet_res_blocks=1"]), 256)
    assert isinstance(net, UNet) and net.image_shape == (14, 14, 1) and net.num_classes == 10
    assert net.max_len == 196 and not net.time_cond
    _, net = build(load_config("fashion-mnist"), 256)
    assert not isinstance(net, UNet) and net.max_len >= 196
    for bad in (["data.corpus=shakespeare"], ["method=ar"], ["data.length=100"], ["model.unet_heads=3"]):
        with pytest.raises(UserError):
            build(load_config("fashion-mnist-unet", bad), 256)


def test_train_eval_sample_a_unet(tmp_path, monkeypatch, capsys):
    from test_image_cli import png_size, train_images

    run = train_images(tmp_path, monkeypatch, "model.arch=unet", "model.unet_ch=16", "model.unet_res_blocks=1",
                       "train.steps=4", "train.eval_every=4", "train.ckpt_every=4")
    m = md4.load(run)
    assert isinstance(m.net, UNet) and m.net.image_shape == (7, 7, 1)
    assert main(["eval", str(run), "--split", "test"]) == 0
    g = tmp_path / "g.png"
    assert main(["sample", str(run), "--num", "4", "--label", "2", "--out", str(g)]) == 0
    assert png_size(g) == (2 * 58 + 2, 2 * 58 + 2)
