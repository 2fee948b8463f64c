"""Intra-op and inter-op threads of one rank: the uniform rule, and ``launch.threads: auto``.

Uniform rule: every op of a rank runs with ``cores per node / ranks per node`` threads (or
``launch.threads``). That is right for big ops and wrong for small ones: a small GEMM, a norm or
an activation on a small tensor pays the thread pool's fork/join and gains nothing (runtime
concurrency control: measure how an op scales, give it only the threads that help).

``launch.threads: auto`` measures instead of assuming, per module (leaf modules: Conv, Linear,
LayerNorm, ...), separately for forward and backward:
- during the first steps (one warm-up step at the uniform count, then ``rounds`` x each candidate
  count, interleaved: 1, half and all of the rank's share) every leaf module runs at the step's
  candidate count; its forward time is taken between a forward pre-hook and a forward hook, its
  backward time from the moment the gradient of its output arrives (a tensor hook on the output:
  the module's backward starts there) to the next such moment (the next module's backward);
- then each module keeps a count other than the uniform one only where that measurably helps
  (fastest candidate at least ``margin`` faster and ``min_gain_s`` per step less); modules that keep
  the uniform count lose their hooks, so an unchanged plan costs nothing;
- with ``reduce`` (an allreduce-sum) all ranks decide on the same summed times, so they share a plan.

Thread counts change where work is split, never what is computed, so results are bit-identical to
the uniform rule wherever the kernels themselves do not depend on the thread count (e.g. MKL GEMM
under ``MKL_CBWR=AUTO,STRICT``); reductions that split by thread count (LayerNorm / conv / embedding
backward on CPU) differ in the last bits, as they do between two uniform counts.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

DIRECTIONS = ("fwd", "bwd")


def configure_threads(launch: Any, topology: Any, loader_workers: int = 0) -> int:
    """Set this rank's intra-op (and inter-op, when given) threads; returns the uniform intra-op count
    (``auto`` starts from the uniform rule and changes counts per module later). Data loader workers
    take their cores out of the rank's share, unless ``launch.threads`` fixes the count."""
    configured = launch.threads if isinstance(launch.threads, int) else 0
    base = topology.threads(configured)
    if not configured:
        base = max(1, base - loader_workers)
    torch.set_num_threads(base)
    interop = getattr(launch, "interop_threads", 0)
    if interop and torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError:  # torch allows it once, before inter-op work: e.g. a second run in one process
            warnings.warn(f"lmsdp launch.interop_threads={interop} not applied: torch's inter-op pool "
                          f"already runs {torch.get_num_interop_threads()} threads in this process")
    return base


