"""Swap planner: profile one training step, predict peak memory and step time for a plan, and choose
per saved tensor whether it stays on the device, is swapped, or (per layer kind) recomputed.

Profile (``profile_workload``). Saved-tensor sizes and order do not depend on the device, so they come
from a run under ``FakeTensorMode`` at the planned batch: no memory, no compute, any batch size, AMP
included. The same hooks the engine uses record every saved tensor (same filters, same dedupe), its
producing module, its pack index and its first use in backward; ``torch.utils.flop_counter`` counts
FLOPs per module. Time comes from one real step at a small batch on the job's device (the same hooks
stamp every pack and first use), scaled to the planned batch by the FLOP ratio; without such a run
(or when its tensors do not line up with the fake run's) events are placed by cumulative FLOPs.

Memory model (``predict``): device peak = parameters + optimizer state + max(forward: resident saved
tensors + swap-outs in flight; backward start: what stayed + the prefetch window + gradients) +
workspace. The resident-saved part follows the engine's own accounting rule for rule (candidate =
saved tensor >= threshold; bytes added at pack, removed when a swap-out starts), so it is checked
against ``peak_saved_bytes`` exactly. Time model: step = forward + backward + recompute + exposed
transfer, replaying the engine's overlap rules: swap-outs FIFO on one stream from the moment the policy
decides, swap-ins FIFO on another, each waits for its own swap-out, prefetch ``prefetch`` handles ahead
in the learned first-use order, the first ones at forward end; compute waits for a swap-in it needs.

Planner (``plan``): for each recompute variant (none, the cheap-layer ``auto`` rule, every cheap kind)
swap the tensors with the most slack per byte (time from pack to first use against the transfer time)
until the predicted peak fits the target, try prefetch depths, keep the fastest; when nothing fits,
report the smallest achievable peak. Everything is deterministic (no timing enters a decision twice:
the profile is taken once and every rank receives the same plan).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .policy import PlanPolicy, SwapPolicy, ThresholdPolicy

RecomputeSpec = Union[None, str, List[str]]
RECOMPUTE_VARIANTS: Tuple[RecomputeSpec, ...] = (None, "auto", ["activation", "norm", "pool", "dropout"])
PREFETCH_DEPTHS = (1, 2, 3, 4, 6, 8)
PLAN_FORMAT = 1


# ---------------------------------------------------------------------------------------- profile
@dataclass
class Workload:
    """How to run one training step of the job: torch-only callables (the launcher builds them)."""

    build_model: Callable[[], nn.Module]
    make_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]   # batch size -> (inputs, targets)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    autocast: Optional[torch.dtype] = None


@dataclass
class SavedTensor:
    """One saved tensor as the engine's pack hook sees it (after dedupe), threshold not yet applied."""

    nbytes: int
    module: str          # innermost module running when it was saved ('' = outside any module)
    pack_s: float        # compute seconds from forward start to this pack
    use_s: float         # compute seconds from backward start to its first use (-1: never used)
    use_rank: int        # position in the first-use order (-1: never used)


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

    @property
    def fixed_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    def candidates(self, threshold: int) -> List[int]:
        """Indices into ``tensors`` of the engine's candidates (its handle seq order) for ``threshold``."""
        return [i for i, t in enumerate(self.tensors) if t.nbytes >= threshold and t.nbytes > 0]


