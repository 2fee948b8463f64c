"""Reading a checkpoint never runs code.

``torch.save`` pickles, and unpickling can call any function: a checkpoint planted in a shared
folder (or received from someone) would run as whoever resumes or exports it. So lmsdp writes only
tensors and plain data (``make_plain`` at every save) and reads with loaders that cannot call code:

- files written by ``torch.save`` (``step-N.pt``, a sharded folder's ``lmsdp.pt``, DCP's byte
  items): ``torch.load(weights_only=True)``;
- DCP's ``.metadata`` (a plain pickle, protocol 4, which torch's weights-only unpickler does not
  read): an unpickler that knows DCP's metadata classes, torch's dtypes and ``torch.Size``, nothing else.

The classes beyond torch.load's own allowlist are in one list, ``extra_safe_globals``. A file that
needs anything else is refused (``UnsafeCheckpoint``: one line naming it and how to convert a
trusted one, ``lmsrun export --trust FILE``). The SHA-256 digest next to a checkpoint is against
damage, not attack: whoever can write the file can write its digest."""
from __future__ import annotations

import functools
import io
import os
import pathlib
import pickle
import re
from collections import OrderedDict
from typing import Any, BinaryIO, Dict, List, Tuple, Union

import torch

from lmsdp.launcher.config.errors import UserError

TRUST_FLAG = "--trust"
DCP_METADATA = ".metadata"  # DCP's own name (torch.distributed.checkpoint.filesystem._metadata_fn)
_PLAIN_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


class UnsafeCheckpoint(UserError):
    """A checkpoint holds something whose loading could run code: refused, never loaded."""

    def __init__(self, path: str, needs: str, hint: str = "") -> None:
        super().__init__(f"{path} refused: loading it would {needs}; lmsdp reads tensors and plain data only",
                         hint=hint or "written by an older lmsdp and you trust it? convert it once: "
                                      f"lmsrun export {TRUST_FLAG} {path}")


_NOT_DCP = "DCP writes only tensors and its own metadata there, so lmsdp did not write this: delete the folder"


class NotPlainData(UserError):
    """A state to be checkpointed holds an object that is neither a tensor nor plain data."""


def extra_safe_globals() -> List[Any]:
    """The one list of classes a checkpoint may hold beyond torch.load's weights-only defaults
    (tensors, dtypes, ``torch.Size``, devices, ``OrderedDict``): DCP's metadata, pickled into each
    sharded folder's ``.metadata``. lmsdp's own ``torch.save`` files need nothing added."""
    import torch.distributed.checkpoint.metadata as meta
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return [meta.Metadata, meta.MetadataIndex, meta.StorageMeta, meta.TensorProperties,
            meta.TensorStorageMetadata, meta.BytesStorageMetadata, meta.ChunkStorageMetadata,
            meta._MEM_FORMAT_ENCODING, _StorageInfo, pathlib.PosixPath, pathlib.PurePosixPath]


@functools.lru_cache(maxsize=None)
def _metadata_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object for the metadata unpickler: the list above, plus the torch objects
    torch.load allows by default that DCP's metadata names (dtypes, Size, the layout lookup)."""
    extra = extra_safe_globals()
    torch.serialization.add_safe_globals(extra)  # the same list for torch.load (e.g. DCP's byte items)
    allowed: Dict[Tuple[str, str], Any] = {(cls.__module__, cls.__qualname__): cls for cls in extra}
    allowed.update({("pathlib", cls.__name__): cls for cls in extra if cls.__module__.startswith("pathlib")})
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of ``_metadata_globals``: nothing else can be called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _metadata_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not DCP metadata")


