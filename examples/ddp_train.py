"""Train a wrapped MnistNet with DistributedDataParallel (CPU and gloo by default).

    torchrun --nproc_per_node 2 examples/ddp_train.py                  # random data, 20 steps
    torchrun --nproc_per_node 2 examples/ddp_train.py --mnist --steps 100
    torchrun --nproc_per_node 4 examples/ddp_train.py --device cuda    # one GPU per process
    python examples/ddp_train.py                                       # one process

The lines that matter::

    model = wrap(MnistNet(), split="fc1")          # wrap first, then hand it to DDP
    ddp = DistributedDataParallel(model)
    logits = ddp(x)                                # one forward: logits and the aux terms
    loss = F.cross_entropy(logits, t) + ddp.module.aux_loss(t)
    loss.backward()                                # DDP averages every gradient

``aux_loss`` lives on the wrapper, so it is reached through ``ddp.module``; its terms were
computed inside DDP's forward, so the decoder biases get their gradients averaged like every
other parameter (``find_unused_parameters`` is not needed). Each rank draws its own latent
noise. ``--mnist`` reads ``mnist.npz`` from ``--data-dir`` or ``$LATENT_AUG_DATA``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from latent_aug import MnistNet, wrap


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=100, help="per process")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mnist", action="store_true", help="MNIST instead of random data")
    p.add_argument("--per-class", type=int, default=100, help="MNIST examples per class")
    p.add_argument("--data-dir", default=None)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device_type: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (or a one-process group without torchrun)."""
    if "RANK" not in os.environ:  # plain `python examples/ddp_train.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend)
    return rank, world, device


def batches(args, rank: int, world: int, device: torch.device):
    """Yield ``(x: (B, 1, 28, 28), t: (B,))`` for this rank, ``args.steps`` times."""
    if args.mnist:
        from latent_aug.data import make_splits

        data = make_splits("mnist", args.data_dir, args.per_class, 1, device)
        x_all, t_all = data.train_x[rank::world], data.train_y[rank::world]  # this rank's shard
        gen = torch.Generator(device=device).manual_seed(rank)
        for _ in range(args.steps):
            idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen, device=device)
            yield x_all[idx], t_all[idx]
    else:
        gen = torch.Generator().manual_seed(rank)
        for _ in range(args.steps):
            x = torch.randn(args.batch, 1, 28, 28, generator=gen)
            yield x.to(device), torch.randint(0, 10, (args.batch,), generator=gen).to(device)


def max_param_difference(model: torch.nn.Module) -> float:
    """Largest |p - p_rank0| over all parameters and ranks (0 when DDP kept them in sync)."""
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rank, world, device = setup(args.device)
    try:
        torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's)
        model = wrap(MnistNet(), split="fc1", lambda1=0.03, lambda2=0.03).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
        torch.manual_seed(1000 + rank)  # each rank draws its own latent noise
        ddp.train()
        for step, (x, t) in enumerate(batches(args, rank, world, device), start=1):
            logits: Tensor = ddp(x)
            loss = F.cross_entropy(logits, t) + ddp.module.aux_loss(t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rank == 0 and (step == 1 or step % 5 == 0 or step == args.steps):
                terms = ddp.module.last_losses.as_floats()
                print(f"step {step:4d}  loss {loss.item():.4f}  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in terms.items()), flush=True)
        diff = max_param_difference(ddp.module)
        if rank == 0:
            print(f"{world} process(es); largest parameter difference across ranks: {diff:.2e}")
        plain = ddp.module.unwrap()  # the trained MnistNet, for inference or saving
        if rank == 0:
            print(f"unwrapped: {type(plain).__name__}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
