"""Benchmarks (`make bench`): latency, scale, footprint and replay speed, each figure measured
next to a baseline in the same run. See bench/__main__.py and build/bench/results.md."""
