"""lmsdp.comm in one process: timing arithmetic, trace files, and both backends as a world of one
(the path a rank takes when not launched by mpirun/horovodrun/torchrun). Real torch.distributed and
real Horovod; each backend runs in a subprocess so process-global state (process group, hvd.init,
MPI) cannot leak between tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmsdp.comm import STAT_KEYS, CommConfig, CommError, get_backend, horovod_available
from lmsdp.comm.timing import StepTimer, _union_ms
from lmsdp.runtime.chrome_trace import ChromeTrace, load_trace, merge_traces, rank_path



def test_union_of_spans_counts_overlap_once() -> None:
    # [0,2] and [1,3] overlap -> 3 ms; [5,6] separate -> +1; clipped at 2.5 -> 2.5
    spans = [(0.0, 2000.0), (1000.0, 3000.0), (5000.0, 6000.0)]
    assert _union_ms(spans) == pytest.approx(4.0)
    assert _union_ms(spans, limit=2500.0) == pytest.approx(2.5)
    assert _union_ms([]) == 0.0


def test_step_timer_hidden_fraction_is_the_part_before_backward_end() -> None:
    t = StepTimer()
    t.started("a", 100, t=0.0)
    t.started("b", 100, t=1000.0)
    t._bwd_ends.append(2000.0)  # backward ends at 2 ms
    t.finished("a", t=1500.0)
    t.finished("b", t=4000.0)
    t.waited(2000.0, 4000.0)
    s = t.collect()
    assert set(STAT_KEYS) <= set(s)
    assert s["allreduce_ms"] == pytest.approx(4.0)
    assert s["allreduce_hidden_frac"] == pytest.approx(0.5)  # 2 of 4 ms before backward ended
    assert s["comm_wait_ms"] == pytest.approx(2.0)
    assert s["allreduce_count"] == 2 and s["allreduce_bytes"] == 200
    json.dumps(s)
    assert t.collect()["allreduce_count"] == 0  # reset after each call


def test_trace_unclosed_array_is_readable_and_mergeable(tmp_path: Path) -> None:
    tr = ChromeTrace(str(tmp_path / "a.json"), rank=1, lanes={100: "allreduce (torch)", 101: "comm wait in step()"})
    tr.span("allreduce", 100, 10.0, 20.0, bytes=4)
    tr.flush()  # not closed: a rank that died mid-run
    events = load_trace(str(tmp_path / "a.json"))
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and spans[0]["pid"] == 1 and spans[0]["dur"] == pytest.approx(10.0)
    tr.close()
    (tmp_path / "swap.json").write_text(json.dumps({"traceEvents": [
        {"name": "swap-in", "ph": "X", "pid": 1, "tid": 2, "ts": 12.0, "dur": 3.0}]}))
    n = merge_traces([str(tmp_path / "a.json"), str(tmp_path / "swap.json")], str(tmp_path / "m.json"))
    assert n == len(events) + 1
    assert rank_path("t/{rank}.json", 3, 4) == "t/3.json"
    assert rank_path("t/x.json", 1, 2) == "t/x.rank1.json" and rank_path("t/x.json", 0, 2) == "t/x.json"


def test_bad_backend_name_and_unsupported_op() -> None:
    with pytest.raises(ValueError, match="comm backend"):
        get_backend("nccl")
    from lmsdp.comm.torch_backend import TorchBackend
    with pytest.raises(ValueError, match="adasum"):
        TorchBackend(CommConfig(backend="torch", op="adasum"))
    assert issubclass(CommError, RuntimeError)


SINGLE = textwrap.dedent("""
    import json, sys, torch
    from lmsdp.comm import CommConfig, get_backend
    b = get_backend(CommConfig(backend=sys.argv[1], timeline=sys.argv[3]))
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref.load_state_dict(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    b.broadcast_state(m, opt)
    opt = b.wrap_optimizer(opt, m)
    stats = []
    for i in range(3):
        x = torch.randn(5, 4)
        for model, o in ((m, opt), (ref, ropt)):
            o.zero_grad(); model(x).pow(2).mean().backward(); o.step()
        stats.append(b.step_stats())
    diff = max((p - q).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
    out = dict(name=b.name, rank=b.rank, size=b.size, local_rank=b.local_rank,
               local_size=b.local_size, diff=diff, stats=stats,
               mean=b.allreduce(torch.tensor([3.0])).item(), gathered=b.allgather_object({"a": 1}),
               state_keys=sorted(opt.state_dict()), groups=len(opt.param_groups), trace=b.trace_path)
    b.barrier(); b.shutdown(); b.shutdown()
    json.dump(out, open(sys.argv[2], "w"))
""")


def _single(backend: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI", "HOROVOD_")) and k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", SINGLE, backend, str(out), str(tmp_path / "tl.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    res["stderr"] = proc.stderr
    return res


@pytest.mark.integration
def test_torch_backend_single_process(tmp_path: Path) -> None:
    r = _single("torch", tmp_path)
    assert (r["name"], r["rank"], r["size"], r["local_rank"], r["local_size"]) == ("torch", 0, 1, 0, 1)
    assert r["diff"] == 0.0  # average over one rank is the gradient itself
    assert r["mean"] == 3.0 and r["gathered"] == [{"a": 1}]
    assert r["state_keys"] == ["param_groups", "state"] and r["groups"] == 1
    for s in r["stats"]:
        assert set(STAT_KEYS) <= set(s)
        assert s["allreduce_count"] >= 1 and s["allreduce_ms"] > 0  # the reducer runs at size 1 too
        assert 0.0 <= s["allreduce_hidden_frac"] <= 1.0
    spans = [e for e in load_trace(r["trace"]) if e["ph"] == "X" and e["tid"] == 100]
    assert len(spans) == sum(s["allreduce_count"] for s in r["stats"])
    assert "comm backend" not in r["stderr"]  # only "auto" announces its choice


@pytest.mark.integration
@pytest.mark.horovod
@pytest.mark.skipif(not horovod_available(), reason="horovod.torch does not import (not built)")
def test_horovod_backend_single_process(tmp_path: Path) -> None:
    r = _single("horovod", tmp_path)
    assert (r["name"], r["rank"], r["size"]) == ("horovod", 0, 1)
    assert r["diff"] == 0.0 and r["mean"] == 3.0 and r["gathered"] == [{"a": 1}]
    # Horovod registers no gradient hooks in a world of one: nothing to reduce, nothing counted
    assert all(s["allreduce_count"] == 0 for s in r["stats"])


@pytest.mark.integration
def test_auto_announces_choice_once_on_rank0(tmp_path: Path) -> None:
    r = _single("auto", tmp_path)
    expected = "horovod" if horovod_available() else "torch"
    lines = [l for l in r["stderr"].splitlines() if "[lmsdp] comm backend:" in l]
    assert len(lines) == 1 and lines[0].startswith(f"[lmsdp] comm backend: {expected} ("), r["stderr"]
    assert r["name"] == expected
