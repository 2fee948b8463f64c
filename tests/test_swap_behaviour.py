"""Which tensors move, in which order, with what accounting: threshold, keep_last, budget, prefetch order,
stalls, dedupe, host_limit, leaks, pass-through, in-place detection, traces and configuration."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import List, Sequence

import pytest
import torch
from torch import nn

from lmsdp.runtime.chrome_trace import load_trace
from lmsdp.runtime.trace_schedule import TraceSchedule
from lmsdp.swapping import (HostMemoryLimitError, HostPool, SwapConfig, SwapEngine, config_from_env,
                            size_class)

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")


class SaveAll(torch.autograd.Function):
    """Identity on ``x`` that saves the given tensors (in order) and reads them all in backward."""

    @staticmethod
    def forward(ctx, x, *saved):  # type: ignore[override]
        ctx.save_for_backward(*saved)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        total = sum(float(t.float().sum()) for t in ctx.saved_tensors)
        return (grad * (1.0 + 0.0 * total),) + (None,) * len(ctx.saved_tensors)


def chain(groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """One autograd node per group, each saving float32 tensors of the given element counts.
    Pack order is the flattened order; tensor i holds the value i so corruption would be visible."""
    x = torch.ones(4, requires_grad=True)
    i = 0
    for group in groups:
        saved = []
        for n in group:
            saved.append(torch.full((n,), float(i)))
            i += 1
        x = SaveAll.apply(x, *saved)
    return x.sum()


def engine(**kw: object) -> SwapEngine:
    cfg = dict(enabled=True, threshold=0, prefetch=2, keep_last=0, budget=0, transport="loopback")
    cfg.update(kw)
    return SwapEngine(SwapConfig(**cfg), "cpu")  # type: ignore[arg-type]


def step(e: SwapEngine, groups: Sequence[Sequence[int]]) -> dict:
    with e:
        loss = chain(groups)
    loss.backward()
    return e.step_end()


def test_threshold_selects_by_size() -> None:
    e = engine(threshold=4000)
    try:
        s = step(e, [[100], [1000], [2000], [50], [999]])  # bytes: 400, 4000, 8000, 200, 3996
        assert e.last_swapped == [0, 1]  # seq among candidates (>= threshold): the 4000 and 8000 byte ones
        assert (s["swapped_tensors"], s["swap_out_bytes"]) == (2, 12000)
        assert s["swap_in_tensors"] == 2 and s["swap_in_bytes"] == 12000
        assert s["packed_tensors"] == 2  # accounting covers candidates only
    finally:
        e.close()


def test_keep_last_keeps_the_newest_resident() -> None:
    e = engine(keep_last=2)
    try:
        s = step(e, [[1024]] * 6)
        assert e.last_swapped == [0, 1, 2, 3]
        assert s["swapped_tensors"] == 4 and s["swap_out_bytes"] == 4 * 4096
        assert s["resident_saved_bytes"] == 2 * 4096
    finally:
        e.close()


def test_budget_swaps_only_while_over_budget() -> None:
    e = engine(keep_last=2, budget=5 * 4096)
    try:
        s = step(e, [[1024]] * 10)
        # the first three stay (resident <= budget when they leave the keep_last window), then every
        # newer one pushes resident over 20 KiB and the oldest pending one goes; the last two are kept
        assert e.last_swapped == [3, 4, 5, 6, 7]
        assert s["swap_out_bytes"] == 5 * 4096
        assert s["resident_saved_bytes"] == 5 * 4096
        assert s["peak_saved_bytes"] == 6 * 4096
    finally:
        e.close()


def test_shared_tensor_is_swapped_once() -> None:
    e = engine()
    try:
        with e:
            x = torch.ones(4, requires_grad=True)
            t = torch.arange(2048, dtype=torch.float32)
            y = SaveAll.apply(x, t, t)
            y = SaveAll.apply(y, t)
            z = SaveAll.apply(y, torch.ones(512))
        z.sum().backward()
        s = e.step_end()
        assert s["packed_tensors"] == 2
        assert s["swapped_tensors"] == 2 and s["swap_out_bytes"] == 8192 + 2048
        assert s["swap_in_tensors"] == 2
    finally:
        e.close()


def test_input_shared_by_q_k_v_projections_is_swapped_once_and_exact() -> None:
    """Separate q/k/v Linears on one 3-D input (Llama-style attention): each saves a fresh view object
    of the same storage. A weak reference to the first view died with it, so every projection made its
    own handle and the input crossed the link three times; the storage's identity dedupes it."""
    torch.manual_seed(0)
    qkv = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))
    x = torch.randn(4, 32, 64, requires_grad=True)

    def step(e: SwapEngine) -> List[torch.Tensor]:
        qkv.zero_grad(set_to_none=True)
        x.grad = None
        with e:
            h = x * 2  # saves nothing itself: the projections' saved inputs are the only candidates
            loss = sum(p(h).sum() for p in qkv)
        loss.backward()
        e.step_end()
        return [x.grad.clone(), *(p.weight.grad.clone() for p in qkv)]

    ref = step(engine(threshold=1 << 40))
    e = engine(threshold=32 * 1024)
    try:
        got = step(e)
        s = e.last_stats
        assert s["packed_tensors"] == 1 and s["swap_out_bytes"] == 4 * 32 * 64 * 4, s
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    finally:
        e.close()


