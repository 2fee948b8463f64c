"""``lmsrun plan``'s mesh dimension: the layout table (one row per ``{dp, tp}`` x strategy with the
predicted per-rank peak, step time, samples per second, whether it fits and why) and the pick. The
estimates are ``lmsdp.swapping.layout``'s; the model's facts come from ``train/layout_facts.py``; the
same choice runs at job start under ``comm.mesh: auto`` (``train/job_layout.py``)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Tuple

from lmsdp.swapping.units import format_size

from lmsdp.launcher.config.errors import UserError
from lmsdp.launcher.train.job_layout import choose_layout, configured_mesh


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-np", "--np", dest="np", type=int, metavar="N", help="ranks the job runs on "
                        "(default: launch.np); with 2 or more, the table of {dp, tp} layouts and the pick")
    parser.add_argument("--net-gbps", type=float, metavar="X", help="rate of collectives between ranks in GB/s "
                        "(default: measured: all-reduces among N processes on this host, gloo)")
    parser.add_argument("--net-latency-us", type=float, metavar="X", help="latency per collective hop in "
                        "microseconds (default: measured with the rate; 20 with --net-gbps)")


def world_of(args: argparse.Namespace, config: Any) -> int:
    world = args.np if args.np is not None else config.launch.np
    if world < 1:
        raise UserError(f"-np: expected a positive number of ranks, got {world}")
    return world


def rates_of(args: argparse.Namespace, world: int, threads: int = 1) -> Tuple[Any, Optional[float]]:
    """Collective rates (configured by the flags, else measured among ``world`` local processes with
    ``threads`` each) and, when measured, how much slower those processes compute than one alone."""
    from lmsdp.swapping.layout import CommRates

    if args.net_gbps is not None:
        if args.net_gbps <= 0:
            raise UserError(f"--net-gbps: expected a positive number of GB/s, got {args.net_gbps:g}")
        latency = 20.0 if args.net_latency_us is None else args.net_latency_us
        if latency < 0:
            raise UserError(f"--net-latency-us: expected 0 or more, got {latency:g}")
        return CommRates(latency * 1e-6, args.net_gbps * 1e9, "--net-gbps"), None
    if args.net_latency_us is not None:
        raise UserError("--net-latency-us: give it with --net-gbps (without both, both are measured)")
    from lmsdp.comm.collective_rates import measure_local

    ops, share = measure_local(world, threads)
    return CommRates.measured(ops, f"measured: gloo collectives among {max(2, world)} local processes, "
                                   f"compute x{share:.2f} when all run"), share


def render_layouts(choice: Any, write: Callable[[str], None], configured: Optional[Any] = None) -> None:
    """The layout table: one row per candidate (estimated or refused, with why), then the pick."""
    from lmsdp.swapping.planner import recompute_label

    def activations(e: Any) -> str:
        res = e.swap
        if res is None or res.chosen is None:
            return "-"
        n = len(res.chosen.prediction.swapped)
        rec = recompute_label(res.chosen.recompute)  # '25 modules', not every name (the plan file lists them)
        return ("no swap" if not n else f"{n} swapped") + ("" if rec == "none" else f", recompute {rec}")

    def name(layout: Any) -> str:
        mark = " *" if configured is not None and (layout.dp, layout.tp) == configured else ""
        return layout.name + mark

    write(f"\n{'layout':<28}  {'peak':>10}  {'step':>9}  {'samples/s':>10}  {'fits':<4}  {'activations':<26}  why\n")
    for e in choice.estimates:
        write(f"{name(e.layout):<28}  {format_size(e.peak_bytes):>10}  {e.step_s * 1e3:>7.1f}ms  "
              f"{e.samples_per_s:>10.1f}  {'yes' if e.fits else 'no':<4}  {activations(e):<26}  {e.why}\n")
    for layout, why in choice.refused:
        write(f"{name(layout):<28}  {'-':>10}  {'-':>9}  {'-':>10}  {'-':<4}  {'-':<26}  not a layout: {why}\n")
    r = choice.rates
    ops = ", ".join(f"{op} {bw / 1e9:.2f} GB/s" for op, _lat, bw in r.ops[1:])
    write(f"(per rank; collectives at {r.bandwidth_bps / 1e9:.2f} GB/s and {r.latency_s * 1e6:.0f} us per hop"
          f"{' (' + ops + ')' if ops else ''}, {r.how}{'; * = comm.mesh' if configured else ''})\n")
    if choice.chosen is not None:
        c = choice.chosen.layout
        write(f"\nlayout: comm.mesh={{dp: {c.dp}, tp: {c.tp}}} comm.strategy={c.strategy} "
              f"({choice.chosen.why})\n")


def does_not_fit(choice: Any, name: str, batch: int) -> str:
    """The one line for a memory target no layout meets."""
    best = min(choice.estimates, key=lambda e: e.peak_bytes, default=None)
    lowest = (f"the lowest peak is {format_size(best.peak_bytes)} ({best.layout.name})" if best is not None
              else "no layout can run: " + "; ".join(f"{l.name}: {w}" for l, w in choice.refused))
    return (f"--memory: {name} at batch {batch} fits no layout of {choice.world} ranks: {lowest}; "
            f"target is {format_size(choice.target)}")


def layout_choice(args: argparse.Namespace, config: Any, profiles: Dict[str, Any], target: int, link: float,
                  world: int, device: Any) -> Any:
    """Every layout of ``world`` ranks estimated, and the pick (``chosen`` None: none fits)."""
    from lmsdp.launcher.train.layout_facts import rank_threads

    rates, share = rates_of(args, world, rank_threads(config, world))
    # --tflops plans for the device each rank will own: no sharing of this machine's cores
    compute = 1.0 if getattr(args, "tflops", None) else (share if device.type == "cpu" else None)
    return choose_layout(config, profiles, target, link, world, rates, device, compute=compute)


def print_layouts(choice: Any, config: Any, write: Callable[[str], None]) -> None:
    render_layouts(choice, write, configured_mesh(config, choice.world))


__all__ = ["add_arguments", "world_of", "rates_of", "render_layouts", "does_not_fit", "layout_choice", "print_layouts"]