class _Recorder:
    """saved_tensors_hooks pair that mirrors the engine's candidate filter and dedupe, with module
    attribution from forward pre/post hooks and a clock (wall time or cumulative FLOPs)."""

    def __init__(self, clock: Callable[[], float], device: Optional[torch.device] = None) -> None:
        self.clock = clock
        self.device = device  # real runs: only tensors on the job's device are candidates, as in the engine
        self.stack: List[str] = []
        self.keys: Dict[tuple, int] = {}
        self.keep: List[torch.Tensor] = []
        self.sizes: List[int] = []
        self.modules: List[str] = []
        self.pack_t: List[float] = []
        self.use_t: Dict[int, float] = {}
        self.order: List[int] = []
        self.t_forward = self.t_backward = 0.0
        self.backward_started = False

    def pack(self, t: torch.Tensor) -> Any:
        if self.backward_started:
            return (None, t)
        if t.layout != torch.strided or (t.requires_grad and t.is_leaf) or t.numel() == 0:
            return (None, t)
        if self.device is not None and t.device != self.device:
            return (None, t)
        base = t._base
        if base is not None and base.requires_grad and base.is_leaf:
            return (None, t)
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        idx = self.keys.get(key)
        if idx is None:
            idx = len(self.sizes)
            self.keys[key] = idx
            self.keep.append(t)  # alive until the profile ends: no storage reuse, as the engine's weakref check
            self.sizes.append(t.nbytes)
            self.modules.append(self.stack[-1] if self.stack else "")
            self.pack_t.append(self.clock() - self.t_forward)
        return (idx, t)

    def unpack(self, packed: Any) -> torch.Tensor:
        idx, t = packed
        if idx is not None and idx not in self.use_t:
            if not self.backward_started:
                self.backward_started = True
                self.t_backward = self.clock()
            self.use_t[idx] = self.clock() - self.t_backward
            self.order.append(idx)
        return t

    def module_hooks(self, model: nn.Module, forward_s: Dict[str, float]) -> List[Any]:
        handles, starts = [], {}
        for name, mod in model.named_modules():
            def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
                if not self.backward_started:
                    self.stack.append(name)
                    starts[name] = self.clock()

            def post(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
                if not self.backward_started and self.stack and self.stack[-1] == name:
                    self.stack.pop()
                    forward_s[name] = forward_s.get(name, 0.0) + self.clock() - starts.pop(name, self.clock())
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return handles


def recomputed_names(model: nn.Module) -> List[str]:
    """Original names of the modules that ``apply_recompute`` wrapped in ``model``."""
    from .recompute import Recompute

    out: List[str] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, Recompute):
            continue
        parent, _, first = path.rpartition(".")
        body = list(mod.body) if isinstance(mod.body, nn.Sequential) and len(mod.body) > 1 else [mod.body]
        out.append(path)
        if len(body) > 1:  # the run's other slots became nn.Identity siblings right after ``first``
            parent_mod = model.get_submodule(parent) if parent else model
            names = list(parent_mod._modules)
            i = names.index(first)
            out += [f"{parent}.{n}" if parent else n for n in names[i + 1:i + len(body)]]
    return out


def _strip(name: str) -> str:
    """'resnet.body.0' style names inside Recompute wrappers back to the original module name."""
    return name.replace(".body.0", "").replace(".body", "") if ".body" in name else name


def _run_step(workload: Workload, model: nn.Module, batch: int, device: torch.device, rec: _Recorder,
              module_s: Dict[str, float], sync: Callable[[], None],
              after_forward: Callable[[], None] = lambda: None) -> Tuple[float, float]:
    inputs, targets = workload.make_batch(batch)
    inputs, targets = inputs.to(device), targets.to(device)
    hooks = rec.module_hooks(model, module_s)
    try:
        sync()
        rec.t_forward = rec.clock()
        ctx = (torch.autocast(device_type=device.type, dtype=workload.autocast) if workload.autocast
               else torch.autocast(device_type=device.type, enabled=False))
        with ctx, torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
            loss = workload.loss(model(inputs), targets)
        sync()
        forward = rec.clock() - rec.t_forward
        after_forward()
        rec.t_backward = rec.clock()
        loss.backward()
        sync()
        backward = rec.clock() - rec.t_backward
    finally:
        for h in hooks:
            h.remove()
    return forward, backward


def _apply(model: nn.Module, recompute: RecomputeSpec) -> nn.Module:
    if recompute:
        from .recompute import apply_recompute

        apply_recompute(model, recompute)
    return model


