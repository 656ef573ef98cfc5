"""Detokenizers for the zero-shot benchmarks, undoing each corpus's tokenization as the
GPT-2 / SEDD / MDLM zero-shot evaluations do before re-tokenizing the text for the model.

- WikiText (2 and 103): " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> "."; space before punctuation
  and contractions removed; spaces inside brackets and quotes removed; headings "= = T = =" -> "== T ==".
- PTB: contractions (" n't", " 's", ...) and punctuation re-attached; the number token "N" -> "1";
  "<unk>" is kept as it is (the literature keeps it).
- One Billion Words: punctuation and contractions re-attached (its text is tokenized like PTB's).
- LAMBADA (OpenAI's jsonl): already detokenized; only whitespace is normalised.

For the character-level models the detokenized text is then normalized text8-style
(md4.data.normalize_text8), so what matters there is which letters end up adjacent: "do n't"
becomes "don t", not "do n t"; "<unk>" becomes the word "unk".
"""

from __future__ import annotations

import re

_CONTRACTIONS = re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", re.IGNORECASE)
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$#]) ")
_QUOTED = re.compile(r'" ([^"\n]*?) "')


def _common(text: str) -> str:
    """Re-attach contractions, punctuation, brackets and double-quoted spans."""
    text = _CONTRACTIONS.sub(r"\1", text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _QUOTED.sub(r'"\1"', text)
    return text


def wikitext(text: str) -> str:
    """WikiText-2 / -103 (raw or tokenized) -> running text."""
    text = re.sub(r" @([-,.])@ ", r"\1", text)
    text = re.sub(r"=( =)+", lambda m: m.group(0).replace(" ", ""), text)  # "= = =" -> "==="
    text = _common(text)
    return re.sub(r"[ \t]+\n", "\n", text)


def ptb(text: str) -> str:
    """Penn Treebank (Mikolov's ptb.*.txt: lower case, one sentence a line) -> running text."""
    text = re.sub(r"(?<!\S)N(?!\S)", "1", text)  # the number token
    text = _common(text)
    return re.sub(r"[ \t]+\n", "\n", text)


def lm1b(text: str) -> str:
    """One Billion Words (tokenized news sentences, one a line) -> running text."""
    text = _common(text)
    return re.sub(r"[ \t]+\n", "\n", text)


def lambada(text: str) -> str:
    """LAMBADA passages (OpenAI's jsonl, already detokenized): whitespace only."""
    return re.sub(r"[ \t]+", " ", text).strip()


DETOKENIZERS = {"wikitext": wikitext, "ptb": ptb, "lm1b": lm1b, "lambada": lambada}
