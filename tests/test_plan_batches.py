"""The planner's answers across batch sizes are consistent, at GPU-scale settings (FLOP rates, links and
memory targets of real GPUs, planned from fake tensors: no processes, no device):

* whether a plan fits is monotone in the batch (a plan at B means a plan at every smaller batch);
* the largest-batch search (``lmsrun plan --batch max``) finds the largest batch a linear scan finds;
* the chosen plan is the fastest predicted row that fits, and the table's "planned" row is it;
* profiles extrapolated from batch 1 and 2 are the fake runs' own profiles at that batch.

Over the zoo (GPT, ResNet-18, U-Net) and two model shapes from outside it (a Transformer encoder and an
MLP-mixer), each coarse (large activations per sample) so that a 8-80 GiB target holds a few dozen
samples and a linear scan takes seconds."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

from lmsdp.launcher.config import load_config
from lmsdp.launcher.train.job_plan import workload_from_config
from lmsdp.swapping.batch_profiles import BatchProfiles
from lmsdp.swapping.batch_search import BatchPlanner, largest_fitting
from lmsdp.swapping.profile import RECOMPUTE_VARIANTS, Workload, optimizer_state_bytes, profile_workload

GIB = 1 << 30


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, written out (torch's nn.TransformerEncoderLayer takes paths that
    its own checkpointing cannot replay under fake tensors)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A small Transformer encoder classifier on float token features."""

    def __init__(self, width: int = 256, heads: int = 8, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(width, heads) for _ in range(layers)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x).mean(dim=1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, channels: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class Mixer(nn.Module):
    """MLP-mixer: patches embedded by a strided conv, token- and channel-mixing MLPs."""

    def __init__(self, image: int = 128, patch: int = 8, channels: int = 256, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, channels, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock((image // patch) ** 2, channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(dim=1))


def _external(build: Callable[[], nn.Module], sample: List[int]) -> Workload:
    def batch(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, *sample), torch.randint(0, 10, (n,))

    return Workload(build_model=build, make_batch=batch, loss=nn.functional.cross_entropy,
                    build_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), label="test model")


def _zoo(*overrides: str) -> Workload:
    config = load_config(None, ["train.batch_size=1", "launch.threads=1", *overrides])
    return workload_from_config(config)


# model -> (workload, memory target GiB, TFLOP/s, link GB/s): coarse shapes so the largest batch is small
CASES: Dict[str, Tuple[Callable[[], Workload], int, float, float]] = {
    "gpt": (lambda: _zoo("model.name=gpt", "model.kwargs={vocab: 4096, seq_len: 4096, layers: 2, width: 1024, heads: 16}",
                         "train.amp=true", "train.amp_dtype=bfloat16"), 8, 400.0, 50.0),
    "resnet18": (lambda: _zoo("model.name=resnet18", "model.kwargs={num_classes: 10, stem: imagenet}",
                              "data.shape=[3, 640, 640]"), 8, 100.0, 25.0),
    "unet3d": (lambda: _zoo("model.name=unet3d", "model.kwargs={width: 16, levels: 3, classes: 3}",
                            "data.shape=[1, 128, 128, 128]"), 32, 200.0, 12.0),
    "transformer-encoder": (lambda: _external(lambda: Encoder(1024, 16, 2), [2048, 1024]), 24, 300.0, 32.0),
    "mlp-mixer": (lambda: _external(lambda: Mixer(512, 4, 1024, 2), [3, 512, 512]), 80, 1000.0, 64.0),
}


def _planner(name: str) -> BatchPlanner:
    make, gib, tflops, gbps = CASES[name]
    workload = make()
    source = BatchProfiles(workload, tflops * 1e12, optimizer_state_bytes(workload))
    return BatchPlanner(source, gib * GIB, gbps * 1e9, 4 << 20, list(RECOMPUTE_VARIANTS))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fits_is_monotone_and_the_search_finds_the_scans_largest_batch(name):
    torch.set_num_threads(1)
    planner = _planner(name)
    largest = planner.largest(start=1)
    assert 2 <= largest <= 64, largest  # the shapes are sized for a short scan
    fits = [planner.fits(b) for b in range(1, largest + 3)]
    assert fits == [True] * largest + [False] * (len(fits) - largest), fits  # monotone, ends at the search's answer
    assert planner.largest(start=3 * largest) == planner.largest(start=largest // 2 + 1) == largest  # any start
    for approach in ("no swap", "recompute only", "swap only"):
        rows = [planner.fits(b, approach) for b in range(1, largest + 2)]
        limit = planner.largest(1, approach)
        assert limit <= largest and rows[:limit + 1] == [True] * limit + [False], (approach, rows)
    for b in range(1, largest + 1):  # the choice is the fastest row that fits, and the table's "planned" row
        result = planner.plan(b)
        fitting = [r for r in result.strategies if r.fits]
        assert all(result.chosen.prediction.step_s <= r.prediction.step_s for r in fitting), b
        assert result.strategies[-1].name == "planned" and result.strategies[-1].prediction == result.chosen.prediction
    over = planner.plan(largest + 1)
    assert over.chosen is None and over.min_peak > planner.target
    assert over.min_peak == min(r.prediction.peak_device_bytes for r in over.strategies if r.name != "configured")


@pytest.mark.parametrize("name", ["gpt", "resnet18", "mlp-mixer"])
def test_extrapolated_profiles_are_the_fake_runs_profiles(name):
    torch.set_num_threads(1)
    planner = _planner(name)
    for spec in (None, RECOMPUTE_VARIANTS[2]):
        got = planner.source.profile(7, spec)
        want = profile_workload(planner.source.workload, 7, spec, "cpu", 0, planner.source.optimizer_bytes,
                                planner.source.rate)
        assert [t.nbytes for t in got.tensors] == [t.nbytes for t in want.tensors]
        assert got.held_bytes == want.held_bytes and got.workspace_bytes == want.workspace_bytes
        assert got.forward_s == pytest.approx(want.forward_s) and got.backward_s == pytest.approx(want.backward_s)
        assert [t.pack_s for t in got.tensors] == pytest.approx([t.pack_s for t in want.tensors])
        assert [t.use_s for t in got.tensors] == pytest.approx([t.use_s for t in want.tensors])
        # input bytes per module agree; which saved tensor an input is matched to can differ between fake
        # runs (the recorder keys tensors by storage, and an unsaved input's storage may be reused)
        assert {m: [n for _, n in ins] for m, ins in got.module_inputs.items()} == \
            {m: [n for _, n in ins] for m, ins in want.module_inputs.items()}


def test_largest_fitting_asks_each_batch_once_and_handles_the_ends():
    asked: List[int] = []

    def fits(b: int) -> bool:
        asked.append(b)
        return b <= 37

    assert largest_fitting(fits, 5) == 37 and len(asked) == len(set(asked))
    assert largest_fitting(lambda b: b <= 37, 1000) == 37
    assert largest_fitting(lambda b: False, 8) == 0
    assert largest_fitting(lambda b: True, 3, limit=100) == 100


def test_lmsrun_plan_batch_max_is_the_largest_batch_whose_own_plan_fits(tmp_path, capsys):
    from lmsdp.launcher.tools.plan import main as plan_main

    overrides = ["--set", "model.name=gpt", "--set", "model.kwargs={vocab: 256, seq_len: 256, layers: 2, width: 64, "
                 "heads: 4}", "--set", "train.batch_size=2"]
    flags = ["--memory", "64MiB", "--tflops", "400", "--link-gbps", "50", "--time-batch", "0", *overrides]
    config = tmp_path / "job.yaml"
    config.write_text("name: batches\n")
    assert plan_main([str(config), *flags, "--batch", "max"]) == 0
    out = capsys.readouterr().out
    largest = int(out.split("largest batch that fits:")[1].split("planned ")[1].split()[0])
    assert f"batch {largest}, memory target 64.0 MiB" in out.splitlines()[0]
    assert plan_main([str(config), *flags, "--batch", str(largest)]) == 0
    capsys.readouterr()
    assert plan_main([str(config), *flags, "--batch", str(largest + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmsrun: error: --memory: batches at batch") and f"largest batch that fits: {largest}" in err
    assert len(err.splitlines()) == 1
