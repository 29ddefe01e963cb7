"""Benchmarks and studies of aitm_torchrec, outside the library: ``python -m benchmarks --help``.

Modules import downward only: ``common`` and ``roofline`` at the bottom, one module per benchmark
above them (``quality`` under ``peer``, ``study`` and ``true_form``), ``all`` and ``run`` (the
command line) at the top. Committed results are under ``benchmarks/results/`` and
``benchmarks/studies/``.
"""
