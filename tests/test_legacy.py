"""Model folders saved by earlier versions (tests/data, see its README) still load and compute the same."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import md4
from md4.build import Bundle, upgrade_weights

DATA = Path(__file__).parent / "data"


def expected(name: str) -> dict:
    return load_file(str(DATA / name / "expected.safetensors"))


@pytest.mark.parametrize("name", ["legacy_md4_v1", "legacy_genmd4_v1"])
def test_a_legacy_model_gives_the_same_logits(name):
    m, e = md4.load(DATA / name), expected(name)
    with torch.no_grad():
        logits = m.net(e["x"], e["t"])
    assert torch.equal(logits, e["logits"])
    x = m.sample(2, steps=8, seed=0)
    assert x.shape == (2, 16) and (x >= 0).all() and (x < 27).all()


def test_a_legacy_md4_model_gives_the_same_nelbo_and_samples():
    m, e = md4.load(DATA / "legacy_md4_v1"), expected("legacy_md4_v1")
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 28, (2, 16), generator=g)  # e["x"]
    x0 = torch.randint(0, 27, (2, 16), generator=g)
    with torch.no_grad():
        nelbo = m.method.nelbo(m.net, x0, t=e["t"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(nelbo.double(), e["nelbo"])
    assert torch.equal(m.sample(2, steps=8, seed=0), e["samples"])


def test_genmd4_exponents_saved_as_diffusion_weights_load():
    saved = load_file(str(DATA / "legacy_genmd4_v1" / "model.safetensors"))
    assert "diffusion.schedule.log_w" in saved and not any(k.startswith("method.") for k in saved)
    m = md4.load(DATA / "legacy_genmd4_v1")
    assert torch.equal(m.method.schedule.log_w.detach(), saved["diffusion.schedule.log_w"])
    assert not torch.equal(saved["diffusion.schedule.log_w"], torch.full((27,), 2.0).log())  # trained, not the init
    assert set(upgrade_weights(saved)) == set(Bundle(m.method, m.net).state_dict())
