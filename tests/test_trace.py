"""The picture of the generation process: the recorder keeps each changed state, and the HTML /
PNG / GIF show masks as blanks and highlight exactly the newly revealed tokens."""

import itertools
import re

import pytest
import torch

from md4 import MD4
from md4.data import CharTokenizer
from md4.errors import UserError
from md4.trace import Recorder, cells, pick, render, to_html

TOK = CharTokenizer()
M = TOK.mask_id


def text(i):
    return TOK.decode([i])


STATES = [torch.tensor([M, M, M, M]), torch.tensor([M, 1, M, M]), torch.tensor([3, 1, M, 0]), torch.tensor([3, 1, 20, 0])]


def test_cells_mark_masks_new_and_old_tokens():
    kinds = [[k for _, k in line] for line in cells(STATES, M)]
    assert kinds == [["mask"] * 4, ["mask", "new", "mask", "mask"], ["new", "old", "mask", "new"], ["old", "old", "new", "old"]]


def test_html_shows_one_line_per_state_with_the_new_tokens_highlighted():
    page = to_html(STATES, text, M, times=[1.0, 0.6, 0.3, 0.0])
    rows = re.findall(r'<div class="row">(.*?)</div>', page)
    assert len(rows) == 4
    assert [r.count('class="mask"') for r in rows] == [4, 3, 1, 0]
    assert [re.findall(r'<span class="new">(.*?)</span>', r) for r in rows] == [[], ["a"], ["c", " "], ["t"]]
    assert "t=0.600" in rows[1]


def test_recorder_keeps_each_changed_state_of_one_sample():
    rec = Recorder(index=1)
    model = MD4(4, "linear")

    def den(xt, t):
        return torch.zeros(*xt.shape, 4)

    x = model.sample(den, 3, 10, steps=50, generator=torch.Generator().manual_seed(0), callback=rec)
    assert torch.equal(rec.states[0], torch.full((10,), 4)) and torch.equal(rec.states[-1], x[1])
    assert rec.times[0] == 1.0 and rec.times[-1] >= 0.0 and all(a >= b for a, b in zip(rec.times, rec.times[1:]))
    masked = [int((s == 4).sum()) for s in rec.states]
    assert all(a > b for a, b in itertools.pairwise(masked))  # only changes are kept, and masks only go


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".gif", b"GIF89a"), (".html", b"<!doctype")])
def test_render_writes_each_format(tmp_path, suffix, magic):
    path = render(STATES, tmp_path / f"trace{suffix}", text, M, [1.0, 0.6, 0.3, 0.0])
    assert path.read_bytes()[: len(magic)] == magic


def test_render_refuses_an_unknown_format_or_nothing_to_draw(tmp_path):
    with pytest.raises(UserError, match="html"):
        render(STATES, tmp_path / "trace.txt", text, M)
    with pytest.raises(UserError):
        render([], tmp_path / "trace.html", text, M)


def test_pick_spreads_and_keeps_the_ends():
    assert pick(5, 10) == [0, 1, 2, 3, 4]
    chosen = pick(1000, 48)
    assert chosen[0] == 0 and chosen[-1] == 999 and len(chosen) == 48