def _fake_profile(workload: Workload, batch: int, recompute: RecomputeSpec
                  ) -> Tuple[_Recorder, Dict[str, int], Dict[str, int], int, int, List[str]]:
    """Sizes, order, modules and FLOPs (per module: forward + backward, and forward alone; '' = the
    step) at ``batch`` without memory or compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    rec = _Recorder(lambda: float(counter.get_total_flops()))
    forward_counts: Dict[str, Any] = {}

    def snapshot() -> None:  # the counter attributes backward FLOPs to modules too: keep forward apart
        forward_counts.update({k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()})

    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        model = _apply(workload.build_model(), recompute)
        params = sum(p.nbytes for p in model.parameters())
        grads = sum(p.nbytes for p in model.parameters() if p.requires_grad)
        with counter:
            _run_step(workload, model, batch, torch.device("cpu"), rec, {}, lambda: None, snapshot)
        names = recomputed_names(model)
    by_module: Dict[str, int] = {}   # forward + backward FLOPs per module
    for key, ops in counter.get_flop_counts().items():
        if key != "Global":
            by_module[_strip(key.partition(".")[2])] = int(sum(ops.values()))
    by_module[""] = int(counter.get_total_flops())
    forward = {_strip(k.partition(".")[2]): v for k, v in forward_counts.items() if k != "Global"}
    return rec, by_module, forward, params, grads, names


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
    fake, flops_by_module, forward_flops, params, grads, names = _fake_profile(workload, batch, recompute)
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
        module_forward_s = {_strip(k): v * scale for k, v in module_s.items()}
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
    rank = {idx: r for r, idx in enumerate(fake.order)}
    tensors = [SavedTensor(n, _strip(m), p, use_t.get(i, -1.0), rank.get(i, -1))
               for i, (n, m, p) in enumerate(zip(fake.sizes, fake.modules, pack_t))]
    opt_bytes = optimizer_state_bytes(workload) if optimizer_bytes is None else optimizer_bytes
    return StepProfile(batch, recompute, tensors, forward_s, backward_s, params, grads, opt_bytes, workspace,
                       total_flops, {k: v for k, v in flops_by_module.items() if k}, module_forward_s,
                       backward_by_module(tensors), names, timed)


def backward_by_module(tensors: Sequence[SavedTensor]) -> Dict[str, float]:
    """Backward compute per module: the time before each first use goes to the module that saved the
    tensor used (autograd reads a node's saved tensors when it runs that node's backward)."""
    out: Dict[str, float] = {}
    last = 0.0
    for t in sorted((t for t in tensors if t.use_rank >= 0), key=lambda t: t.use_rank):
        out[t.module] = out.get(t.module, 0.0) + max(0.0, t.use_s - last)
        last = max(last, t.use_s)
    return out


def device_flops(device: torch.device) -> float:
    """Achieved matmul FLOP/s on ``device`` (a 1024^2 product, median of 5)."""
    a = torch.randn(1024, 1024, device=device)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / sorted(times)[2]


def link_bandwidth(device: Union[str, torch.device]) -> float:
    """Bytes/s of one direction of the swap link: pinned device<->host copies on CUDA, a host copy
    (what the loopback transport does) on CPU. Median of 5 copies of 64 MiB."""
    device = torch.device(device)
    n = 64 << 20
    if device.type == "cuda":
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    else:
        src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[2]


# ---------------------------------------------------------------------------------- memory + time
@dataclass
class Settings:
    """A swap configuration the models can evaluate: the threshold policy's knobs or a per-tensor plan."""

    threshold: int
    prefetch: int
    keep_last: int = 1
    budget: int = 0
    swap: Optional[List[int]] = None     # plan: candidate seqs swapped at pack (None: threshold rules)
    enabled: bool = True


@dataclass
class Prediction:
    peak_saved_bytes: int        # the engine's accounting: candidate bytes resident during forward
    peak_device_bytes: int       # what the device must hold (params, optimizer state, saved, in flight, ...)
    step_s: float
    compute_s: float
    exposed_s: float             # compute waiting for swap-ins
    swapped: List[int]           # candidate seqs swapped
    swap_bytes: int


