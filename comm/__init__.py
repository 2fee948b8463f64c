"""lmsdp.comm: gradient allreduce backends (Horovod, torch.distributed)."""
from .config import CommConfig

__all__ = ["CommConfig"]
