"""Denoiser backbones: networks x_t [B, N], t [B] -> logits [B, N, V]; they know nothing of diffusion."""

from md4.nn.transformer import Transformer
from md4.nn.unet import UNet

__all__ = ["Transformer", "UNet"]
