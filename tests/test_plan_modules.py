"""Per-module recompute in the swap planner (SuperNeurons' choice per module) against the real engine:
the chosen plan's predicted saved peak is the engine's measured accounting, it is never slower than the
best per-kind variant at the same target, training with it is bit-exact to no recompute, and a target
only per-module recompute can meet is met."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from lmsdp.launcher.config import load_config
from lmsdp.launcher.tools.plan import main as plan_main
from lmsdp.launcher.tools.plan import plan_config, workload_from_config
from lmsdp.launcher.train.trainer import run_worker
from lmsdp.runtime.topology import detect_topology
from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.plan_models import Settings, predict
from lmsdp.swapping.planner import PER_MODULE, plan_swaps, policy_for
from lmsdp.swapping.recompute import apply_recompute, split_spec
from tests.test_plan import GPT_DROPOUT, _final_state, _write_config, config_for

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")
LINK = 5e9
TFLOPS = 0.05  # about what one core of this machine reaches
CPU = torch.device("cpu")


def _plan(tmp_path, name: str, threshold: int, frac: float):
    """The plan at ``frac`` of the way from swap-only's smallest peak to the no-swap peak."""
    config = config_for(tmp_path, name, f"swap.threshold={threshold}", "train.batch_size=4")
    # a fixed compute rate (not one measured on a loaded machine) keeps the chosen plan the same every run
    loose = plan_config(config, 1 << 40, 4, LINK, CPU, 0, TFLOPS)
    base = loose.profiles["none"]
    everything = Settings(threshold, 1, swap=list(range(len(base.candidates(threshold)))))
    low = predict(base, everything, LINK).peak_device_bytes
    high = predict(base, Settings(threshold, 0, enabled=False), LINK).peak_device_bytes
    return config, plan_config(config, int(low + frac * (high - low)), 4, LINK, CPU, 0, TFLOPS)


def _measured_saved_peak(workload, spec, settings: Settings, profile) -> int:
    torch.manual_seed(0)
    model = workload.build_model()
    if spec:
        apply_recompute(model, spec)
    engine = SwapEngine(SwapConfig(enabled=True, transport="loopback", threshold=settings.threshold), "cpu",
                        policy=policy_for(settings, profile))
    try:
        for _ in range(2):
            inputs, targets = workload.make_batch(4)
            with engine:
                loss = workload.loss(model(inputs), targets)
            loss.backward()
            stats = engine.step_end()
        return stats["peak_saved_bytes"]
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["resnet18", "gpt"])
@pytest.mark.parametrize("frac", [0.3, 0.7])
def test_per_module_plan_predicts_the_measured_peak_and_beats_per_kind(tmp_path, name, frac):
    torch.set_num_threads(1)
    config, result = _plan(tmp_path, name, 1024, frac)
    row = next(s for s in result.strategies if s.name == PER_MODULE)
    prof = result.profiles[row.recompute and ",".join(row.recompute) or "none"]
    # never slower than any per-kind variant's own best plan at this target
    for key, variant in result.profiles.items():
        if key in ("none", "auto", "activation,norm,pool,dropout"):
            _settings, pred = plan_swaps(variant, result.target, LINK, 1024)
            if pred.peak_device_bytes <= result.target:
                assert row.fits and row.prediction.step_s <= pred.step_s + 1e-12, (key, row.prediction, pred)
    got = _measured_saved_peak(workload_from_config(config), row.recompute, row.settings, prof)
    want = row.prediction.peak_saved_bytes
    assert abs(got - want) <= 0.05 * want, (row.recompute, got, want)


