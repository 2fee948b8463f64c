"""The swap planner's memory and time models: what a swap configuration (``Settings``) costs on a
profiled step (``profile.StepProfile``), replaying the engine's rules.

Memory model (``predict``): device peak = parameters + optimizer state + max(forward: resident saved
tensors + swap-outs in flight; backward start: what stayed + the prefetch window + gradients) +
workspace (+ inputs that recompute checkpoints hold, + the saved tensors of the largest recomputed
module, live again while its backward runs). The resident-saved part follows the engine's own accounting rule for rule (candidate =
saved tensor >= threshold; bytes added at pack, removed when a swap-out starts), so it is checked
against ``peak_saved_bytes`` exactly. Time model: step = forward + backward + recompute + exposed
transfer, replaying the engine's overlap rules (a transfer moves the tensor's storage span, which for
a view such as attention's head split is more than its own bytes): swap-outs FIFO on one stream from the moment the policy
decides, swap-ins FIFO on another, each waits for its own swap-out, prefetch ``prefetch`` handles ahead
in the learned first-use order, the first ones at forward end; compute waits for a swap-in it needs.
Pure arithmetic on the profile: no torch, no timing.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Optional

from .profile import StepProfile


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
class DiskModel:
    """A disk tier below host memory (``swap.disk_dir``): the first ``host_bytes`` swapped (in swap
    order, as the engine fills the host pool) move at the link's rate, the rest at the slower of the
    link and the disk (``write_bps`` out, ``read_bps`` back), as measured by ``rates.disk_bandwidth``."""

    host_bytes: int
    write_bps: float
    read_bps: float


@dataclass
class Prediction:
    peak_saved_bytes: int        # the engine's accounting: candidate bytes resident during forward
    peak_device_bytes: int       # what the device must hold (params, optimizer state, saved, in flight, ...)
    step_s: float
    compute_s: float
    exposed_s: float             # compute waiting for swap-ins
    swapped: List[int]           # candidate seqs swapped
    swap_bytes: int              # bytes copied each way per step (storage spans, as the engine copies)


def predict(profile: StepProfile, settings: Settings, link_bps: float, timed: bool = True,
            disk: Optional[DiskModel] = None) -> Prediction:
    """Peak memory and step time of ``settings`` on ``profile`` (steady state: order learned);
    ``timed=False``: the peak only (the step is the compute alone, no stall replay: for scans);
    ``disk``: swapped bytes past its host share move at the disk's rates."""
    tensors = profile.tensors
    compute = profile.forward_s + profile.backward_s
    if not settings.enabled:
        peak = sum(t.nbytes for t in tensors if t.nbytes >= settings.threshold)
        device = (profile.fixed_bytes + sum(t.nbytes for t in tensors) + profile.grad_bytes + profile.workspace_bytes
                  + profile.held_bytes + profile.recompute_bytes)
        return Prediction(peak, device, compute, compute, 0.0, [], 0)
    cand = profile.candidates(settings.threshold)
    sizes = [tensors[i].nbytes for i in cand]
    moved = [tensors[i].copy_bytes for i in cand]   # a view's swap copies its whole storage span
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
    # swap-outs: FIFO from the decision time; with a disk tier, those past the host share go at its rates
    out_bps: Dict[int, float] = {}
    in_bps: Dict[int, float] = {}
    on_host = 0
    for seq in sorted(swap_at, key=lambda s: (swap_at[s], s)):
        on_host += moved[seq]
        spilled = disk is not None and on_host > disk.host_bytes
        out_bps[seq] = min(link_bps, disk.write_bps) if spilled and disk else link_bps
        in_bps[seq] = min(link_bps, disk.read_bps) if spilled and disk else link_bps
    out_end: Dict[int, float] = {}
    free = 0.0
    for seq in sorted(swap_at, key=lambda s: (swap_at[s], s)):
        start = max(free, tensors[cand[swap_at[seq]]].pack_s)
        free = out_end[seq] = start + moved[seq] / out_bps[seq]
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
        in_free[0] = issued[s] = start + moved[s] / in_bps[s]

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

    # the swap-ins issued at forward end: the first ``prefetch`` swapped tensors in first-use order
    window = sum(sizes[s] for s in [s for s in order if s in swapped][:max(0, settings.prefetch)])
    prefetch_after(0, profile.forward_s)
    for s in (order if timed else []):
        now = profile.forward_s + tensors[cand[s]].use_s + stall
        if s in swapped and s not in issued:
            issue(s, now)
        prefetch_after(pos[s] + 1, now)
        if s in swapped:
            stall += max(0.0, issued[s] - now)
    end_resident = sum(n for s, n in enumerate(sizes) if s not in swapped)
    non_candidates = sum(t.nbytes for t in tensors) - sum(sizes)
    bw_peak = end_resident + window + profile.grad_bytes + profile.recompute_bytes
    device = (profile.fixed_bytes + non_candidates + max(fw_peak, bw_peak) + profile.workspace_bytes
              + profile.held_bytes)
    return Prediction(peak, device, compute + stall, compute, stall, sorted(swapped),
                      sum(moved[s] for s in swapped))


__all__ = ["Settings", "DiskModel", "Prediction", "predict"]