def _needs(exc: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"call {found.group(1)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"go beyond weights ({lines[-1] if lines else type(exc).__name__})"


def load_weights_only(source: Union[str, BinaryIO], name: str, map_location: Any = "cpu", hint: str = "") -> Any:
    """``torch.load(weights_only=True)``; a file that needs more is UnsafeCheckpoint naming ``name``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(name, _needs(exc), hint) from None


def load_dcp_metadata(stream: BinaryIO, name: str) -> Any:
    """DCP's ``.metadata`` through the restricted unpickler; anything else is UnsafeCheckpoint."""
    _metadata_globals()
    try:
        return _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(name, _needs(exc), _NOT_DCP) from None


def check_dcp_folder(folder: str) -> None:
    """Read ``folder``'s DCP metadata restricted, before DCP does: a planted one is UnsafeCheckpoint
    here, in one line, rather than inside DCP (which logs a traceback per failed read and wraps it)."""
    with open(os.path.join(folder, DCP_METADATA), "rb") as handle:
        load_dcp_metadata(handle, folder)


def safe_reader(path: str) -> Any:
    """A DCP ``FileSystemReader`` for ``path`` whose metadata is read by ``load_dcp_metadata``."""
    return _reader_class()(path)


@functools.lru_cache(maxsize=None)
def _reader_class() -> type:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _metadata_fn
    from torch.distributed.checkpoint.metadata import StorageMeta

    class WeightsOnlyReader(dcp.FileSystemReader):
        """FileSystemReader whose metadata cannot run code (DCP itself reads it with pickle.load)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = _metadata_fn if rank is None else f"__{rank}{_metadata_fn}"
            path = os.path.join(str(self.path), name)
            with open(path, "rb") as handle:
                metadata = load_dcp_metadata(handle, os.path.dirname(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return WeightsOnlyReader


def safe_planner(folder: str, **kwargs: Any) -> Any:
    """DCP's default load planner for ``folder``, its byte items read weights-only (DCP: weights_only=False)."""
    planner = _planner_class(False)(**kwargs)
    planner.lmsdp_folder = folder
    return planner


def safe_full_planner(folder: str, **kwargs: Any) -> Any:
    """The same for DCP's empty-state-dict planner (one process reading a whole folder)."""
    planner = _planner_class(True)(**kwargs)
    planner.lmsdp_folder = folder
    return planner


@functools.lru_cache(maxsize=None)
def _planner_class(empty: bool) -> type:
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base: type = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    def load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
        obj = load_weights_only(value, f"{self.lmsdp_folder} ({read_item.dest_index.fqn})", hint=_NOT_DCP)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    return type(f"WeightsOnly{base.__name__.lstrip('_')}", (base,), {"load_bytes": load_bytes})


# ------------------------------------------------------------------------------------ plain data
def make_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` as tensors and plain data (dicts, lists, tuples, numbers, strings, None, dtypes):
    numpy arrays become tensors and numpy scalars numbers; anything else is NotPlainData naming
    where it sits (``where``: the path so far, e.g. ``checkpoint['rng'][0]``). What is plain
    already comes back as the same object (a state_dict keeps its ``_metadata``)."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, dict):
        items = {key: make_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        if type(value) in (dict, OrderedDict) and all(items[key] is value[key] for key in value):
            return value
        plain = OrderedDict(items) if isinstance(value, OrderedDict) else items
        if isinstance(value, OrderedDict):
            plain.__dict__.update(make_plain(vars(value), f"{where} attributes"))
        return plain
    if isinstance(value, (list, tuple)):
        items = [make_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        if type(value) in (list, tuple) and all(a is b for a, b in zip(items, value)):
            return value
        return items if isinstance(value, list) else tuple(items)
    kind = type(value)
    if kind.__module__ == "numpy":
        import numpy

        if isinstance(value, numpy.ndarray):
            return torch.from_numpy(numpy.array(value))
        if isinstance(value, numpy.generic):
            return value.item()
    raise NotPlainData(f"{where} holds a {kind.__module__}.{kind.__qualname__}, which is neither a tensor "
                       "nor plain data", hint="checkpoints hold tensors, numbers, strings, lists and dicts only")
