"""Interpreter start-up hook for ``lmsrun ... -- python train.py`` (script mode).

lmsrun puts this folder first on every rank's PYTHONPATH, so Python imports this module at start-up
(``site`` imports ``sitecustomize``). It first runs the sitecustomize this one shadows (a distro's or a
venv's), then, when LMSDP_SWAP=1, switches the swap engine on for the whole process through
``lmsdp.swapping.enable_from_env()`` -- the user's script is not edited. The engine prints its
``[lmsdp swap] ...`` line at exit.

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


def _enable_swap() -> None:
    from lmsdp.runtime import env as envvars

    if not envvars.flag(envvars.SWAP):
        return
    from lmsdp.swapping import enable_from_env

    enable_from_env()


for _step in (_chain_previous, _enable_swap):
    try:
        _step()
    except Exception as _exc:  # noqa: BLE001 - report, never stop the user's program from starting
        print(f"[lmsdp] script mode: {_step.__name__.strip('_')} failed: {type(_exc).__name__}: {_exc}",
              file=sys.stderr, flush=True)
