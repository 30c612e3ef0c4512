"""Train many runs of one method at once: runs packed into lanes, lanes stepped in lockstep.

:mod:`latent_aug.vectorized` stacks the *sets* of one grid cell; this module stacks whole
*families* of runs: every run of one method (all sizes and sets) shares the graph, the batch
size and the optimizer, and differs only in its data, its seed and how many steps it takes.

* **Lanes.** Runs are packed into ``R`` lanes (longest-processing-time first, as many lanes
  as the total work over the longest run); a lane trains its runs back to back, so the MNIST
  grid's ``all``-size runs (60k steps) run beside lanes that hold every smaller run.
* **One step for all lanes.** Each lane's parameters are one row of a flat ``(R, P)``
  buffer; a step is ``vmap(grad_and_value(loss))`` over the lanes (convolutions batch as
  grouped convolutions) and one elementwise Adam on ``(R, P)`` with a per-lane learning rate
  and step count, so a lane that starts a new run restarts its own schedule and bias
  correction. Batches are gathered on the device from per-lane orders (no host work per step).
* **Exactly the one-run-at-a-time protocol per run**: the run's seed builds its initial
  weights (``torch.manual_seed(spec.seed)`` + :func:`~latent_aug.protocol.build_model`), its
  own generator draws its epoch orders, the learning rate follows its own epochs, validation
  runs after each of its epochs and its test error is that of its best-validation weights.
  Deterministic methods match :func:`~latent_aug.protocol.train_run` to float tolerance
  (tested); the latent noise of perturbed methods comes from another random stream.
* **CUDA graphs.** On CUDA the fixed-shape step (gather, forward, backward, Adam) is captured
  once and replayed; each trainer replays on its own stream, so several methods' trainers
  driven round-robin by :func:`train_families` overlap on the GPU. Capture failures fall back
  to eager steps with a warning.

Random crops (CIFAR-10) draw from the run's own generator in the one-run-at-a-time order: at
each epoch start a lane draws its run's order and then every step's crop offsets and flips
(:func:`~latent_aug.data.crop_draws`, the same calls in the same sequence as
:func:`~latent_aug.data.random_crop_flip` makes them step by step), so the crops are the
sequential run's crops; evaluation takes the centre crop. Not for runs whose training set is
not a multiple of the batch size (a short last batch changes the step's shape) or methods with
state outside their parameters: :func:`can_pack` says why; those runs take the per-cell path.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from .data import DataSplit, crop_draws, crop_flip_at
from .decoders import TiedConv
from .errors import ConfigError
from .protocol import LEARNING_RATE, RunResult, RunSpec, build_model, lr_at
from .vectorized import _TrainLoss, can_vectorize, stacked_errors

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def family_key(spec: RunSpec) -> tuple:
    """Runs with the same key can share lanes (they differ in size and set only)."""
    return (spec.dataset, spec.method, spec.epochs, spec.options, spec.batch_size)


def can_pack(spec: RunSpec, data: DataSplit) -> str | None:
    """Why ``spec`` cannot be trained in lanes, or None when it can."""
    if data.train_x.shape[0] % spec.batch_size:
        return (f"its {data.train_x.shape[0]} training examples are not a multiple of the "
                f"batch size {spec.batch_size}")
    if spec.method in ("ladder", "isda", "manifold_mixup"):
        return f"method {spec.method!r} keeps state outside its parameters"
    return None


def can_pack_spec(spec: RunSpec) -> bool:
    """Whether ``spec`` can go into lanes, decided before loading data (see :func:`can_pack`):
    a stateless method and a training set a multiple of the batch."""
    if spec.method in ("ladder", "isda", "manifold_mixup"):
        return False
    return spec.per_class == "all" or (10 * int(spec.per_class)) % spec.batch_size == 0


def pack_lanes(costs: Sequence[int], lanes: int | None = None) -> list[list[int]]:
    """Indices of ``costs`` packed into lanes, longest first onto the least loaded lane.

    ``lanes`` defaults to ``ceil(sum / max)``: as many lanes as keep every lane's load near
    the longest run, which bounds the wall time anyway. Each lane then runs its shortest run
    first, so a grid stopped early has finished as many runs as it could."""
    if not costs:
        return []
    if lanes is None:
        lanes = max(1, -(-sum(costs) // max(1, max(costs))))
    loads = [0] * lanes
    out: list[list[int]] = [[] for _ in range(lanes)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        j = min(range(lanes), key=lambda j: (loads[j], j))
        out[j].append(i)
        loads[j] += costs[i]
    return [sorted(lane, key=lambda i: (costs[i], i)) for lane in out if lane]


def adam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: Tensor) -> None:
    """In-place Adam on ``(R, P)`` rows with per-row ``step, lr: (R, 1)`` (as torch.optim.Adam:
    ``p -= lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)``)."""
    b1, b2 = ADAM_BETAS
    step += 1
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = 1 - torch.pow(b1, step)
    bc2 = 1 - torch.pow(b2, step)
    denom = (v.sqrt() / bc2.sqrt()).add_(ADAM_EPS)
    p.sub_(m / denom * (lr / bc1))


class LaneTrainer:
    """One family of runs (same :func:`family_key`), trained in lanes; drive with
    :meth:`step` (one lockstep step; False when every run is done) or :meth:`run`.

    Args:
        specs, datas: The runs and their data (all on one device).
        lanes: Number of lanes (default: see :func:`pack_lanes`).
        cuda_graph: Capture the step in a CUDA graph (default: on CUDA).
        eval_batch: Images per lane per evaluation call (default 1000 on CPU; on CUDA 10000
            for MNIST-sized inputs, fewer for larger ones: ``8e6 / (C·H·W)``, at least 500).
        eval_sets: One shared copy of the validation and test sets, ``{"valid": (x, y),
            "test": (x, y)}`` scaled but not centred (:func:`latent_aug.data.eval_sets`):
            each run subtracts its own ``data.mean`` as it evaluates, and the ``datas`` may
            come without their own copies (``split_from(..., with_eval=False)``). A grid of
            162 CIFAR-10 runs otherwise holds 40 GB of per-run copies.
        on_epoch: ``(run index, epoch, validation error)``, called in batches about once a
            second (reading the errors synchronizes with the device).
        on_result: ``(run index, RunResult)``, as soon as a run finishes.
    """

    def __init__(
        self,
        specs: Sequence[RunSpec],
        datas: Sequence[DataSplit],
        *,
        lanes: int | None = None,
        cuda_graph: bool | None = None,
        eval_batch: int | None = None,
        on_epoch: Callable[[int, int, float], None] | None = None,
        on_result: Callable[[int, RunResult], None] | None = None,
        eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        if not specs or len(specs) != len(datas):
            raise ConfigError("LaneTrainer needs one DataSplit per RunSpec (and at least one).")
        if len({family_key(s) for s in specs}) != 1:
            raise ConfigError("LaneTrainer needs runs of one method, epochs and options; "
                              "group them with latent_aug.lanes.family_key.")
        for spec, data in zip(specs, datas):
            why = can_pack(spec, data)
            if why:
                raise ConfigError(f"Run {spec} cannot be trained in lanes: {why}.")
        self.specs = list(specs)
        # what evaluation needs, per run (the trainer keeps no DataSplit: their training
        # tensors would double the pool's memory)
        if eval_sets is None:
            self.eval_x = {k: [getattr(d, f"{k}_x") for d in datas] for k in ("valid", "test")}
            self.eval_y = {k: [getattr(d, f"{k}_y") for d in datas] for k in ("valid", "test")}
            self.means = None
        else:
            self.eval_x = {k: [eval_sets[k][0]] * len(datas) for k in ("valid", "test")}
            self.eval_y = {k: [eval_sets[k][1]] * len(datas) for k in ("valid", "test")}
            self.means = [d.mean for d in datas]
        spec0 = specs[0]
        self.device = device = datas[0].train_x.device
        on_cuda = device.type == "cuda"
        self.batch = spec0.batch_size
        self.epochs = spec0.epochs
        self.base_lr = LEARNING_RATE[spec0.dataset]
        self.on_epoch, self.on_result = on_epoch, on_result
        self.crop = datas[0].crop
        c, h, w = datas[0].input_shape
        self.eval_batch = eval_batch or (
            max(500, min(10000, 8_000_000 // (c * h * w))) if on_cuda else 1000)
        self.sizes = [d.train_x.shape[0] for d in datas]
        self.spe = [n // self.batch for n in self.sizes]  # steps per epoch
        costs = [self.epochs * s for s in self.spe]
        self.plan = pack_lanes(costs, lanes)
        self.total_steps = max(sum(costs[i] for i in lane) for lane in self.plan)
        R = self.R = len(self.plan)
        self.stream = torch.cuda.Stream(device) if on_cuda else None

        torch.manual_seed(spec0.seed)
        self.template = build_model(spec0).to(device)
        if not can_vectorize(self.template):
            raise ConfigError(f"Method {spec0.method!r} cannot be trained in lanes "
                              "(buffers or state outside its parameters).")
        for module in self.template.modules():
            if isinstance(module, TiedConv):
                module.cpu_kernels = False  # vmap: no channels_last clone, no phase kernel
        self.loss_module = _TrainLoss(self.template)
        named = list(self.loss_module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.offsets, total = [], 0
        for _, p in named:
            self.offsets.append(total)
            total += p.numel()
        f32 = dict(device=device, dtype=torch.float32)
        self.flat = torch.zeros(R, total, **f32)
        self.m, self.v = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        self.best_flat = torch.zeros_like(self.flat)
        self.adam_step = torch.zeros(R, 1, **f32)
        self.lr = torch.zeros(R, 1, **f32)
        self.best_err = torch.full((R,), float("inf"), **f32)
        self.loss_acc = torch.zeros(R, **f32)
        # every run's training set in one pool; lanes index it through their current order
        self.pool_x = torch.cat([d.train_x for d in datas])
        self.pool_y = torch.cat([d.train_y for d in datas])
        self.offset = [0]
        for n in self.sizes[:-1]:
            self.offset.append(self.offset[-1] + n)
        self.width = max(self.sizes)
        self.order = torch.zeros(R, self.width, dtype=torch.long, device=device)
        self.pos = torch.zeros(R, dtype=torch.long, device=device)
        self.arange = torch.arange(self.batch, device=device)
        # crops: (top, left, flip) of every position of the lane's current epoch
        self.crops = (torch.zeros(R, 3, self.width, dtype=torch.long, device=device)
                      if self.crop else None)
        self.hist_val = torch.zeros(len(specs), self.epochs, **f32)
        self.hist_loss = torch.zeros(len(specs), self.epochs, **f32)

        self.step_fn = vmap(grad_and_value(self._one_loss), in_dims=(0, 0, 0),
                            randomness="different")
        self.k = 0
        self.cursor = [0] * R  # index into the lane's plan
        self.run_start = [0] * R  # global step at which the lane's current run started
        # host-side schedule: lanes only need attention at epoch boundaries, so the step
        # loop checks them only after a step that ended some lane's epoch (or at step 0)
        self.boundary = True
        self.next_end = 0  # the next global step after which some lane's epoch ends
        self.epoch_end = [0] * R
        self.gens: dict[int, torch.Generator] = {}
        self.started: dict[int, float] = {}
        self.pending: list[tuple[int, int]] = []
        self.last_report = time.monotonic()
        self._lane_index: dict[tuple[int, ...], Tensor] = {}
        self.graph = None
        self.use_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.use_graph and not on_cuda:
            raise ConfigError("cuda_graph=True needs the data on a CUDA device.")
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))

    # -- the step --------------------------------------------------------------------------

    def _one_loss(self, p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return functional_call(self.loss_module, p, (x, t))

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        """``(L, P)`` rows -> ``{name: (L, *shape)}`` views."""
        return {
            name: flat[:, o : o + math.prod(shape)].view(flat.shape[0], *shape)
            for name, shape, o in zip(self.names, self.shapes, self.offsets)
        }

    def _train_step(self) -> None:
        at = (self.pos[:, None] + self.arange) % self.width  # (R, B) positions in the epoch
        idx = self.order.gather(1, at)
        self.pos += self.batch
        x = self.pool_x[idx]
        if self.crops is not None:
            top, left, flip = self.crops.gather(2, at[:, None].expand(-1, 3, -1)).unbind(1)
            x = crop_flip_at(x.flatten(0, 1), self.crop, top.flatten(), left.flatten(),
                             flip.flatten()).unflatten(0, (self.R, self.batch))
        grads, loss = self.step_fn(self._views(self.flat), x, self.pool_y[idx])
        g = torch.cat([grads[n].reshape(self.R, -1) for n in self.names], 1)
        adam_(self.flat, g, self.m, self.v, self.adam_step, self.lr)
        self.loss_acc += loss.detach() * self.batch

    def _capture(self) -> None:
        """Record the step in a CUDA graph (state restored after the warm-up steps)."""
        state = [self.flat, self.m, self.v, self.adam_step, self.pos, self.loss_acc]
        saved = [t.clone() for t in state]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: autotuning and lazy init happen outside capture
                    self._train_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._train_step()
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure: eager steps instead
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); "
                          "training this family with eager steps.", stacklevel=2)
            self.use_graph = False
            torch.cuda.synchronize(self.device)
        for t, s in zip(state, saved):
            t.copy_(s)

    def step(self) -> bool:
        """One lockstep step of every lane; False once every run has finished."""
        if self.k >= self.total_steps:
            return False
        on_stream = self.stream is not None
        with torch.cuda.stream(self.stream) if on_stream else contextlib.nullcontext():
            if self.boundary:
                self._before_step()
                self.boundary = False
            self.template.train()
            if self.use_graph and self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._train_step()
            if self.k == self.next_end:
                self._after_step()
                self.boundary = True
        self.k += 1
        if self.k >= self.total_steps:
            self._report(force=True)
        return self.k < self.total_steps

    def run(self) -> None:
        while self.step():
            pass

    # -- host-side schedule ----------------------------------------------------------------

    def _current(self, r: int) -> int | None:
        lane = self.plan[r]
        return lane[self.cursor[r]] if self.cursor[r] < len(lane) else None

    def _before_step(self) -> None:
        for r in range(self.R):
            run = self._current(r)
            if run is None:
                continue
            s = self.k - self.run_start[r]
            if s == 0:
                self._start_run(r, run)
            if s % self.spe[run] == 0:
                self.epoch_end[r] = self.k + self.spe[run] - 1
                n = self.sizes[run]
                order = torch.randperm(n, generator=self.gens[run], device=self.device)
                self.order[r, :n] = order + self.offset[run]
                if self.crops is not None:
                    self._draw_crops(r, run)
                self.pos[r] = 0
                self.lr[r] = lr_at(s // self.spe[run], self.base_lr, self.epochs)
        active = [self.epoch_end[r] for r in range(self.R) if self._current(r) is not None]
        self.next_end = min(active, default=self.total_steps)

    def _draw_crops(self, r: int, run: int) -> None:
        """The crops of the lane's epoch, drawn after its order as the sequential run draws
        them (one call per batch, in step order, from the run's generator)."""
        _, h, w = self.pool_x.shape[-3:]
        draws = [torch.stack(crop_draws(self.batch, h, w, self.crop, self.gens[run],
                                        self.device))
                 for _ in range(self.spe[run])]
        self.crops[r, :, : self.sizes[run]] = torch.cat(draws, 1)

    def _start_run(self, r: int, run: int) -> None:
        spec = self.specs[run]
        torch.manual_seed(spec.seed)  # the run's own initial weights, as in protocol.fit
        model = _TrainLoss(build_model(spec))
        self.flat[r] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        for t in (self.m[r], self.v[r], self.adam_step[r], self.loss_acc[r]):
            t.zero_()
        self.best_err[r] = float("inf")
        self.gens[run] = torch.Generator(device=self.device).manual_seed(spec.seed)
        self.started[run] = time.perf_counter()

    def _after_step(self) -> None:
        ended, finished = [], []
        for r in range(self.R):
            run = self._current(r)
            if run is None:
                continue
            s = self.k + 1 - self.run_start[r]
            if s % self.spe[run] == 0:
                ended.append((r, run, s // self.spe[run] - 1))
                if s == self.spe[run] * self.epochs:
                    finished.append((r, run))
        if ended:
            self._end_epochs(ended)
        for r, run in finished:
            self._finish(r, run)
            self.cursor[r] += 1
            self.run_start[r] = self.k + 1
        self._report()

    def _lanes(self, lanes: list[int]) -> Tensor:
        key = tuple(lanes)
        if key not in self._lane_index:
            self._lane_index[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        return self._lane_index[key]

    def _end_epochs(self, ended: list[tuple[int, int, int]]) -> None:
        lanes = self._lanes([r for r, _, _ in ended])
        runs = [run for _, run, _ in ended]
        flat = self.flat[lanes]
        err = self._errors(flat, runs, "valid")
        for i, (r, run, epoch) in enumerate(ended):
            self.hist_val[run, epoch] = err[i]
            self.hist_loss[run, epoch] = self.loss_acc[r] / self.sizes[run]
            self.loss_acc[r] = 0.0
            self.pending.append((run, epoch))
        best = self.best_err[lanes]
        improved = err < best  # strict: the earliest epoch wins ties, as in protocol.fit
        self.best_err[lanes] = torch.where(improved, err, best)
        self.best_flat[lanes] = torch.where(improved[:, None], flat, self.best_flat[lanes])

    def _errors(self, flat: Tensor, runs: list[int], which: str) -> Tensor:
        """``(L,)`` error rates in percent of the rows of ``flat`` on their runs' sets."""
        return stacked_errors(self.template, self._views(flat),
                              [self.eval_x[which][q] for q in runs],
                              [self.eval_y[which][q] for q in runs], self.crop, self.eval_batch,
                              None if self.means is None else [self.means[q] for q in runs])

    def _finish(self, r: int, run: int) -> None:
        test = float(self._errors(self.best_flat[r : r + 1], [run], "test")[0])
        val = self.hist_val[run].tolist()
        losses = self.hist_loss[run].tolist()
        best_val = min(val)
        result = RunResult(
            test_error=test,
            best_val_error=best_val,
            best_epoch=val.index(best_val) + 1,
            epochs=self.epochs,
            seconds=time.perf_counter() - self.started[run],
            val_errors=val,
            train_losses=losses,
        )
        self._report(force=True)
        if self.on_result is not None:
            self.on_result(run, result)

    def _report(self, force: bool = False) -> None:
        """Hand finished epochs to ``on_epoch`` (one device sync) about once a second."""
        if not self.pending or self.on_epoch is None:
            self.pending.clear()
            return
        if not force and time.monotonic() - self.last_report < 1.0:
            return
        hist = self.hist_val.tolist()
        for run, epoch in self.pending:
            self.on_epoch(run, epoch + 1, hist[run][epoch])
        self.pending.clear()
        self.last_report = time.monotonic()


def train_families(trainers: Sequence[LaneTrainer]) -> None:
    """Step several trainers round-robin until all are done (on CUDA each replays on its own
    stream, so their small kernels overlap)."""
    active = list(trainers)
    while active:
        active = [t for t in active if t.step()]


def train_runs_in_lanes(
    specs: Sequence[RunSpec],
    datas: Sequence[DataSplit],
    **kwargs,
) -> list[RunResult]:
    """Train ``specs`` (one family) in lanes; results in spec order."""
    results: dict[int, RunResult] = {}
    user = kwargs.pop("on_result", None)

    def keep(run: int, result: RunResult) -> None:
        results[run] = result
        if user is not None:
            user(run, result)

    LaneTrainer(specs, datas, on_result=keep, **kwargs).run()
    return [results[i] for i in range(len(specs))]
