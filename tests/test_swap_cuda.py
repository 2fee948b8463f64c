"""The swap engine on a real GPU: CUDA transport exactness, memory actually released, stats on CUDA.
Skipped without CUDA."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lmsdp.swapping import SwapConfig, SwapEngine

from .test_swap_exactness import CASES, assert_same, swap_all, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU_CASES = ["shared", "views", "inplace", "branches", "lstm_gru", "int_bool", "checkpoint", "resnet", "gpt",
             "conv3d"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("case", GPU_CASES)
def test_cuda_gradients_equal_with_everything_swapped(case: str, prefetch: int) -> None:
    build, make_input, loss_fn = CASES[case]
    ref = train(build, make_input, loss_fn, None, device="cuda")
    engine = swap_all(prefetch, device="cuda", transport="cuda")
    try:
        got = train(build, make_input, loss_fn, engine, device="cuda")
        s = engine.summary()
        assert s["swapped_tensors"] > 0 and s["swap_in_tensors"] > 0
        assert engine.last_stats["max_memory_allocated"] > 0
    finally:
        engine.close()
    torch.cuda.synchronize()
    assert_same(ref, got)


def test_cuda_amp_double_backward_equal() -> None:
    build, make_input, _ = CASES["branches"]

    def amp_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            out = m(x)
        return out.float().pow(2).mean()

    ref = train(build, make_input, amp_loss, None, device="cuda", double=True)
    engine = swap_all(2, device="cuda", transport="cuda")
    try:
        got = train(build, make_input, amp_loss, engine, device="cuda", double=True)
    finally:
        engine.close()
    assert_same(ref, got)


def test_cuda_swapping_lowers_peak_memory() -> None:
    """Saved activations leave the GPU: peak allocated memory in the step drops by most of them."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.Tanh()) for _ in range(16)]).cuda()
    x = torch.randn(4096, 1024, device="cuda")

    def peak(engine: SwapEngine = None) -> int:  # type: ignore[assignment]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if engine is None:
            model(x).sum().backward()
        else:
            with engine:
                loss = model(x).sum()
            loss.backward()
            engine.step_end()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    for p in model.parameters():
        p.grad = None
    without = peak()
    engine = SwapEngine(SwapConfig(enabled=True, threshold=1 << 20, prefetch=2, keep_last=1), "cuda")
    try:
        peak(engine)  # learn the order
        with_engine = peak(engine)
        s = engine.last_stats
        assert s["swapped_tensors"] >= 14 and s["stalls"] == 0
    finally:
        engine.close()
    activations = 16 * 4096 * 1024 * 4
    assert with_engine < without - activations // 2


# ------------------------------------------------------------------------------------------------------
# Issue 21: each item of the CUDA review, provable the day a GPU is lent. ``torch.cuda._sleep`` keeps
# the GPU busy so that the CPU runs ahead of it, as it does in real training.
MIB = 1 << 20


