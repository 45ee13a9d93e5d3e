"""The memory a training step needs, known before the run: one step traced on fake tensors at the real
shapes (no memory, no GPU), every storage it makes followed from its first op to its last reference.

The peak is what the allocator holds at the worst moment of a steady-state step (what
``torch.cuda.max_memory_allocated`` reports): the parameters, the optimizer's state and the batch, which
live across steps, plus what the step makes and still holds at that moment: gradients, activations saved
for the backward, and transients (an op's output before its consumer frees its input, the optimizer's
temporaries). Not counted: the CUDA context, library workspaces outside PyTorch's allocator and the
allocator's fragmentation; :func:`usable_bytes` leaves room for them.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GiB = 1024 ** 3
# What a GPU of N GiB leaves to the tensors: the CUDA context (~0.5-1 GiB), cuBLAS/cuDNN workspaces and
# the caching allocator's fragmentation. A plan that fits the rest runs.
HEADROOM_FRACTION, HEADROOM_BYTES = 0.08, 1 * GiB
CHECKPOINTING = ("off", "stage", "block")
PHASES = ("forward", "backward", "optimizer")


def usable_bytes(gib: float) -> int:
    """The bytes a plan may use on a GPU of ``gib`` GiB."""
    return int(gib * GiB * (1 - HEADROOM_FRACTION) - HEADROOM_BYTES)


def tensors_in(obj) -> Iterable[torch.Tensor]:
    """The tensors of an op's arguments or outputs (nested lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)


class LiveStorages(TorchDispatchMode):
    """Every storage an op makes under this mode: its bytes, the op that made it and the op after which
    it was freed (its last reference gone). ``tick`` counts ops; ``mark(name)`` notes the tick of a moment."""

    def __init__(self):
        super().__init__()
        self.tick = 0
        self.live = 0
        self.peak = 0
        self.peak_tick = 0
        self.made: dict[int, tuple[int, int]] = {}  # storage key -> (bytes, tick made)
        self.freed: dict[int, float] = {}  # storage key -> when freed: tick + 0.5, between op tick and the next
        self.marks: dict[str, int] = {}
        self._keys = 0

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist already (parameters, optimizer state): never counted as made here."""
        for t in tensors:
            t.untyped_storage()._fcmae_plan_key = 0

    def mark(self, name: str) -> None:
        self.marks[name] = self.tick

    def _free(self, key: int) -> None:
        self.live -= self.made[key][0]
        self.freed[key] = self.tick + 0.5

    def track(self, t: torch.Tensor) -> int | None:
        """Follow ``t``'s storage from now on (once); returns its key."""
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None
        key = getattr(storage, "_fcmae_plan_key", None)
        if key == 0:  # made before the trace (:meth:`exclude`): a view of it is no allocation
            return None
        if key is not None and key in self.made:
            return key
        self._keys += 1
        key = self._keys
        storage._fcmae_plan_key = key
        size = storage.nbytes()
        self.made[key] = (size, self.tick)
        self.live += size
        if self.live > self.peak:
            self.peak, self.peak_tick = self.live, self.tick
        weakref.finalize(storage, self._free, key)
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tick += 1
        for t in tensors_in(out):
            self.track(t)
        return out

    def live_at(self, tick: int, keys: Iterable[int] | None = None, settled: bool = False) -> int:
        """Bytes of the storages (of ``keys``, or all) alive just after op ``tick`` (``settled``: once the
        references dropped before the next op are gone too)."""
        keys = self.made if keys is None else keys
        until = tick + 0.5 if settled else tick
        return sum(self.made[k][0] for k in keys
                   if k in self.made and self.made[k][1] <= tick and self.freed.get(k, math.inf) > until)


@dataclass
class MemoryPlan:
    """One training step's memory, in bytes. ``peak`` = ``parameters + optimizer + inputs + buckets`` (alive
    across steps; ``buckets``: DDP's gradient buckets, a copy of the trainable parameters' gradients, with
    several processes) + what the step holds at its worst moment (``phase``): ``gradients``, ``activations``
    (made in the forward and still alive) and ``transient`` (the rest). ``saved`` is what the forward leaves
    for the backward (all activations at the end of the forward)."""

    batch: int
    checkpointing: str
    parameters: int
    optimizer: int
    inputs: int
    gradients: int
    activations: int
    transient: int
    saved: int
    peak: int
    phase: str
    buckets: int = 0

    def with_ddp_buckets(self, trainable_bytes: int) -> "MemoryPlan":
        """The plan for one of several DDP processes: its buckets hold another copy of the gradients."""
        return replace(self, buckets=trainable_bytes, peak=self.peak - self.buckets + trainable_bytes)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        return (f"peak {g(self.peak)} GiB in the {self.phase} (batch {self.batch}, checkpointing "
                f"{self.checkpointing}): parameters {g(self.parameters)}, optimizer state {g(self.optimizer)}, "
                f"batch {g(self.inputs)}, gradients {g(self.gradients)}, activations {g(self.activations)} "
                f"(saved by the forward {g(self.saved)}), transient {g(self.transient)}"
                + (f", DDP buckets {g(self.buckets)}" if self.buckets else ""))


