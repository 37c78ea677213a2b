"""The ground floor: what every other room stands on.

Owns params.yaml's schema and reader (``params``), atomic file writing (``files``), the one
JSON Lines reader and writer (``jsonl``), the errors meant for the user (``errors``), the
machine (``blas``: a BLAS that cannot crash MLX; ``kernels``: the fast x86 CPU kernels;
``environment``: library versions), and the project's own bookkeeping (``code_hash``: the
code a script runs; ``freshness``: are DVC's outputs current). Imports nothing else of
voicetune.
"""
