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


# --- edges: the exact edge metric on NYUD-sized maps -----------------------------------------

def bench_edges(argv):
    """Seconds per 480×640 image for EdgeMeter (99 thresholds), extrapolated to the 654 NYUD val images.

    The maps are synthetic but shaped like a network's output: ground truth = boundaries of a random
    Voronoi partition plus random curves; prediction = some edges dropped, spurious ones added,
    blurred, scored at 1/4 resolution with noise, upsampled bilinearly (as the decoders do) and passed
    through a sigmoid. Its background hovers around 0.02, so the lowest thresholds keep most of the
    image: the thinning and matching then work on large regions, which is the slow case.
    """
    import time

    import numpy as np
    import torch
    from scipy import ndimage
    from scipy.spatial import cKDTree

    import metrics

    parser = argparse.ArgumentParser(prog="bench.py edges", description=bench_edges.__doc__)
    parser.add_argument("--images", type=int, default=8, help="synthetic images to score; more = steadier figure")
    parser.add_argument("--processes", type=int, default=2, help="EdgeMeter worker processes (the target assumes 2)")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--max-dist", type=float, default=0.011, help="0.011 NYUD, 0.0075 PASCAL")
    parser.add_argument("--thresholds", type=int, default=99)
    parser.add_argument("--background", type=float, default=-4.0,
                        help="prediction logit away from edges; try -7 for cleaner (faster) maps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    H, W = args.size
    rng = np.random.default_rng(args.seed)

    def drawing(cells, curves):
        seeds = rng.uniform(0, 1, (cells, 2)) * (H, W)
        _, label = cKDTree(seeds).query(np.stack(np.mgrid[0:H, 0:W], -1).reshape(-1, 2))
        label = label.reshape(H, W)
        edge = np.zeros((H, W), bool)
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        edge[:-1] |= label[:-1] != label[1:]
        for _ in range(curves):                     # random-walk strokes with slowly turning heading
            heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, 200))
            y = np.clip(rng.uniform(0, H) + np.cumsum(np.sin(heading)), 0, H - 1).round().astype(int)
            x = np.clip(rng.uniform(0, W) + np.cumsum(np.cos(heading)), 0, W - 1).round().astype(int)
            edge[y, x] = True
        return edge

    def prediction(gt):
        kept = ndimage.gaussian_filter(rng.random((H, W)), 20) > 0.49      # drop some edges in patches
        strength = ndimage.gaussian_filter((gt & kept) + 0.6 * drawing(12, 6), 2.0) * 5.0
        low = strength[: H // 4 * 4, : W // 4 * 4].reshape(H // 4, 4, W // 4, 4).mean((1, 3))
        logit = args.background + 9.0 * low + rng.normal(0, 0.6, low.shape)
        logit = ndimage.zoom(logit, (H / low.shape[0], W / low.shape[1]), order=1)
        return 1 / (1 + np.exp(-logit))

    maps = []
    for _ in range(args.images):
        gt = drawing(70, 25)
        maps.append((torch.from_numpy(prediction(gt))[None, None].float(), torch.from_numpy(gt)[None, None].long()))
    print(f"# {args.images} synthetic {H}x{W} maps, {args.thresholds} thresholds, max_dist {args.max_dist}, "
          f"GT edge pixels {np.mean([g.float().mean().item() for _, g in maps]):.1%}, "
          f"prediction > 0.01 on {np.mean([(p > 0.01).float().mean().item() for p, _ in maps]):.0%} of pixels")
    print("| mode | processes | s / image (wall) | CPU s / image | NYUD val, 654 images (wall) | odsF "
          "| load before → after |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for exact in (True, False):
        meter = metrics.EdgeMeter(args.max_dist, args.thresholds, exact=exact, processes=args.processes)
        meter.update(torch.zeros(2 * args.processes, 1, 8, 8), torch.zeros(2 * args.processes, 1, 8, 8))  # start workers
        meter.reset()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        for prob, gt in maps:
            meter.update(prob, gt)
        result = meter.compute()
        per_image = (time.perf_counter() - start) / args.images
        meter.close()
        # CPU time of the same work in this process: steadier than wall time when others share the cores
        cpu = time.process_time()
        for prob, gt in maps:
            metrics.edge_counts(prob[0, 0].numpy(), gt[0, 0].numpy(), args.max_dist, args.thresholds, exact)
        cpu = (time.process_time() - cpu) / args.images
        row = dict(exact=exact, processes=args.processes if exact else 1, s_per_image=per_image, cpu_s_per_image=cpu,
                   nyud_val_s=654 * per_image, odsF=result["odsF" if exact else "odsF_approx"], load_before=load,
                   load_after=os.getloadavg()[0])
        rows.append(row)
        print(f"| {'exact' if exact else 'approx'} | {row['processes']} | {per_image:.3f} | {cpu:.3f} | "
              f"{row['nyud_val_s'] / 60:.1f} min | {row['odsF']:.4f} | {load:.2f} → {row['load_after']:.2f} |",
              flush=True)
    return rows


BENCHES["edges"] = bench_edges


def bench_data(argv):
    """SyntheticRooms samples per second on one core: dataset[i] with every task, no transform.

    One process, one thread (torch.set_num_threads(1); the renderer's numpy calls are single-threaded).
    Each size renders fresh indices after a short warm-up; the cached row is dataset[i] from
    SyntheticRooms(..., cache=True), whose rendering happens in the constructor, outside the timing.
    """
    import time

    import torch

    from synthetic import SyntheticRooms

    parser = argparse.ArgumentParser(prog="bench.py data", description=bench_data.__doc__)
    parser.add_argument("--samples", type=int, default=400, help="timed samples per size")
    parser.add_argument("--sizes", nargs="+", default=["96x128", "192x256"], help="HxW image sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# dataset[i] with all tasks, {args.samples} fresh samples per size after 20 warm-up, 1 thread")
    print("| size | cache | samples / s (wall) | samples / CPU-s | ms / sample | ms / batch of 8 | load before → after |")
    print("|---|---|---:|---:|---:|---:|---|")
    rows = []
    for text in args.sizes:
        H, W = (int(x) for x in text.lower().split("x"))
        for cache in (False, True):
            if cache and (H, W) != (96, 128):
                continue                                     # the cache matters at the training size only
            n = args.samples + 20
            ds = SyntheticRooms("train", n, size=(H, W), seed=args.seed, cache=cache)
            for i in range(20):
                ds[i]
            load = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()   # CPU time: steadier when others load the machine
            for i in range(20, n):
                ds[i]
            per_sample = (time.perf_counter() - start) / args.samples
            cpu_per_sample = (time.process_time() - cpu_start) / args.samples
            row = dict(size=(H, W), cache=cache, samples_per_s=1 / per_sample, samples_per_cpu_s=1 / cpu_per_sample,
                       ms_per_sample=per_sample * 1e3, load_before=load, load_after=os.getloadavg()[0])
            rows.append(row)
            print(f"| {H}×{W} | {'yes' if cache else 'no'} | {row['samples_per_s']:.0f} | {row['samples_per_cpu_s']:.0f} "
                  f"| {row['ms_per_sample']:.2f} "
                  f"| {8 * row['ms_per_sample']:.1f} | {load:.2f} → {row['load_after']:.2f} |", flush=True)
    return rows


BENCHES["data"] = bench_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    print(machine_line())
    BENCHES[args.what](rest)


if __name__ == "__main__":
    sys.exit(main())