def fake_module(module: torch.nn.Module, fake_mode, device: torch.device) -> torch.nn.Module:
    """``module`` (built on any device, ``meta`` included) with fake parameters and buffers on ``device``."""
    with fake_mode:
        for m in module.modules():
            for k, v in m._parameters.items():
                if v is not None:
                    m._parameters[k] = torch.nn.Parameter(torch.empty_like(v, device=device),
                                                          requires_grad=v.requires_grad)
            for k, v in m._buffers.items():
                if v is not None:
                    m._buffers[k] = torch.empty_like(v, device=device)
    return module


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _storages_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        key = id(s)
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def plan_step(model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
              make_inputs: Callable[[], object], loss_of: Callable[[torch.nn.Module, object], torch.Tensor],
              fake_mode, autocast=contextlib.nullcontext, clip: bool = True, batch: int = 0,
              checkpointing: str = "off") -> MemoryPlan:
    """Trace a steady-state training step of ``model`` (fake, see :func:`fake_module`) under
    ``fake_mode``: the optimizer's state made first (a step on zero gradients, untraced), then the traced
    step: inputs, forward under ``autocast()``, backward, gradient clipping, the optimizer step, ``zero_grad``."""
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    with fake_mode:
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    resident_params = _storages_bytes(params + list(model.buffers()))
    state = _optimizer_tensors(optimizer)
    resident_optimizer = _storages_bytes(state)
    trace = LiveStorages()
    trace.exclude(params + list(model.buffers()) + state)
    with fake_mode, trace:
        inputs = make_inputs()
        trace.mark("inputs")
        with autocast():
            loss = loss_of(model, inputs)
        trace.mark("forward")
        loss.backward()
        trace.mark("backward")
        grad_keys = [trace.track(p.grad) for p in params if p.grad is not None]
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trace.mark("optimizer")
        del loss
    input_keys = [k for k, (_, made) in trace.made.items() if made <= trace.marks["inputs"]]
    inputs_bytes = trace.live_at(trace.marks["inputs"], input_keys, settled=True)  # the batch, not its making's temporaries
    at = trace.peak_tick
    phase = next(p for p in PHASES if at <= trace.marks[p])
    forward_keys = [k for k, (_, made) in trace.made.items() if trace.marks["inputs"] < made <= trace.marks["forward"]]
    grads = trace.live_at(at, grad_keys)
    activations = trace.live_at(at, forward_keys)
    live_inputs = trace.live_at(at, input_keys)
    transient = trace.peak - grads - activations - live_inputs
    saved = trace.live_at(trace.marks["forward"], forward_keys, settled=True)
    # the batch is counted as alive all step (the loader holds it): the traced peak without it, plus it
    peak = resident_params + resident_optimizer + inputs_bytes + trace.peak - live_inputs
    return MemoryPlan(batch, checkpointing, resident_params, resident_optimizer, inputs_bytes, grads,
                      activations, transient, saved, peak, phase)


