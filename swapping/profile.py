"""Profile one training step for the swap planner: every saved tensor (size, producing module, pack
time, first use in backward), forward / backward time, parameter, gradient, optimizer and workspace bytes.

Saved-tensor sizes and order do not depend on the device, so they come from a run under
``FakeTensorMode`` at the planned batch: no memory, no compute, any batch size, AMP included. The same
hooks the engine uses record every saved tensor (same filters, same dedupe), its producing module, its
pack index and its first use in backward; ``torch.utils.flop_counter`` counts FLOPs per module. Time
comes from one real step at a small batch on the job's device (the same hooks stamp every pack and first
use), scaled to the planned batch by the FLOP ratio; without such a run (or when its tensors do not line
up with the fake run's) events are placed by cumulative FLOPs. Recording a step (the hooks, the fake
run) is ``step_record``; the machine's rates (``link_bandwidth``, ``device_flops``) are ``rates``; the
memory and time models are in ``plan_models``, the search in ``planner``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .rates import device_flops, link_bandwidth
from .step_record import (RECOMPUTE_VARIANTS, FakeProfileError, RecomputeSpec, Workload, _ModuleFacts,
                          _Recorder, _apply, _fake_profile, _run_step, original_names, recomputed_names)


@dataclass
class SavedTensor:
    """One saved tensor as the engine's pack hook sees it (after dedupe), threshold not yet applied."""

    nbytes: int
    module: str          # innermost module running when it was saved ('' = outside any module)
    pack_s: float        # compute seconds from forward start to this pack
    use_s: float         # compute seconds from backward start to its first use (-1: never used)
    use_rank: int        # position in the first-use order (-1: never used)
    packers: Tuple[str, ...] = ()   # every module that saved it (autograd saves one tensor for several ops)
    span_bytes: int = 0  # bytes a swap copies: the storage span of a view (0: nbytes, a dense tensor)

    @property
    def copy_bytes(self) -> int:
        """What one swap-out (or swap-in) of this tensor moves over the link."""
        return max(self.nbytes, self.span_bytes)


@dataclass
class StepProfile:
    """One step of one model variant at one batch size."""

    batch: int
    recompute: RecomputeSpec
    tensors: List[SavedTensor]
    forward_s: float
    backward_s: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    workspace_bytes: int
    flops: int
    module_flops: Dict[str, int]
    module_forward_s: Dict[str, float]
    module_backward_s: Dict[str, float]  # backward compute ending at first uses of the module's tensors
    recomputed: List[str]            # original names of modules run again in backward
    timed: str                       # how times were obtained (for the report)
    module_forward_flops: Dict[str, int] = field(default_factory=dict)
    # per module called once in forward: its inputs that need grad, as (saved tensor index or -1, bytes)
    module_inputs: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    held_bytes: int = 0              # recompute segments' inputs no saved tensor holds (checkpoint keeps them)
    recompute_bytes: int = 0         # saved bytes of the largest recomputed module, live again in its backward

    @property
    def fixed_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    def candidates(self, threshold: int) -> List[int]:
        """Indices into ``tensors`` of the engine's candidates (its handle seq order) for ``threshold``."""
        return [i for i, t in enumerate(self.tensors) if t.nbytes >= threshold and t.nbytes > 0]


