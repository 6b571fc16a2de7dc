"""Non-finite guard: a step whose loss, gradients or updated weights are NaN/inf never reaches the adapter.

Every optimizer step runs as ``snapshot -> step -> mask``:

* before the step, every tensor the step may change (the adapter weights and the optimizer state
  held on their device) is copied (into buffers kept across steps);
* after it, ``ok = isfinite(loss) & isfinite(grads) & isfinite(new weights)`` is computed on the
  device and each tensor becomes ``where(ok, new, saved)`` - bit-identical to the plain step when
  ``ok`` (``where`` selects, it does not compute), the state before the step when not. Gradient
  clipping runs inside the step, so a non-finite clipping norm is caught the same way.

No value is read back to the host for this, so the healthy path keeps its asynchronous queue.
State the device cannot select on (a CPU step counter on a GPU run, Python numbers of
bitsandbytes/Prodigy, state created by the first step) is restored one step late: the flag is
copied to the host without waiting and read just before the next optimizer step (or checkpoint,
or the end), when it has long arrived; the optimizer only reads that state inside its step.

Counters live on the device too: ``skipped`` (steps skipped so far) and ``streak`` (consecutive
bad steps). :meth:`NonFiniteGuard.check` reads them - at logging intervals, before a checkpoint is
written and at the end - and raises :class:`NonFiniteLossError` once ``streak >= max_consecutive``.

Memory: one copy of the adapter weights and their optimizer state (small next to the base model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ..errors import NonFiniteLossError


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: every element of ``tensors`` is finite (on their device, no host read)."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm(tensors, math.inf)  # max |x|: NaN and inf propagate
    return torch.stack([n.float() for n in norms]).amax().isfinite()


def all_ranks_agree(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` and-ed over every rank (a device-side all-reduce, no host read)."""
    if not dist.is_available() or not dist.is_initialized():
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


_MISSING = object()


