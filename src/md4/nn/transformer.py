"""Bidirectional transformer denoiser: tokens x [B, N] and time t [B] -> logits [B, N, V].

It knows nothing of diffusion: token id V is simply one more input symbol (the mask), and the
head predicts only the V real symbols. Pre-norm blocks with rotary position embeddings (RoPE),
fused-qkv attention through `F.scaled_dot_product_attention` (no causal mask), SwiGLU or GELU
feed-forward. With `time_cond=True`, t enters through adaLN-zero (DiT, Peebles & Xie 2023):
each block's norms are shifted/scaled and its two residual branches gated by a linear function
of a time embedding, zero-initialised so that every block starts as the identity.

Two options for images (md4.data.images): `num_classes > 0` adds a class-label embedding to the
same conditioning vector (adaLN), with one extra "null" label (id num_classes) meaning
unconditional, for label dropout and classifier-free guidance; `image_shape=(H, W, C)` adds
learned row, column and channel embeddings to the tokens, so attention also knows where a
token sits in the image (RoPE alone sees only the distance along the raster order).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from md4.errors import UserError
from md4.nn.backbone import Backbone


def rope_tables(n: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the angles m * base^(-2i / head_dim), positions m < n: each [n, head_dim] float32.

    Frequency i serves the pair of channels (i, i + head_dim / 2), so the halves are repeated.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x_i, x_{i + D/2}) of x: [..., N, D] by its position's angle.

    cos, sin: [N, D] from `rope_tables`. Rotations compose, so <rope(q, m), rope(k, n)> depends
    on n - m only: attention sees relative positions.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t: [B] in [0, 1] -> [B, dim] (t is scaled so features vary fast)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = scale * t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] normalised, shift/scale [B, 1, D]; scale = 0 is the identity."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, RoPE on q and k, no mask."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; every position attends to every position (to itself and
        the earlier ones when causal)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                           is_causal=self.causal)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, N, D)))


class MLP(nn.Module):
    """SwiGLU, W2 (silu(W1 x) * W3 x), when glu else W2 gelu(W1 x)."""

    def __init__(self, dim: int, hidden: int, glu: bool, dropout: float):
        super().__init__()
        self.glu = glu
        self.fc = nn.Linear(dim, 2 * hidden if glu else hidden, bias=False)  # W1 and W3 fused
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc(x))
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm block; with cond_dim > 0 its norms and residual gates are set by adaLN-zero."""

    def __init__(self, dim: int, heads: int, hidden: int, glu: bool, cond_dim: int, dropout: float,
                 causal: bool = False):
        super().__init__()
        affine = cond_dim == 0  # under adaLN the modulation is the norm's affine map
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=affine, bias=False)
        self.attn = Attention(dim, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=affine, bias=False)
        self.mlp = MLP(dim, hidden, glu, dropout)
        self.ada = nn.Linear(cond_dim, 6 * dim) if cond_dim else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                c: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; c: [B, cond_dim] time embedding (after SiLU), or None."""
        if self.ada is None:
            x = x + self.attn(self.norm1(x), cos, sin)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PixelPositions(nn.Module):
    """Learned row + column + channel embeddings for tokens of [H, W, C] images in raster order."""

    def __init__(self, shape: tuple[int, int, int], dim: int):
        super().__init__()
        self.shape = tuple(int(v) for v in shape)
        H, W, C = self.shape
        self.row, self.col, self.channel = nn.Embedding(H, dim), nn.Embedding(W, dim), nn.Embedding(C, dim)

    def forward(self, n: int) -> torch.Tensor:
        """[n, dim] embeddings of the first n positions (n <= H * W * C)."""
        H, W, C = self.shape
        i = torch.arange(n, device=self.row.weight.device)
        return self.row(i // (W * C)) + self.col(i // C % W) + self.channel(i % C)


class Transformer(Backbone):
    """Denoiser backbone; `time_cond=False` builds no time parameters and ignores t entirely.
    `causal=True` makes position n attend only to positions <= n (the autoregressive baseline)."""

    def __init__(self, vocab_size: int, dim: int = 384, layers: int = 6, heads: int = 6,
                 mlp_ratio: float = 4.0, glu: bool = True, time_cond: bool = True,
                 cond_dim: int = 128, dropout: float = 0.0, max_len: int = 4096, causal: bool = False,
                 num_classes: int = 0, image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        assert dim % heads == 0 and (dim // heads) % 2 == 0, "head dim must be even, for RoPE"
        self.vocab_size, self.dim, self.layers, self.time_cond = vocab_size, dim, layers, time_cond
        self.causal = causal
        self.num_classes = num_classes
        conditioned = time_cond or num_classes > 0  # an adaLN conditioning vector exists
        # SwiGLU has three matrices: 2/3 of the hidden width keeps the parameter count (llama)
        hidden = -(-int(2 / 3 * mlp_ratio * dim) // 32) * 32 if glu else int(mlp_ratio * dim)
        self.cond_dim = cond_dim = cond_dim if conditioned else 0
        self.embed = nn.Embedding(vocab_size + 1, dim)  # + 1: the mask token, id vocab_size
        self.positions = PixelPositions(image_shape, dim) if image_shape else None
        if time_cond:
            self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(),
                                          nn.Linear(cond_dim, cond_dim), nn.SiLU())
        if num_classes:  # + 1: the null label (unconditional), id num_classes
            self.label_embed = nn.Embedding(num_classes + 1, cond_dim)
        if conditioned:
            self.final_ada = nn.Linear(cond_dim, 2 * dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, glu, cond_dim, dropout, causal)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim, elementwise_affine=not conditioned, bias=False)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rope_tables(max_len, dim // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled down with depth
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))
        adaln = [b.ada for b in self.blocks] + [self.final_ada] if conditioned else []
        for linear in adaln:  # adaLN-zero: no shift, unit scale, closed gates at init
            nn.init.zeros_(linear.weight)

    @classmethod
    def from_config(cls, vocab_size: int, cfg, *, length: int, causal: bool = False,
                    image_shape: tuple[int, int, int] | None = None) -> "Transformer":
        """From model.* keys dim, layers, heads, mlp_ratio, glu, time_cond, cond_dim, dropout,
        num_classes and pos2d (learned pixel positions: needs `image_shape`); RoPE tables for
        max(length, 1024) positions, so samples may be longer than the training length."""
        if cfg.dim % cfg.heads:
            raise UserError(f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads}).")
        if cfg.pos2d and image_shape is None:
            raise UserError("model.pos2d needs an image dataset (learned row, column and channel positions).")
        return cls(vocab_size, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                   glu=cfg.glu, time_cond=cfg.time_cond, cond_dim=cfg.cond_dim, dropout=cfg.dropout,
                   max_len=max(length, 1024), causal=causal, num_classes=cfg.num_classes,
                   image_shape=image_shape if cfg.pos2d else None)

    @property
    def max_len(self) -> int:
        """The longest sequence this network takes (its RoPE tables)."""
        return self.rope_cos.shape[0]

    @property
    def uses_time(self) -> bool:
        return self.time_cond

    def shard_units(self) -> list[nn.Module]:
        """Each block: FSDP gathers one block's weights at a time."""
        return list(self.blocks)

    @staticmethod
    def _init(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The adaLN conditioning vector [B, cond_dim]: time embedding + label embedding (labels
        [B] long in 0..num_classes; None = the null label), or None for an unconditioned network."""
        c = self.time_mlp(timestep_embedding(t, self.cond_dim)) if self.time_cond else None
        if self.num_classes:
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.embed.weight.device)
            e = self.label_embed(labels)
            c = e if c is None else c + e
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N] long in 0..V (V is the mask id), t: [B] float in [0, 1] -> logits [B, N, V].
        labels: [B] long class ids (num_classes = unconditional), only for class-conditional networks."""
        N = x.shape[1]
        assert N <= self.rope_cos.shape[0], f"sequence length {N} exceeds max_len"
        cos, sin = self.rope_cos[:N], self.rope_sin[:N]
        c = self.condition(t, labels, x.shape[0])
        h = self.embed(x)
        if self.positions is not None:
            h = h + self.positions(N)
        for block in self.blocks:
            h = block(h, cos, sin, c)
        h = self.norm(h)
        if c is not None:
            shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.head(h)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; embeddings=False leaves out the token embedding (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, nanoGPT / PaLM convention:
        6 * P + 12 * layers * dim * seq_len, where P counts the parameters applied at every
        token (blocks, final norm, head) and 12 * L * D * N is the q.k and attention.v matmuls.
        Not in P: the token embedding (a lookup) and the time path (time MLP and adaLN linears),
        which runs once per sequence, not per token.
        """
        P = self.num_params(embeddings=False)
        if self.cond_dim:
            time_path = [getattr(self, "time_mlp", nn.Identity()), self.final_ada] + [b.ada for b in self.blocks]
            P -= sum(p.numel() for m in time_path for p in m.parameters())
        for lookup in (getattr(self, "label_embed", None), self.positions):  # lookups, no FLOPs
            P -= sum(p.numel() for p in lookup.parameters()) if lookup is not None else 0
        return 6 * P + 12 * self.layers * self.dim * seq_len
