"""lmsdp.runtime: what every process of a job shares, torch-free and importable from launcher, comm
and swapping alike: where a rank is (topology), the ``LMSDP_*`` environment, name registries,
chrome-trace files and per-rank error files."""
