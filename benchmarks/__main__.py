"""``python -m benchmarks SUBCOMMAND ...``: see ``benchmarks/run.py``."""

from benchmarks.run import main

main()
