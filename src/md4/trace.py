"""A picture of the generation process, as on the author's slides ("Mayor ? said ? ..."):
one line per step, masked positions blank, newly revealed tokens highlighted.

    rec = Recorder()                                  # a sampler callback(x, t)
    model.sample(net, 1, 128, steps=64, callback=rec)
    render(rec.states, "out.html", token_text, mask_id, rec.times)   # or .png / .gif

The recorder keeps plain states ([N] long per step), so other renderers (image strips) can use
it too; `render` draws token sequences.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from md4.errors import UserError

FORMATS = (".html", ".png", ".gif")


class Recorder:
    """A sampler callback(x [B, N], t [B]) that keeps sample `index`'s state ([N] long) each time it
    changes, or with index=None the whole batch's ([B, N]): `states` (one per step that changed
    something, in order) and `times` (the time t reached, floats)."""

    def __init__(self, index: int | None = 0):
        self.index, self.states, self.times = index, [], []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> None:
        row = (x if self.index is None else x[self.index]).detach().cpu()
        if not self.states or not torch.equal(row, self.states[-1]):
            self.states.append(row.clone())
            self.times.append(float(t[0 if self.index is None else self.index]))


def check_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"A trace is written as {', '.join(FORMATS)}; got {path.name!r}.")
    return path


def pick(n: int, limit: int) -> list[int]:
    """At most `limit` indices out of range(n), evenly spread, always with the first and last."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def cells(states: list[torch.Tensor], mask_id: int) -> list[list[tuple[int, str]]]:
    """Per state, per position: (token id, kind) with kind "mask", "new" (revealed since the
    previous state given) or "old"."""
    out, previous = [], None
    for x in states:
        x = x.tolist()
        out.append([(v, "mask" if v == mask_id else "new" if previous is not None and previous[n] == mask_id else "old")
                    for n, v in enumerate(x)])
        previous = x
    return out


def to_html(states, token_text, mask_id: int, times=None, title: str = "md4 generation") -> str:
    """An HTML page: one line per state; masks as grey blanks, new tokens highlighted."""
    rows = []
    for i, line in enumerate(cells(states, mask_id)):
        spans = "".join(f'<span class="{kind}">{html.escape(token_text(v)) if kind != "mask" else "&nbsp;"}</span>'
                        for v, kind in line)
        label = f"t={times[i]:.3f}" if times is not None else f"{i}"
        rows.append(f'<div class="row"><span class="label">{label}</span>{spans}</div>')
    style = ("body{font-family:monospace;font-size:13px}.row{white-space:pre;line-height:1.5}"
             ".label{color:#888;display:inline-block;width:6em}.mask{background:#ddd;margin:0 1px 0 0}"
             ".new{background:#ffd54f;font-weight:bold}.old{color:#222}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n<h3>{html.escape(title)}</h3>\n"
            f"<p>Grey: still masked. Yellow: revealed in this step. {len(states)} states, top to bottom.</p>\n"
            + "\n".join(rows) + "\n</body></html>\n")


def _strings(line, token_text, width=None):
    """Three overlaid strings (masked, old, new) for a monospace drawing, wrapped at `width`."""
    layers = {"mask": [], "old": [], "new": []}
    for n, (v, kind) in enumerate(line):
        ch = "_" if kind == "mask" else (token_text(v)[:1] or " ")
        for k, chars in layers.items():
            chars.append(ch if k == kind else " ")
        if width and (n + 1) % width == 0 and n + 1 < len(line):
            for chars in layers.values():
                chars.append("\n")
    return {k: "".join(v) for k, v in layers.items()}


COLORS = {"mask": "#bbbbbb", "old": "#222222", "new": "#d32f2f"}


def to_png(path, states, token_text, mask_id: int, times=None, max_rows: int = 48) -> None:
    """One line per state (at most max_rows, evenly chosen): masks grey "_", new tokens red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = pick(len(states), max_rows)
    lines = cells([states[i] for i in keep], mask_id)
    N = len(lines[0])
    fig = plt.figure(figsize=(1.2 + N * 0.085, 0.6 + 0.17 * len(lines)), dpi=100)
    for r, line in enumerate(lines):
        y = 1 - (r + 1) / (len(lines) + 1)
        label = f"t={times[keep[r]]:.3f}" if times is not None else str(keep[r])
        fig.text(0.005, y, label, family="monospace", fontsize=7, color="#888888", va="center")
        for kind, s in _strings(line, token_text).items():
            fig.text(1.1 / (1.2 + N * 0.085), y, s, family="monospace", fontsize=8.5, color=COLORS[kind],
                     va="center", weight="bold" if kind == "new" else "normal")
    fig.savefig(path)
    plt.close(fig)


def to_gif(path, states, token_text, mask_id: int, times=None, width: int = 64, max_frames: int = 80) -> None:
    """One frame per state (at most max_frames), the sequence wrapped at `width` characters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    keep = pick(len(states), max_frames)
    lines = cells([states[i] for i in keep], mask_id)
    rows = -(-len(lines[0]) // width)
    fig = plt.figure(figsize=(0.6 + min(width, len(lines[0])) * 0.11, 0.7 + 0.25 * rows), dpi=80)
    title = fig.text(0.02, 0.95, "", family="monospace", fontsize=9, va="top")
    texts = {k: fig.text(0.02, 0.8, "", family="monospace", fontsize=10, color=c, va="top", linespacing=1.6,
                         weight="bold" if k == "new" else "normal") for k, c in COLORS.items()}

    def draw(f):
        f = min(f, len(lines) - 1)  # the last frame is held a little longer
        label = f"t = {times[keep[f]]:.3f}" if times is not None else ""
        title.set_text(f"step {f + 1}/{len(lines)}  {label}")
        for kind, s in _strings(lines[f], token_text, width).items():
            texts[kind].set_text(s)
        return [title, *texts.values()]

    FuncAnimation(fig, draw, frames=len(lines) + 8).save(path, writer=PillowWriter(fps=6))
    plt.close(fig)


def render(states, path, token_text, mask_id: int, times=None, title: str = "md4 generation") -> Path:
    """Write the states ([N] long each) as .html, .png or .gif, chosen by the file name."""
    path = check_path(path)
    if not states:
        raise UserError("There is no recorded state to draw.")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".html":
        path.write_text(to_html(states, token_text, mask_id, times, title))
    elif suffix == ".png":
        to_png(path, states, token_text, mask_id, times)
    else:
        to_gif(path, states, token_text, mask_id, times)
    return path
