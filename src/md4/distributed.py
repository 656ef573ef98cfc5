"""Data-parallel training under torchrun: DDP or FSDP2, gradient accumulation, rank-0 I/O.

    torchrun --nproc-per-node 8 -m md4 train --config owt-md4-small --out runs/owt --set train.parallel=fsdp
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m md4 train ...

Without torchrun's environment (RANK and WORLD_SIZE unset) `setup` returns a single-process
`Parallel`: a single process with the whole batch in one chunk draws times and masks from the
run's own generator. Under torchrun the model is wrapped for DDP or FSDP2 even when there is
one process (so one GPU can check those paths). md4.train takes the same step
(`Parallel.forward_backward`) either way.

The global batch (train.batch_size rows) is the unit of randomness, so W ranks compute what one
process would:
- data: every rank draws the global batch's B offsets from the same data generator state and
  reads only its own rows [r B/W, (r+1) B/W): no example is duplicated or skipped;
- micro-batches: the global batch is cut into chunks of train.micro_batch rows (0 = one chunk
  per rank); chunk k of step s draws its diffusion times and masks from a generator seeded by
  (seed, s, k), and re-seeds the default generator (dropout) likewise. Which rank or which
  accumulation step handles chunk k does not matter, so W ranks with micro-batch m give the
  losses and gradients of one process with micro-batch m (up to float summation order), and a
  resumed run replays exactly. Each chunk's loss is scaled by its share of the global batch, and
  DDP / FSDP average the ranks' gradients, so the update is the gradient of the global mean.

Checkpoints keep the single-process format (safetensors weights, tensors-only optim.pt):
DDP replicas are identical and rank 0 writes; FSDP gathers full state dicts to rank 0 through
torch.distributed.checkpoint.state_dict (on CPU), and every rank loads full state dicts from the
run folder (which must be on a filesystem all nodes see). FSDP shards each of the network's
`shard_units()` (the transformer's blocks) and the rest of the network (`fully_shard`); the EMA
copy is sharded the same way and averaged shard by shard. A method's own parameters (a learnable schedule: small) stay replicated, their
gradients averaged by hand.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from md4.errors import UserError

MODES = ("ddp", "fsdp")


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """A distinct 63-bit seed for chunk `chunk` of step `step` (steps < 2^30, chunks < 2^20)."""
    return ((seed % (1 << 12)) << 51) | ((step % (1 << 30)) << 21) | ((chunk % (1 << 20)) << 1)


class LossModule(nn.Module):
    """The training objective as a module's forward, so DDP/FSDP hooks run around it:
    forward(x0 [b, N] long, generator, labels [b] long or None) -> the method's loss (scalar, nats
    per sequence)."""

    def __init__(self, bundle: nn.Module):
        super().__init__()
        self.bundle = bundle

    def forward(self, x0: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        from md4.guidance import with_labels

        return self.bundle.method.loss(with_labels(self.bundle.net, labels), x0, generator=generator)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a (possibly sharded DTensor) parameter or gradient."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none (one process), ddp or fsdp
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Launched by torchrun (a process group, DDP/FSDP), even with a single process."""
        return self.mode != "none"

    # ------------------------------------------------------------------ setup
    def rows(self, batch_size: int) -> slice:
        b = batch_size // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def check_batch(self, batch_size: int, micro_batch: int) -> int:
        """The micro-batch size to use; UserError unless batch_size = world x accum x micro."""
        if batch_size % self.world:
            raise UserError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({self.world}).")
        per_rank = batch_size // self.world
        micro = micro_batch or per_rank
        if micro < 0 or per_rank % micro:
            raise UserError(f"train.micro_batch ({micro_batch}) must divide the per-process batch "
                            f"{per_rank} (train.batch_size / processes).")
        return micro

    def wrap(self, model: nn.Module, ema: nn.Module) -> nn.Module:
        """The module whose forward(x0, generator) is the loss; shards model and ema for FSDP."""
        loss_module = LossModule(model)
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for bundle in (model, ema):
                for unit in bundle.net.shard_units():
                    fully_shard(unit)
                fully_shard(bundle.net)  # the rest (embedding, head, norms): the root group
        return loss_module

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (a collective)."""
        return self.maximum(float(flag)) > 0

    def maximum(self, value: float) -> float:
        """The largest of the ranks' values, on every rank (a collective, in float64)."""
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ the step
    def forward_backward(self, loss_module, model, corpus, batch_size: int, micro: int, length: int, data_gen,
                         seed: int, step: int, device, bf16: bool, num_classes: int = 0,
                         label_dropout: float = 0.0, noise: torch.Generator | None = None) -> torch.Tensor:
        """The training step, for one process or many: loss (nats per token, the global batch mean,
        on `device`) and gradients. num_classes > 0: a class-conditional model, trained with label
        dropout. `noise`: the run's generator of diffusion times and masks, used when one process
        takes the whole batch at once; otherwise each chunk draws from its own seed (module docstring)."""
        from md4.data.batches import draw_batch

        rows = self.rows(batch_size)
        x0, y = draw_batch(corpus, batch_size, length, data_gen, rows, labels=num_classes > 0,
                           label_dropout=label_dropout, null_label=num_classes)
        if device.type == "cuda":  # a copy from pageable memory would wait for the GPU: a host sync
            x0 = x0.pin_memory()
        x0 = x0.to(device, non_blocking=True)
        chunks = x0.split(micro)
        labels = y.to(device).split(micro) if y is not None else [None] * len(chunks)
        first = rows.start // micro
        total = torch.zeros((), device=device)
        one_chunk = noise is not None and not self.active and len(chunks) == 1
        for k, (xk, yk) in enumerate(zip(chunks, labels)):
            if one_chunk:
                g = noise
            else:
                s = chunk_seed(seed, step, first + k)
                g = torch.Generator(device).manual_seed(s)
                torch.manual_seed(s + 1)  # dropout and anything else on the default generators
            with self.no_sync(loss_module, model, last=k == len(chunks) - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_module(xk, g, yk) / length * (len(xk) / (rows.stop - rows.start))
                loss.backward()
            total += loss.detach()
        if self.active:
            self.average_replicated_grads(model)
            dist.all_reduce(total)
            total /= self.world
        return total

    @contextlib.contextmanager
    def no_sync(self, loss_module, model, last: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if last or self.mode == "none":
            yield
        elif self.mode == "ddp":
            with loss_module.no_sync():
                yield
        else:
            model.net.set_requires_gradient_sync(False, recurse=True)
            try:
                yield
            finally:
                model.net.set_requires_gradient_sync(True, recurse=True)

    def average_replicated_grads(self, model: nn.Module) -> None:
        """FSDP leaves the method's own (unsharded) parameters to us: average their gradients."""
        if self.mode != "fsdp":
            return
        for p in model.method.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """Total gradient norm over all ranks' shards (a plain tensor), clipping to max_norm if > 0."""
        limit = max_norm if max_norm > 0 else float("inf")
        if self.mode != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, limit)
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if hasattr(g, "full_tensor")]
        plain = [g for g in grads if not hasattr(g, "full_tensor")]
        sq = torch.zeros((), device=self.device)
        if sharded:
            sq = sq + torch.nn.utils.get_total_norm(sharded).full_tensor().float() ** 2
        if plain:
            sq = sq + torch.nn.utils.get_total_norm(plain).float() ** 2
        norm = sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([local(g) for g in grads], coef)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def state_dicts(self, model: nn.Module, ema: nn.Module, opt) -> tuple[dict, dict, dict] | None:
        """Full (model, ema, optimizer) state dicts on rank 0, None on the others (a collective)."""
        if self.mode != "fsdp":
            return (model.state_dict(), ema.state_dict(), opt.state_dict()) if self.main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        m, e = get_model_state_dict(model, options=full), get_model_state_dict(ema, options=full)
        o = get_optimizer_state_dict(model, opt, options=full)
        return (m, e, o) if self.main else None

    def load_weights(self, module: nn.Module, weights: dict, source) -> None:
        from md4 import checkpoint

        if self.mode != "fsdp":
            return checkpoint.load_into(module, weights, source)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        checkpoint.check_weights(module, weights, source)  # names and (global) shapes
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, model: nn.Module, opt, state: dict) -> None:
        """FSDP checkpoints key the AdamW state by parameter name, the others by position."""
        by_name = any(isinstance(k, str) for k in state.get("state", {}))
        if by_name != (self.mode == "fsdp"):
            saved, now = ("FSDP", "another mode") if by_name else ("a non-FSDP run", "FSDP")
            raise UserError(f"This run's optimizer state was saved by {saved} and cannot be resumed with {now}; "
                            f"resume it with the train.parallel it was started with.")
        if self.mode != "fsdp":
            return opt.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def setup(parallel: str, device_name: str) -> Parallel:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): join the process group
    (NCCL on GPUs, gloo on CPUs) and pick this rank's device. Without torchrun: mode "none"."""
    from md4.build import resolve_device

    if parallel not in MODES:
        raise UserError(f"train.parallel must be one of {', '.join(MODES)}, got {parallel!r}.")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Parallel(device=resolve_device(device_name))
    world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(rank, world, local_rank, parallel, device, owns)
