"""Gradients with the swap engine on (everything swapped, small prefetch) equal gradients with it off,
bit for bit, on the loopback transport; tricky autograd patterns and small conv/transformer/3D nets."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmsdp.swapping import SwapConfig, SwapEngine

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")


# ------------------------------------------------------------------------------------------- models
class Shared(nn.Module):
    """One activation saved by several nodes (mul with itself, sin, matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return (h * h * h.sin()).sum() + (h @ self.w).tanh().sum() + (h * h).mean()


class Views(nn.Module):
    """Saved views: reshapes, transposes, strided slices, an expanded (stride-0) tensor, offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        v = h.view(-1, 8).exp()
        t = h.t()
        s = h[:, 1::3]
        e = h[:, 2:3].expand(-1, 8)
        tail = h[3:, 5:]
        return (v.sum() + (t @ t.t()).sum() + (s * s.sin()).sum() + (e * h[:, :8]).sum()
                + (tail * tail.cos()).sum())


class InPlace(nn.Module):
    """Legal in-place ops: relu_/sigmoid_ on fresh results, in-place on a slice, add_ after save-free ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.relu_()
        g = self.b(h) * 3
        g.add_(1)
        g = g.sigmoid_()
        k = self.b(h).clone()
        k[:, :4].mul_(2)
        return (g * h).sum() + k.tanh().sum()


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(16, 24)
        self.c = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(self.a(x))
        v = F.gelu(self.b(x))
        y = self.c(torch.cat([u * v, u + v], dim=1))
        return (y + x[:, :8]).pow(2).sum()


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(4, 4, 8))
        out, h = self.gru(out)
        return out.sum() + h.pow(2).sum()


