"""``lmsrun plan CONFIG``: will the job fit, how fast, with which swap / recompute settings.

    lmsrun plan CONFIG [--memory SIZE] [--batch N|max] [--link-gbps X] [--write FILE] [--set k=v ..]
                       [-np N] [--net-gbps X] [--net-latency-us X]

Builds the job's model, data, loss and optimizer exactly as a rank does (the worker's own builders),
profiles one step (``lmsdp.swapping.profile``), and prints a per-module table (saved bytes, decision,
why), one row per strategy (no swap, recompute only, swap only, planned: predicted peak and step time)
and the largest batch each approach fits; with ``-np N`` >= 2 the table of ``{dp, tp}`` layouts and the
pick (``plan_layout.py``). ``--write`` stores the chosen settings and the per-tensor plan
as YAML; ``swap.plan: FILE`` runs a job with it. The job-start side of ``swap.plan`` is ``train/job_plan.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from lmsdp.swapping.units import format_size, parse_size

from lmsdp.launcher.config.argtypes import OneLineParser
from lmsdp.launcher.config.errors import UserError
from lmsdp.launcher.tools.plan_layout import add_arguments as add_layout_arguments
from lmsdp.launcher.tools.plan_layout import does_not_fit as layouts_do_not_fit
from lmsdp.launcher.tools.plan_layout import layout_choice, print_layouts, world_of
from lmsdp.launcher.train.job_layout import check_configured
from lmsdp.launcher.train.job_plan import batch_planner, default_target, link_bps, plan_config, workload_from_config

EXIT_DOES_NOT_FIT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmsrun plan", allow_abbrev=False,
                                     description="Predict peak memory and step time; choose what to keep, swap "
                                                 "and recompute for a memory target.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--memory", metavar="SIZE", help="device memory the step must fit, e.g. 16GiB "
                        "(default: swap.memory_target, else the GPU's total memory)")
    parser.add_argument("--batch", metavar="N|max", help="batch per rank to plan for (default: train.batch_size); "
                        "'max': the largest batch the plan fits")
    parser.add_argument("--link-gbps", type=float, metavar="X", help="device<->host link in GB/s "
                        "(default: measured: pinned copies on a GPU, host copies for the CPU loopback transport)")
    parser.add_argument("--tflops", type=float, metavar="X", help="compute rate of the device the job will run on, "
                        "in TFLOP/s: times from FLOPs instead of a timed step (plan for a GPU from a machine "
                        "without one)")
    parser.add_argument("--time-batch", type=int, metavar="N", help="batch of the real step that is timed "
                        "(default: the planned batch if its saved tensors take <= 1 GiB, else 1; 0: FLOPs only)")
    parser.add_argument("--depth", type=int, default=2, metavar="D", help="module name depth of the table (default 2)")
    parser.add_argument("--write", metavar="FILE", help="write the chosen settings and per-tensor plan as YAML")
    add_layout_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    return parser


# ----------------------------------------------------------------------------------- the workload
def largest_batch(config: Any) -> Tuple[Optional[int], str]:
    """The largest batch per rank the planner predicts to fit the device (the GPU's memory or
    ``swap.memory_target``), with every candidate swapped when ``swap.enabled``; None on CPU without a
    memory target (then nothing bounds the batch but host memory). The second value says why."""
    import torch

    from lmsdp.swapping.planner import BatchSizes, max_batch
    from lmsdp.swapping.profile import optimizer_state_bytes

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not config.swap.memory_target:
        return None, "no device memory bounds it on CPU (set swap.memory_target to bound it)"
    target = default_target(config, device, None)
    workload = workload_from_config(config)
    sizes = BatchSizes(workload, config.swap.recompute or None, optimizer_state_bytes(workload))
    threshold = parse_size(config.swap.threshold) or 0
    largest = max_batch(sizes, target, threshold, bool(config.swap.enabled), link_bps(device, None))
    swap = "every candidate swapped" if config.swap.enabled else "swap off"
    return largest, f"the swap planner's largest batch for {format_size(target)} ({swap})"


def module_rows(result: Any, depth: int) -> List[Tuple[str, int, str, str, float, float, int]]:
    """(module, saved bytes, decision, why, forward s, backward s, FLOPs) per module at ``depth`` of the
    base (no recompute) profile."""
    base = result.profiles["none"]
    chosen = result.chosen
    prof = result.profile
    recomputed = set(prof.recomputed) if prof is not None else set()
    swapped_modules: Dict[str, List[Any]] = {}
    if chosen is not None and prof is not None:
        cand = prof.candidates(chosen.settings.threshold)
        for s in chosen.prediction.swapped:
            t = prof.tensors[cand[s]]
            swapped_modules.setdefault(t.module, []).append(t)
    groups: Dict[str, Dict[str, Any]] = {}
    for t in base.tensors:
        key = ".".join(t.module.split(".")[:depth]) if t.module else "(top)"
        g = groups.setdefault(key, {"bytes": 0, "modules": set()})
        g["bytes"] += t.nbytes
        g["modules"].add(t.module)
    rows = []
    for key, g in groups.items():
        mods = g["modules"]
        n_re = sum(1 for m in mods if m in recomputed or any(m.startswith(r + ".") for r in recomputed))
        swapped = [t for m in mods for t in swapped_modules.get(m, [])]
        parts, why = [], []
        if n_re:
            parts.append("recompute")
            why.append(f"{n_re} cheap layer{'s' if n_re > 1 else ''} run again in backward")
        if swapped:
            parts.append("swap")
            gap = min(base.forward_s - t.pack_s + max(0.0, t.use_s) for t in swapped)
            moved = sum(t.nbytes for t in swapped)
            why.append(f"{format_size(moved)} out+in {2 * moved / result.link_bps * 1e3:.1f} ms, "
                       f">= {gap * 1e3:.1f} ms of compute to hide it")
        kept = sum(1 for t in base.tensors if t.module in mods) - len(swapped)
        if not parts or (kept > 0 and not n_re):
            parts.append("keep")
            if chosen is None:
                why.append("the target cannot be met")
            elif not chosen.prediction.swapped:
                why.append("fits without swapping")
            else:
                why.append("kept: the target is met without moving it (less slack than what was swapped)")
        backward = sum(v for m, v in base.module_backward_s.items() if m in mods)
        rows.append((key, g["bytes"], "+".join(parts), "; ".join(why), base.module_forward_s.get(key, 0.0),
                     backward, base.module_flops.get(key, 0)))
    return rows


def render(result: Any, depth: int, name: str, out: Any = None) -> None:
    base = result.profiles["none"]
    w = (out or sys.stdout).write
    w(f"# {name}: batch {result.batch}, memory target {format_size(result.target)}, link {result.link_bps / 1e9:.1f} GB/s; "
      f"times {base.timed}\n")
    w(f"# fixed: parameters {format_size(base.param_bytes)}, optimizer state {format_size(base.optimizer_bytes)}, "
      f"gradients {format_size(base.grad_bytes)}, workspace {format_size(base.workspace_bytes)}\n\n")
    rows = module_rows(result, depth)
    width = max([len(r[0]) for r in rows] + [6])
    w(f"{'module':<{width}}  {'saved':>10}  {'fwd ms':>8}  {'bwd ms':>8}  {'GFLOP':>8}  {'decision':<16}  why\n")
    for key, nbytes, decision, why, fwd, bwd, flops in rows:
        w(f"{key:<{width}}  {format_size(nbytes):>10}  {fwd * 1e3:>8.1f}  {bwd * 1e3:>8.1f}  {flops / 1e9:>8.2f}  "
          f"{decision:<16}  {why}\n")
    w(f"\n{'strategy':<30}  {'peak':>10}  {'saved peak':>10}  {'step':>9}  {'exposed':>9}  fits\n")
    for st in result.strategies:
        p = st.prediction
        w(f"{st.name:<30}  {format_size(p.peak_device_bytes):>10}  {format_size(p.peak_saved_bytes):>10}  "
          f"{p.step_s * 1e3:>7.1f}ms  {p.exposed_s * 1e3:>7.1f}ms  {'yes' if st.fits else 'no'}\n")


def document_yaml(result: Any, config_name: str, path: Optional[str] = None) -> str:
    """The chosen settings as a ``swap:`` section plus the per-tensor plan ``swap.plan: FILE`` reads."""
    import yaml

    from lmsdp.swapping.planner import plan_document

    doc = plan_document(result)
    st = result.chosen
    section = {"enabled": True, "threshold": st.settings.threshold,
               "prefetch": st.settings.prefetch, "recompute": st.recompute, "memory_target": result.target,
               "plan": path or "auto"}
    head = (f"# lmsrun plan for {config_name}: predicted peak {format_size(doc['predicted_peak_bytes'])}, "
            f"step {doc['predicted_step_s'] * 1e3:.1f} ms at batch {result.batch}.\n"
            "# Use it with --set swap.plan=<this file>, or copy the swap: section into the config.\n")
    return head + yaml.safe_dump({"swap": section, "plan": doc}, sort_keys=False, default_flow_style=None, width=120)


# ------------------------------------------------------------------------------------------- main
def main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _does_not_fit(name: str, batch: int, result: Any, largest: int) -> int:
    """One line: the lowest peak the search found against the target, and the largest batch that fits."""
    fits = f"largest batch that fits: {largest}" if largest else "not even batch 1 fits"
    print(f"lmsrun: error: --memory: {name} at batch {batch} does not fit: {result.shortfall()}; {fits}",
          file=sys.stderr, flush=True)
    return EXIT_DOES_NOT_FIT


def run(args: argparse.Namespace) -> int:
    from lmsdp.launcher.config import load_config

    batch_text = args.batch
    batch = 0
    if batch_text is not None and batch_text != "max":
        try:
            batch = int(batch_text)
        except ValueError:
            batch = 0
        if batch < 1:
            raise UserError(f"--batch: expected a positive integer or 'max', got '{batch_text}'")
    if args.depth < 1:
        raise UserError(f"--depth: expected 1 or more, got {args.depth}")
    if args.link_gbps is not None and args.link_gbps <= 0:
        raise UserError(f"--link-gbps: expected a positive number of GB/s, got {args.link_gbps:g}")
    if args.tflops is not None and args.tflops <= 0:
        raise UserError(f"--tflops: expected a positive number of TFLOP/s, got {args.tflops:g}")
    if args.time_batch is not None and args.time_batch < 0:
        raise UserError(f"--time-batch: expected 0 or more, got {args.time_batch}")
    config = load_config(args.config, args.overrides)
    world = world_of(args, config)
    check_configured(config, world)  # a comm.mesh that cannot run is one line before any profiling
    import torch

    from lmsdp.swapping.profile import optimizer_state_bytes

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    target = default_target(config, device, args.memory)
    link = link_bps(device, args.link_gbps)
    if world > 1 and device.type == "cpu":  # time the step as one rank of the job computes it
        from lmsdp.launcher.train.layout_facts import rank_threads

        torch.set_num_threads(rank_threads(config, world))
    workload = workload_from_config(config)
    opt_bytes = optimizer_state_bytes(workload)
    start = config.train.batch_size if batch_text in (None, "max") else batch
    batch = batch or start  # no --batch: the config's
    if args.tflops:
        rate = args.tflops * 1e12
    else:  # the timed step at the planned batch sets the FLOP rate other batches are planned at
        timed = plan_config(config, target, start, link, device, args.time_batch)
        base = timed.profiles["none"]
        rate = base.flops / max(1e-12, base.forward_s + base.backward_s)
    planner = batch_planner(config, target, link, rate, workload, opt_bytes)
    if batch_text == "max":
        batch = planner.largest(start)
        if batch == 0:
            raise UserError(f"--memory: not even batch 1 fits {format_size(target)}: "
                            f"{planner.plan(1).shortfall()}")
    result = planner.plan(batch) if args.tflops or batch_text == "max" else timed
    if result.chosen is None and world == 1:
        return _does_not_fit(config.name, batch, result, planner.largest(batch))
    choice = layout_choice(args, config, result.profiles, target, link, world, device) if world > 1 else None
    if choice is not None and choice.chosen is None:
        print("lmsrun: error: " + layouts_do_not_fit(choice, config.name, batch), file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    if result.chosen is None:  # one rank cannot hold the step whole; a layout of the job's ranks does
        render(result, args.depth, config.name)
        print_layouts(choice, config, sys.stdout.write)
        print(f"\nthe step does not fit one rank whole ({result.shortfall()}); the layout above does "
              "(no swap plan file for one rank: use comm.mesh with swap.plan: none)")
        return 0
    limits = planner.limits(batch)
    render(result, args.depth, config.name)
    print("\nlargest batch that fits: " + ", ".join(f"{k} {v}" for k, v in limits.items())
          + f" (times from FLOPs at {rate / 1e12:.3g} TFLOP/s)")
    if choice is not None:
        print_layouts(choice, config, sys.stdout.write)
    text = document_yaml(result, config.name, args.write)
    if args.write:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
            with open(args.write, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise UserError(f"--write: cannot write {args.write}: {exc.strerror}") from None
        print(f"\nplan written to {args.write} (use it with --set swap.plan={args.write})")
    else:
        st = result.chosen
        print(f"\nchosen: swap.threshold={st.settings.threshold} swap.prefetch={st.settings.prefetch} "
              f"swap.recompute={st.recompute} ({len(st.prediction.swapped)} tensors swapped; "
              "--write FILE keeps the plan)")
    return 0
