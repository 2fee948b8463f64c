"""A ``TensorParallelPlan`` made real: torch's ``parallelize_module`` with ColwiseParallel,
RowwiseParallel, SequenceParallel and PrepareModuleInput on the tp sub-mesh, then every parameter
the plan leaves whole becomes a replicated DTensor (so the optimizer's foreach kernels and FSDP2 see
one kind of parameter: DTensors on one mesh), and tied parameters are tied again (parallelize_module
replaces each module's parameter with its own DTensor)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from .tensor_parallel import TensorParallelPlan


def _replicate_style() -> Any:
    """Whole parameters on every tp rank: inputs wrapped as replicated DTensors, outputs local."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel.style import ParallelStyle

    def partition(_name: str, module: nn.Module, mesh: Any) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, DTensor):
                module.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]),
                                                              requires_grad=p.requires_grad))

    def to_dtensor(_module: nn.Module, inputs: Tuple[Any, ...], mesh: Any) -> Tuple[Any, ...]:
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(_module: nn.Module, outputs: Any, _mesh: Any) -> Any:
        if isinstance(outputs, DTensor):
            return outputs.to_local()
        if isinstance(outputs, tuple):
            return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
        return outputs

    class ReplicateParallel(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            return distribute_module(module, device_mesh, partition, to_dtensor, to_local)

    return ReplicateParallel()


def torch_style(style: str, module: nn.Module, sequence_parallel: bool) -> Any:
    """The torch ParallelStyle for one of ``tensor_parallel.STYLES`` (see that module)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    stream = Shard(1) if sequence_parallel else Replicate()  # the activations between blocks
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        if isinstance(module, nn.Embedding):
            return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        return RowwiseParallel(output_layouts=stream)
    if style == "colwise_gather":
        return ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
    if style == "gather_input":
        return PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),))
    if style == "sequence_parallel" and sequence_parallel:
        return SequenceParallel()
    return _replicate_style()


def apply_tensor_parallel(model: nn.Module, plan: TensorParallelPlan, tp_mesh: Any) -> nn.Module:
    """Split ``model`` in place as ``plan`` says over ``tp_mesh`` (1-D); returns it."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    modules = dict(model.named_modules())
    styles: Dict[str, Any] = {name: torch_style(style, modules[name], plan.sequence_parallel)
                              for name, style in plan.styles.items()}
    parallelize_module(model, tp_mesh, styles)
    rest: Dict[str, Any] = {}
    for name, module in model.named_modules():
        if name not in styles and any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            rest[name] = _replicate_style()
    root = rest.pop("", None)
    if rest:
        parallelize_module(model, tp_mesh, rest)
    if root is not None:
        root._apply(model, tp_mesh)
    for first, second in plan.ties:
        owner, _, pname = second.rpartition(".")
        setattr(model.get_submodule(owner), pname, model.get_parameter(first))
    return model
