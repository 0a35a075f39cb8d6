"""The experiments behind experiments.py, one module each, its logic and its report side by side.

runner.py (records, train.py child processes, the shared skeleton) and stats.py (t-intervals, paired
comparisons, families with Holm's correction) serve them all. Run them through the root script:
`python experiments.py <name>`.
"""
