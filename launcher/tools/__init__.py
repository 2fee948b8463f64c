"""Offline tools behind ``lmsrun`` subcommands (plan, tune, report, export, slurm), reached only by
name through ``lmsdp.launcher.cli.subcommands``."""
