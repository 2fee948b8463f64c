"""Transfer-bound behaviour on CPU: the loopback transport paced to ``swap.link_gbps`` (a simulated link),
the in-flight windows, step end without waiting, autocast's parameter casts, the pinned pool's classes,
and the planner's time model against a paced run. What needs a GPU is in test_swap_cuda.py."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import pytest
import torch
from torch import nn

from lmsdp.launcher.config import ConfigError, load_config
from lmsdp.launcher.tools.plan import workload_from_config
from lmsdp.swapping import HostPool, SwapConfig, SwapEngine
from lmsdp.swapping.plan_models import Settings, predict
from lmsdp.swapping.planner import policy_for
from lmsdp.swapping.profile import profile_workload

from .test_swap_behaviour import chain

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")
KIB = 1024
ZOO = {  # a little larger than test_plan's: backward long enough that thread wake-ups are noise
    "resnet18": ["model.kwargs={width: 8, num_classes: 10, stem: cifar}", "data.shape=[3, 32, 32]"],
    "gpt": ["model.kwargs={vocab: 64, seq_len: 64, layers: 4, width: 64, heads: 4}"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Copy threads and compute share two cores: intra-op threads on top would turn a busy machine's
    timings to noise (as launch.threads=1 does for the jobs in test_plan)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paced(**kw: object) -> SwapEngine:
    cfg: Dict[str, object] = dict(enabled=True, threshold=0, prefetch=2, keep_last=0, budget=0,
                                  transport="loopback")
    cfg.update(kw)
    return SwapEngine(SwapConfig(**cfg), "cpu")  # type: ignore[arg-type]


def grads_of(engine: SwapEngine, groups: List[List[int]]) -> torch.Tensor:
    x = torch.ones(4, requires_grad=True)
    with engine:
        loss = chain(groups) * x.sum()
    loss.backward()
    engine.step_end()
    return x.grad


def test_paced_copy_is_done_only_after_its_link_time() -> None:
    e = paced(link_gbps=0.01)  # 10 MB/s: 1 MiB takes ~105 ms
    try:
        with e:
            loss = chain([[256 * KIB]])
        tr = e.mover.inflight._out[0][0]
        assert not tr.done()
        loss.backward()
        s = e.step_end()
        assert s["swap_out_ms"] >= 0.99 * (1 << 20) / 1e7 * 1e3
        assert s["swap_in_ms"] >= 0.99 * (1 << 20) / 1e7 * 1e3
    finally:
        e.close()


@pytest.mark.parametrize("budget", [0, 256 * KIB])
def test_slow_link_keeps_resident_bytes_within_budget_plus_window(budget: int) -> None:
    """Forward outruns a slow link: swap-outs count as resident until copied; compute waits at the window."""
    groups = [[16 * KIB]] * 24  # 64 KiB each; the link moves one in ~3 ms, forward packs them in far less
    window = 192 * KIB
    ref = grads_of(paced(enabled=False), groups)
    bounded, unbounded = paced(link_gbps=0.02, budget=budget, swap_out_window=window), \
        paced(link_gbps=0.02, budget=budget, swap_out_window=1 << 40)
    try:
        assert torch.equal(grads_of(bounded, groups), ref)
        s = bounded.last_stats
        assert s["swap_out_waits"] > 0
        assert s["peak_resident_bytes"] <= budget + window
        assert s["peak_saved_bytes"] <= budget + 64 * KIB  # the policy's view: swapped = gone at queue time
        grads_of(unbounded, groups)
        assert unbounded.last_stats["peak_resident_bytes"] > budget + window  # what the window prevents
        assert unbounded.last_stats["swap_out_waits"] == 0
    finally:
        bounded.close()
        unbounded.close()


def test_prefetch_window_bounds_swapped_in_bytes() -> None:
    groups = [[16 * KIB]] * 12
    e = paced(prefetch=100, prefetch_window=3 * 64 * KIB, link_gbps=0.05, threshold=4096)
    try:
        ref = grads_of(paced(enabled=False), groups)
        for _ in range(2):
            assert torch.equal(grads_of(e, groups), ref)
        s = e.last_stats
        assert s["swap_in_tensors"] == 12 and 0 < s["peak_swapin_bytes"] <= 3 * 64 * KIB
    finally:
        e.close()


def test_step_end_does_not_wait_for_copies_and_counts_them_next_step() -> None:
    e = paced(link_gbps=0.005)  # 256 KiB: ~52 ms
    try:
        with e:
            loss = chain([[64 * KIB]])
        s1 = e.step_end()  # forward only: the swap-out is still on the link
        assert s1["swapped_tensors"] == 1 and s1["swap_out_ms"] == 0
        assert len(e._ledger.transfers) == 1  # carried, not waited for
        del loss
        time.sleep(0.1)
        s2 = e.step_end()
        assert s2["swap_out_ms"] >= 0.99 * 256 * KIB / 5e6 * 1e3
        assert not e._ledger.transfers
    finally:
        e.close()


def workload(name: str):
    config = load_config(None, [f"model.name={name}", *ZOO[name], "comm.backend=torch"])
    return workload_from_config(config)


def run_steps(w, batch: int, engine: SwapEngine, steps: int) -> List[Dict[str, float]]:
    torch.manual_seed(0)
    model = w.build_model()
    out = []
    for _ in range(steps):
        inputs, targets = w.make_batch(batch)
        t0 = time.perf_counter()
        with engine:
            loss = w.loss(model(inputs), targets)
        loss.backward()
        stats = engine.step_end()
        stats["step_s"] = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        out.append(stats)
    return out


def backward_s(w, batch: int) -> float:
    """The fastest of five backward passes: a link faster than it is faster than any backward here."""
    torch.manual_seed(0)
    model = w.build_model()
    inputs, targets = w.make_batch(batch)
    times = []
    for _ in range(5):
        loss = w.loss(model(inputs), targets)
        t0 = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("name,batch", [("gpt", 32), ("resnet18", 16)])
def test_link_faster_than_backward_hides_the_copies(name: str, batch: int) -> None:
    """The link moves a step's swapped bytes in half of backward's time: stalls hide (hidden fraction
    >= 0.9, the median of the steady steps: a busy machine's thread scheduling can spoil one)."""
    w = workload(name)
    probe = paced(threshold=4096, keep_last=1)
    try:
        swapped = run_steps(w, batch, probe, 1)[0]["swap_out_bytes"]
    finally:
        probe.close()
    link = 2 * swapped / backward_s(w, batch)
    e = paced(threshold=4096, keep_last=1, prefetch=64, link_gbps=link / 1e9)
    try:
        steady = run_steps(w, batch, e, 6)[2:]  # the order is learned in step 1
    finally:
        e.close()
    assert all(s["swap_in_ms"] > 0 for s in steady)
    assert statistics.median(s["hidden_frac"] for s in steady) >= 0.9, [
        (s["hidden_frac"], s["stall_ms"], s["swap_in_ms"]) for s in steady]


@pytest.mark.parametrize("name", ["resnet18", "gpt"])
def test_planner_predicts_a_transfer_bound_paced_step(name: str) -> None:
    """The link is the bottleneck (a step's transfers take 4x its compute): predicted vs paced within 15 %."""
    batch = 4
    w = workload(name)
    profile = profile_workload(w, batch)
    settings = Settings(4096, 2, keep_last=1, budget=0)
    moved = predict(profile, settings, 1e18).swap_bytes
    link = moved / (4 * (profile.forward_s + profile.backward_s))
    predicted = predict(profile, settings, link).step_s
    e = SwapEngine(SwapConfig(enabled=True, transport="loopback", threshold=4096, keep_last=1, prefetch=2,
                              link_gbps=link / 1e9, swap_out_window=1 << 40, prefetch_window=1 << 40),
                   "cpu", policy=policy_for(settings, profile))
    try:
        measured = statistics.median(s["step_s"] for s in run_steps(w, batch, e, 4)[1:])
    finally:
        e.close()
    assert abs(measured / predicted - 1) <= 0.15, (measured, predicted)


class FusedQKV(nn.Module):
    """Attention with one fused q/k/v projection (GPT-2's c_attn): q, k and v are views of one output,
    each saved by its matmul, so a swap copies the whole fused storage span (3x the view's bytes)."""

    def __init__(self, width: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj in self.qkv:
            q, k, v = proj(x).chunk(3, dim=-1)
            x = torch.softmax(q @ k.transpose(-1, -2) / 11, dim=-1) @ v
        return x


def test_planner_prices_storage_spans_of_fused_qkv_views() -> None:
    """The time model moves what the engine copies: the views' storage spans, not their bytes (priced
    by bytes, a transfer-bound step of this model ran 2.3x the prediction)."""
    from lmsdp.swapping.step_record import Workload

    w = Workload(build_model=FusedQKV, make_batch=lambda n: (torch.randn(n, 64, 128), torch.zeros(n, 64, 128)),
                 loss=lambda out, target: ((out - target) ** 2).mean(),
                 build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01))
    batch = 8
    profile = profile_workload(w, batch)
    settings = Settings(4096, 2, keep_last=1, budget=0)
    swapped = predict(profile, settings, 1e18)
    cand = profile.candidates(4096)
    spans = sum(profile.tensors[cand[s]].copy_bytes for s in swapped.swapped)
    assert spans == swapped.swap_bytes > 1.2 * sum(profile.tensors[cand[s]].nbytes for s in swapped.swapped)
    link = swapped.swap_bytes / (4 * (profile.forward_s + profile.backward_s))
    predicted = predict(profile, settings, link).step_s
    e = SwapEngine(SwapConfig(enabled=True, transport="loopback", threshold=4096, keep_last=1, prefetch=2,
                              link_gbps=link / 1e9, swap_out_window=1 << 40, prefetch_window=1 << 40),
                   "cpu", policy=policy_for(settings, profile))
    try:
        steps = run_steps(w, batch, e, 4)[1:]
    finally:
        e.close()
    assert steps[-1]["swap_out_bytes"] == swapped.swap_bytes
    measured = statistics.median(s["step_s"] for s in steps)
    assert abs(measured / predicted - 1) <= 0.15, (measured, predicted)


def test_autocast_parameter_casts_are_not_swapped() -> None:
    """Under autocast, linear saves the bf16 copy of its weight: rebuilt each step, so it stays put."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(32, 64)

    def step(engine: SwapEngine) -> List[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with engine, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        engine.step_end()
        return [p.grad.clone() for p in model.parameters()]

    ref = step(paced(enabled=False))
    e = paced()
    try:
        got = step(e)
        s = e.last_stats
    finally:
        e.close()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    # the first layer's cast input and two ReLU outputs (bf16), pow's float input; no 64x64 weight cast
    assert s["packed_tensors"] == 4 and s["swap_out_bytes"] == 3 * 32 * 64 * 2 + 32 * 64 * 4


def test_pinned_pool_counts_power_of_two_blocks_and_waits_instead_of_growing() -> None:
    pool = HostPool(power_of_two=True)
    buf = pool.acquire(5000)
    assert buf.numel() == 8192 and pool.total_bytes == 8192  # what the host allocator reserves for it
    finished = []
    pool.release(buf, lambda: bool(finished), lambda: finished.append(True))
    pool.sized = True  # after step 1: a dry class waits for its parked buffer, no new allocation
    again = pool.acquire(6000)
    assert again.data_ptr() == buf.data_ptr() and finished == [True]
    assert (pool.allocations, pool.copy_waits, pool.total_bytes) == (1, 1, 8192)


@pytest.mark.parametrize("override,words", [
    ("swap.link_gbps=-1", "swap.link_gbps: expected a positive number of GB/s, got -1"),
    ("swap.transport=cuda", "swap.link_gbps: paces the loopback transport only"),
])
def test_bad_link_gbps_is_a_config_error(override: str, words: str) -> None:
    extra = [] if "link_gbps" in override else ["swap.link_gbps=2"]
    with pytest.raises(ConfigError, match=words):
        load_config(None, [override, *extra])


@pytest.mark.parametrize("name", ["resnet18", "gpt"])
def test_host_pool_sized_before_step_one_allocates_nothing_in_it(name: str) -> None:
    """The pool reserved from a fake record of the step (threshold rules, storage spans): step 1's
    pack hooks take every host buffer from it (on CUDA a pinned allocation there is a device sync)."""
    from lmsdp.swapping.presize import presize_host_pool, settings_of
    from lmsdp.swapping.profile import sizes_profile

    w, batch = workload(name), 2
    e = SwapEngine(SwapConfig(enabled=True, transport="loopback", threshold=4096, keep_last=1, prefetch=2), "cpu")
    try:
        reserved = presize_host_pool(e.pool, sizes_profile(w, batch, None, 0), settings_of(e.policy))
        before = (e.pool.allocations, e.pool.total_bytes)
        assert reserved == before[1] > 0
        stats = run_steps(w, batch, e, 2)
        assert (e.pool.allocations, e.pool.total_bytes) == before
        assert stats[0]["swap_out_bytes"] > 0
    finally:
        e.close()