class IntBool(nn.Module):
    """Integer (embedding/gather indices) and bool (masks) saved tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.abs() * 10).long().clamp(max=49)[:, :6]
        h = self.lin(self.emb(idx)).sum(1)
        mask = h > 0
        g = torch.gather(h, 1, idx.clamp(max=15))
        return torch.where(mask, h, h * 0.1).sum() + h.masked_fill(~mask, 0.0).pow(2).sum() + g.sum()


class CheckpointRegion(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.post = nn.Linear(32, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.post(h.sin()).sum()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2))
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class GPTBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.heads, self.drop = heads, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        att = self.drop(att.softmax(-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, ctx: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[GPTBlock(d) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


class Tiny3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(2),
                                 nn.Conv3d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                                 nn.ConvTranspose3d(8, 4, 2, stride=2), nn.Conv3d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------ harness
Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _plain(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = m(x)
    return out if out.dim() == 0 else out.float().pow(2).mean()


def _gpt_loss(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = m(idx)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def _amp_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    return out.float().pow(2).mean()


CASES = {
    "shared": (Shared, lambda: torch.randn(8, 16), _plain),
    "views": (Views, lambda: torch.randn(8, 16), _plain),
    "inplace": (InPlace, lambda: torch.randn(8, 16), _plain),
    "branches": (Branches, lambda: torch.randn(8, 16, requires_grad=True), _plain),
    "lstm_gru": (Recurrent, lambda: torch.randn(16, 8), _plain),
    "int_bool": (IntBool, lambda: torch.randn(8, 16), _plain),
    "checkpoint": (lambda: CheckpointRegion(False), lambda: torch.randn(8, 16), _plain),
    "checkpoint_reentrant": (lambda: CheckpointRegion(True), lambda: torch.randn(8, 16, requires_grad=True), _plain),
    "amp_bf16": (Branches, lambda: torch.randn(8, 16), _amp_loss),
    "resnet": (TinyResNet, lambda: torch.randn(2, 3, 16, 16), _plain),
    "gpt": (TinyGPT, lambda: torch.randint(0, 64, (2, 16)), _gpt_loss),
    "conv3d": (Tiny3D, lambda: torch.randn(1, 1, 8, 8, 8), _plain),
}


def train(build: Callable[[], nn.Module], make_input: Callable[[], torch.Tensor], loss_fn: Loss,
          engine: Optional[SwapEngine], steps: int = 2, device: str = "cpu",
          double: bool = False) -> List[torch.Tensor]:
    """Seeded steps; returns losses, every gradient and the parameters after two SGD updates."""
    torch.manual_seed(0)
    model = build().to(device)
    x = make_input().to(device)
    if x.is_floating_point() and not x.requires_grad and double:
        x.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    results: List[torch.Tensor] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if x.grad is not None:
            x.grad = None
        torch.manual_seed(1)  # identical dropout masks with and without the engine
        with (engine if engine is not None else contextlib.nullcontext()):
            loss = loss_fn(model, x)
        if double:
            (gx,) = torch.autograd.grad(loss, x, create_graph=True)
            total = loss + gx.pow(2).sum()
            total.backward()
        else:
            loss.backward()
        if engine is not None:
            engine.step_end()
        results.append(loss.detach().clone())
        results += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        if x.grad is not None:
            results.append(x.grad.clone())
        opt.step()
    results += [p.detach().clone() for p in model.parameters()]
    results += [b.clone() for b in model.buffers()]
    return results


def assert_same(a: List[torch.Tensor], b: List[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(u, v), f"tensor {i} differs: max |diff| {(u.double() - v.double()).abs().max()}"


def swap_all(prefetch: int, device: str = "cpu", transport: str = "loopback") -> SwapEngine:
    return SwapEngine(SwapConfig(enabled=True, threshold=0, prefetch=prefetch, keep_last=0, budget=0,
                                 transport=transport), device)


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_with_everything_swapped(case: str, prefetch: int) -> None:
    build, make_input, loss_fn = CASES[case]
    ref = train(build, make_input, loss_fn, None)
    engine = swap_all(prefetch)
    try:
        got = train(build, make_input, loss_fn, engine)
        totals = engine.summary()
        assert totals["swapped_tensors"] > 0 and totals["swap_in_tensors"] > 0
        assert engine.live_handles == 0
    finally:
        engine.close()
    assert_same(ref, got)


@pytest.mark.parametrize("case", ["branches", "shared", "resnet"])
def test_double_backward_equal(case: str) -> None:
    build, make_input, loss_fn = CASES[case]
    ref = train(build, make_input, loss_fn, None, double=True)
    engine = swap_all(2)
    try:
        got = train(build, make_input, loss_fn, engine, double=True)
        assert engine.summary()["swapped_tensors"] > 0
    finally:
        engine.close()
    assert_same(ref, got)


def test_double_backward_inside_the_engine_context() -> None:
    """create_graph backward run while the hooks are active (packs during backward stay resident)."""
    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        loss = _plain(m, x)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + gx.pow(2).sum()

    make_input = lambda: torch.randn(8, 16, requires_grad=True)  # noqa: E731
    ref = train(Branches, make_input, loss_fn, None)
    engine = swap_all(1)
    try:
        got = train(Branches, make_input, loss_fn, engine)
        assert engine.summary()["swapped_tensors"] > 0
    finally:
        engine.close()
    assert_same(ref, got)


def test_partial_swapping_equal() -> None:
    """Default-ish settings (keep_last, budget, threshold) mixing resident and swapped handles."""
    build, make_input, loss_fn = CASES["gpt"]
    ref = train(build, make_input, loss_fn, None, steps=3)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=2048, prefetch=3, keep_last=4, budget=16 << 10,
                                   transport="loopback"), "cpu")
    try:
        got = train(build, make_input, loss_fn, engine, steps=3)
        s = engine.summary()
        assert 0 < s["swapped_tensors"]
    finally:
        engine.close()
    assert_same(ref, got)


@pytest.mark.parametrize("spec", [["relu", "batchnorm", "pool"], "auto"])
def test_recompute_is_exact_and_keeps_running_stats(spec: object) -> None:
    build, make_input, loss_fn = CASES["resnet"]
    ref = train(build, make_input, loss_fn, None)

    engine = SwapEngine(SwapConfig(enabled=True, threshold=0, prefetch=2, keep_last=0, recompute=spec,
                                   transport="loopback"), "cpu")

    def wrapped() -> nn.Module:
        return engine.wrap_model(build())

    try:
        got = train(wrapped, make_input, loss_fn, engine)
        assert engine.recomputed_modules > 0
    finally:
        engine.close()
    assert_same(ref, got)  # includes BatchNorm running stats: recomputation does not update them twice
