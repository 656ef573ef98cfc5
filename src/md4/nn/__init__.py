"""Denoiser backbones: networks x_t [B, N], t [B] -> logits [B, N, V]; they know nothing of diffusion."""

from md4.nn.transformer import Transformer

__all__ = ["Transformer"]
