"""Config mode's data, schedules and validation (issue 22): batches as a pure function of (seed,
step, rank) through DataLoader workers, so a mid-epoch resume with workers is bit-exact; token files,
image folders and factories; the LR schedule's formula; validation against a hand computation; bad
data as one line naming the file. Single-rank runs train in this process (run_worker), with real
DataLoader worker processes."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from lmsdp.launcher.cli import main
from lmsdp.launcher.config import load_config
from lmsdp.launcher.config.errors import ConfigError, UserError
from lmsdp.launcher.train.checkpoint import CheckpointManager
from lmsdp.launcher.train.data import make_batches
from lmsdp.launcher.train.schedule import lr_at
from lmsdp.launcher.train.trainer import run_worker
from lmsdp.runtime.topology import detect_topology
from tests.support import SCRIPTS

GPT = "model.kwargs={vocab: 64, seq_len: 16, layers: 1, width: 16, heads: 2}"


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)


def write_tokens(path, count: int, vocab: int = 64, dtype=np.uint16) -> str:
    np.random.default_rng(5).integers(0, vocab, count).astype(dtype).tofile(path)
    return str(path)


def write_images(folder, classes: int = 2, per_class: int = 12, size: int = 10) -> str:
    from PIL import Image

    rng = np.random.default_rng(7)
    for c in range(classes):
        os.makedirs(folder / f"class{c}", exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = 200 + c  # a class a model can see
            Image.fromarray(pixels).save(folder / f"class{c}" / f"img{i:03d}.png")
    return str(folder)


def config_for(tmp_path, kind: str, *extra: str):
    os.makedirs(tmp_path, exist_ok=True)
    base = ["train.batch_size=4", "train.progress=false", "comm.backend=torch", "launch.threads=1",
            f"train.output_dir={tmp_path}/out", "train.seed=3"]
    if kind == "tokens":
        base += ["model.name=gpt", GPT, "data.kind=tokens", f"data.path={write_tokens(tmp_path / 't.bin', 4000)}",
                 "data.samples=20"]
    elif kind == "image_folder":
        base += ["model.factory=failing_model:make", "model.kwargs={fail: none, classes: 2}", "data.kind=image_folder",
                 f"data.path={write_images(tmp_path / 'img')}", "data.shape=[3, 8, 8]", "data.task=classify"]
    elif kind == "factory":
        base += ["model.name=gpt", GPT, "data.kind=factory", "data.factory=token_data:tokens",
                 "data.kwargs={samples: 20, vocab: 64, seq_len: 16}"]
    return load_config(None, base + list(extra))


def losses(out: str):
    with open(os.path.join(out, "metrics.rank0.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def final_weights(out: str):
    _path, state = CheckpointManager(os.path.join(out, "checkpoints")).load_latest()
    return state["model"]


# ------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedule_is_the_formula(schedule):
    opt = load_config(None, [f"optimizer.schedule={schedule}", "optimizer.lr=0.4", "optimizer.min_lr=0.1",
                             "optimizer.warmup_steps=4"]).optimizer
    total = 24
    for step in range(1, total + 1):
        if step <= 4:
            want = 0.4 * step / 4
        else:
            p = (step - 4) / (total - 4)
            want = {"constant": 0.4, "cosine": 0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi * p)),
                    "linear": 0.4 - 0.3 * p}[schedule]
        assert lr_at(step, total, opt) == pytest.approx(want, abs=1e-12), step
    assert lr_at(total, total, opt) == pytest.approx(0.4 if schedule == "constant" else 0.1)


def test_schedule_lr_is_in_the_metrics(tmp_path):
    config = config_for(tmp_path, "tokens", "train.steps=6", "optimizer.lr=0.01", "optimizer.schedule=linear",
                        "optimizer.warmup_steps=2")
    assert run_worker(config, detect_topology()) == 0
    assert [r["lr"] for r in losses(config.output_dir)] == pytest.approx(
        [lr_at(s, 6, config.optimizer) for s in range(1, 7)])


# ------------------------------------------------------------------------------------------ sampling
def test_two_ranks_read_the_global_batch_one_rank_reads():
    config = load_config(None, ["data.samples=64", "train.batch_size=4", "data.shape=[3, 4, 4]"])
    one = make_batches(load_config(None, ["data.samples=64", "train.batch_size=8", "data.shape=[3, 4, 4]"]), 0, 1)[0]
    two = [make_batches(config, rank, 2)[0] for rank in (0, 1)]
    for step in range(12):  # across the epoch boundary (8 steps per epoch)
        assert one.indices(step) == two[0].indices(step) + two[1].indices(step)


def test_workers_give_the_same_batches_as_in_process(tmp_path):
    config = config_for(tmp_path, "image_folder")
    inline = make_batches(config, 0, 1)[0]
    workers = make_batches(config, 0, 1, workers=2)[0]
    for (a, b), (c, d) in zip(workers.iterate(2, 9), (inline.batch(s) for s in range(2, 9))):
        assert torch.equal(a, c) and torch.equal(b, d)


# ------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("kind", ["tokens", "image_folder", "factory"])
def test_mid_epoch_resume_with_workers_is_bit_exact(tmp_path, kind):
    # warm-up only: a decaying schedule depends on train.steps, which the cut run sets lower
    common = ["data.workers=2", "train.checkpoint_every=3", "optimizer.warmup_steps=5",
              "train.deterministic=true"]
    whole = config_for(tmp_path / "whole", kind, "train.steps=7", *common)
    assert run_worker(whole, detect_topology()) == 0
    part = config_for(tmp_path / "cut", kind, "train.steps=3", *common)
    assert run_worker(part, detect_topology()) == 0
    rest = config_for(tmp_path / "cut", kind, "train.steps=7", "train.resume=true", *common)
    assert run_worker(rest, detect_topology()) == 0
    a, b = losses(whole.output_dir), losses(rest.output_dir)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["lr"] for r in a] == [r["lr"] for r in b]
    wa, wb = final_weights(whole.output_dir), final_weights(rest.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(a) == 7 and steps_per_epoch_under(whole) < 7  # the run crossed an epoch boundary


def steps_per_epoch_under(config) -> int:
    return make_batches(config, 0, 1)[1]


# -------------------------------------------------------------------------------------- validation
def test_eval_equals_a_hand_computation(tmp_path):
    config = config_for(tmp_path, "tokens", "train.steps=4", "eval.every=4", "eval.steps=3", "data.val_fraction=0.2")
    assert run_worker(config, detect_topology()) == 0
    record = losses(config.output_dir)[-1]
    from lmsdp.launcher.train.build import build_network

    model = build_network(config)
    model.load_state_dict(final_weights(config.output_dir))
    model.eval()
    val = make_batches(config, 0, 1, split="val")[0]
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for step in range(3):
            inputs, targets = val.batch(step)
            out = model(inputs)
            total += float(torch.nn.functional.cross_entropy(out.float().flatten(0, 1), targets.flatten()))
            correct += int((out.argmax(-1) == targets).sum())
            count += targets.numel()
    assert record["eval_loss"] == pytest.approx(total / 3, rel=1e-5)
    assert record["eval_accuracy"] == pytest.approx(correct / count)
    assert record["eval_perplexity"] == pytest.approx(math.exp(total / 3), rel=1e-5)
    summary = json.load(open(os.path.join(config.output_dir, "summary.json")))
    assert summary["final_eval_loss"] == pytest.approx(record["eval_loss"])


def test_validation_split_does_not_overlap_training(tmp_path):
    config = config_for(tmp_path, "tokens", "data.val_fraction=0.25")
    train, val = make_batches(config, 0, 1)[0].dataset, make_batches(config, 0, 1, split="val")[0].dataset
    assert train.end == val.start == 3000 and val.end == 4000


def test_synthetic_targets_are_learnable(tmp_path):
    config = load_config(None, ["model.name=gpt", GPT, "train.steps=40", "train.batch_size=8", "optimizer.name=adam",
                                "optimizer.lr=0.01", "train.progress=false", "comm.backend=torch", "launch.threads=1",
                                f"train.output_dir={tmp_path}/out", "eval.every=40"])
    assert run_worker(config, detect_topology()) == 0
    records = losses(config.output_dir)
    assert records[-1]["loss"] < 0.3 * records[0]["loss"] and records[-1]["eval_accuracy"] > 0.5


# ---------------------------------------------------------------------------------------- bad data
def test_token_tool_writes_bytes_as_uint16(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_bytes(b"print(1)\n")
    (tmp_path / "a" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b.txt").write_bytes(b"\xff\x00z")
    out = tmp_path / "t.bin"
    assert main(["data", "tokens", str(tmp_path / "a"), str(tmp_path / "b.txt"), "--out", str(out)]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == list(b"print(1)\n") + [255, 0, ord("z")]
    assert main(["data", "tokens", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lmsrun: error: PATH: not found")


@pytest.mark.parametrize("case, words", [
    ("missing", "data.path: not found"),
    ("wrong_dtype", "not a whole number of uint32 tokens"),
    ("short", "fewer than one sequence"),
    ("empty_class", "holds no images"),
    ("val_without_kind", "data.val_path: only for data.kind tokens or image_folder"),
])
def test_bad_data_is_one_line_naming_the_file(tmp_path, case, words):
    overrides = {
        "missing": ["model.name=gpt", GPT, "data.kind=tokens", f"data.path={tmp_path}/none.bin"],
        "wrong_dtype": ["model.name=gpt", GPT, "data.kind=tokens", "data.dtype=uint32",
                        f"data.path={write_tokens(tmp_path / 'odd.bin', 301)}"],
        "short": ["model.name=gpt", GPT, "data.kind=tokens", f"data.path={write_tokens(tmp_path / 's.bin', 10)}"],
        "empty_class": ["model.factory=failing_model:make", "model.kwargs={fail: none}", "data.kind=image_folder",
                        f"data.path={tmp_path}/img", "data.shape=[3, 8, 8]"],
        "val_without_kind": [f"data.val_path={tmp_path}"],
    }[case]
    if case == "empty_class":
        write_images(tmp_path / "img")
        (tmp_path / "img" / "class9").mkdir()
    with pytest.raises(ConfigError) as info:
        config = load_config(None, overrides + [f"train.output_dir={tmp_path}/out"])
        make_batches(config, 0, 1)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_corrupt_image_names_the_file(tmp_path):
    config = config_for(tmp_path, "image_folder")
    bad = tmp_path / "img" / "class1" / "img000.png"
    bad.write_bytes(b"not a png")
    batches = make_batches(config, 0, 1)[0]
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        for step in range(batches.steps_per_epoch):
            batches.batch(step)
    with pytest.raises(UserError) as info:  # from a loader worker: the same one line, no worker traceback
        list(make_batches(config, 0, 1, workers=2)[0].iterate(0, batches.steps_per_epoch))
    assert str(info.value).startswith(f"data.path: cannot read image {bad}") and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ accumulation
ACCUMULATE_CASES = {
    "replicate-horovod": ["comm.backend=horovod"],
    "replicate-torch": ["comm.backend=torch"],
    "shard-torch": ["comm.backend=torch", "comm.strategy=shard"],
}


@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.parametrize("case", sorted(ACCUMULATE_CASES))
def test_accumulate_4_of_batch_4_equals_batch_16(tmp_path, case):
    """Two ranks: four micro-batches of 4 give the gradient of one batch of 16 (the same samples), so
    the loss after the first update agrees; swapping on."""
    import shutil

    from tests.support import Run, metric_lines

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    if case.endswith("horovod"):
        pytest.importorskip("horovod.torch")
    config = tmp_path / "acc.yaml"
    config.write_text("name: acc\nmodel: {name: gpt, kwargs: {vocab: 64, seq_len: 16, layers: 1, width: 16, heads: 2}}\n")
    common = [str(config), "-np", "2", "--set", "train.steps=2",
              "--set", "optimizer.lr=0.5", "--set", "train.progress=false", "--set", "swap.enabled=true",
              "--set", "swap.threshold=0", "--set", "launch.threads=1"]
    for item in ACCUMULATE_CASES[case]:
        common += ["--set", item]
    second = []
    for batch, k in ((16, 1), (4, 4)):
        out = tmp_path / f"b{batch}"
        run = Run(*common, "--set", f"train.batch_size={batch}", "--set", f"train.accumulate={k}",
                  "--output-dir", str(out))
        assert run.wait() == 0, run.text()
        records = metric_lines(str(out / "metrics.rank0.jsonl"))
        second.append(records[1]["loss"])
    assert second[0] == pytest.approx(second[1], rel=1e-5, abs=1e-6), case