def candidate_counts(base: int) -> List[int]:
    """1, half and all of the rank's share (distinct, ascending)."""
    return sorted({1, max(1, base // 2), base})


@dataclass
class ModulePlan:
    """One leaf module's measured times (seconds per step, best of the rounds) and chosen counts."""

    name: str
    kind: str
    times: Dict[str, Dict[int, float]] = field(default_factory=lambda: {d: {} for d in DIRECTIONS})
    threads: Dict[str, int] = field(default_factory=dict)

    def changed(self, base: int) -> bool:
        return any(self.threads.get(d, base) != base for d in DIRECTIONS)


class ModuleThreads:
    """Measures leaf modules at candidate thread counts during the first steps, then runs each module
    (forward and backward) at the count that measurably helps it. Attach before training starts."""

    def __init__(self, model: nn.Module, base: int, rounds: int = 2, warmup: int = 1, margin: float = 0.1,
                 min_gain_s: float = 20e-6, candidates: Optional[List[int]] = None,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.base = base
        self.candidates = candidates or candidate_counts(base)
        self.margin, self.min_gain_s, self.reduce = margin, min_gain_s, reduce
        order: List[int] = []
        for r in range(rounds):  # interleaved: 1, 2, 4, 4, 2, 1, ... so drift hits every count alike
            order += self.candidates if r % 2 == 0 else self.candidates[::-1]
        self.schedule = [None] * warmup + order  # None: warm-up at the uniform count, not measured
        self.units: List[Tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules()
                                                   if n and not any(True for _ in m.children())]
        self.plans = {n: ModulePlan(n, type(m).__name__) for n, m in self.units}
        self.step = 0  # steps begun
        self.decided = len(self.candidates) < 2  # one core: nothing to choose
        self.step_times: Dict[str, List[float]] = {"uniform": [], "plan": []}
        self._step_started: Optional[float] = None
        self._step_kind: Optional[str] = None
        self._measuring: Optional[int] = None  # candidate count of the current step, or None
        self._fwd: Dict[str, float] = {}
        self._bwd: Dict[str, float] = {}
        self._saved: Dict[str, List[int]] = {}
        self._bwd_unit: Optional[str] = None
        self._bwd_since = 0.0
        self._in_backward = False
        self._counts: Dict[str, Dict[str, int]] = {}  # unit -> direction -> count in force
        self._handles: List[Any] = [model.register_forward_pre_hook(self._on_step)]
        self._unit_handles: Dict[str, List[Any]] = {}
        if not self.decided:
            for name, module in self.units:
                self._hook(name, module)

    # ---- hooks

    def _hook(self, name: str, module: nn.Module) -> None:
        self._unit_handles[name] = [
            module.register_forward_pre_hook(lambda _m, _a, n=name: self._fwd_enter(n)),
            module.register_forward_hook(lambda _m, _a, out, n=name: self._fwd_exit(n, out)),
        ]

    def _count(self, name: str, direction: str) -> int:
        if self._measuring is not None:
            return self._measuring
        return self._counts.get(name, {}).get(direction, self.base)

    def _fwd_enter(self, name: str) -> None:
        self._saved.setdefault(name, []).append(torch.get_num_threads())
        torch.set_num_threads(self._count(name, "fwd"))
        self._fwd[name] = self._fwd.get(name, 0.0) - time.perf_counter()

    def _fwd_exit(self, name: str, output: Any) -> None:
        self._fwd[name] = self._fwd.get(name, 0.0) + time.perf_counter()
        torch.set_num_threads(self._saved[name].pop())  # the count around the call (base, or a backward's)
        if self._in_backward:  # a recomputation inside backward: its own backward is not ours to time
            return
        tensor = _first_grad_tensor(output)
        if tensor is not None:
            tensor.register_hook(lambda _grad, n=name: self._bwd_enter(n))

    def _bwd_enter(self, name: str) -> None:
        now = time.perf_counter()
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._bwd_done)
        self._close_bwd(now)
        self._bwd_unit, self._bwd_since = name, now
        torch.set_num_threads(self._count(name, "bwd"))
        return None  # the gradient is not changed

    def _close_bwd(self, now: float) -> None:
        if self._bwd_unit is not None:
            self._bwd[self._bwd_unit] = self._bwd.get(self._bwd_unit, 0.0) + now - self._bwd_since
            self._bwd_unit = None

    def _bwd_done(self) -> None:
        """End of the backward pass (queued on autograd's engine): back to the uniform count."""
        self._close_bwd(time.perf_counter())
        self._in_backward = False
        torch.set_num_threads(self.base)

    # ---- phases

    def _on_step(self, _module: nn.Module, _args: Any) -> None:
        """Root forward pre-hook = a step begins: book the last step, pick this step's counts."""
        if torch.is_grad_enabled() is False or self._in_backward:
            return  # evaluation or recomputation, not a training step
        now = time.perf_counter()
        if self._step_started is not None and self._step_kind is not None:
            self.step_times[self._step_kind].append(now - self._step_started)
        if self._measuring is not None:
            self._book(self._measuring)
        self._fwd, self._bwd = {}, {}
        index = self.step
        self.step += 1
        if not self.decided and index >= len(self.schedule):
            self.decide()
        self._measuring = self.schedule[index] if not self.decided else None
        self._step_kind = ("uniform" if self._measuring == self.base else None) if not self.decided else "plan"
        self._step_started = now

    def _book(self, count: int) -> None:
        for name, plan in self.plans.items():
            for direction, spent in (("fwd", self._fwd), ("bwd", self._bwd)):
                if name in spent:
                    seen = plan.times[direction]
                    seen[count] = min(seen.get(count, float("inf")), spent[name])

    def decide(self) -> None:
        """Choose each module's counts from the measured times (summed over ranks with ``reduce``)."""
        names = list(self.plans)
        table = torch.tensor([[self.plans[n].times[d].get(c, float("nan")) for d in DIRECTIONS
                               for c in self.candidates] for n in names], dtype=torch.float64)
        if self.reduce is not None and len(names):
            table = self.reduce(table)
        chosen: Dict[str, Dict[str, int]] = {}
        width = len(self.candidates)
        for row, name in zip(table.tolist(), names):
            chosen[name] = {d: choose_count(dict(zip(self.candidates, row[i * width:(i + 1) * width])),
                                            self.base, self.margin, self.min_gain_s)
                            for i, d in enumerate(DIRECTIONS)}
        self.apply_plan(chosen)

    def apply_plan(self, chosen: Dict[str, Dict[str, int]]) -> None:
        """Run each named module at its counts from now on; modules left at the uniform count (or not
        named) lose their hooks."""
        for name, plan in self.plans.items():
            plan.threads = {d: chosen.get(name, {}).get(d, self.base) for d in DIRECTIONS}
            if plan.changed(self.base):
                self._counts[name] = dict(plan.threads)
                if name not in self._unit_handles:
                    self._hook(name, dict(self.units)[name])
            else:
                self._counts.pop(name, None)
                for handle in self._unit_handles.pop(name, []):
                    handle.remove()
        self.decided = True

    # ---- report

    def changed(self) -> List[ModulePlan]:
        return [p for p in self.plans.values() if p.changed(self.base)] if self.decided else []

    def summary(self) -> Dict[str, Any]:
        """Rows for the run summary: the plan in one line, and measured step times uniform vs plan."""
        if len(self.candidates) < 2:
            return {"threads_auto": f"1 thread per rank: nothing to choose (uniform {self.base})"}
        if not self.decided:
            return {"threads_auto": f"not decided: needs {len(self.schedule) + 1} steps to measure; "
                                    f"ran uniform {self.base}"}
        changed = self.changed()
        out: Dict[str, Any] = {}
        if not changed:
            out["threads_auto"] = f"no module gains over uniform {self.base}: uniform kept"
        else:
            groups: Dict[Tuple[str, int, int], int] = {}
            for p in changed:
                key = (p.kind, p.threads["fwd"], p.threads["bwd"])
                groups[key] = groups.get(key, 0) + 1
            parts = [f"{n}x {kind} fwd {f}/bwd {b}" for (kind, f, b), n in sorted(groups.items())]
            out["threads_auto"] = (f"{len(changed)}/{len(self.plans)} modules off uniform {self.base}: "
                                   + ", ".join(parts))
        uniform, planned = self.step_times["uniform"], self.step_times["plan"][1:]  # first pays the switch
        if uniform and planned:
            out["threads_auto_step_s"] = (f"uniform {statistics.median(uniform):.4g} vs plan "
                                          f"{statistics.median(planned):.4g} (median)")
        return out

    def write(self, path: str) -> None:
        """The whole per-module plan with its measured times, for a person or a tool to read."""
        data = {"base": self.base, "candidates": self.candidates, "decided": self.decided,
                "modules": [{"name": p.name, "kind": p.kind, "threads": p.threads,
                             "times_s": {d: {str(c): t for c, t in p.times[d].items()} for d in DIRECTIONS}}
                            for p in self.plans.values()]}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)

    def close(self) -> None:
        for handle in self._handles + [h for hs in self._unit_handles.values() for h in hs]:
            handle.remove()
        self._handles, self._unit_handles = [], {}
        torch.set_num_threads(self.base)


def choose_count(times: Dict[int, float], base: int, margin: float, min_gain_s: float) -> int:
    """The count to run at: the fastest measured one if it beats ``base``'s time by at least ``margin``
    (relative) and ``min_gain_s`` (absolute), else ``base``. NaN: not measured at that count."""
    base_time = times.get(base, float("nan"))
    usable = {c: t for c, t in times.items() if t == t}
    if not usable or base_time != base_time:
        return base
    best = min(usable, key=lambda c: (usable[c], -c))  # ties: the larger count (the uniform rule's side)
    gain = base_time - usable[best]
    if best != base and gain >= margin * base_time and gain >= min_gain_s:
        return best
    return base


def _first_grad_tensor(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_grad_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        return _first_grad_tensor(list(output.values()))
    return None


def attach(model: nn.Module, launch: Any, base: int,
           reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[ModuleThreads]:
    """The worker's hook: a ModuleThreads on ``model`` when ``launch.threads`` is ``auto``, else None."""
    if launch.threads != "auto":
        return None
    return ModuleThreads(model, base, reduce=reduce)
