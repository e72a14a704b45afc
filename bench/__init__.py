"""The benchmark harness: `python -m bench.run` (see bench/README.md)."""

from pathlib import Path

BENCH = Path(__file__).resolve().parent  # results/, README.md, and the cwd of what it starts
