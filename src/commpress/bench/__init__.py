"""Benchmark tools: measurement rows, link emulation and one writer for the results.

- `commpress.bench.netem` -- run local ranks over a shaped loopback in a private
  network namespace (an emulated 100mbit / 1gbit / 10gbit link).
- `commpress.bench.report` -- rows (lists of dicts) to an aligned table, JSON,
  CSV and matplotlib plots.

Measurement modules return rows and never print or write files themselves;
``commpress bench`` and ``benchmarks/*.py`` put the pieces together.
"""
