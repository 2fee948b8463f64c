"""What autograd stores instead of a saved tensor the swap engine took over: a :class:`Handle`.

A handle knows the tensor's geometry (so the storage span comes back bit-exact), where its bytes are
(device tensor, host buffer, swapped-in copy) and the transfers moving them. It reports its own death
(autograd freed the graph) to its owner, the engine, through the small :class:`HandleOwner` protocol,
so this module does not depend on the engine.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Protocol, Tuple, Union

import torch

from .transport import Transfer

ALIGN = 512  # bytes of the first element's address alignment preserved on swap-in


class HandleOwner(Protocol):
    """The engine as a handle sees it: told once when autograd drops the handle."""

    def handle_released(self, handle: "Handle") -> None: ...


def storage_span(t: torch.Tensor) -> int:
    """Elements of storage covered by ``t`` from its first element (numel for dense tensors)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


def modified_error(t: torch.Tensor, saved: int) -> RuntimeError:
    """Autograd's own in-place error (the hooks disable autograd's check, so the engine raises it)."""
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {saved} instead "
        "(detected by the lmsdp swap engine's unpack hook)")


class Handle:
    """What autograd stores instead of a candidate tensor."""

    __slots__ = ("owner", "seq", "step_id", "dtype", "size", "stride", "span", "pad", "nbytes",
                 "span_bytes", "tensor", "orig", "version", "host", "host_view", "out_tr", "in_tr",
                 "in_tensor", "in_users", "used", "prefetched", "spill", "__weakref__")

    def __init__(self, owner: HandleOwner, seq: int, step_id: int, t: torch.Tensor, version: int,
                 nbytes: int) -> None:
        self.owner = owner
        self.seq = seq
        self.step_id = step_id
        self.dtype, self.size, self.stride = t.dtype, t.shape, t.stride()
        self.span = storage_span(t)
        self.span_bytes = self.span * t.element_size()
        self.pad = (t.data_ptr() % ALIGN) // t.element_size()
        self.nbytes = nbytes
        self.tensor: Optional[torch.Tensor] = t          # resident original, or swapped-in copy
        self.orig = weakref.ref(t)                      # for the version check
        self.version = version
        self.host: Optional[torch.Tensor] = None
        self.host_view: Optional[torch.Tensor] = None
        self.out_tr: Optional[Transfer] = None
        self.in_tr: Optional[Transfer] = None
        self.in_tensor: Optional[torch.Tensor] = None
        self.in_users = 0        # references to the swapped-in storage when the engine alone held it
        self.used = False
        self.prefetched = False  # its swap-in was started ahead of need (not by its own unpack)
        self.spill: Optional[Any] = None  # its file in the disk tier (``disk.Spill``), when it went there

    def __del__(self) -> None:
        try:
            self.owner.handle_released(self)
        except Exception:  # interpreter shutdown
            pass


Packed = Union[Handle, Tuple[torch.Tensor, int]]


class LocalShard:
    """A DTensor whose local shard the engine took over: rebuilt around the shard on unpack (autograd
    saved the DTensor; the engine moves only the bytes this rank holds)."""

    __slots__ = ("inner", "spec", "requires_grad")

    def __init__(self, inner: Packed, spec: Any, requires_grad: bool) -> None:
        self.inner, self.spec, self.requires_grad = inner, spec, requires_grad

    @staticmethod
    def pack(pack: Any, t: torch.Tensor) -> Optional["LocalShard"]:
        """``t``'s local shard packed by ``pack`` if ``t`` is a swappable DTensor whose shard the
        engine takes (else None: ``t`` stays as it is)."""
        from .candidates import is_swappable

        if type(t).__name__ != "DTensor" or not is_swappable(t):
            return None
        inner = pack(t._local_tensor)  # type: ignore[attr-defined]
        return None if type(inner) is tuple else LocalShard(inner, t._spec, t.requires_grad)  # type: ignore[attr-defined]

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor(local, self.spec, requires_grad=self.requires_grad)  # type: ignore[call-arg]
