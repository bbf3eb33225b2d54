"""Research experiments that chose a default, run as `python -m experiments.NAME` (README.md)."""
