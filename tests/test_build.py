"""Building untrained models (md4.build) through the method and backbone registries."""

import ast
from pathlib import Path

import pytest
import torch

from md4.build import Bundle, build, upgrade_key
from md4.config import load_config
from md4.errors import UserError
from md4.nn import BACKBONES, Backbone, Transformer

SRC = Path(__file__).resolve().parents[1] / "src" / "md4"


def test_build_reads_the_method_and_the_backbone_from_their_registries():
    method, net = build(load_config("tiny", ["method=ar", "model.time_cond=true"]), 27)
    assert isinstance(net, Transformer) and net.causal and net.uses_time  # AR asks for causal
    assert net.max_len == 1024 and len(net.shard_units()) == 2  # RoPE for max(32, 1024); two blocks
    method, net = build(load_config("tiny", ["data.length=2048"]), 27)
    assert not net.causal and not net.uses_time and net.max_len == 2048
    assert set(dict(Bundle(method, net).named_parameters())) == {"net." + k for k, _ in net.named_parameters()}


def test_the_transformer_from_config_is_the_one_built_by_hand():
    cfg = load_config("tiny", ["model.time_cond=true", "model.num_classes=3"]).model
    torch.manual_seed(0)
    a = Transformer.from_config(27, cfg, length=32)
    torch.manual_seed(0)
    b = Transformer(27, dim=32, layers=2, heads=2, mlp_ratio=2.0, glu=True, time_cond=True, cond_dim=16,
                    max_len=1024, num_classes=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("overrides, says", [
    (["model.arch=mamba"], "model.arch must be one of " + ", ".join(BACKBONES) + ", got 'mamba'"),
    (["model.dim=30", "model.heads=4"], "divisible"),
    (["model.pos2d=true"], "pos2d needs an image dataset"),
    (["method=d3pm"], "Unknown method 'd3pm'"),
])
def test_build_errors_are_one_sentence(overrides, says):
    with pytest.raises(UserError, match=says):
        build(load_config("tiny", overrides), 27)


def test_every_backbone_implements_the_protocol():
    for name, cls in BACKBONES.items():
        assert issubclass(cls, Backbone), name
        for member in ("from_config", "max_len", "uses_time", "shard_units"):
            assert getattr(cls, member) is not getattr(Backbone, member), (name, member)


def test_legacy_weight_names():
    assert upgrade_key("diffusion.schedule.log_w") == "method.schedule.log_w"
    assert upgrade_key("net.blocks.0.attn.qkv.weight") == "net.blocks.0.attn.qkv.weight"


def test_nothing_outside_md4_nn_reaches_into_a_network():
    """Only the backbone protocol is used outside md4.nn: no attribute that one network happens
    to have (the transformer's blocks, RoPE tables, embeddings, head, time path)."""
    internals = {"blocks", "rope_cos", "rope_sin", "embed", "head", "time_mlp", "final_ada", "label_embed",
                 "positions", "cond_dim"}
    found = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "nn":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internals:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert found == []
