"""U-Net denoiser for images: tokens x [B, N] (N = H * W * C, raster order, channels innermost)
and time t [B] -> logits [B, N, V].

The image backbone of MD4's CIFAR-10 model (Shi et al. 2024), which took the U-Net of VDM
(Kingma et al. 2021): one resolution, `res_blocks` residual blocks on the way down, a middle of
block - self-attention - block, `res_blocks + 1` blocks on the way up, each fed the matching
down-path activation through a skip concatenation. The paper's setting is 128 channels, 32
blocks, one attention head, dropout 0.1, at 32 x 32.

The same code is the DDPM U-Net (Ho et al. 2020) when `mults` has more than one entry: level i
works at 1 / 2^i of the image size with ch * mults[i] channels, stride-2 convolutions go down
and nearest-neighbour upsampling (to the skip's size, so odd sizes such as 7 work) goes up, and
`attn_res` lists the feature-map heights whose blocks are followed by self-attention.

Tokens to features: each of a pixel's C tokens (a value 0..V-1, or the mask id V) is looked up
in one embedding table [V + 1, ch]; the C vectors are concatenated into C * ch input channels.
Features to logits: a 3 x 3 convolution to C * V channels, read as V logits per channel token.
Conditioning: the sinusoidal features of t (when `time_cond`) and a class-label embedding (when
`num_classes > 0`; id num_classes is the null label, as in md4.nn.Transformer) are concatenated
and sent through an MLP to c [B, ch]; every residual block adds a linear map of c to its
features. The last layer of every residual branch (block and attention), the conditioning maps
and the output convolution start at zero, so the network starts as a uniform predictor.

Written from the description of the authors' JAX code (google-deepmind/md4: md4/networks/unet.py,
md4/models/backward.py); it differs in the attention's output projection starting at zero and in
narrow networks' GroupNorm groups (see `group_norm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from md4.errors import UserError
from md4.nn.backbone import Backbone
from md4.nn.transformer import timestep_embedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups at the paper's widths (multiples of 128), and at least 4 channels
    per group in narrower networks: the residual blocks add the conditioning as one bias per
    channel right before a GroupNorm, which removes each group's mean, so with one channel per
    group t and the label would have no effect at all."""
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels, eps=1e-6)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x + conv(drop(silu(norm(conv(silu(norm(x))) + W c)))), with a 1 x 1 convolution on the
    skip when the width changes. x: [B, cin, H, W], c: [B, cond_dim] or None -> [B, cout, H, W]."""

    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = zero(nn.Linear(cond_dim, cout, bias=False)) if cond_dim else None
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.cond is not None:
            h = h + self.cond(c)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """x + attention over all H * W positions of norm(x): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        assert channels % heads == 0, "attention heads must divide the channels"
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        z = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(z).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(y).transpose(1, 2).reshape(B, C, H, W)