def predict(profile: StepProfile, settings: Settings, link_bps: float) -> Prediction:
    """Peak memory and step time of ``settings`` on ``profile`` (steady state: order learned)."""
    tensors = profile.tensors
    compute = profile.forward_s + profile.backward_s
    if not settings.enabled:
        peak = sum(t.nbytes for t in tensors if t.nbytes >= settings.threshold)
        device = profile.fixed_bytes + sum(t.nbytes for t in tensors) + profile.grad_bytes + profile.workspace_bytes
        return Prediction(peak, device, compute, compute, 0.0, [], 0)
    cand = profile.candidates(settings.threshold)
    sizes = [tensors[i].nbytes for i in cand]
    swap_at: Dict[int, int] = {}          # candidate seq -> candidate seq at whose pack it is swapped
    resident = peak = 0
    pending: List[int] = []
    planned = set(settings.swap) if settings.swap is not None else None
    for seq, n in enumerate(sizes):
        resident += n
        peak = max(peak, resident)
        if planned is not None:
            if seq in planned:
                swap_at[seq] = seq
                resident -= n
            continue
        pending.append(seq)
        while len(pending) > settings.keep_last:
            old = pending.pop(0)
            if resident > settings.budget:
                swap_at[old] = seq
                resident -= sizes[old]
    released: Dict[int, int] = {}
    for seq, at in swap_at.items():
        released[at] = released.get(at, 0) + sizes[seq]
    # swap-outs: FIFO from the decision time
    out_end: Dict[int, float] = {}
    free = 0.0
    for seq in sorted(swap_at, key=lambda s: (swap_at[s], s)):
        start = max(free, tensors[cand[swap_at[seq]]].pack_s)
        free = out_end[seq] = start + sizes[seq] / link_bps
    # forward peak with swap-outs still in flight (the device copy is freed when its copy ends): swap-outs
    # finish in FIFO (decision) order, so those in flight at a pack are a suffix of those decided before it
    fifo = sorted(swap_at, key=lambda s: (swap_at[s], s))
    ends = [out_end[s] for s in fifo]
    prefix = [0]
    for s in fifo:
        prefix.append(prefix[-1] + sizes[s])
    decided = 0
    fw_peak = res = 0
    for seq, n in enumerate(sizes):
        res += n
        while decided < len(fifo) and swap_at[fifo[decided]] < seq:
            decided += 1
        first_inflight = bisect.bisect_right(ends, tensors[cand[seq]].pack_s, 0, decided)
        fw_peak = max(fw_peak, res + prefix[decided] - prefix[first_inflight])
        res -= released.get(seq, 0)
    # backward: first-use order, prefetch window, FIFO swap-ins
    order = sorted((s for s in range(len(sizes)) if tensors[cand[s]].use_rank >= 0),
                   key=lambda s: tensors[cand[s]].use_rank)
    pos = {s: i for i, s in enumerate(order)}
    swapped = set(swap_at)
    issued: Dict[int, float] = {}
    in_free = [profile.forward_s]
    stall = 0.0

    def issue(s: int, now: float) -> None:
        start = max(now, in_free[0], out_end[s])
        in_free[0] = issued[s] = start + sizes[s] / link_bps

    def prefetch_after(i: int, now: float) -> None:
        if settings.prefetch <= 0:
            return
        count = 0  # the engine's sliding window: the next ``prefetch`` swapped tensors, issued or not
        for s in order[i:]:
            if s in swapped:
                if s not in issued:
                    issue(s, now)
                count += 1
                if count >= settings.prefetch:
                    break

    prefetch_after(0, profile.forward_s)
    window = sum(sorted((sizes[s] for s in issued), reverse=True)[:max(1, settings.prefetch)])
    for s in order:
        now = profile.forward_s + tensors[cand[s]].use_s + stall
        if s in swapped and s not in issued:
            issue(s, now)
        prefetch_after(pos[s] + 1, now)
        if s in swapped:
            stall += max(0.0, issued[s] - now)
    end_resident = sum(n for s, n in enumerate(sizes) if s not in swapped)
    non_candidates = sum(t.nbytes for t in tensors) - sum(sizes)
    bw_peak = end_resident + window + profile.grad_bytes
    device = profile.fixed_bytes + non_candidates + max(fw_peak, bw_peak) + profile.workspace_bytes
    return Prediction(peak, device, compute + stall, compute, stall, sorted(swapped),
                      sum(sizes[s] for s in swapped))


