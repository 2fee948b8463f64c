"""``python -m lmsdp.launcher.cli``: the rank program lmsrun starts under mpirun (same as ``lmsrun``)."""
import sys

from lmsdp.launcher.cli import main

sys.exit(main())
