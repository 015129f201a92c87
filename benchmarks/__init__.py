"""The study runner, the report writer and speed benchmarks (imports every other package)."""