def trainable_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def largest_batch(peak_at: Callable[[int], int], budget: int, multiple: int = 8, limit: int = 1 << 14,
                  known: dict[int, int] | None = None) -> int:
    """The largest batch, a multiple of ``multiple`` (below it, any size), whose ``peak_at(batch)`` fits
    ``budget``; 0 when not even 1 does, ``limit`` at most. The peak is piecewise linear in the batch (the
    largest of a few lines: the optimizer's moment at small batches, the backward's at large ones), so a
    secant through the two latest points lands next to the edge; a bracket keeps it converging. ``known``
    (batch -> peak, e.g. from a search for another budget) starts it from the two largest batches there."""
    if peak_at(1) > budget:
        return 0
    if peak_at(multiple) > budget:
        return next(b for b in range(multiple - 1, 0, -1) if peak_at(b) <= budget)
    seen = {b: p for b, p in (known or {}).items() if b >= multiple and b % multiple == 0}
    seen[multiple] = peak_at(multiple)
    lo = max(b for b, p in seen.items() if p <= budget)  # the largest batch known to fit
    hi = min((b for b, p in seen.items() if p > budget), default=None)  # the smallest known not to
    x0, x1 = sorted(seen)[-2:] if len(seen) > 1 else (multiple, min(2 * multiple, limit))
    p0 = peak_at(x0)
    while True:
        p1 = peak_at(x1)
        if p1 <= budget:
            lo = max(lo, x1)
        else:
            hi = x1 if hi is None else min(hi, x1)
        if lo >= limit or (hi is not None and hi - lo <= multiple):
            return lo
        slope = (p1 - p0) / (x1 - x0) if x1 != x0 else 0.0
        guess = int(x1 + (budget - p1) / slope) // multiple * multiple if slope > 0 else 2 * lo
        upper = min(limit, hi - multiple) if hi is not None else limit
        guess = min(max(guess, lo + multiple), upper)  # inside the bracket: on the edge, the next batch up
        if guess == x1:  # the secant stalled: bisect
            guess = max(lo + multiple, (lo + upper) // 2 // multiple * multiple)
        x0, p0, x1 = x1, p1, guess


def emulated_cuda_autocast():
    """CPU autocast with CUDA's casts for the ops these models use, for a plan or a roofline made without
    a GPU: LayerNorm and pow in fp32; a norm or sum without a dtype accumulates and returns fp32 (CUDA's
    ``fp32_set_opt_dtype``). Registered once per process (it changes the CPU's autocast there)."""
    if not _POLICY_LIBS:
        lib = torch.library.Library("aten", "IMPL")
        keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

        def fp32(op):
            def impl(*args, **kwargs):
                with torch._C._ExcludeDispatchKeyGuard(keyset):
                    cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                    return op(*cast, **kwargs)
            return impl

        for name, op in (("layer_norm", aten.layer_norm.default), ("native_layer_norm", aten.native_layer_norm.default),
                         ("pow.Tensor_Scalar", aten.pow.Tensor_Scalar), ("pow.Tensor_Tensor", aten.pow.Tensor_Tensor)):
            lib.impl(name, fp32(op), "AutocastCPU")

        def opt_dtype(op):
            def impl(x, *args, dtype=None, **kwargs):
                with torch._C._ExcludeDispatchKeyGuard(keyset):
                    if dtype is None and x.is_floating_point():
                        x = x.float()
                    return op(x, *args, dtype=dtype, **kwargs)
            return impl
        lib.impl("linalg_vector_norm", opt_dtype(aten.linalg_vector_norm.default), "AutocastCPU")
        lib.impl("sum.dim_IntList", opt_dtype(aten.sum.dim_IntList), "AutocastCPU")
        _POLICY_LIBS.append(lib)
    return torch.autocast("cpu", dtype=torch.bfloat16)


_POLICY_LIBS: list = []


def _proc_status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured_cpu_peak(model: torch.nn.Module, make_optimizer, make_inputs, loss_of, clip: bool = True) -> dict:
    """The measured counterpart of :func:`plan_step` for a real model on the CPU (Linux): after a first step,
    the bytes of the tensors alive across steps (parameters, buffers, the optimizer's state, the batch),
    plus how far the step raises the process's resident set above where it started (the peak ``VmHWM``,
    reset through ``/proc/self/clear_refs`` just before the step, minus ``VmRSS`` then).

    Start the process with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every tensor over 64 KiB on
    its own and returns it to the system when freed, so the resident set follows the live tensors (with
    its default, adaptive threshold, freed memory stays resident and later steps reuse it unseen)."""
    import gc
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    warm = make_inputs()
    loss_of(model, warm).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del warm
    gc.collect()
    inputs = make_inputs()
    state = _optimizer_tensors(optimizer)
    resident = _storages_bytes(params + list(model.buffers()) + state + list(tensors_in(tuple(inputs))))
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    loss = loss_of(model, inputs)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del loss
    rise = _proc_status_bytes("VmHWM") - before
    return {"resident": resident, "step_rise": rise, "peak": resident + rise}


class PeakCheck:
    """A loop callback for a run on a GPU: after its first step (which makes the optimizer's state), the
    allocator's peak is reset; after ``steps`` more, the plan and ``torch.cuda.max_memory_allocated`` go
    to ``report`` side by side. Runs once."""

    def __init__(self, plan: MemoryPlan, device: torch.device, report: Callable[[str], None], steps: int = 2):
        self.plan, self.device, self.report, self.steps = plan, device, report, steps
        self.calls = 0

    def __call__(self, context=None) -> None:
        self.calls += 1
        if self.calls == 1:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.calls == 1 + self.steps:
            measured = torch.cuda.max_memory_allocated(self.device)
            self.report(f"memory: planned peak {self.plan.peak / GiB:.2f} GiB, measured {measured / GiB:.2f} GiB "
                        f"(torch.cuda.max_memory_allocated over steps 2-{1 + self.steps}; planned / measured = "
                        f"{self.plan.peak / max(measured, 1):.3f})")


def wants_plan(setting: str, device: torch.device) -> bool:
    """``trainer.memory_plan``: ``auto`` plans a run on a GPU (where memory is the question), ``on`` any run."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")