def test_prefetch_follows_the_learned_order() -> None:
    """Within a node tensors are read in pack order, so the real order is not reverse pack order."""
    e = engine(prefetch=2)
    groups = [[1024, 1024, 1024], [1024, 1024, 1024]]
    try:
        s1 = step(e, groups)
        assert e.last_unpack_order == [3, 4, 5, 0, 1, 2]
        # step 1: default reverse pack order, a window of 2: 3 stalls and brings back 2, 1; the window
        # stays on 2, 1 (already in flight) while 4 and 5 stall, so 0 stalls too
        assert e.last_prefetch_order == [2, 1]
        assert s1["stalls"] == 4
        assert e.learned_order == [3, 4, 5, 0, 1, 2]
        for _ in range(2):
            s = step(e, groups)
            assert e.last_prefetch_order == [3, 4, 5, 0, 1, 2]
            assert s["stalls"] == 0 and s["swap_in_tensors"] == 6
    finally:
        e.close()


def test_prefetch_zero_stalls_on_every_swapped_tensor() -> None:
    e = engine(prefetch=0)
    try:
        for _ in range(2):
            s = step(e, [[4096]] * 5)
            assert s["stalls"] == 5 == s["swapped_tensors"] == s["swap_in_tensors"]
            assert s["stall_ms"] > 0 and e.last_prefetch_order == []
            assert 0.0 <= s["hidden_frac"] <= 1.0
    finally:
        e.close()


def test_no_leaked_handles_or_pool_growth_over_50_steps() -> None:
    e = engine(prefetch=1, keep_last=1)
    groups = [[3000, 1500], [700], [5000, 5000, 20]]
    try:
        step(e, groups)
        allocations, pool_bytes = e.pool.allocations, e.pool.total_bytes
        assert allocations > 0
        for _ in range(50):
            s = step(e, groups)
            assert e.live_handles == 0
            assert e.pool.in_use_bytes == 0
        assert (e.pool.allocations, e.pool.total_bytes, s["host_pool_bytes"]) == (allocations, pool_bytes, pool_bytes)
        assert e.summary()["steps"] == 51
    finally:
        e.close()


def test_host_limit_raises_named_error() -> None:
    e = engine(host_limit=150 * 1024)
    try:
        with pytest.raises(HostMemoryLimitError) as info:
            step(e, [[16384]] * 4)  # 64 KiB each: the third does not fit
        err = info.value
        assert err.limit == 150 * 1024 and err.needed == 3 * 65536 - 150 * 1024
        assert "needs 42.0 KiB (43008 bytes) more, limit 150.0 KiB" in str(err)
    finally:
        e.close()


def test_pool_size_classes_and_reuse() -> None:
    assert size_class(1) == 4096 and size_class(4096) == 4096
    assert size_class(4097) == 5120 and size_class(1 << 20) == 1 << 20 and size_class((1 << 20) + 1) == 1310720
    for n in (5000, 123457, 10 ** 7):
        assert n <= size_class(n) <= 1.25 * n
    pool = HostPool()
    a = pool.acquire(5000)
    pool.release(a)
    b = pool.acquire(4500)
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    pending = [True]
    pool.release(b, done=lambda: not pending)
    c = pool.acquire(4500)  # b is still read by a copy: a new buffer
    assert c.data_ptr() != b.data_ptr() and pool.allocations == 2
    pending.clear()
    pool.release(c)
    assert pool.acquire(4500).data_ptr() in (b.data_ptr(), c.data_ptr()) and pool.allocations == 2


