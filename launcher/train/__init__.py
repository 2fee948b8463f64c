"""Inside one rank: the training loop (``trainer``) composed of its parts (build, data, checkpoints,
resume, metrics, threads, the job's swap plan). Never imports ``launch``."""
