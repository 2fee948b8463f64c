"""The layout planner (issue 23: Tofu's partitioning, workload-aware parallelization): one rank's step
under a {dp, tp} layout (TP's division of saved activations and parameters, DP's of sharded state),
``lmsrun plan -np N``'s layout table and pick on a tiny GPT, its one-line errors, and ``comm.mesh:
auto`` resolved at job start in one real multi-rank run."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lmsdp.comm.collective_rates import fit
from lmsdp.comm.tensor_parallel import plan_tensor_parallel
from lmsdp.launcher.cli import main
from lmsdp.launcher.config import load_config
from lmsdp.launcher.models.gpt import GPT
from lmsdp.launcher.tools.plan import main as plan_main
from lmsdp.launcher.train.job_plan import plan_config, workload_from_config
from lmsdp.launcher.train.layout_facts import model_facts
from lmsdp.swapping.layout import CommRates, Layout, choose, rank_state
from lmsdp.swapping.layout_profile import RankState, layout_profile
from lmsdp.swapping.profile import profile_workload

LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
KWARGS = {"vocab": 64, "seq_len": 16, "layers": 2, "width": 32, "heads": 4}
RATES = CommRates(20e-6, 1e9)


def _config_file(tmp_path, **comm) -> str:
    raw = {"name": "layout_test", "model": {"name": "gpt", "kwargs": KWARGS},
           "optimizer": {"name": "adam", "lr": 0.001},
           "train": {"steps": 2, "batch_size": 4, "progress": False, "output_dir": str(tmp_path / "out")},
           "swap": {"threshold": 0, "transport": "loopback"},
           "comm": {"backend": "torch", **comm}, "launch": {"np": 4, "threads": 1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """The tiny GPT's sizes-only profile at batch 4 and its layout facts for 4 ranks."""
    config = load_config(_config_file(tmp_path_factory.mktemp("gpt")))
    workload = workload_from_config(config)
    profile = profile_workload(workload, 4, time_batch=0, flops_rate=1e9)
    return config, profile, model_facts(config, workload, 4, 4)


