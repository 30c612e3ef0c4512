"""The wrapper under torch.compile and DistributedDataParallel.

Both are exercised the way a training loop uses them: train and eval switches, varying batch
sizes and a last, smaller batch. The compile tests use the ``aot_eager`` backend (Dynamo
tracing and AOTAutograd, no C++ code generation) so they stay small on a CPU; one inductor
test is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gloo import free_port, leave_passed_worker
from torch import Tensor, nn

from latent_aug import wrap

NUM_CLASSES = 3
# (mode, batch size): train/eval switches, a new batch size, and a last, smaller batch.
SCHEDULE = [
    ("train", 8), ("train", 8), ("eval", 8), ("train", 8), ("train", 5), ("eval", 3),
    ("train", 8), ("train", 3),
]




class TinyConvNet(nn.Module):
    """``(B, 1, 8, 8) -> (B, 3)``: conv 3×3/2 ×4, fc 8 (z = ``fc1``), fc 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        z = torch.relu(self.fc1(h.flatten(1)))
        return self.fc2(z)


def _batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (n,),
                                                                 generator=gen)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


def _compile_schedule(backend: str, dynamic: bool | None, schedule=SCHEDULE) -> None:
    """Run ``schedule`` on a compiled wrapper and on an eager twin with the same RNG draws."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = wrap(TinyConvNet(), split="fc1", perturb="class_conditional")
    compiled_inner = copy.deepcopy(eager)
    compiled = torch.compile(compiled_inner, backend=backend, dynamic=dynamic)
    exact = backend != "inductor"  # inductor draws its own random numbers
    for step, (mode, n) in enumerate(schedule):
        x, t = _batch(n, seed=step)
        if mode == "eval":
            compiled.eval()
            eager.eval()
            with torch.no_grad():
                out = compiled(x)
                assert out.shape == (n, NUM_CLASSES)
                torch.testing.assert_close(out, compiled_inner.model(x))
                if exact:  # and the eager twin, trained on the same draws, agrees
                    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-5)
            continue
        compiled.train()
        eager.train()
        rng = torch.get_rng_state()
        logits = compiled(x)
        terms = compiled_inner.losses(t)
        loss = F.cross_entropy(logits, t) + terms.total
        loss.backward()
        torch.set_rng_state(rng)
        eager_logits = eager(x)
        eager_loss = F.cross_entropy(eager_logits, t) + eager.aux_loss(t)
        eager_loss.backward()
        assert logits.shape == (n, NUM_CLASSES), step
        for name, value in terms._asdict().items():
            assert torch.isfinite(value), (step, name, value)
        if exact:
            torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
            grads = dict(compiled_inner.named_parameters())
            for name, p in eager.named_parameters():
                torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, name=name: f"{name}: {m}")
        for wrapped in (compiled_inner, eager):  # the same plain SGD step on both
            with torch.no_grad():
                for p in wrapped.parameters():
                    if p.grad is not None:
                        p -= 0.01 * p.grad
                        p.grad = None


def test_compiled_wrapper_static_shapes() -> None:
    """Each batch size compiled on its own (dynamic=False): switches and a smaller last batch."""
    _compile_schedule("aot_eager", dynamic=False)


def test_compiled_wrapper_default_dynamic_shapes() -> None:
    """The default ``torch.compile(wrapped)``: a second batch size makes the shapes dynamic."""
    _compile_schedule("aot_eager", dynamic=None)


def test_compiled_eval_only_matches_the_original_model() -> None:
    """A compiled wrapper in eval mode is the user's model (any batch size, dynamic shapes)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    wrapped = wrap(TinyConvNet(), split="fc1").eval()
    compiled = torch.compile(wrapped, backend="aot_eager")
    with torch.no_grad():
        for step, n in enumerate((4, 7, 1)):
            x, _ = _batch(n, seed=10 + step)
            torch.testing.assert_close(compiled(x), wrapped.model(x))


@pytest.mark.slow
def test_compiled_wrapper_inductor() -> None:
    """The default backend generates C++ for every graph: minutes on a busy CPU."""
    _compile_schedule("inductor", dynamic=False, schedule=SCHEDULE[:6])


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, 2 processes)
# ----------------------------------------------------------------------------------------------

WORLD = 2
# (mode, global batch) split evenly over the ranks where possible; 7 leaves 4 + 3.
DDP_SCHEDULE = [("train", 8), ("eval", 8), ("train", 8), ("eval_grad", 6), ("train", 8),
                ("train", 7), ("eval", 3), ("train", 2)]


def _same_on_all_ranks(t: Tensor, what: str) -> None:
    import torch.distributed as dist

    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for r, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"{what}: rank {r} differs from rank 0"


def _ddp_worker(rank: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        wrapped = wrap(TinyConvNet(), split="fc1", perturb="class_conditional")
        ddp = DDP(wrapped)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        torch.manual_seed(100 + rank)  # different latent noise on each rank
        for step, (mode, n) in enumerate(DDP_SCHEDULE):
            x_all, t_all = _batch(n, seed=step)
            x, t = x_all.tensor_split(WORLD)[rank], t_all.tensor_split(WORLD)[rank]
            if mode.startswith("eval"):
                ddp.eval()
                with torch.set_grad_enabled(mode == "eval_grad"):
                    out = ddp(x_all)
                    assert torch.equal(out, wrapped.model(x_all)), step
                _same_on_all_ranks(out.detach(), f"step {step} eval output")
                continue
            ddp.train()
            # The gradient a rank computes alone, from the same parameters and noise draws.
            local = wrap(TinyConvNet(), split="fc1", perturb="class_conditional")
            local.load_state_dict(wrapped.state_dict())
            rng = torch.get_rng_state()
            (F.cross_entropy(local(x), t) + local.aux_loss(t)).backward()
            torch.set_rng_state(rng)

            logits = ddp(x)
            terms = wrapped.losses(t)
            loss = F.cross_entropy(logits, t) + terms.total
            assert all(torch.isfinite(v) for v in terms), (step, terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for (name, p), (_, q) in zip(wrapped.named_parameters(),
                                         local.named_parameters(), strict=True):
                assert p.grad is not None, f"{name} got no gradient"
                expected = q.grad.clone()
                dist.all_reduce(expected)
                torch.testing.assert_close(p.grad, expected / WORLD, rtol=1e-4, atol=1e-6)
                _same_on_all_ranks(p.grad, f"step {step} grad {name}")
            opt.step()
            for name, p in wrapped.named_parameters():
                _same_on_all_ranks(p.detach(), f"step {step} param {name}")
        dist.barrier()  # no rank tears gloo down while another still talks
    finally:
        dist.destroy_process_group()
    leave_passed_worker()  # reached only when every check above passed


def test_ddp_train_eval_switches_and_a_smaller_last_batch() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(free_port(),), nprocs=WORLD, join=True)