def policy_for(settings: Settings, profile: Optional[StepProfile] = None) -> SwapPolicy:
    """The engine policy that carries out ``settings`` (a PlanPolicy needs the profile's sizes/order)."""
    if settings.swap is None:
        return ThresholdPolicy(settings.threshold, settings.prefetch, settings.keep_last, settings.budget)
    assert profile is not None
    cand = profile.candidates(settings.threshold)
    sizes = [profile.tensors[i].nbytes for i in cand]
    order = sorted((s for s, i in enumerate(cand) if profile.tensors[i].use_rank >= 0),
                   key=lambda s: profile.tensors[cand[s]].use_rank)
    return PlanPolicy(settings.threshold, settings.prefetch, settings.swap, sizes, order)


# ------------------------------------------------------------------------------------------ planner
@dataclass
class Strategy:
    """One row of the comparison: a way to run the step and what the models predict for it."""

    name: str
    recompute: RecomputeSpec
    settings: Settings
    prediction: Prediction
    fits: bool


@dataclass
class PlanResult:
    target: int
    link_bps: float
    batch: int
    chosen: Optional[Strategy]
    strategies: List[Strategy]
    min_peak: int
    profiles: Dict[str, StepProfile] = field(default_factory=dict)

    @property
    def profile(self) -> Optional[StepProfile]:
        return self.profiles.get(variant_key(self.chosen.recompute)) if self.chosen else None


def variant_key(recompute: RecomputeSpec) -> str:
    return "none" if not recompute else (recompute if isinstance(recompute, str) else ",".join(recompute))


def recompute_label(recompute: RecomputeSpec) -> str:
    """Short name of a recompute variant for tables."""
    if recompute == RECOMPUTE_VARIANTS[2]:
        return "all cheap"
    return variant_key(recompute)


def plan_swaps(profile: StepProfile, target: int, link_bps: float, threshold: int) -> Tuple[Settings, Prediction]:
    """Cheapest per-tensor plan for ``profile`` under ``target`` device bytes (or the smallest peak)."""
    cand = profile.candidates(threshold)
    t = profile.tensors
    fw = profile.forward_s
    # slack: compute time between pack and first use, against the time the bytes need on the link
    def slack(s: int) -> float:
        x = t[cand[s]]
        used = x.use_s if x.use_rank >= 0 else profile.backward_s
        return (fw - x.pack_s + used) / max(1e-12, 2 * x.nbytes / link_bps)

    orders = [sorted(range(len(cand)), key=lambda s: (-slack(s), s)),
              sorted(range(len(cand)), key=lambda s: (-t[cand[s]].nbytes, s))]
    best: Optional[Tuple[Settings, Prediction]] = None

    def rank(pred: Prediction, swapped: int) -> tuple:
        fits = pred.peak_device_bytes <= target
        return (not fits, pred.step_s if fits else pred.peak_device_bytes, swapped)

    for ranking in orders:
        for depth in PREFETCH_DEPTHS:
            def at(k: int) -> Tuple[Settings, Prediction]:
                settings = Settings(threshold, depth, swap=sorted(ranking[:k]))
                return settings, predict(profile, settings, link_bps)

            # the device peak falls (weakly) as more tensors leave: the fewest swaps that fit, by bisection
            lo, hi = 0, len(ranking)
            found = at(hi)
            if found[1].peak_device_bytes <= target:
                while lo < hi:
                    mid = (lo + hi) // 2
                    trial = at(mid)
                    if trial[1].peak_device_bytes <= target:
                        hi, found = mid, trial
                    else:
                        lo = mid + 1
            if best is None or rank(found[1], len(found[0].swap or [])) < rank(best[1], len(best[0].swap or [])):
                best = found
    assert best is not None
    return best


