"""Detokenizers of the zero-shot sets: each undoes its corpus's tokenization, one record (a line, a
sentence, a passage) at a time, before the text is tokenized for the model.

The rules are those of the published zero-shot evaluations of SEDD and MDLM, whose four
detokenizers are identical (louaaron/Score-Entropy-Discrete-Diffusion data.py and
kuleshov-group/mdlm dataloader.py: wt_, ptb_, lm1b_ and lambada_detokenizer), written here as
tables of (pattern, replacement) applied in order with `re.sub` (a literal pattern is escaped,
which is exactly `str.replace`: every non-overlapping occurrence, left to right). The same text
as theirs reaches the GPT-2 tokenizer, so a perplexity can be set beside their tables. Their
quirks are kept on purpose: WikiText's " N " -> " 1 " is one pass (so "N N N" keeps a middle
"N"), LM1B leaves " n't" split, PTB's "<unk>" becomes "?". (SEDD's WikiText rule
`r"/' [0-9]/"` matches only a literal "/' 1/" with slashes and is left out: it never fires.)

- WikiText (2, 103): "s '" -> "s'"; " @-@ " "-", " @,@ " ",", " @.@ " "."; the space before
  : ; . ! ? , (followed by a space) removed; spaces inside (), [], {}, "" and '' pairs removed;
  "= = = =" -> "====", "= = =" -> "===", "= =" -> "=="; " ° " -> "°"; spaces next to a newline
  removed; " N " -> " 1 "; " 's" -> "'s".
- PTB: " 's" -> "'s", "s ' " -> "s' ", " n't" -> "n't", " \\n " -> "\\n", "\\/" -> "/", every "N"
  between spaces -> "1", "$ 1" -> "$1", "# 1" -> "#1", "<unk>" -> "?".
- One Billion Words: "http : / / " -> "http://"; " 'word" -> "'word"; the space before . ? ! , : ;
  removed (before . only after a word; at the end of the sentence too for . ? !); " / " -> "/";
  spaces inside "", '', () and [] pairs removed; "$ " -> "$", "£ " -> "£".
- LAMBADA (OpenAI's jsonl): curly double quotes straightened, the passage stripped and preceded
  by a newline.

For the character models the detokenized text is then normalized text8-style
(md4.data.normalize_text8): "do n't" -> "don't" -> "don t"; "<unk>" -> "?" -> nothing.
"""

from __future__ import annotations

import re
from typing import Callable

Rule = tuple[str, str, bool]  # (pattern, replacement, is a regular expression)


def literal(*pairs: str) -> list[Rule]:
    """Literal (old, new) rules from a flat list old1, new1, old2, new2, ..."""
    return [(old, new, False) for old, new in zip(pairs[::2], pairs[1::2])]


def regex(*pairs: str) -> list[Rule]:
    return [(pattern, new, True) for pattern, new in zip(pairs[::2], pairs[1::2])]


def compile_rules(rules: list[Rule]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p if is_re else re.escape(p)), new if is_re else new.replace("\\", r"\\"))
            for p, new, is_re in rules]


def pairs_stripped(inner_space: str, *brackets: str) -> list[Rule]:
    """Spaces (`inner_space`: \\s* or a single space) removed just inside each pair of brackets
    "()" "[]" ..., the shortest pair first."""
    out = []
    for pair in brackets:
        a, b = map(re.escape, pair)
        if inner_space == " ":
            out += regex(f"{a} ([^{a}{b}]+) {b}" if a != b else f"{a} ([^{a}]+) {b}", f"{pair[0]}\\1{pair[1]}")
        else:
            out += regex(f"{a}\\s*([^{b}]*?)\\s*{b}", f"{pair[0]}\\1{pair[1]}")
    return out


WIKITEXT = (literal("s '", "s'", " @-@ ", "-", " @,@ ", ",", " @.@ ", ".")
            + literal(*[x for p in ":;.!?," for x in (f" {p} ", f"{p} ")])
            + pairs_stripped(r"\s*", "()", "[]", "{}", '""', "''")
            + literal("= = = =", "====", "= = =", "===", "= =", "==", " ° ", "°", " \n", "\n", "\n ", "\n",
                      " N ", " 1 ", " 's", "'s"))

PTB = (literal(" 's", "'s", "s ' ", "s' ", " n't", "n't", " \n ", "\n", "\\/", "/")
       + regex(r"(?<= )N(?= )", "1")  # every N between spaces (theirs: ten passes of " N " -> " 1 ")
       + literal("$ 1", "$1", "# 1", "#1", "<unk>", "?"))

LM1B = (literal("http : / / ", "http://", "https : / / ", "https://")
        + regex(r" '(\w+)", r"'\1", r" (\w+) \. ", r" \1. ", r" (\w+) \.$", r" \1.")
        + literal(" ? ", "? ") + regex(r" \?$", "?") + literal(" ! ", "! ") + regex(r" !$", "!")
        + literal(" , ", ", ", " : ", ": ", " ; ", "; ", " / ", "/")
        + pairs_stripped(" ", '""', "''", "()", "[]")
        + literal("$ ", "$", "£ ", "£"))

LAMBADA = literal("\u201c", '"', "\u201d", '"')


def detokenizer(rules: list[Rule], finish: Callable[[str], str] = str) -> Callable[[str], str]:
    """A function applying `rules` in order, then `finish`."""
    compiled = compile_rules(rules)

    def apply(text: str) -> str:
        for pattern, new in compiled:
            text = pattern.sub(new, text)
        return finish(text)

    return apply


wikitext = detokenizer(WIKITEXT)
ptb = detokenizer(PTB)
lm1b = detokenizer(LM1B)
lambada = detokenizer(LAMBADA, lambda text: "\n" + text.strip())

DETOKENIZERS = {"wikitext": wikitext, "ptb": ptb, "lm1b": lm1b, "lambada": lambada}
