"""Benchmarks behind `make bench`; each writes markdown + json under benchmarks/ with its command
and the machine that made it."""
