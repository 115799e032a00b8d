"""prefkern's benchmark CLI: ``python -m benchmarks [SUITE ...]`` (see ``--help``)."""
