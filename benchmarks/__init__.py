"""The product's benchmarks, each run by `make bench` as `python -m benchmarks.NAME`."""
