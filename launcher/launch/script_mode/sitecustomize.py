"""Interpreter start-up hook for ``lmsrun ... -- python train.py`` (script mode).

lmsrun puts this folder first on every rank's PYTHONPATH, so Python imports this module at start-up
(``site`` imports ``sitecustomize``). It first runs the sitecustomize this one shadows (a distro's or a
venv's); then it makes an uncaught exception in the script write this rank's error file (for
lmsrun's report) and abort the whole MPI job when the script uses mpi4py (as ``python -m mpi4py``
does: otherwise the other ranks wait in MPI_Finalize until they finish), or always when the rank runs
under srun or a user's own mpirun (``lmsdp.runtime.abort``); it ends the rank when
lmsrun itself is gone (``lmsdp.runtime.lifeline``); it prints lmsdp's own warnings as one
``[lmsdp] ...`` line, on rank 0 (``lmsdp.runtime.warning_lines``); and when LMSDP_SWAP=1 it
switches the swap engine on for the whole process through ``lmsdp.swapping.enable_from_env()`` --
the user's script is not edited. The engine prints its ``[lmsdp swap] ...`` line at exit.

Must never break the user's interpreter: failures are reported on stderr and start-up goes on.
"""
import os
import sys


def _chain_previous() -> None:
    """Execute the next ``sitecustomize`` on sys.path (the one this file hides), if any."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None or not spec.origin:
        return
    if os.path.dirname(os.path.abspath(spec.origin)) == here:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _record_failures() -> None:
    """sys.excepthook that writes rank<R>.json, shows the traceback, then aborts an MPI world."""
    previous = sys.excepthook

    def hook(kind, exc, tb):  # type: ignore[no-untyped-def]
        try:
            from lmsdp.runtime.error_file import write_error
            from lmsdp.runtime.topology import rank_hint

            write_error(exc, rank_hint())  # nothing without LMSDP_ERROR_DIR
        except Exception:  # noqa: BLE001 - the user's traceback must still be shown
            pass
        previous(kind, exc, tb)
        _abort_mpi_world()

    sys.excepthook = hook


def _abort_mpi_world() -> None:
    """Under srun or a user's own mpirun: end every rank (``lmsdp.runtime.abort``; MPI is initialised
    for it when a Horovod script's MPI is not mpi4py's). Under lmsrun's mpirun, which ends the job on
    a non-zero exit anyway: MPI_Abort only when the script initialised MPI through mpi4py, so the
    other ranks do not wait in MPI_Finalize until they finish."""
    try:
        from lmsdp.runtime.abort import abort_if_mpi_initialised, abort_world, ends_job_on_failure
        from lmsdp.runtime.topology import detect_launched

        topology = detect_launched()
        if ends_job_on_failure(topology):
            abort_world(1, topology.mpi_world)  # type: ignore[union-attr]
        else:
            abort_if_mpi_initialised(1)
    except Exception:  # noqa: BLE001
        pass


def _watch_launcher() -> None:
    """End this rank when lmsrun is gone (kill -9, a dropped SSH session): no headless job."""
    from lmsdp.runtime.lifeline import watch_launcher

    watch_launcher()


def _warning_lines() -> None:
    """lmsdp's own warnings as one ``[lmsdp] ...`` line, from rank 0 only (every rank says the same)."""
    from lmsdp.runtime import warning_lines
    from lmsdp.runtime.topology import rank_hint

    warning_lines.install(rank_hint())


def _enable_swap() -> None:
    from lmsdp.runtime import env as envvars

    if not envvars.flag(envvars.SWAP):
        return
    from lmsdp.swapping import enable_from_env

    enable_from_env()


for _step in (_chain_previous, _record_failures, _watch_launcher, _warning_lines, _enable_swap):
    try:
        _step()
    except Exception as _exc:  # noqa: BLE001 - report, never stop the user's program from starting
        print(f"[lmsdp] script mode: {_step.__name__.strip('_')} failed: {type(_exc).__name__}: {_exc}",
              file=sys.stderr, flush=True)
