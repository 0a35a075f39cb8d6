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


# --- exchange: KEM vs cross-attention --------------------------------------------------------

def _time_and_memory(kind, N, D, B, L, k_frac, repeats, device, queue):
    """Runs in a fresh process: forward+backward seconds and the peak extra memory (MB)."""
    import resource
    import time

    import torch

    from kem_mtl import KEM, CrossTaskAttention

    torch.manual_seed(0)
    if kind == "kem":
        module = KEM(D, L, max(1, round(k_frac * N)))
    elif kind == "cross":
        module = CrossTaskAttention(D)
    else:  # "proj3": KEM's cost floor if it projected every token, as the equations are written
        module = torch.nn.ModuleList(torch.nn.Linear(D, D, bias=False) for _ in range(3))
    module = module.to(device)
    x = torch.randn(B, N, D, device=device, requires_grad=True)

    def step():
        y = sum(p(x) for p in module) if kind == "proj3" else module(x)
        y.sum().backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the process's high-water mark so far: imports, module and input, nothing computed yet
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # bytes (Linux: KiB)
    step()                                                     # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put((seconds, max(extra, 0) / 2**20))


def measure_exchange(kind, N, *, D=128, B=2, L=16, k_frac=1 / 8, repeats=3, device="cpu"):
    """(seconds per forward+backward, peak MB) for one module, in its own process so the
    memory high-water mark belongs to this measurement alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_time_and_memory, args=(kind, N, D, B, L, k_frac, repeats, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_exchange(argv):
    parser = argparse.ArgumentParser(prog="bench.py exchange",
                                     description="KEM vs full cross-attention: forward+backward time and peak memory.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="token counts N")
    parser.add_argument("--dim", type=int, default=128, help="token width D")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument("--slots", type=int, default=16, help="KEM memory slots L")
    parser.add_argument("--topk", type=float, default=1 / 8, help="k as a fraction of N")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"# D={args.dim} B={args.batch} L={args.slots} k=N*{args.topk:g}; forward+backward, "
          f"mean of {args.repeats} after one warm-up; memory = peak above the process before its first step")
    print("| N | KEM ms | cross ms | cross/KEM time | KEM MB | cross MB | 3 token projections ms | KEM/projections |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for N in args.tokens:
        kw = dict(D=args.dim, B=args.batch, L=args.slots, k_frac=args.topk, repeats=args.repeats, device=args.device)
        kem_s, kem_mb = measure_exchange("kem", N, **kw)
        cross_s, cross_mb = measure_exchange("cross", N, **kw)
        proj_s, _ = measure_exchange("proj3", N, **kw)
        row = dict(tokens=N, kem_ms=kem_s * 1e3, cross_ms=cross_s * 1e3, kem_mb=kem_mb, cross_mb=cross_mb,
                   proj3_ms=proj_s * 1e3)
        rows.append(row)
        print(f"| {N:,} | {row['kem_ms']:.1f} | {row['cross_ms']:.1f} | {cross_s / kem_s:.1f}x | {kem_mb:.0f} "
              f"| {cross_mb:.0f} | {row['proj3_ms']:.1f} | {kem_s / proj_s:.2f} |", flush=True)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(), args=vars(args), rows=rows), f, indent=1)
    return rows


BENCHES = {"exchange": bench_exchange}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    print(machine_line())
    BENCHES[args.what](rest)


if __name__ == "__main__":
    sys.exit(main())
