"""adapterctl's benchmarks: each module runs as `python -m benchmarks.NAME` (see README.md)."""
