"""The judge scores every token of a sample longer than its context (in windows overlapping by one
token), so its NLL per character divides by characters that were all scored. A tiny fake causal
LM stands in for the judge: a bigram model over characters, whose exact NLL needs only the
previous token, so windowed scoring must give exactly the unwindowed sum."""

import math
from types import SimpleNamespace

import pytest
import torch

from md4.judge import Judge, generative_perplexity, windows

V = 128  # characters' code points; BOS = 0


class Bigram(torch.nn.Module):
    """logits[b, i] = table[x[b, i]]: p(next | previous token) only. A position table of `context`."""

    def __init__(self, context: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(max_position_embeddings=context)

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape[1] <= self.config.max_position_embeddings  # a longer input would fail on a real judge
        return SimpleNamespace(logits=self.table[input_ids])


class Chars:
    bos_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def exact_nll(judge: Judge, text: str) -> float:
    logp = torch.log_softmax(judge.model.table.double(), -1)
    ids = [0] + [ord(c) for c in text]
    return -sum(logp[a, b].item() for a, b in zip(ids, ids[1:]))


def test_windows_score_each_token_once():
    ids = list(range(11))  # BOS and 10 tokens
    ws = windows(ids, 4)
    assert ws == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10]]
    assert [t for w in ws for t in w[1:]] == ids[1:]
    assert windows([0], 4) == [[0]] and windows([0, 1, 2], 4) == [[0, 1, 2]]


def test_long_samples_are_scored_whole():
    judge = Judge(Bigram(context=16), Chars(), "bigram")
    long = "the king rode out of the city at dawn and his men followed him to the river"  # 75 tokens > 16
    (nll, n), = judge.nll([long], batch_size=3)
    assert n == len(long) and nll == pytest.approx(exact_nll(judge, long), rel=1e-6)
    r = generative_perplexity(judge, [long, long[:10]], batch_size=2)
    total = exact_nll(judge, long) + exact_nll(judge, long[:10])
    assert r["judge_tokens"] == len(long) + 10
    assert r["judge_bits_per_char"] == pytest.approx(total / math.log(2) / (len(long) + 10), rel=1e-6)
    assert r["gen_ppl"] == pytest.approx(math.exp(total / (len(long) + 10)), rel=1e-6)
    # the same characters as two samples of under 16 tokens: the same bits per character as one
    # sample of 32 (truncating it at 16 tokens but dividing by 32 characters gave about half)
    text = long[:32]
    halves = generative_perplexity(judge, [text[:16], text[16:]])
    whole = generative_perplexity(judge, [text])
    extra = exact_nll(judge, text) - exact_nll(judge, text[:16]) - exact_nll(judge, text[16:])  # BOS vs context
    assert whole["judge_bits_per_char"] == pytest.approx(halves["judge_bits_per_char"] + extra / math.log(2) / 32,
                                                         rel=1e-6)
    assert abs(extra) < 0.2 * exact_nll(judge, text)
