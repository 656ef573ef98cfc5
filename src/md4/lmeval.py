"""md4 models in lm-evaluation-harness: the model type "md4".

    pip install "md4[lmeval]"
    md4-lm-eval --model md4 --model_args pretrained=runs/demo,mc_samples=8 --batch_size 32 --tasks lambada_openai
    # or, in Python: import md4.lmeval; lm_eval.simple_evaluate(model="md4", model_args=..., tasks=...)

`md4-lm-eval` is the harness's own command line (lm_eval ...) with this module imported, which
registers the model type (the harness has no plugin discovery). model_args: pretrained (a run or
model folder, or a Hub repo id "org/name[@revision]"), mc_samples (draws of t per window,
default 1), timesteps (0 = continuous-time bound), batch_size, seed, device, revision, and for
generation sampler, steps, temperature, top_p, max_gen_toks.

The log-likelihoods are LOWER BOUNDS (minus the NELBO; exact for md4's AR baseline), as in
LLaDA's and MDLM's harness adapters: loglikelihood(context, continuation) is minus the conditional
NELBO of the continuation with only its positions masked, loglikelihood_rolling scores long text
in windows of the model length, and generate_until runs md4's samplers with the context as a
prompt and cuts at the stop strings (md4.textlm has the details). Accuracies computed from bounds
compare bounds, not likelihoods; more draws (mc_samples) lower their variance.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import md4
from md4 import textlm


@register_model("md4")
class MD4LM(LM):
    """An md4 model for lm-evaluation-harness (see the module docstring)."""

    def __init__(self, pretrained: str, mc_samples: int = 1, timesteps: int = 0, batch_size=32, seed: int = 0,
                 device: str | None = "cpu", revision: str | None = None, sampler: str = "ancestral",
                 steps: int | None = None, temperature: float = 1.0, top_p: float = 1.0, max_gen_toks: int = 64,
                 **unused):
        super().__init__()
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():  # the harness's default is cuda:0
            logging.getLogger(__name__).warning("md4: no CUDA GPU; evaluating on the CPU instead of %s", device)
            device = "cpu"
        self.model = md4.load(str(pretrained), device=device, revision=None if revision is None else str(revision))
        self.mc_samples, self.timesteps, self.seed = int(mc_samples), int(timesteps), int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> 32
        self.generation = {"sampler": sampler, "steps": None if steps is None else int(steps),
                           "temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_gen_toks)}

    @property
    def tokenizer_name(self) -> str:
        return self.model.tokenizer.name

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(bound on log p(continuation | context) in nats, is_greedy) per request; is_greedy is
        md4.textlm.greedy's one-step verdict for masked diffusion models."""
        return textlm.loglikelihoods(self.model, [tuple(r.args) for r in requests], self.mc_samples, self.timesteps,
                                     self.batch_size, self.seed, with_greedy=True)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Bound on log p(text) in nats per request, scored in windows of the model length."""
        return textlm.loglikelihoods(self.model, [("", r.args[0]) for r in requests], self.mc_samples,
                                     self.timesteps, self.batch_size, self.seed)

    def generate_until(self, requests) -> list[str]:
        """Text generated after each context, cut at the request's stop strings ("until")."""
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            options = {**self.generation, "max_tokens": int(kwargs.get("max_gen_toks", self.generation["max_tokens"]))}
            if "temperature" in kwargs:
                options["temperature"] = float(kwargs["temperature"])
            if kwargs.get("do_sample") is False:
                options["temperature"] = 0.0  # greedy: argmax at every reveal
            out += textlm.generate(self.model, [context], [until] if isinstance(until, str) else until,
                                   seed=self.seed, **options)
        return out


def main(argv: list[str] | None = None) -> None:
    """`md4-lm-eval ARGS`: the harness's command line with the md4 model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