def optimizer_state_bytes(workload: Workload) -> int:
    """Optimizer state after one step of a tiny stand-in: the state per parameter byte is what counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = workload.build_model()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt = workload.build_optimizer(model)
        try:
            opt.step()
        except Exception:  # an optimizer that cannot step on fake tensors: assume Adam-like (2 states)
            return 2 * sum(p.nbytes for p in model.parameters() if p.requires_grad)
        return sum(v.nbytes for state in opt.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)


def profile_workload(workload: Workload, batch: int, recompute: RecomputeSpec = None,
                     device: Union[str, torch.device] = "cpu", time_batch: Optional[int] = None,
                     optimizer_bytes: Optional[int] = None, flops_rate: Optional[float] = None) -> StepProfile:
    """Profile one step at ``batch``: sizes from a fake run, times from a real run at ``time_batch``
    (default: ``batch``; 0: no real run, times from FLOPs at ``flops_rate`` FLOP/s, default the device's
    measured matmul rate: how a CPU machine plans for a GPU it does not have)."""
    device = torch.device(device)
    fake, flops_by_module, forward_flops, params, grads, names, facts = _fake_profile(workload, batch, recompute)
    total_flops = max(1, flops_by_module.get("", 0))
    tb = batch if time_batch is None else time_batch
    if flops_rate:
        tb = 0
    module_s: Dict[str, float] = {}
    workspace = 0
    real: Optional[_Recorder] = None
    if tb > 0:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        torch.manual_seed(0)
        model = _apply(workload.build_model().to(device), recompute)
        for _ in range(2):  # warm-up: allocator, kernel caches and lazy init take a step or two
            _run_step(workload, model, tb, device, _Recorder(time.perf_counter, device), {}, sync)
            model.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        runs = []
        for _ in range(3):  # the median of three timed steps: one slowed by a busy machine does not count
            model.zero_grad(set_to_none=True)
            rec, mod_s = _Recorder(time.perf_counter, device), {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            fw_bw = _run_step(workload, model, tb, device, rec, mod_s, sync)
            if device.type == "cuda":
                workspace = max(workspace, torch.cuda.max_memory_allocated(device) - base - sum(rec.sizes) - grads)
            runs.append((fw_bw, rec, mod_s))
        (fw, bw), real, module_s = sorted(runs, key=lambda r: sum(r[0]))[1]
        del model
    if real is not None and len(real.sizes) == len(fake.sizes) and real.order == fake.order:
        fake_tb = _fake_profile(workload, tb, recompute)[1].get("", 0) if tb != batch else total_flops
        scale = total_flops / max(1, fake_tb)
        pack_t, use_t = [t * scale for t in real.pack_t], {i: t * scale for i, t in real.use_t.items()}
        forward_s, backward_s = fw * scale, bw * scale
        module_forward_s = {facts.rename(k): v * scale for k, v in module_s.items()}
        timed = f"measured on {device.type} at batch {tb}" + (f", scaled x{scale:.2f} by FLOPs" if tb != batch else "")
        workspace = int(workspace * scale)
    else:  # events placed by cumulative FLOPs at the device's rate
        rate = flops_rate or ((total_flops / max(1e-9, fw + bw) * (batch / tb)) if real is not None
                              else device_flops(device))
        pack_t = [f / rate for f in fake.pack_t]
        use_t = {i: f / rate for i, f in fake.use_t.items()}
        forward_s = fake.t_backward / rate if fake.t_backward else total_flops / 3 / rate
        backward_s = total_flops / rate - forward_s
        module_forward_s = {k: v / rate for k, v in forward_flops.items()}
        timed = f"from FLOPs at {rate / 1e9:.1f} GFLOP/s ({device.type})"
    if not workspace:  # CPU / no measurement: a layer's output and its gradient, the largest of them
        workspace = 2 * max(fake.sizes, default=0)
    tensors = _saved_tensors(fake, facts, pack_t, use_t)
    opt_bytes = optimizer_state_bytes(workload) if optimizer_bytes is None else optimizer_bytes
    return StepProfile(batch, recompute, tensors, forward_s, backward_s, params, grads, opt_bytes, workspace,
                       total_flops, {k: v for k, v in flops_by_module.items() if k}, module_forward_s,
                       backward_by_module(tensors), names, timed, forward_flops, facts.inputs, facts.held_bytes)


def _saved_tensors(fake: _Recorder, facts: _ModuleFacts, pack_t: Sequence[float],
                   use_t: Dict[int, float]) -> List[SavedTensor]:
    rank = {idx: r for r, idx in enumerate(fake.order)}
    return [SavedTensor(n, facts.rename(m), p, use_t.get(i, -1.0), rank.get(i, -1),
                        tuple(facts.rename(x) for x in fake.packers[i]), fake.spans[i])
            for i, (n, m, p) in enumerate(zip(fake.sizes, fake.modules, pack_t))]


def backward_by_module(tensors: Sequence[SavedTensor]) -> Dict[str, float]:
    """Backward compute per module: the time before each first use goes to the module that saved the
    tensor used (autograd reads a node's saved tensors when it runs that node's backward)."""
    out: Dict[str, float] = {}
    last = 0.0
    for t in sorted((t for t in tensors if t.use_rank >= 0), key=lambda t: t.use_rank):
        out[t.module] = out.get(t.module, 0.0) + max(0.0, t.use_s - last)
        last = max(last, t.use_s)
    return out


def variant_key(recompute: RecomputeSpec) -> str:
    """Key of a recompute variant in ``profile_variants``' result (and in plan tables)."""
    return "none" if not recompute else (recompute if isinstance(recompute, str) else ",".join(recompute))