def sleep_cycles(ms: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for about ``ms`` milliseconds (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 1_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return max(1, int(cycles * ms / max(start.elapsed_time(end), 1e-3)))


class SlowNode(torch.autograd.Function):
    """Identity on ``x`` that saves ``saved`` (filled with ``value``); after ``cycles`` of GPU sleep its
    backward adds how far a sample of every 4096th element is from ``value``: 0 unless corrupted."""

    @staticmethod
    def forward(ctx, x, saved, cycles, value):  # type: ignore[override]
        ctx.save_for_backward(saved)
        ctx.cycles, ctx.value = cycles, value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.cycles:
            torch.cuda._sleep(ctx.cycles)
        return grad + (saved.view(-1)[::4096] - ctx.value).abs().sum(), None, None, None


class Chain:
    """``n`` SlowNodes saving ``nbytes`` each; ``x.grad`` is exactly 1 when every saved tensor came back intact."""

    def __init__(self, n: int, nbytes: int, cycles: int) -> None:
        self.x = torch.ones(1, device="cuda", requires_grad=True)
        y = self.x
        for i in range(n):
            y = SlowNode.apply(y, torch.full((nbytes // 4,), float(i), device="cuda"), cycles, float(i))
        self.loss = y.sum()

    def intact(self) -> bool:
        return self.x.grad is not None and float(self.x.grad) == 1.0


def slow_chain(n: int, nbytes: int, cycles: int) -> torch.Tensor:
    return Chain(n, nbytes, cycles).loss


def cuda_engine(**kw: object) -> SwapEngine:
    cfg: dict = dict(enabled=True, threshold=1 << 16, keep_last=0, prefetch=2, transport="cuda")
    cfg.update(kw)
    return SwapEngine(SwapConfig(**cfg), "cuda")


def test_swap_in_active_bytes_stay_within_the_window_while_the_cpu_runs_ahead() -> None:
    """Item 2: with the CPU far ahead in backward, swapped-in blocks are reused once compute has passed
    their use; active bytes stay near the prefetch window, not 'every swapped tensor resident'."""
    size, n, window = 32 * MIB, 24, 4 * 32 * MIB
    engine = cuda_engine(prefetch=n, prefetch_window=window)
    cycles = sleep_cycles(2.0)
    try:
        for _ in range(2):  # step 1 learns the order
            with engine:
                loss = slow_chain(n, size, cycles)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.memory_stats()["active_bytes.all.peak"] - base
            engine.step_end()
        assert engine.last_stats["swap_in_tensors"] == n
        assert peak <= window + 2 * size, (peak, window)
    finally:
        engine.close()


def test_forward_peak_is_bounded_by_the_swap_out_window() -> None:
    """Item 3: 16 large elementwise ops outrun the link; compute waits at swap_out_window bytes."""
    size, window = 64 * MIB, 2 * 64 * MIB

    def forward_peak(engine: SwapEngine) -> int:
        x = torch.randn(size // 4, device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with engine:
            y = x.requires_grad_()
            for _ in range(16):
                y = torch.sin(y)  # saves its input: 64 MiB each
        torch.cuda.synchronize()
        peak = torch.cuda.memory_stats()["active_bytes.all.peak"] - base
        y.sum().backward()
        engine.step_end()
        return peak

    bounded, unbounded = cuda_engine(swap_out_window=window), cuda_engine(swap_out_window=1 << 40)
    try:
        with_window, without = forward_peak(bounded), forward_peak(unbounded)
        assert bounded.last_stats["swap_out_waits"] > 0
        assert bounded.last_stats["peak_resident_bytes"] <= window
    finally:
        bounded.close()
        unbounded.close()
    assert with_window <= window + 3 * size, with_window
    assert without > with_window  # the queue, not the window, bounded it before


def test_prefetch_hides_behind_a_slow_backward_node() -> None:
    """Item 1: swap-ins are not gated on the compute tail: behind 2 ms nodes, stalls < 10 % of swap-in time."""
    engine = cuda_engine(prefetch=4)
    cycles = sleep_cycles(2.0)
    try:
        for _ in range(3):
            with engine:
                loss = slow_chain(16, 8 * MIB, cycles)
            loss.backward()
            torch.cuda.synchronize()
            engine.step_end()
        torch.cuda.synchronize()
        s = engine.step_end()  # the last step's copies and stalls, resolved now
        total = engine.summary()
        assert total["swap_in_ms"] > 0 and total["stall_ms"] < 0.1 * total["swap_in_ms"], (s, total)
    finally:
        engine.close()


def test_next_steps_first_pack_does_not_block_the_cpu() -> None:
    """Item 5: in script mode step_end runs inside the next forward's first pack; it must not sync."""
    engine = cuda_engine()
    engine.install_global()
    cycles = sleep_cycles(200.0)
    try:
        x = torch.randn(4 * MIB // 4, device="cuda", requires_grad=True)
        torch.sin(torch.sin(x)).sum().backward()  # step 1
        torch.cuda._sleep(cycles)  # the GPU is 200 ms behind the CPU
        t0 = time.perf_counter()
        y = torch.sin(x)  # the next step's first pack: closes step 1
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.05, elapsed
        y.sum().backward()
        torch.cuda.synchronize()
    finally:
        engine.close()


def test_pinned_pool_is_constant_from_step_2_and_matches_the_host_allocator() -> None:
    """Item 4: no pinned allocation after step 1; the pool's bytes are the host allocator's bytes."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        pytest.skip("torch.cuda.host_memory_stats is missing in this torch")
    before = stats()
    engine = cuda_engine()
    try:
        sizes = []
        for _ in range(4):
            with engine:
                loss = slow_chain(8, 3 * MIB, 0)  # 3 MiB: a 4 MiB power-of-two block each
            loss.backward()
            engine.step_end()
            sizes.append((engine.pool.allocations, engine.pool.total_bytes))
        assert sizes[1:] == [sizes[0]] * 3
        after = stats()
        grown = after["allocated_bytes.current"] - before.get("allocated_bytes.current", 0)
        assert grown == engine.pool.total_bytes
        assert engine.pool.total_bytes == engine.pool.allocations * 4 * MIB
    finally:
        engine.close()
    if hasattr(torch._C, "_host_emptyCache"):
        assert stats()["allocated_bytes.current"] <= before.get("allocated_bytes.current", 0)


def test_job_pool_is_pinned_before_step_1_and_step_1_allocates_nothing() -> None:
    """Item 4: a config-mode job reserves its pinned buffers from a fake record of its step, so step 1's
    pack hooks allocate no pinned memory (each would be an implicit device sync)."""
    from lmsdp.launcher.config import load_config
    from lmsdp.launcher.train.job_plan import presize_host_pool, workload_from_config

    config = load_config(None, ["model.name=gpt", "model.kwargs={vocab: 256, seq_len: 256, layers: 4, width: 256, heads: 4}",
                                "train.batch_size=8", "swap.enabled=true", "swap.threshold=64KiB",
                                "swap.transport=cuda", "comm.backend=torch"])
    engine = SwapEngine(config.swap, "cuda")
    try:
        assert presize_host_pool(config, engine) > 0
        before = (engine.pool.allocations, engine.pool.total_bytes)
        w = workload_from_config(config)
        torch.manual_seed(0)
        model = w.build_model().cuda()
        for _ in range(2):
            inputs, targets = w.make_batch(8)
            with engine:
                loss = w.loss(model(inputs.cuda()), targets.cuda())
            loss.backward()
            engine.step_end()
            assert engine.last_stats["swap_out_bytes"] > 0
        assert (engine.pool.allocations, engine.pool.total_bytes) == before
    finally:
        engine.close()


def test_cuda_graph_capture_passes_through_with_equal_gradients() -> None:
    """Item 6: the pack hook stands aside inside a capture; replayed gradients equal eager ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).cuda()
    static_x = torch.randn(64, 256, device="cuda")
    model(static_x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    engine = cuda_engine(threshold=0)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture, as torch's docs ask
                model.zero_grad(set_to_none=False)
                model(static_x).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model.zero_grad(set_to_none=False)
        with engine, torch.cuda.graph(graph):
            model(static_x).sum().backward()
        graph.replay()
        torch.cuda.synchronize()
        assert engine.last_stats["packed_tensors"] == 0 and not engine.step_open
    finally:
        engine.close()
    assert_same(ref, [p.grad for p in model.parameters()])


def test_dropping_a_graph_with_prefetches_in_flight_and_freeing_sources_stays_exact() -> None:
    """Race guards: sources freed behind copies queued after a busy compute stream (the allocator would
    hand their blocks to the scratch tensors at once were the transfers not holding them), and a graph
    dropped while its prefetches run; every saved tensor comes back bit-exact."""
    cycles = sleep_cycles(20.0)
    engine = cuda_engine(prefetch=8)
    try:
        for step in range(4):
            torch.cuda._sleep(cycles)  # compute busy: the swap-outs queue behind it
            with engine:
                chain = Chain(12, 4 * MIB, 0)
            scratch = [torch.full((MIB,), -1.0, device="cuda") for _ in range(24)]
            if step == 2:
                del chain  # prefetches started at the learned forward end: dropped in flight
                engine.step_end()
                continue
            chain.loss.backward()
            engine.step_end()
            assert chain.intact(), float(chain.x.grad)
            del scratch
        assert engine.last_stats["swap_in_tensors"] == 12
    finally:
        engine.close()


def test_autocast_weight_casts_stay_on_the_device() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).cuda()
    x = torch.randn(256, 512, device="cuda")

    def step(engine: SwapEngine) -> list:
        model.zero_grad(set_to_none=True)
        with engine, torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        engine.step_end()
        return [p.grad.clone() for p in model.parameters()]

    ref = step(cuda_engine(enabled=False))
    engine = cuda_engine(threshold=0)
    try:
        got = step(engine)
        assert engine.last_stats["swap_out_bytes"] == 256 * 512 * (2 + 2 + 4)  # x cast, relu out, pow in
    finally:
        engine.close()
    assert_same(ref, got)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_engine_bound_before_set_device_says_so() -> None:
    engine = cuda_engine()
    try:
        torch.cuda.set_device(1)
        with pytest.warns(RuntimeWarning, match="bound to cuda:0"):
            with engine:
                loss = slow_chain(2, 4 * MIB, 0)
            loss.backward()
            engine.step_end()
    finally:
        torch.cuda.set_device(0)
        engine.close()
