"""``trimode bench``: per-mode, per-category benchmarks against a peer in the same run.

``datasets`` loads prompt sets and scorers, ``runner`` decodes them and collects metrics,
``peer`` runs transformers' ``generate`` on the same weights, ``oracle`` and ``sol`` give the
speed-of-light analysis (docs/spec.md 7.3), ``report`` prints tables and JSON, draws plots and writes
``benchmarks/RESULTS.md``, ``cli`` is the subcommand.
"""
