"""Starting ranks: the launch plan, the mpirun command, running it (signals, first failure), the
per-rank output demultiplexer and log files, and script mode's start-up hook. Never imports ``train``."""
