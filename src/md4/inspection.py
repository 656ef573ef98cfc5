"""What a trained GenMD4 model learned: the order in which token values unmask (`md4 inspect`).

With alpha_{t,i} = 1 - t^{w_i}, a larger exponent w_i keeps token i unmasked longer in the forward
process, so in generation (t from 1 to 0) it is revealed earlier: sorting by w from largest to
smallest gives the order in which token values tend to unmask.
"""

from __future__ import annotations

from pathlib import Path

import torch

from md4.errors import UserError


def token_label(tokenizer, token: int) -> str:
    """A token id as visible text: space as "␣", other whitespace escaped."""
    text = tokenizer.decode([token])
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or f"<{token}>"


def exponents(model) -> torch.Tensor:
    """The learned exponents w [V] of a loaded model (md4.load), or a UserError if it has none."""
    if model.method.shared_schedule:
        raise UserError(f"{model.source} is a {model.config.method} model with one schedule for all tokens; "
                        f"`md4 inspect` shows the exponents learned by a genmd4 model.")
    return model.method.schedule.w.detach().float().cpu()


def unmasking_order(model) -> list[tuple[str, float]]:
    """(token label, w) for every token value, largest w (unmasks first in generation) first."""
    w = exponents(model)
    order = torch.argsort(w, descending=True, stable=True)
    return [(token_label(model.tokenizer, int(i)), float(w[i])) for i in order]


def plot_exponents(model, path: str | Path) -> Path:
    """A PNG of the learned exponents (bars, sorted) and of alpha_{t,i} for the first and last tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = unmasking_order(model)
    labels, w = zip(*order)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    ax.bar(range(len(w)), w, color="tab:blue")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="w = 1 (linear schedule, MD4)")
    ax.set_xticks(range(len(w)), labels, fontsize=8 if len(w) <= 40 else 5)
    ax.set_ylabel("exponent w_i")
    ax.set_title("learned exponents, alpha_{t,i} = 1 - t^{w_i}: left unmasks first")
    ax.legend(loc="upper right")
    t = torch.linspace(0, 1, 201)
    shown = order[:3] + order[-3:] if len(order) > 6 else order
    for label, wi in shown:
        ax2.plot(t, 1 - t**wi, label=f"{label}  w={wi:.2f}")
    ax2.set_xlabel("t")
    ax2.set_ylabel("alpha_{t,i} (probability unmasked)")
    ax2.set_title("first and last tokens")
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.suptitle(f"GenMD4 schedule: {model.source}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