def test_a_target_only_per_module_recompute_meets_is_met(tmp_path):
    """Saved tensors under the threshold cannot be swapped; recomputing whole modules frees them."""
    torch.set_num_threads(1)
    config, result = _plan(tmp_path, "gpt", 16384, -0.5)  # below what swapping alone reaches
    rows = {s.name: s for s in result.strategies}
    row = rows[PER_MODULE]
    others = [s for n, s in rows.items() if n not in (PER_MODULE, "planned")]
    target = (row.prediction.peak_device_bytes + min(s.prediction.peak_device_bytes for s in others)) // 2
    assert row.prediction.peak_device_bytes < target
    met = plan_config(config, target, 4, LINK, CPU, 0)
    assert met.chosen is not None and met.chosen.recompute
    kinds, modules = split_spec(met.chosen.recompute)
    assert modules and not kinds
    assert not any(s.fits for s in met.strategies if s.name not in (PER_MODULE, "planned"))
    got = _measured_saved_peak(workload_from_config(config), met.chosen.recompute, met.chosen.settings, met.profile)
    assert abs(got - met.chosen.prediction.peak_saved_bytes) <= 0.05 * met.chosen.prediction.peak_saved_bytes


def test_per_module_plan_file_trains_bit_exact_vs_no_recompute(tmp_path, capsys):
    """GPT with dropout: recomputed modules replay their dropout masks; the plan file names modules."""
    config = _write_config(tmp_path, GPT_DROPOUT)
    plan_file = tmp_path / "plan.yaml"
    assert plan_main([config, "--memory", "1GiB", "--link-gbps", "8", "--time-batch", "0",
                      "--set", "swap.threshold=64KiB", "--write", str(plan_file)]) == 0
    assert PER_MODULE in capsys.readouterr().out
    doc = yaml.safe_load(plan_file.read_text())
    # this target needs no recompute; run the per-module search's choice for a tight one instead
    _c, tight = _plan(tmp_path, "gpt", 16384, -0.5)  # below what swapping alone reaches
    spec = next(s for s in tight.strategies if s.name == PER_MODULE).recompute
    modules = split_spec(spec)[1]
    assert modules
    doc["swap"]["recompute"] = doc["plan"]["swap"]["recompute"] = spec
    plan_file.write_text(yaml.safe_dump(doc))
    off = load_config(config, ["swap.enabled=false", f"train.output_dir={tmp_path}/off"])
    on = load_config(config, [f"swap.plan={plan_file}", f"train.output_dir={tmp_path}/on"])
    assert run_worker(off, detect_topology()) == 0 and run_worker(on, detect_topology()) == 0
    a, b = _final_state(f"{tmp_path}/off"), _final_state(f"{tmp_path}/on")
    # wrapped modules gain a 'body' level in their names; values, in order, are what must not change
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a.values(), b.values()))
    records = [json.loads(line) for line in open(tmp_path / "on" / "metrics.rank0.jsonl")]
    assert all(r["recomputed_modules"] >= len(modules) for r in records)  # the named modules did run again


@pytest.mark.parametrize("spec", [["blocks.0"], ["blocks.0", "blocks.1"], ["blocks.1.mlp"], ["module:ln_f"],
                                  ["module:head"], ["blocks.0.mlp.3"]])
def test_named_module_recompute_predicts_the_measured_peak(tmp_path, spec):
    """Every saved tensor swapped with these modules recomputed: the model's saved peak is the engine's.
    (The plans chosen above depend on the machine's rates and may recompute nothing; this pins the
    recompute accounting itself.)"""
    from lmsdp.swapping.profile import optimizer_state_bytes, profile_workload

    torch.set_num_threads(1)
    workload = workload_from_config(config_for(tmp_path, "gpt", "swap.threshold=1024", "train.batch_size=4"))
    profile = profile_workload(workload, 4, spec, CPU, 0, optimizer_state_bytes(workload))
    settings = Settings(1024, 1, swap=list(range(len(profile.candidates(1024)))))
    want = predict(profile, settings, LINK).peak_saved_bytes
    got = _measured_saved_peak(workload, spec, settings, profile)
    assert abs(got - want) <= 0.05 * want, (spec, got, want)
