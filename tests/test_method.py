"""What methods declare (md4.method.Method) and what samplers need (md4.sampling.SAMPLERS)."""

import pytest
import torch

from md4.ar import AR
from md4.build import METHODS
from md4.diffusion import MD4
from md4.errors import UserError
from md4.genmd4 import GenMD4
from md4.method import Method
from md4.sampling import SAMPLERS, check_sampler, sample, supported_samplers
from md4.sedd import SEDD

CAPABILITIES = ("causal", "exact_likelihood", "continuous_time_only", "needs_time_cond", "reverse_process",
                "predicts_mean", "shared_schedule")


def test_every_method_declares_every_capability_as_a_bool():
    for name, cls in METHODS.items():
        assert issubclass(cls, Method), name
        assert cls.description and cls.description != Method.description, name
        for cap in CAPABILITIES:
            assert isinstance(getattr(cls, cap), bool), (name, cap)
    for sampler in SAMPLERS.values():
        assert set(sampler.needs) <= set(CAPABILITIES)


def test_the_samplers_each_method_supports():
    assert supported_samplers(MD4(5)) == list(SAMPLERS) == ["ancestral", "cached", "mean", "jump", "confidence", "remdm"]
    assert supported_samplers(GenMD4(5)) == ["ancestral", "cached", "mean"]  # one schedule per token
    assert supported_samplers(SEDD(5)) == ["ancestral", "cached"]  # score ratios, not a mean
    assert supported_samplers(AR(5)) == []  # draws left to right on its own


@pytest.mark.parametrize("model, sampler, says", [
    (SEDD(5), "mean", "own reverse step.*use ancestral or cached"),
    (SEDD(5), "jump", "own reverse step"),
    (GenMD4(5), "confidence", "one masking schedule per token.*use ancestral or cached or mean"),
    (AR(5), "ancestral", "draws on its own"),
    (MD4(5), "cached", "ignores t"),  # a denoiser that uses t
    (MD4(5), "gibbs", "Unknown sampler 'gibbs'; choose one of ancestral, cached, mean, jump, confidence, remdm"),
])
def test_a_sampler_a_method_cannot_use_is_one_sentence(model, sampler, says):
    with pytest.raises(UserError, match=says):
        check_sampler(model, sampler)


def test_sample_refuses_what_the_method_lacks_before_any_network_call():
    calls = []

    def denoiser(x, t):
        calls.append(1)
        return torch.zeros(*x.shape, 5)

    with pytest.raises(UserError, match="one masking schedule per token"):
        sample(GenMD4(5), denoiser, 2, 4, steps=4, sampler="jump")
    assert calls == []
    x = sample(GenMD4(5), denoiser, 2, 4, steps=4, sampler="mean")  # one it has: runs
    assert x.shape == (2, 4) and len(calls) >= 1
