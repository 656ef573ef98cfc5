"""The backbone protocol: what md4 asks of a denoising network, and nothing more.

A backbone maps x_t [B, N] long (values 0..V, V = the mask id), t [B] float and optional class
labels [B] long to logits [B, N, V]. It knows nothing of diffusion. Outside md4.nn, code uses
only what this base class declares:

    cls.from_config(vocab_size, cfg, length=N, causal=False, image_shape=None)   build it
    net.max_len        the longest sequence it takes
    net.uses_time      whether its output depends on t (False: samplers may reuse predictions)
    net.shard_units()  submodules to shard one by one under FSDP (the rest shards as one group)
    net.num_classes    class labels it is conditioned on (0: none); label num_classes is the null label
    net(x, t, labels=None)
"""

from __future__ import annotations

from torch import nn


class Backbone(nn.Module):
    """Base class of the denoising networks of md4.nn (registered in md4.nn.BACKBONES)."""

    num_classes: int = 0

    @classmethod
    def from_config(cls, vocab_size: int, cfg, *, length: int, causal: bool = False,
                    image_shape: tuple[int, int, int] | None = None) -> Backbone:
        """The network for `cfg` (md4.config.ModelConfig: the keys this backbone reads) over V =
        vocab_size tokens, for sequences of `length` tokens; `causal` when the method needs it
        (a backbone that cannot be causal raises md4.errors.UserError); `image_shape` (H, W, C)
        when the data are images in raster order, else None."""
        raise NotImplementedError

    @property
    def max_len(self) -> int:
        raise NotImplementedError

    @property
    def uses_time(self) -> bool:
        raise NotImplementedError

    def shard_units(self) -> list[nn.Module]:
        return []