def profile_variants(workload: Workload, batch: int, device: Union[str, torch.device] = "cpu",
                     time_batch: Optional[int] = None,
                     variants: Sequence[RecomputeSpec] = RECOMPUTE_VARIANTS,
                     flops_rate: Optional[float] = None) -> Dict[str, StepProfile]:
    """One profile per recompute variant (the optimizer state is measured once); ``None`` always included."""
    variants = [None] + [v for v in variants if v]
    out: Dict[str, StepProfile] = {}
    opt_bytes = optimizer_state_bytes(workload)
    for r in variants:
        key = variant_key(r)
        if key not in out:
            out[key] = profile_workload(workload, batch, r, device, time_batch, opt_bytes, flops_rate)
    base = out[variant_key(None)]
    for key, prof in out.items():
        if key != "none":
            align_times(prof, base)
    return out


def align_times(prof: StepProfile, base: StepProfile) -> None:
    """A recompute variant's step = the base step + the forward time of the layers it runs again.
    Separate timed runs would differ by noise more than by the recompute itself, so the variant keeps
    only the shape of its own timeline and takes its totals from the base profile."""
    extra = sum(base.module_forward_s.get(name, 0.0) for name in prof.recomputed)
    fw_scale = base.forward_s / max(1e-12, prof.forward_s)
    bw_scale = (base.backward_s + extra) / max(1e-12, prof.backward_s)
    for t in prof.tensors:
        t.pack_s *= fw_scale
        if t.use_s >= 0:
            t.use_s *= bw_scale
    prof.forward_s, prof.backward_s = base.forward_s, base.backward_s + extra
    prof.recompute_bytes = max((subtree_bytes(base, name) for name in prof.recomputed), default=0)
    prof.timed = base.timed + f"; +{extra * 1e3:.1f} ms recompute"


def profile_aligned(workload: Workload, base: StepProfile, recompute: RecomputeSpec,
                    device: Union[str, torch.device] = "cpu") -> StepProfile:
    """A recompute variant profiled by a fake run only (events at the base step's FLOP rate) and
    aligned to the base step: what the per-module planner checks its estimate against."""
    rate = base.flops / max(1e-12, base.forward_s + base.backward_s)
    prof = profile_workload(workload, base.batch, recompute, device, 0, base.optimizer_bytes, rate)
    align_times(prof, base)
    return prof


def subtree_bytes(profile: StepProfile, module: str) -> int:
    """Saved bytes of ``module`` and the modules inside it."""
    return sum(t.nbytes for t in profile.tensors if t.module == module or t.module.startswith(module + "."))


def sizes_profile(workload: Workload, batch: int, recompute: RecomputeSpec, optimizer_bytes: int) -> StepProfile:
    """Sizes and order only (a fake run; times are FLOP fractions of a nominal 1 s step)."""
    fake, flops, _forward, params, grads, names, facts = _fake_profile(workload, batch, recompute)
    total = max(1.0, float(flops.get("", 1)))
    tensors = _saved_tensors(fake, facts, [p / total for p in fake.pack_t],
                             {i: u / total for i, u in fake.use_t.items()})
    fw = fake.t_backward / total if fake.t_backward else 1 / 3
    return StepProfile(batch, recompute, tensors, fw, 1 - fw, params, grads, optimizer_bytes,
                       2 * max(fake.sizes, default=0), int(total), {}, {}, {}, names, "sizes only",
                       {}, facts.inputs, facts.held_bytes)


__all__ = ["RecomputeSpec", "RECOMPUTE_VARIANTS", "Workload", "FakeProfileError", "SavedTensor", "StepProfile", "profile_workload",
           "profile_variants", "sizes_profile", "optimizer_state_bytes", "backward_by_module", "recomputed_names",
           "variant_key", "align_times", "link_bandwidth", "device_flops", "subtree_bytes", "original_names", "profile_aligned"]
