"""Denoiser backbones: networks x_t [B, N], t [B] -> logits [B, N, V]; they know nothing of diffusion.

A backbone is one module here plus one entry in BACKBONES; `model.arch` in a config chooses it,
and md4.build builds it through the protocol of md4.nn.backbone.Backbone.
"""

from __future__ import annotations

from md4.nn.backbone import Backbone
from md4.nn.transformer import Transformer
from md4.nn.unet import UNet

# model.arch -> backbone class (ModelConfig checks the name)
BACKBONES: dict[str, type[Backbone]] = {"transformer": Transformer, "unet": UNet}

__all__ = ["BACKBONES", "Backbone", "Transformer", "UNet"]