def test_tp_divides_split_activations_and_parameters_as_the_tp_plan_does(gpt):
    config, profile, facts = gpt
    assert set(facts.splits) == {1, 2, 4}
    split = facts.splits[2]
    ranked = layout_profile(profile, split, RankState(0, 0, 0))
    by_module = {}
    for before, after in zip(profile.tensors, ranked.tensors):
        by_module.setdefault(before.module, []).append((before.nbytes, after.nbytes))
    # attention's own saved tensors (q, k, v, output: this rank's heads) and the row-parallel inputs halve;
    # the column-parallel layers' input (the whole activation every rank needs) and the norms stay whole
    for module in ("blocks.0.attn", "blocks.0.attn.proj", "blocks.0.mlp.1", "blocks.0.mlp.2"):
        assert by_module[module] and all(a == -(-b // 2) for b, a in by_module[module]), module
    for module in ("blocks.0.attn.q", "blocks.0.mlp.0", "blocks.0.ln1", "ln_f"):
        assert by_module[module] and all(a == b for b, a in by_module[module]), module
    # the split part of the compute runs at half the time, the rest unchanged
    assert ranked.forward_s + ranked.backward_s < profile.forward_s + profile.backward_s
    # per-rank parameters: the TP plan's own arithmetic; shard divides the state by dp on top
    plan = plan_tensor_parallel(GPT(**KWARGS), tp=2)
    held = rank_state(profile, Layout(2, 2, "replicate"), split, facts)
    assert held.param_bytes == plan.param_bytes_per_rank(2)
    sharded = rank_state(profile, Layout(2, 2, "shard"), split, facts, gathered=False)
    assert sharded.param_bytes == held.param_bytes // 2 and sharded.optimizer_bytes == held.optimizer_bytes // 2


def test_tp_divides_the_split_share_of_compute_by_forward_flops(tmp_path):
    """The step's compute at tp T is (1 - f) + f / T of one rank's, f the split modules' share of forward
    FLOPs, whatever events the timeline has: with every block recomputed (its tensors gone, nothing to
    attribute compute to) and with the LM head left whole, as a vocabulary tp does not divide leaves it."""
    from lmsdp.swapping.layout_profile import split_flops_fraction

    config = load_config(_config_file(tmp_path), ["model.kwargs.vocab=65"])  # 2 does not divide: head whole
    workload = workload_from_config(config)
    facts = model_facts(config, workload, 4, 4)
    plain = profile_workload(workload, 4, time_batch=0, flops_rate=1e9)
    recomputed = profile_workload(workload, 4, ["blocks.0", "blocks.1"], time_batch=0, flops_rate=1e9)
    for prof in (plain, recomputed):
        split = facts.splits[2]
        f = split_flops_fraction(prof, split)
        assert 0.3 < f < 0.95, f  # the LM head's matmul runs whole on every tp rank
        ranked = layout_profile(prof, split, RankState(0, 0, 0))
        ratio = (ranked.forward_s + ranked.backward_s) / (prof.forward_s + prof.backward_s)
        assert ratio == pytest.approx(1 - f / 2, rel=1e-6), (prof.recompute, ratio, f)


def test_tflops_plans_for_one_device_per_rank_not_this_machines_cores(tmp_path, capsys):
    """--tflops: each rank will own a GPU, so the layouts' compute is not slowed by ranks sharing this
    machine's cores (8 ranks on 2 cores made every layout's compute 4x)."""
    config = _config_file(tmp_path)
    flags = ["--memory", "1GiB", "--tflops", "0.0005", "--link-gbps", "8", "--net-gbps", "10", "-np", "4"]
    assert plan_main([config, *flags]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dp 4 x tp 1 replicate")]
    assert rows and "compute" in rows[0]
    base = load_config(config)
    prof = profile_workload(workload_from_config(base), 4, time_batch=0, flops_rate=0.0005e12)
    compute_ms = float(rows[0].split("(compute ")[1].split(" ms")[0])
    assert compute_ms == pytest.approx((prof.forward_s + prof.backward_s) * 1e3, rel=0.02)


def test_swap_plan_auto_under_tp_plans_one_ranks_local_shards(gpt):
    """``swap.plan: auto`` with tp 2 plans the rank's step (the division above, tensor for tensor what the
    swap engine packs per rank: tests/test_tensor_parallel.py), not the whole model's."""
    config, profile, facts = gpt
    meshed = dataclasses.replace(config, comm=dataclasses.replace(config.comm, mesh={"dp": 2, "tp": 2}))
    result = plan_config(meshed, 1 << 40, 4, 5e9, torch.device("cpu"), time_batch=1, world=4)
    planned = result.profiles["none"]
    split = facts.splits[2]
    ranked = layout_profile(profile, split, rank_state(profile, Layout(2, 2, "replicate"), split, facts))
    assert [t.nbytes for t in planned.tensors] == [t.nbytes for t in ranked.tensors]
    assert sum(t.nbytes for t in planned.tensors) < sum(t.nbytes for t in profile.tensors)
    assert planned.param_bytes == ranked.param_bytes < profile.param_bytes


def test_the_pick_is_the_fastest_layout_that_fits(gpt):
    _config, profile, facts = gpt
    profiles = {"none": profile}
    free = choose(profiles, 4, facts, 1 << 40, 5e9, 0, RATES)
    assert [(e.layout.dp, e.layout.tp, e.layout.strategy) for e in free.estimates] == [
        (4, 1, "replicate"), (4, 1, "shard"), (2, 2, "replicate"), (2, 2, "shard"), (1, 4, "replicate")]
    assert [(lay.dp, lay.tp, why) for lay, why in free.refused] == [(1, 4, "shard needs dp >= 2")]
    peaks = {(e.layout.dp, e.layout.tp, e.layout.strategy): e.peak_bytes for e in free.estimates}
    assert peaks[(1, 4, "replicate")] < peaks[(2, 2, "replicate")] < peaks[(4, 1, "replicate")]
    assert peaks[(4, 1, "shard")] < peaks[(4, 1, "replicate")]
    assert free.chosen is max(free.estimates, key=lambda e: e.samples_per_s)
    assert free.chosen.why.startswith("picked") and all(e.why.startswith("fits") for e in free.estimates
                                                        if e is not free.chosen)
    # a target only the smallest peak meets without swapping: others may still fit by swapping (the swap
    # plan of each rank's step); those that cannot are out, and the pick is the fastest of the rest
    target = peaks[(1, 4, "replicate")] + 1
    tight = choose(profiles, 4, facts, target, 5e9, 0, RATES)
    fitting = [e for e in tight.estimates if e.fits]
    assert all(e.peak_bytes <= target for e in fitting) and len(fitting) < len(tight.estimates)
    assert tight.chosen is max(fitting, key=lambda e: e.samples_per_s)
    assert any(e.swap_exposed_s >= 0 and e.swap.chosen.prediction.swapped for e in fitting)
    assert all(e.why.startswith("does not fit: lowest peak") for e in tight.estimates if not e.fits)


def test_a_tp_the_model_cannot_split_is_listed_with_why(gpt):
    config, profile, _facts = gpt
    facts = model_facts(config, workload_from_config(config), 4, 6)
    assert set(facts.splits) == {1, 2} and set(facts.refused) == {3, 6}
    choice = choose({"none": profile}, 6, facts, 1 << 40, 5e9, 0, RATES)
    refused = {(lay.dp, lay.tp, lay.strategy): why for lay, why in choice.refused}
    assert refused[(2, 3, "replicate")] == refused[(2, 3, "shard")]
    assert refused[(2, 3, "replicate")].startswith("3 does not divide the gpt's 4 attention heads")
    assert {(e.layout.dp, e.layout.tp) for e in choice.estimates} == {(6, 1), (3, 2)}


def test_collective_rates_fit_recovers_the_ring_model():
    true = CommRates(30e-6, 2e9, ops=(("reduce_scatter", 50e-6, 0.5e9),))
    for op, lat, bw in (("allreduce", 30e-6, 2e9), ("allgather", 30e-6, 2e9), ("reduce_scatter", 50e-6, 0.5e9)):
        times = {n: true.cost(op, n, 4) for n in (4096, 4 << 20)}
        latency, bandwidth = fit(4, times, op)
        assert latency == pytest.approx(lat, rel=1e-6) and bandwidth == pytest.approx(bw, rel=1e-6)


def test_lmsrun_plan_prints_the_layout_table_and_the_pick(tmp_path, capsys):
    config = _config_file(tmp_path)
    flags = ["--memory", "64MiB", "--tflops", "0.01", "--net-gbps", "1", "--net-latency-us", "20", "-np", "4"]
    assert plan_main([config, *flags]) == 0
    out = capsys.readouterr().out
    table = out.split("\nlayout ")[1]
    for name in ("dp 4 x tp 1 replicate", "dp 4 x tp 1 shard", "dp 2 x tp 2 replicate", "dp 2 x tp 2 shard",
                 "dp 1 x tp 4 replicate"):
        assert name in table
    assert "dp 1 x tp 4 shard" in table and "not a layout: shard needs dp >= 2" in table
    rows = [line for line in table.splitlines() if line.startswith("dp ") and " yes " in line]
    best = max(rows, key=lambda line: float(line.split("ms")[1].split()[0]))
    pick = out.split("\nlayout: comm.mesh=")[1].splitlines()[0]
    dp, tp = best.split()[1], best.split()[4]
    assert pick.startswith(f"{{dp: {dp}, tp: {tp}}} comm.strategy={best.split()[5]} (picked")
    assert "collectives at 1.00 GB/s and 20 us per hop, --net-gbps" in out


@pytest.mark.parametrize("flags, words", [
    (["-np", "4", "--set", "comm.mesh={dp: 3, tp: 2}"],
     "comm.mesh: dp x tp = 3 x 2 = 6 but the job has 4 rank(s); allowed: {dp: 4, tp: 1}, {dp: 2, tp: 2}, {dp: 1, tp: 4}"),
    (["-np", "3", "--set", "comm.mesh={dp: 1, tp: 3}"], "comm.mesh.tp: 3 does not divide the gpt's 4 attention heads"),
    (["-np", "2", "--memory", "64KiB"], "--memory: layout_test at batch 4 fits no layout of 2 ranks: the lowest peak is "),
    (["-np", "2", "--net-latency-us", "5"], "--net-latency-us: give it with --net-gbps"),
])
def test_layout_errors_are_one_line(tmp_path, capsys, flags, words):
    config = _config_file(tmp_path)
    base = ["--memory", "64MiB", "--tflops", "0.01"] + ([] if "--net-latency-us" in flags else ["--net-gbps", "1"])
    code = main(["plan", config, *base, *flags])  # through lmsrun's one error boundary
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lmsrun: error: ") and words in err[0], err


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_comm_mesh_auto_is_resolved_at_job_start_on_every_rank(tmp_path):
    """Two real ranks: rank 0 profiles and picks, both train under that pick, the run's config says which."""
    config = _config_file(tmp_path, mesh="auto")
    proc = subprocess.run([LMSRUN, config, "-np", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "[lmsdp] layout: comm.mesh=" in x]
    assert len(lines) == 1, proc.stdout + proc.stderr  # rank 0 says it once
    line = lines[0][lines[0].index("[lmsdp] layout"):]
    saved = json.loads((out / "config.json").read_text())["comm"]
    assert line.startswith(f"[lmsdp] layout: comm.mesh={{dp: {saved['mesh']['dp']}, tp: {saved['mesh']['tp']}}} "
                           f"comm.strategy={saved['strategy']} (picked: the most samples/s that fits")
    assert saved["mesh"]["dp"] * saved["mesh"]["tp"] == 2
    for rank in (0, 1):
        records = [json.loads(x) for x in (out / f"metrics.rank{rank}.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
