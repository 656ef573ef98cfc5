"""One training step's loss and gradients under md4.distributed, run by tests/test_distributed.py:

    torchrun --standalone --nproc-per-node 2 tests/dist_step_worker.py OUT_DIR     (DDP, then FSDP)

(the test starts its 2 processes with torchrun's environment itself: tests/md4proc.py).

Rank 0 writes OUT_DIR/{mode}.pt with the global-batch loss, the total gradient norm and the full
gradients; the test compares them with one process computing the same step by hand. A second case,
OUT_DIR/{mode}_labels.pt, trains a class-conditional GenMD4 (learnable schedule, two draws per
sequence) on rows of a labelled dataset (images) with label dropout.
"""

import copy
import sys
from pathlib import Path

import torch

from md4 import distributed
from md4.diffusion import MD4
from md4.genmd4 import GenMD4
from md4.nn import Transformer
from md4.build import Bundle

V, N, B, MICRO, SEED, STEP = 11, 16, 8, 2, 3, 5


def build() -> Bundle:
    torch.manual_seed(0)
    net = Transformer(V, dim=32, layers=2, heads=2, mlp_ratio=2.0, time_cond=True, cond_dim=16, dropout=0.1,
                      max_len=N)
    return Bundle(MD4(V), net)


def data() -> torch.Tensor:
    return torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(7))


class Text:
    """A corpus whose training split is one token stream."""

    def __init__(self, train):
        self.train = train


CLASSES, DROPOUT = 3, 0.5


class Rows:
    """A corpus of 40 labelled sequences of N tokens (one per row, like images)."""

    def __init__(self):
        g = torch.Generator().manual_seed(8)
        self.train = torch.randint(0, V, (40, N), generator=g)
        self.y = torch.randint(0, CLASSES, (40,), generator=g)

    def labels(self, split):
        return self.y


def build_labelled() -> Bundle:
    torch.manual_seed(0)
    net = Transformer(V, dim=32, layers=2, heads=2, mlp_ratio=2.0, time_cond=False, cond_dim=16, dropout=0.1,
                      max_len=N, num_classes=CLASSES)
    return Bundle(GenMD4(V), net)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    first = None
    cases = [("", build, Text(data()), 0), ("_labels", build_labelled, Rows(), CLASSES)]
    for mode in ("ddp", "fsdp"):
        for suffix, make, corpus, classes in cases:
            par = distributed.setup(mode, "cpu")
            first = first or par  # the one that joined the process group, and leaves it
            model = make()
            ema = copy.deepcopy(model)
            loss_module = par.wrap(model, ema)
            model.train()
            micro = par.check_batch(B, MICRO)
            loss = par.forward_backward(loss_module, model, corpus, B, micro, N, torch.Generator().manual_seed(1),
                                        SEED, STEP, torch.device("cpu"), bf16=False, num_classes=classes,
                                        label_dropout=DROPOUT)
            params = list(model.parameters())
            gnorm = par.clip_grad_norm(params, 0.0)
            grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for name, p in model.named_parameters()}
            if par.main:
                torch.save({"loss": loss, "gnorm": gnorm, "grads": grads, "world": par.world}, out / f"{mode}{suffix}.pt")
    first.barrier()
    first.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
