"""Benchmarks: how fast, how much memory. Numbers come from here, never from timed tests.

    python bench.py exchange      # KEM vs cross-attention, forward+backward, time and peak memory
    python bench.py --help        # every benchmark this file holds

Each benchmark is a function `bench_<name>(args)` registered in BENCHES at the bottom; it prints
a table and returns its rows so other scripts (and the README's tables) can reuse them.
"""
import argparse
import os
import sys


def machine_line():
    """One line saying where the numbers came from (they depend on it)."""
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}")


BENCHES = {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    print(machine_line())
    BENCHES[args.what](rest)


if __name__ == "__main__":
    sys.exit(main())
