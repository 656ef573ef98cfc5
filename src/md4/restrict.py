"""Restricting the prediction at each position to the tokens that can be there.

A tokenizer may declare `allowed(x) -> [B, N, V] bool` (or [N, V], the same for every row): which
values position n can take given the input x [B, N] (values 0..V, mask id V; unmasked positions
are the truth). `restrict_network` then adds a forward hook to the network that pushes the other
logits to -1e4, so that softmax gives them probability 0 in training, evaluation and sampling
alike. The true x_0 is always allowed, so this only removes mass from impossible rows: the model
stays a distribution at every position and the NELBO stays a bound (a lower one).

Tables (md4.data.tables): position n takes only the values of column n. Records
(md4.data.records): the structure  symbols* EOS PAD*  given what is unmasked (a symbol or EOS
after n makes n a symbol; EOS or PAD before n makes n PAD; one EOS at most).
The hook is the same whatever the method (md4.build adds it when the tokenizer is given, for
training and loading alike); records restrict only non-causal networks (an AR
network sees its input shifted by one, and learns the structure exactly anyway); the rule of
tables does not read the input, so it restricts AR networks too (their logits at n predict n).
"""

from __future__ import annotations

import torch

NEG = -1.0e4  # exp(-1e4) is 0 even in float64; finite, so classifier-free guidance stays finite


def restrict_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [B, N, V] with the entries outside `allowed` ([B, N', V] or [N', V] bool, N' >= N:
    the first N positions are used) set to NEG."""
    allowed = allowed[..., : logits.shape[-2], :].to(logits.device)
    return logits.masked_fill(~allowed, NEG)


def restrict_network(net: torch.nn.Module, tokenizer, causal: bool = False):
    """Hook the tokenizer's `allowed` rule onto `net` (nothing when the tokenizer has none, or
    declares `structural` rules and the method's network is `causal`: md4.method.Method.causal).
    The hook is the module's own (torch's forward hooks): the network's weights, its state dict
    and its backbone protocol (md4.nn.backbone) are untouched. Returns the hook handle or None."""
    rule = getattr(tokenizer, "allowed", None)
    if rule is None or (getattr(tokenizer, "structural", False) and causal):
        return None

    def hook(module, args, output):
        return restrict_logits(output, rule(args[0]))

    return net.register_forward_hook(hook)
