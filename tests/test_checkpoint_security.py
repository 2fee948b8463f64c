"""Loading a checkpoint never runs code, and predictable names in shared folders are never opened
through a planted link (issue 27).

The planted checkpoints are the real attack: a state whose pickle calls ``os.system`` to touch a
marker file, its ``.sha256`` rewritten to match (whoever can write a file can write its digest).
Nothing may run; the file is named in one line; ``--resume`` uses the previous good checkpoint and
stays bit-exact (replicate with float16 AMP + GradScaler + swap; shard likewise)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy
import pytest
import torch

from lmsdp.launcher.train.checkpoint import CheckpointManager, file_digest
from lmsdp.launcher.train.checkpoint_lock import CheckpointLock, LockNotAFile, check_free
from lmsdp.launcher.train.checkpoint_sharded import META, read_full
from lmsdp.launcher.train.checkpoint_trust import NotPlainData, UnsafeCheckpoint, make_plain
from lmsdp.launcher.tools.export import main as export_main
from lmsdp.runtime.error_file import ErrorRecord, keep_errors, write_error
from lmsdp.runtime.new_file import open_new

from .test_shard import GPT, LMSRUN, SHARD, SWAP, _env, assert_equal_states, export, lmsrun, metrics

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
FP16 = ["train.amp=true", "train.amp_dtype=float16"]


class RunsCode:
    """Pickles to ``os.system("touch MARKER")``: loading it with full pickle runs the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, step: int = 2) -> None:
    """Replace the checkpoint at ``path`` by a code-running one, with a matching digest when it had one."""
    torch.save({"step": step, "model": {"w": RunsCode(marker)}, "optimizer": {}}, path)
    digest = Path(f"{path}.sha256")
    if digest.exists():
        digest.write_text(f"{file_digest(str(path))}  {path.name}\n")


def plant_metadata(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64)}, "optimizer": {}, "rng": [{"torch": torch.get_rng_state()}]}


def _lines(text: str, needle: str) -> list:
    return [line for line in text.splitlines() if needle in line]


