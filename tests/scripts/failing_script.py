"""A user script for script-mode failure tests (imports no lmsdp): rank ``--fail-rank`` fails after
the ranks have met, the others wait in a collective.

``--how closed``: closes stdout and stderr, then raises (plain script, no MPI library);
``--how mpi4py``: initializes MPI through mpi4py; the failing rank raises while the others sit in a
barrier, which without an abort would last until they are killed;
``--how horovod``: initializes MPI through Horovod (no mpi4py); the failing rank raises while the
others sit in an allreduce."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--how", choices=("closed", "mpi4py", "horovod"), required=True)
parser.add_argument("--fail-rank", type=int, default=1)
parser.add_argument("--marker", default="")
args = parser.parse_args()
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0")))

if args.how == "mpi4py":
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
    if rank == args.fail_rank:
        raise ValueError(f"mpi4py script failed on rank {rank}")
    MPI.COMM_WORLD.Barrier()  # never completes: the failing rank is gone
    time.sleep(600)
elif args.how == "horovod":
    import horovod.torch as hvd
    import torch

    hvd.init()
    hvd.allreduce(torch.ones(1))
    if rank == args.fail_rank:
        raise ValueError(f"horovod script failed on rank {rank}")
    hvd.allreduce(torch.ones(1))  # never completes: the failing rank is gone
    time.sleep(600)
else:
    if rank == args.fail_rank:
        os.close(1)
        os.close(2)
        raise ValueError(f"script failed silently on rank {rank}")
    time.sleep(600)
