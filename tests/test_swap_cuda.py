"""The swap engine on a real GPU: CUDA transport exactness, memory actually released, stats on CUDA.
Skipped without CUDA."""
from __future__ import annotations

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