# ------------------------------------------------------------------ nothing runs, the file is named
def test_planted_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capfd):
    marker = tmp_path / "PWNED"
    manager = CheckpointManager(str(tmp_path / "ck"))
    manager.save(1, _state(1))
    newest = Path(manager.save(2, _state(2)))
    plant(newest, marker)
    path, state = manager.load_latest()
    assert not marker.exists()
    assert path.endswith("step-00000001.pt") and torch.equal(state["model"]["w"], _state(1)["model"]["w"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert f"{newest} refused: loading it would call posix.system" in err[0]
    assert f"lmsrun export --trust {newest}" in err[0] and "trying an older one" in err[0]


def test_checkpoints_hold_tensors_and_plain_data_only(tmp_path):
    state = {**_state(1), "rng": [{"torch": torch.get_rng_state(), "numpy": numpy.random.get_state()}]}
    path = CheckpointManager(str(tmp_path)).save(1, state)
    loaded = torch.load(path, weights_only=True)  # loads with no extra globals at all
    assert torch.equal(loaded["rng"][0]["numpy"][1], torch.from_numpy(numpy.random.get_state()[1]))
    with pytest.raises(NotPlainData, match=r"checkpoint\['notes'\]\[0\] holds a pathlib.PosixPath"):
        CheckpointManager(str(tmp_path)).save(2, {**_state(2), "notes": [Path("/x")]})
    plain = make_plain(torch.nn.Linear(2, 2).state_dict())  # plain already: the same object, _metadata kept
    assert hasattr(plain, "_metadata")


def test_export_trust_converts_an_older_checkpoint_that_resume_refuses(tmp_path, capfd):
    """An older lmsdp's checkpoint (numpy RNG state: needs numpy's globals) is refused; converted once
    with --trust, it resumes with the same values."""
    manager = CheckpointManager(str(tmp_path))
    older = {**_state(1), "rng": [{"torch": torch.get_rng_state(), "numpy": numpy.random.get_state()}]}
    path = tmp_path / "step-00000001.pt"
    torch.save(older, path)  # as an older lmsdp wrote it: no digest, numpy objects
    assert manager.load_latest() is None
    assert "lmsrun export --trust" in capfd.readouterr().err
    assert export_main(["--trust", str(path)]) == 0
    assert f"converted {path}" in capfd.readouterr().err
    loaded_path, state = manager.load_latest()
    assert loaded_path == str(path) and torch.equal(state["model"]["w"], older["model"]["w"])
    assert torch.equal(state["rng"][0]["numpy"][1], torch.from_numpy(older["rng"][0]["numpy"][1]))
    assert os.path.exists(f"{path}.sha256")


@pytest.mark.integration
def test_export_refuses_a_planted_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    newest = Path(CheckpointManager(str(run_dir / "checkpoints")).save(2, _state(2)))
    plant(newest, marker)
    proc = subprocess.run([LMSRUN, "export", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not marker.exists() and not (run_dir / "model.pt").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmsrun: error: {newest} refused"), proc.stderr


def test_planted_dcp_metadata_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"
    folder = tmp_path / "step-00000002"
    model = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": one process here
        dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(folder)))
    assert torch.equal(read_full(str(folder), ("model",))["model"]["weight"], model.weight)  # genuine: loads
    plant_metadata(folder, marker)
    with pytest.raises(UnsafeCheckpoint, match=f"{folder} refused: loading it would call posix.system"):
        read_full(str(folder), ("model",))
    assert not marker.exists()


# ------------------------------------------------- real jobs: --resume passes over, and is bit-exact
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_resume_passes_over_a_planted_checkpoint_bit_exact_with_fp16_scaler_and_swap(tmp_path):
    marker = tmp_path / "PWNED"
    job = GPT + SWAP + FP16 + ["train.checkpoint_every=2"]
    reference = lmsrun(tmp_path / "ref", *job, np=1, steps=6)
    out = lmsrun(tmp_path / "run", *job, np=1, steps=4)
    planted = out / "checkpoints" / "step-00000004.pt"
    plant(planted, marker)
    proc = lmsrun(out, *job, np=1, steps=6, extra=("--resume",), wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and not marker.exists(), err[-3000:]
    refused = _lines(err, "refused")
    assert len(refused) == 1 and str(planted) in refused[0] and "lmsrun export --trust" in refused[0], err
    assert "step-00000002.pt at step 2" in err and "Traceback" not in err
    assert_equal_states(export(out), export(reference))
    assert [r["loss_scale"] for r in metrics(out)][-4:] == [r["loss_scale"] for r in metrics(reference)][-4:]


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(900)
def test_sharded_resume_passes_over_planted_metadata_bit_exact(tmp_path):
    """Planted DCP ``.metadata`` (step 6) and ``lmsdp.pt`` (step 4): both refused, step 2 resumed, the
    same weights as an uninterrupted run; a link planted at the next save's temp name is not followed;
    ``lmsrun export`` of a planted folder is one line."""
    marker = tmp_path / "PWNED"
    job = GPT + SHARD + SWAP + FP16 + ["train.checkpoint_every=2"]
    reference = lmsrun(tmp_path / "ref", *job, steps=8)
    out = lmsrun(tmp_path / "run", *job, steps=6)
    folders = out / "checkpoints"
    plant_metadata(folders / "step-00000006", marker)
    torch.save({"step": 4, "scaler": RunsCode(marker)}, folders / "step-00000004" / META)
    victim = tmp_path / "victim"
    victim.mkdir()
    (folders / ".tmp-step-00000008").symlink_to(victim)
    proc = lmsrun(out, *job, steps=8, extra=("--resume",), wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and not marker.exists(), err[-3000:]
    refused = _lines(err, "refused")
    assert len(refused) == 2 and "step-00000006 refused" in refused[0], err
    assert f"{folders / 'step-00000004' / META} refused" in refused[1], err
    assert "step-00000002 at step 2" in err and "Traceback" not in err
    assert list(victim.iterdir()) == [] and not (folders / "step-00000008").is_symlink()
    assert_equal_states(export(out), export(reference))

    plant_metadata(folders / "step-00000008", marker)
    proc = subprocess.run([LMSRUN, "export", str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "step-00000008 refused" in lines[0], proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------- predictable names: links are not followed
def test_link_planted_at_the_lock_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / ".lmsdp.lock").symlink_to(victim)
    with pytest.raises(LockNotAFile, match="is not a regular file"):
        check_free(str(folder))
    with pytest.raises(LockNotAFile, match="is not a regular file"):
        CheckpointLock(str(folder)).acquire()
    assert victim.read_text() == "mine"


def test_lock_and_error_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        lock = CheckpointLock(str(tmp_path / "ck")).acquire(announce=False)
        mode = os.stat(lock.path).st_mode & 0o777
        lock.release()
        written = write_error(ValueError("x"), 0, str(tmp_path / "errors"))
    finally:
        os.umask(old)
    assert mode == 0o640 and os.stat(written).st_mode & 0o777 == 0o640


def test_links_planted_in_the_error_folders_are_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / f"rank0.json.{os.getpid()}.tmp").symlink_to(victim)  # the temp name write_error uses
    written = write_error(RuntimeError("boom"), 0, str(errors))
    assert victim.read_text() == "mine" and json.loads(Path(written).read_text())["message"] == "boom"

    run_dir, victim_dir = tmp_path / "run", tmp_path / "victim-dir"
    run_dir.mkdir()
    victim_dir.mkdir()
    (run_dir / "errors").symlink_to(victim_dir)  # <output_dir>/errors: where a failed job's records go
    record = ErrorRecord(rank=0, type="RuntimeError", message="boom", traceback="", time=0.0)
    kept = keep_errors([record], str(run_dir))
    assert list(victim_dir.iterdir()) == [] and not os.path.islink(kept) and os.listdir(kept) == ["rank0.json"]


def test_a_new_file_replaces_a_planted_link_never_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    name = tmp_path / "step-00000001.pt.sha256.tmp"
    name.symlink_to(victim)
    with open_new(str(name)) as handle:
        handle.write("digest")
    assert victim.read_text() == "mine" and not name.is_symlink() and name.read_text() == "digest"
