"""The library's CUDA paths: training, evaluation and sampling on a GPU from the command line, a GPU
checkpoint read on the CPU, fused AdamW and bf16 autocast, fp32 loss and gradients equal to the
CPU's, `cached` equal to `ancestral`. Skipped without a GPU; bench/gpu_check.sh runs this file."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import md4
from md4.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("cuda") / "tiny"
    argv = ["train", "--config", "tiny", "--out", str(run), "--quiet", "--set", f"data.corpus={corpus}",
            "--set", "train.device=cuda", "--set", "train.steps=30", "--set", "train.eval_every=15"]
    assert main(argv) == 0
    return run


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_eval_and_sample_on_the_gpu_agree_with_the_cpu(gpu_run, capsys):
    """The same model's NELBO on the GPU and on the CPU: other random draws of t and of the masks,
    so equal within their standard errors; samples decode to text of the model's length."""
    results = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", str(gpu_run), "--device", device, "--json"]) == 0
        results[device] = json.loads(capsys.readouterr().out)
    a, b = results["cuda"], results["cpu"]
    se = math.hypot(a["bits_per_token_se"], b["bits_per_token_se"])
    assert a["sequences"] == b["sequences"] and abs(a["bits_per_token"] - b["bits_per_token"]) < 5 * se
    assert main(["sample", str(gpu_run), "--device", "cuda", "--num", "3", "--steps", "16", "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)["samples"]
    assert len(texts) == 3 and all(len(t) == 32 for t in texts)  # characters: one per token


def test_gpu_checkpoint_loads_on_the_cpu(gpu_run):
    gpu, cpu = md4.load(gpu_run, device="cuda"), md4.load(gpu_run, device="cpu")
    x = torch.randint(0, 28, (4, gpu.length), generator=torch.Generator().manual_seed(0))
    t = torch.rand(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = gpu.net(x.cuda(), t.cuda()).cpu(), cpu.net(x, t)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_fused_adamw_and_bf16_autocast_on_the_gpu():
    from md4.build import Bundle
    from md4.config import TrainConfig
    from md4.diffusion import MD4
    from md4.nn import Transformer
    from md4.train import make_optimizer, use_bf16

    device = torch.device("cuda")
    model = Bundle(MD4(27), Transformer(27, 32, 1, 2)).to(device)
    assert make_optimizer(model, TrainConfig(), device).defaults["fused"] is True
    assert use_bf16("auto", device) and not use_bf16("false", device)


def test_loss_and_gradients_equal_the_cpu_in_fp32():
    from gpu_check import compare_devices
    from md4.diffusion import MD4
    from md4.nn import Transformer

    torch.manual_seed(0)
    net = Transformer(300, 64, 2, 4, max_len=128)
    x0 = torch.randint(0, 300, (4, 128), generator=torch.Generator().manual_seed(0))
    r = compare_devices(MD4(300), net, x0, torch.device("cuda"))
    assert r["loss_rel"] < 1e-4 and r["grad_rel"] < 1e-3, r


def test_cached_sampler_equals_ancestral_on_the_gpu():
    from gpu_check import cached_vs_ancestral
    from md4.diffusion import MD4
    from md4.nn import Transformer

    torch.manual_seed(0)
    r = cached_vs_ancestral(MD4(50), Transformer(50, 64, 2, 4, time_cond=False, max_len=64), 4, 64, 32,
                            torch.device("cuda"))
    assert r["equal"], r