class _Snapshot:
    """What one optimizer step may change, split into what the device can select on and the rest.

    The copies go into ``buffers`` (kept by the guard across steps, one per tensor, so a step
    allocates nothing) with one ``_foreach_copy_`` per side.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        extra: Iterable[torch.Tensor] = (),
        buffers: dict[int, torch.Tensor] | None = None,
    ):
        self.optimizer = optimizer
        self.device = device
        self.device_tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host_tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.values: list[tuple[dict, object, object]] = []  # (container, key, old value or _MISSING)
        self._seen: set[int] = set()
        self._buffers = {} if buffers is None else buffers
        for t in extra:  # the module's own weights, where they are not the optimizer's (DeepSpeed's copies)
            self._tensor(t)
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._tensor(p)
                self._dict(optimizer.state[p], p)
            self._dict(group, None, skip=("params",))
        if len(self._buffers) > len(self._seen):  # tensors no longer in the step (replaced state)
            for key in set(self._buffers) - self._seen:
                del self._buffers[key]
        with torch.no_grad():
            for pairs in (self.device_tensors, self.host_tensors):
                if pairs:
                    torch._foreach_copy_([saved for _, saved in pairs], [t for t, _ in pairs])

    def _tensor(self, t: torch.Tensor) -> None:
        if id(t) in self._seen:
            return
        self._seen.add(id(t))
        saved = self._buffers.get(id(t))
        if saved is None or saved.shape != t.shape or saved.dtype != t.dtype or saved.device != t.device:
            saved = self._buffers[id(t)] = torch.empty_like(t, memory_format=torch.preserve_format)
        (self.device_tensors if t.device == self.device else self.host_tensors).append((t, saved))

    def _dict(self, d: dict, p, skip=()) -> None:
        self.values.append((d, _MISSING, set(d)))  # keys present before the step
        for k, v in d.items():
            if k in skip:
                continue
            if isinstance(v, torch.Tensor):
                self._tensor(v)
            else:
                self.values.append((d, k, copy.copy(v)))

    def changed_on_host(self) -> bool:
        """Did the step touch anything the device cannot restore (new keys, Python values, other-device tensors)?"""
        if self.host_tensors:
            return True
        for d, k, old in self.values:
            if k is _MISSING:
                if set(d) != old:
                    return True
            elif d.get(k, _MISSING) is not old and d.get(k, _MISSING) != old:
                return True
        return False

    def mask_device(self, ok: torch.Tensor, host_decides: bool = False) -> None:
        """``t <- where(ok, t, saved)`` for every device tensor, on the device. With ``host_decides``
        (the CPU, where reading ``ok`` waits for nothing) the flag is read instead and a healthy
        step touches nothing; a bad one copies every tensor back."""
        if not self.device_tensors:
            return
        with torch.no_grad():
            if host_decides:
                if not bool(ok):
                    torch._foreach_copy_(
                        [t for t, _ in self.device_tensors], [saved for _, saved in self.device_tensors]
                    )
                return
            for t, saved in self.device_tensors:
                t.copy_(torch.where(ok, t, saved))

    def restore_host(self) -> None:
        with torch.no_grad():
            for t, saved in self.host_tensors:
                t.copy_(saved)
        for d, k, old in self.values:
            if k is _MISSING:
                for new in set(d) - old:
                    del d[new]
        for d, k, old in self.values:
            if k is not _MISSING:
                d[k] = old
        for p in list(self.optimizer.state):  # state created by this step
            if not self.optimizer.state[p]:
                del self.optimizer.state[p]


class NonFiniteGuard:
    """Skips (and counts) optimizer steps with a non-finite loss, gradient or result.

    Args:
        max_consecutive: stop the run once this many consecutive steps were skipped.

    Attributes:
        host_decides: read the step's flag on the host and restore only a bad step (None = on the
            CPU, where the read waits for nothing; accelerators select on the device, no read).

    Use: :meth:`observe` in every ``training_step`` (loss and the batch's inputs), :meth:`step`
    around ``optimizer.step``, :meth:`check` where a host read is affordable.
    """

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.skipped: torch.Tensor | None = None  # float 0-dim, device
        self.streak: torch.Tensor | None = None
        self.input_streak: torch.Tensor | None = None  # bad steps of the streak whose inputs were non-finite
        self._loss_ok: torch.Tensor | None = None
        self._inputs_ok: torch.Tensor | None = None
        self._pending: tuple[_Snapshot, torch.Tensor, object] | None = None
        self._buffers: dict[int, torch.Tensor] = {}  # the snapshot's copies, reused every step
        self.host_decides: bool | None = None

    def _counters(self, device) -> None:
        if self.skipped is None or self.skipped.device != device:
            zero = torch.zeros((), device=device)
            old = [t for t in (self.skipped, self.streak, self.input_streak)]
            self.skipped, self.streak, self.input_streak = (zero.clone() if t is None else t.to(device) for t in old)

    def observe(self, loss: torch.Tensor, inputs: Iterable[torch.Tensor]) -> None:
        """Record one micro-batch: its loss and whether its inputs (latents, embeddings) are finite."""
        loss_ok = loss.detach().isfinite().all()
        inputs_ok = all_finite([t.detach() for t in inputs if t.is_floating_point()]).to(loss.device)
        self._loss_ok = loss_ok if self._loss_ok is None else self._loss_ok & loss_ok
        self._inputs_ok = inputs_ok if self._inputs_ok is None else self._inputs_ok & inputs_ok

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        run_step: Callable[[], object],
        params: Iterable[torch.Tensor] = (),
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """Run ``run_step()`` (closure, clipping, update) and undo its effect if anything was non-finite.

        Args:
            params: weights to protect besides the optimizer's own (the module's trainable ones).
            all_reduce: ``flag -> flag`` agreed by every rank (min), so sharded runs skip together.
        """
        self.resolve()
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        params = list({id(p): p for p in [*params, *(p for g in inner.param_groups for p in g["params"])]}.values())
        device = params[0].device if params else torch.device("cpu")
        snapshot = _Snapshot(inner, device, params, self._buffers)
        out = run_step()
        ok = all_finite([p.grad for p in params if p.grad is not None] + params).to(device)
        if self._loss_ok is not None:
            ok = ok & self._loss_ok.to(device)
        if all_reduce is not None:
            ok = all_reduce(ok)
        inputs_ok = (
            self._inputs_ok.to(device)
            if self._inputs_ok is not None
            else torch.ones((), dtype=torch.bool, device=device)
        )
        self._loss_ok = self._inputs_ok = None
        snapshot.mask_device(ok, host_decides=device.type == "cpu" if self.host_decides is None else self.host_decides)
        self._counters(device)
        bad = (~ok).float()
        self.skipped += bad
        self.streak.mul_(bad).add_(bad)
        self.input_streak.mul_(bad).add_(bad * (~inputs_ok).float())
        if snapshot.changed_on_host():
            if device.type == "cpu":
                self._pending = (snapshot, ok, None)
            else:  # copy the flag without waiting; read it before the next step
                host = torch.empty((), dtype=torch.bool, pin_memory=True)
                host.copy_(ok, non_blocking=True)
                event = torch.cuda.Event() if device.type == "cuda" else None
                if event is not None:
                    event.record()
                self._pending = (snapshot, host, event)
        return out

    def resolve(self) -> None:
        """Apply the host-side half of the last step's decision (waits only for that step's flag)."""
        if self._pending is None:
            return
        snapshot, flag, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        elif flag.device.type != "cpu":
            flag = flag.cpu()
        if not flag.numpy().item():  # a host copy made one step ago: no device wait here
            snapshot.restore_host()

    def counts(self) -> tuple[int, int, int]:
        """``(skipped, streak, input_streak)`` as Python ints (a host read)."""
        self.resolve()
        if self.skipped is None:
            return 0, 0, 0
        return tuple(int(v) for v in torch.stack([self.skipped, self.streak, self.input_streak]).cpu().tolist())

    def check(self, step: int, precision: str | None = None) -> None:
        """Raise :class:`NonFiniteLossError` if the last ``max_consecutive`` (or more) steps were skipped."""
        _, streak, input_streak = self.counts()
        if streak < self.max_consecutive:
            return
        first = step - streak + 1
        if input_streak:
            cause = (
                f"{input_streak} of these batches had NaN/inf in their cached latents or text embeddings: the "
                "cache is damaged; delete the dataset's cache (under paths.cache_dir) and re-run to re-encode it"
            )
        else:
            fp16 = (
                " or train in bf16 rather than fp16 (trainer.precision=bf16-mixed)"
                if precision and "16" in str(precision) and "bf16" not in str(precision)
                else ""
            )
            cause = f"the inputs were finite, so the loss diverged: lower optimizer.lr{fp16}"
        raise NonFiniteLossError(
            f"training stopped at step {step}: the last {streak} steps (from step {first}) had a non-finite "
            f"loss or gradient and were skipped (nonfinite_max_consecutive={self.max_consecutive}); {cause}. "
            "Checkpoints hold the last good weights; no LoRA of the bad state was written"
        )
