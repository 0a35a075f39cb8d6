"""The lab: the experiments that test the paper's claims, and the benchmarks, one module each.

`python -m research <name>` runs an experiment (research/__main__.py lists them); research/README.md
says what each asks, its command, and where its records and tables are. runner.py (records, train.py
child processes, the shared skeleton) and stats.py (t-intervals, paired comparisons, families with
Holm's correction) serve them all. Nothing in the reference (the top-level modules) imports this package.
"""