def test_disabled_engine_is_a_pass_through() -> None:
    e = SwapEngine(SwapConfig(enabled=False), "cpu")
    with e:
        with e:
            loss = chain([[1024]])
            assert loss.grad_fn is not None
    loss.backward()
    s = e.step_end()
    assert set(s) >= {"swap_out_bytes", "swap_in_bytes", "swapped_tensors", "swap_in_tensors", "stall_ms",
                      "stalls", "swap_out_ms", "swap_in_ms", "hidden_frac", "peak_saved_bytes",
                      "resident_saved_bytes", "host_pool_bytes", "recomputed_modules"}
    assert all(v == 0 for v in s.values())
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert e.wrap_model(model) is model and isinstance(model[1], nn.ReLU)
    e.close()
    e.close()


def test_reentrant_context_and_close_idempotent() -> None:
    e = engine()
    with e:
        with e:
            a = chain([[1024]])
        b = chain([[1024]])
    (a + b).backward()
    assert e.step_end()["swapped_tensors"] == 2
    e.close()
    e.close()


@pytest.mark.parametrize("threshold", [0, 1 << 30])
def test_inplace_modification_after_save_is_detected(threshold: int) -> None:
    """Hooks switch off autograd's version check; the engine restores it (swapped or not)."""
    def run(e: SwapEngine = None) -> None:  # type: ignore[assignment]
        lin = nn.Linear(8, 8)
        with (e if e is not None else torch.enable_grad()):
            y = torch.sigmoid(lin(torch.randn(4, 8)))
            y.mul_(2)
        y.sum().backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run()
    e = engine(threshold=threshold)
    try:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(e)
    finally:
        e.close()


def test_trace_has_compute_and_swap_spans_with_rank_of_the_scheduled_steps_only(tmp_path, monkeypatch) -> None:
    """Without a training loop the engine follows the schedule by its own step count: steps 2-3 of 4."""
    monkeypatch.setenv("RANK", "3")
    path = tmp_path / "trace_{rank}.json"
    e = SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, transport="loopback", trace=str(path)), "cpu",
                   trace_window=TraceSchedule(2, 3))
    for _ in range(4):
        step(e, [[1024]] * 3)
    e.close()
    events = load_trace(str(tmp_path / "trace_3.json"))
    spans = [ev for ev in events if ev["ph"] == "X"]
    names = {ev["name"].split(" ")[0] for ev in spans}
    assert {"forward", "backward", "swap-out", "swap-in"} <= names
    assert all(ev["pid"] == 3 and ev["dur"] >= 0 for ev in spans)
    assert {ev["args"]["step"] for ev in spans} == {2, 3}
    assert sum(ev["name"].startswith("swap-out") for ev in spans) == 6
    first = min(ev["ts"] for ev in spans if ev["name"] == "forward")
    counters = [ev for ev in events if ev["ph"] == "C"]
    assert counters and all(ev["ts"] >= first for ev in counters)  # memory samples of the traced steps only


def test_auto_recompute_saves_fewer_bytes() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.2), nn.Flatten(), nn.Linear(512, 4))

    def peak(recompute: object) -> float:
        e = engine(budget=1 << 40, recompute=recompute)  # nothing moves: count saved bytes only
        model = e.wrap_model(build())
        x = torch.randn(2, 3, 16, 16)
        with e:
            loss = model(x).sum()
        loss.backward()
        s = e.step_end()
        e.close()
        assert s["recomputed_modules"] == (0 if recompute is None else 4)
        return s["peak_saved_bytes"]

    assert peak("auto") < peak(None)


def test_recompute_rejects_unknown_kind() -> None:
    e = engine(recompute=["relu", "conv"])
    with pytest.raises(ValueError, match="conv"):
        e.wrap_model(nn.Sequential(nn.ReLU()))
    e.close()


def test_config_from_env() -> None:
    cfg = config_from_env({"LMSDP_SWAP": "1", "LMSDP_SWAP_THRESHOLD": "64KiB", "LMSDP_SWAP_PREFETCH": "3",
                           "LMSDP_SWAP_KEEP_LAST": "0", "LMSDP_SWAP_BUDGET": "1MiB",
                           "LMSDP_SWAP_HOST_LIMIT": "2GiB", "LMSDP_SWAP_RECOMPUTE": "relu,pool",
                           "LMSDP_SWAP_TRANSPORT": "loopback", "LMSDP_SWAP_LINK_GBPS": "2.5"})
    assert cfg == SwapConfig(enabled=True, threshold=65536, prefetch=3, keep_last=0, budget=1 << 20,
                             host_limit=2 << 30, recompute=["relu", "pool"], transport="loopback", link_gbps=2.5)
    assert config_from_env({}).enabled is False
    assert config_from_env({"LMSDP_SWAP": "1", "LMSDP_SWAP_RECOMPUTE": "auto"}).recompute == "auto"