def plan(profiles: Dict[str, StepProfile], target: int, link_bps: float, threshold: int,
         config_settings: Optional[Settings] = None, config_recompute: RecomputeSpec = None) -> PlanResult:
    """Compare strategies on the profiled variants and pick the fastest one that fits ``target``."""
    base = profiles["none"]
    rows: List[Strategy] = []

    def row(name: str, recompute: RecomputeSpec, settings: Settings) -> Strategy:
        pred = predict(profiles[variant_key(recompute)], settings, link_bps)
        st = Strategy(name, recompute, settings, pred, pred.peak_device_bytes <= target)
        rows.append(st)
        return st

    row("no swap", None, Settings(threshold, 0, enabled=False))
    if config_settings is not None:
        row("configured", config_recompute if variant_key(config_recompute) in profiles else None, config_settings)
    for r in RECOMPUTE_VARIANTS[1:]:
        if variant_key(r) in profiles:
            row(f"recompute {recompute_label(r)}", r, Settings(threshold, 0, enabled=False))
    settings, _ = plan_swaps(base, target, link_bps, threshold)
    row("swap only", None, settings)
    planned: List[Strategy] = []
    for key, prof in profiles.items():
        if key == "none":
            continue
        s, _ = plan_swaps(prof, target, link_bps, threshold)
        planned.append(Strategy("", prof.recompute, s, predict(prof, s, link_bps), False))
    candidates = [r for r in rows if r.name != "configured"] + planned
    fitting = [c for c in candidates if c.prediction.peak_device_bytes <= target]
    min_peak = min(c.prediction.peak_device_bytes for c in candidates)
    chosen = min(fitting, key=lambda c: (c.prediction.step_s, len(c.settings.swap or []))) if fitting else None
    final = row("planned", chosen.recompute, chosen.settings) if chosen is not None else None
    return PlanResult(target, link_bps, base.batch, final, rows, min_peak, profiles)


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
            _align_times(prof, base)
    return out


def _align_times(prof: StepProfile, base: StepProfile) -> None:
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
    prof.timed = base.timed + f"; +{extra * 1e3:.1f} ms recompute"


def sizes_profile(workload: Workload, batch: int, recompute: RecomputeSpec, optimizer_bytes: int) -> StepProfile:
    """Sizes and order only (a fake run; times are FLOP fractions of a nominal 1 s step)."""
    fake, flops, _forward, params, grads, names = _fake_profile(workload, batch, recompute)
    rank = {idx: r for r, idx in enumerate(fake.order)}
    total = max(1.0, float(flops.get("", 1)))
    tensors = [SavedTensor(n, m, p / total, fake.use_t.get(i, -1.0) / total, rank.get(i, -1))
               for i, (n, m, p) in enumerate(zip(fake.sizes, fake.modules, fake.pack_t))]
    fw = fake.t_backward / total if fake.t_backward else 1 / 3
    return StepProfile(batch, recompute, tensors, fw, 1 - fw, params, grads, optimizer_bytes,
                       2 * max(fake.sizes, default=0), int(total), {}, {}, {}, names, "sizes only")