class Stage(nn.Module):
    """One residual block, followed by self-attention when `heads` > 0."""

    takes_skip = True  # on the way up, its input is the previous output concatenated with a skip

    def __init__(self, cin: int, cout: int, cond_dim: int, dropout: float, heads: int = 0):
        super().__init__()
        self.res = ResBlock(cin, cout, cond_dim, dropout)
        self.attn = SelfAttention(cout, heads) if heads else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.res(x, c)
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Module):
    """Stride-2 3 x 3 convolution: [B, C, H, W] -> [B, C, ceil(H / 2), ceil(W / 2)]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3 x 3 convolution."""

    takes_skip = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(Backbone):
    """U-Net denoiser over images of `image_shape` (H, W, C); the sequence length is fixed to
    H * W * C. `time_cond=False` builds no time parameters and ignores t entirely."""

    def __init__(self, vocab_size: int, image_shape: tuple[int, int, int], ch: int = 128,
                 mults: tuple[int, ...] = (1,), res_blocks: int = 32, attn_res: tuple[int, ...] = (),
                 heads: int = 1, time_cond: bool = True, num_classes: int = 0, dropout: float = 0.1):
        super().__init__()
        assert len(mults) >= 1 and res_blocks >= 1
        self.vocab_size, self.image_shape = vocab_size, tuple(int(v) for v in image_shape)
        self.time_cond, self.num_classes = time_cond, num_classes
        H, W, C = self.image_shape
        self.embed = nn.Embedding(vocab_size + 1, ch)  # + 1: the mask token, id vocab_size
        cond_in = (ch // 2 * 2 if time_cond else 0) + (ch if num_classes else 0)  # time features: even size
        if num_classes:  # + 1: the null label (unconditional), id num_classes
            self.label_embed = nn.Embedding(num_classes + 1, ch)
        self.cond_mlp = nn.Sequential(nn.Linear(cond_in, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, ch)) if cond_in else None
        cond_dim = ch if cond_in else 0
        self.conv_in = nn.Conv2d(C * ch, ch, 3, padding=1)

        sizes = [H]  # feature-map height at each level: halved, rounding up
        while len(sizes) < len(mults):
            sizes.append((sizes[-1] + 1) // 2)
        skips, width = [ch], ch  # the channels of every skip, in the order they are pushed
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            attn = heads if sizes[level] in attn_res else 0
            for _ in range(res_blocks):
                self.down.append(Stage(width, ch * mult, cond_dim, dropout, attn))
                width = ch * mult
                skips.append(width)
            if level < len(mults) - 1:
                self.down.append(Downsample(width))
                skips.append(width)
        self.mid = nn.ModuleList([Stage(width, width, cond_dim, dropout, heads),
                                  Stage(width, width, cond_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            attn = heads if sizes[level] in attn_res else 0
            for _ in range(res_blocks + 1):
                self.up.append(Stage(width + skips.pop(), ch * mult, cond_dim, dropout, attn))
                width = ch * mult
            if level > 0:
                self.up.append(Upsample(width))
        assert not skips
        self.norm_out = group_norm(width)
        self.conv_out = zero(nn.Conv2d(width, C * vocab_size, 3, padding=1))

    @classmethod
    def from_config(cls, vocab_size: int, m, *, length: int, causal: bool = False,
                    image_shape: tuple[int, int, int] | None = None) -> "UNet":
        """Built from an md4.config.ModelConfig `m` (its unet_* keys, time_cond, num_classes, dropout)
        over whole images of `image_shape`: UserError for text data, another length, or a method
        that needs a causal network."""
        if causal:
            raise UserError("This method needs a causal network, which model.arch=unet is not; use transformer.")
        if image_shape is None:
            raise UserError("model.arch=unet needs an image dataset (data.corpus).")
        H, W, C = image_shape
        if length != H * W * C:
            raise UserError(f"model.arch=unet takes whole images: data.length must be {H * W * C} for "
                            f"{H}x{W}x{C} images, not {length}.")
        if any(m.unet_ch * k % m.unet_heads for k in m.unet_mults):
            raise UserError(f"model.unet_heads ({m.unet_heads}) must divide every width model.unet_ch x "
                            f"model.unet_mults.")
        return cls(vocab_size, image_shape, ch=m.unet_ch, mults=tuple(m.unet_mults), res_blocks=m.unet_res_blocks,
                   attn_res=tuple(m.unet_attn_res), heads=m.unet_heads, time_cond=m.time_cond,
                   num_classes=m.num_classes, dropout=m.dropout)

    @property
    def max_len(self) -> int:
        """The only sequence length this network takes: H * W * C."""
        H, W, C = self.image_shape
        return H * W * C

    @property
    def uses_time(self) -> bool:
        return self.time_cond

    def shard_units(self) -> list[nn.Module]:
        """The residual stages, down- and upsamplers, in order of use: FSDP gathers one at a time."""
        return [*self.down, *self.mid, *self.up]

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """c [B, ch] = MLP([time features, label embedding]), or None for an unconditioned network.
        labels: [B] long in 0..num_classes (None = the null label)."""
        if self.cond_mlp is None:
            return None
        parts = [timestep_embedding(t, self.embed.embedding_dim)] if self.time_cond else []
        if self.num_classes:
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.embed.weight.device)
            parts.append(self.label_embed(labels))
        return self.cond_mlp(torch.cat(parts, dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N] long in 0..V (V is the mask id), t: [B] float in [0, 1] -> logits [B, N, V].
        labels: [B] long class ids (num_classes = unconditional), only for class-conditional networks."""
        B, N = x.shape
        H, W, C = self.image_shape
        assert N == self.max_len, f"a U-Net over {H}x{W}x{C} images takes {self.max_len} tokens, not {N}"
        c = self.condition(t, labels, B)
        h = self.embed(x.view(B, H, W, C)).view(B, H, W, -1).permute(0, 3, 1, 2)  # [B, C * ch, H, W]
        h = self.conv_in(h)
        hs = [h]
        for unit in self.down:
            h = unit(h, c)
            hs.append(h)
        for unit in self.mid:
            h = unit(h, c)
        for unit in self.up:
            h = unit(torch.cat([h, hs.pop()], dim=1), c) if unit.takes_skip else unit(h, hs[-1].shape[-2:])
        h = self.conv_out(F.silu(self.norm_out(h)))  # [B, C * V, H, W], channel token c at c * V + v
        return h.view(B, C, self.vocab_size, H, W).permute(0, 3, 4, 1, 2).reshape(B, N, self.vocab_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