def test_cuda_transport_needs_cuda() -> None:
    with pytest.raises(ValueError, match="cuda"):
        SwapEngine(SwapConfig(enabled=True, transport="cuda"), "cpu")


@pytest.mark.integration
def test_cpu_run_warns_that_nothing_is_saved() -> None:
    code = textwrap.dedent("""
        import warnings, torch
        from lmsdp.swapping import SwapConfig, SwapEngine
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            SwapEngine(SwapConfig(enabled=True), "cpu").close()
            SwapEngine(SwapConfig(enabled=True), "cpu").close()
        print(sum("saves no memory" in str(x.message) for x in w))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr


SCRIPT = """
import torch
from torch import nn
{enable}
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(64, 32)).pow(2).mean().backward()
    opt.step()
print("loss-ok")
"""


@pytest.mark.integration
@pytest.mark.parametrize("how", ["enable", "env"])
def test_script_mode_reports_at_exit(how: str) -> None:
    env = dict(os.environ)
    if how == "enable":
        code = SCRIPT.format(enable="import lmsdp.swapping as s; s.enable(threshold=4096, keep_last=0, prefetch=1)")
    else:
        code = SCRIPT.format(enable="import lmsdp.swapping as s; s.enable_from_env()")
        env.update(LMSDP_SWAP="1", LMSDP_SWAP_THRESHOLD="4KiB", LMSDP_SWAP_KEEP_LAST="0", LMSDP_SWAP_PREFETCH="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "loss-ok" in out.stdout, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[lmsdp swap]")]
    assert len(lines) == 1, out.stderr
    fields = dict(kv.split("=", 1) for kv in lines[0].split() if "=" in kv)
    assert int(fields["swapped_out"]) > 0 and fields["steps"] == "3"
    # three identical steps: the 64x32 input and the 64x256 relu and tanh outputs (each saved by two nodes)
    assert int(fields["swapped_out"]) == 3 * (64 * 32 + 2 * 64 * 256) * 4


def test_prefetch_window_slides_instead_of_growing() -> None:
    """At most ``prefetch`` swapped tensors are on their way back (or back and unused) at any unpack:
    each use slides the window by one. Issuing ``prefetch`` new copies per unpack instead brought
    most of a step's swapped bytes back to the device at once in backward."""
    n = 12
    for prefetch in (1, 2, 3):
        e = engine(prefetch=prefetch)
        try:
            for _ in range(2):  # step 2 runs with the learned order
                outstanding = []

                def probe(grad, e=e, outstanding=outstanding):
                    handles = [h() for h in e._handles]
                    back = [h for h in handles if h is not None and h.in_tr is not None and not h.used]
                    outstanding.append(len(back))
                    return grad

                with e:
                    xs = [torch.ones(1024, requires_grad=True) for _ in range(n)]
                    ys = [(x * 2).exp() for x in xs]  # exp saves its 4 KiB result
                    for y in ys:
                        y.register_hook(probe)
                    loss = sum(y.sum() for y in ys)
                loss.backward()
                s = e.step_end()
            assert s["swapped_tensors"] == n and s["stalls"] == 0
            assert max(outstanding) <= prefetch, (prefetch, outstanding)
        finally:
            e.close()


def test_held_bytes_stay_right_while_nothing_records_the_timeline() -> None:
    """Releases skip the lock while the timeline is off, yet the held count stays exact: switched on
    after two unrecorded steps (some tensors swapped, some resident), the timeline starts from the
    step's own packs and returns to zero once backward has freed everything."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(8)])
    x = torch.randn(16, 64)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=1024, keep_last=2, budget=0, prefetch=1,
                                   transport="loopback"), "cpu")
    assert not engine.record_memory
    for _ in range(2):
        with engine:
            loss = model(x).square().mean()
        loss.backward()
        del loss
        stats = engine.step_end()
    assert stats["swapped_tensors"] > 0 and engine.last_memory_timeline == []
    engine.record_memory = True
    with engine:
        loss = model(x).square().mean()
    loss.backward()
    del loss
    stats = engine.step_end()
    held = [b for _, b in engine.last_memory_timeline]
    assert held[0] > 0 and min(held) >= 0 and held[-1] == 0, held
    assert max(held) == stats["peak_saved_bytes"]
    engine.close()
