"""A plain user script for script-mode tests: no torch, no lmsdp. Prints what the rank sees."""
import argparse
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("words", nargs="*")
parser.add_argument("--exit-rank", type=int, default=-1)
parser.add_argument("--code", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--marker", default="")
args = parser.parse_args()

rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
signal.signal(signal.SIGTERM, lambda n, f: (print(f"rank {rank} got signal {n}", flush=True), sys.exit(0)))
print(f"hello from rank {rank} of {size} words={args.words}", flush=True)
print(f"rank {rank} user_sitecustomize={os.environ.get('USER_SITECUSTOMIZE_RAN', '0')} "
      f"swap={os.environ.get('LMSDP_SWAP', '0')} threshold={os.environ.get('LMSDP_SWAP_THRESHOLD', '')} "
      f"omp={os.environ.get('OMP_NUM_THREADS', '')}", flush=True)
print(f"rank {rank} to stderr", file=sys.stderr, flush=True)
if rank == args.exit_rank:
    print(f"rank {rank} exits with {args.code}", file=sys.stderr, flush=True)
    sys.exit(args.code)
time.sleep(args.sleep)
