"""One training step's loss and gradients under md4.distributed, run by tests/test_distributed.py:

    torchrun --standalone --nproc-per-node 2 tests/dist_step_worker.py OUT_DIR     (DDP, then FSDP)

Rank 0 writes OUT_DIR/{mode}.pt with the global-batch loss, the total gradient norm and the full
gradients; the test compares them with one process computing the same step by hand.
"""

import copy
import sys
from pathlib import Path

import torch

from md4 import distributed
from md4.diffusion import MD4
from md4.nn import Transformer
from md4.pretrained import Bundle

V, N, B, MICRO, SEED, STEP = 11, 16, 8, 2, 3, 5


def build() -> Bundle:
    torch.manual_seed(0)
    net = Transformer(V, dim=32, layers=2, heads=2, mlp_ratio=2.0, time_cond=True, cond_dim=16, dropout=0.1,
                      max_len=N)
    return Bundle(MD4(V), net)


def data() -> torch.Tensor:
    return torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(7))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    first = None
    for mode in ("ddp", "fsdp"):
        par = distributed.setup(mode, "cpu")
        first = first or par  # the one that joined the process group, and leaves it
        model = build()
        ema = copy.deepcopy(model)
        loss_module = par.wrap(model, ema)
        model.train()
        micro = par.check_batch(B, MICRO)
        loss = par.forward_backward(loss_module, model, data(), B, micro, N, torch.Generator().manual_seed(1),
                                    SEED, STEP, torch.device("cpu"), bf16=False)
        params = list(model.parameters())
        gnorm = par.clip_grad_norm(params, 0.0)
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for name, p in model.named_parameters()}
        if par.main:
            torch.save({"loss": loss, "gnorm": gnorm, "grads": grads, "world": par.world}, out / f"{mode}.pt")
    first.barrier()
    first.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