class BatchSizes:
    """Sizes at any batch from fake runs at batch 1 and 2: every saved tensor of these models is affine
    in the batch (``a + b * batch``); when the two runs do not line up, each batch gets its own fake run."""

    def __init__(self, workload: Workload, recompute: RecomputeSpec, optimizer_bytes: int,
                 step_s_per_sample: float = 0.0) -> None:
        self.workload, self.recompute, self.optimizer_bytes = workload, recompute, optimizer_bytes
        self.step_s_per_sample = step_s_per_sample  # times scale with the batch (FLOPs are linear in it)
        self.one = sizes_profile(workload, 1, recompute, optimizer_bytes)
        self.two = sizes_profile(workload, 2, recompute, optimizer_bytes)
        a, b = self.one.tensors, self.two.tensors
        self.affine = len(a) == len(b) and all(x.module == y.module and x.use_rank == y.use_rank for x, y in zip(a, b))

    def at(self, batch: int) -> StepProfile:
        if not self.affine:
            prof = sizes_profile(self.workload, batch, self.recompute, self.optimizer_bytes)
        else:
            tensors = [dataclasses.replace(y, nbytes=x.nbytes + (y.nbytes - x.nbytes) * (batch - 1))
                       for x, y in zip(self.one.tensors, self.two.tensors)]
            ws = self.one.workspace_bytes + (self.two.workspace_bytes - self.one.workspace_bytes) * (batch - 1)
            prof = dataclasses.replace(self.two, batch=batch, tensors=tensors, workspace_bytes=ws)
        scale = self.step_s_per_sample * batch  # the sizes-only profile spans a nominal 1 s step
        if scale > 0:
            prof.tensors = [dataclasses.replace(t, pack_s=t.pack_s * scale, use_s=t.use_s * scale if t.use_s >= 0
                                                else t.use_s) for t in prof.tensors]
            prof = dataclasses.replace(prof, forward_s=prof.forward_s * scale, backward_s=prof.backward_s * scale)
        return prof

    def peak(self, batch: int, threshold: int, swap_all: bool, link_bps: float) -> int:
        """Device peak at ``batch``: without the engine, or with every candidate swapped."""
        prof = self.at(batch)
        if not swap_all:
            return predict(prof, Settings(threshold, 0, enabled=False), link_bps).peak_device_bytes
        swap = list(range(len(prof.candidates(threshold))))
        return predict(prof, Settings(threshold, 1, swap=swap), link_bps).peak_device_bytes


def max_batch(sizes: BatchSizes, target: int, threshold: int, swap_all: bool, link_bps: float,
              limit: int = 1 << 16) -> int:
    """Largest batch whose predicted peak fits ``target`` (0: not even batch 1): doubling, then bisection."""
    def fits(b: int) -> bool:
        return sizes.peak(b, threshold, swap_all, link_bps) <= target

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------- plan files
def plan_document(result: PlanResult) -> Dict[str, Any]:
    """What ``--write`` stores and ``swap.plan: FILE`` reads: settings plus the per-tensor plan."""
    assert result.chosen is not None and result.profile is not None
    st, prof = result.chosen, result.profile
    cand = prof.candidates(st.settings.threshold)
    # a plan without swaps (no swap / recompute only) still runs under the engine: it applies the
    # recompute and keeps the accounting the prediction is checked against
    planned = dataclasses.replace(st.settings, swap=list(st.settings.swap or []), enabled=True)
    pol = policy_for(planned, prof)
    doc: Dict[str, Any] = {
        "format": PLAN_FORMAT, "batch": result.batch, "memory_target": result.target,
        "predicted_peak_bytes": st.prediction.peak_device_bytes,
        "predicted_peak_saved_bytes": st.prediction.peak_saved_bytes,
        "predicted_step_s": round(st.prediction.step_s, 6), "link_gb_per_s": round(result.link_bps / 1e9, 3),
        "swap": {"enabled": True, "threshold": st.settings.threshold,
                 "prefetch": st.settings.prefetch, "recompute": st.recompute},
        "tensors": {"sizes": [prof.tensors[i].nbytes for i in cand], "swap": planned.swap,
                    "order": list(pol.learned_order or [])},
    }
    return doc


def policy_from_document(doc: Dict[str, Any]) -> PlanPolicy:
    """The engine policy for a plan document (from ``plan_document`` or a plan file)."""
    swap, tensors = doc["swap"], doc["tensors"]
    return PlanPolicy(int(swap["threshold"]), int(swap["prefetch"]), tensors["swap"], tensors["sizes"],
                      tensors.get("order") or None)


def to_json(doc: Dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True)


__all__ = ["Workload", "SavedTensor", "StepProfile", "Settings", "Prediction", "Strategy", "PlanResult",
           "profile_workload", "profile_variants", "predict", "plan", "plan_swaps", "policy_for", "max_batch",
           "BatchSizes", "backward_by_module", "sizes_profile", "optimizer_state_bytes", "variant_key",
           "recompute_label", "link_bandwidth", "device_flops", "plan_document", "policy_from_document",
           "RECOMPUTE_VARIANTS"]
