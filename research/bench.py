"""Benchmarks: how fast, how much memory. Numbers come from here, never from timed tests.

    python -m research.bench exchange      # KEM vs cross-attention, forward+backward, time and peak memory
    python -m research.bench step          # a whole training step of MultiTaskNet with kem / cross / none
    python -m research.bench etf           # what projecting the tokens into ETF space costs
    python -m research.bench data          # SyntheticRooms samples per second
    python -m research.bench edges         # the exact edge metric on 480x640 maps
    python -m research.bench presets       # the nyud / pascal presets at protocol size: step, memory, evaluation
    python -m research.bench --help        # every benchmark this file holds

Each benchmark is a function `bench_<name>(args)` registered in BENCHES at the bottom; it prints
a table and returns its rows so other scripts (and the tables in research/PERFORMANCE.md) can reuse them.
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


# --- measuring one step in a fresh process ----------------------------------------------------

def _make_step(spec, device):
    """spec (a tuple, so it pickles) -> a function running one timed step on `device`."""
    import torch

    from etf import ETFProjection
    from kem_mtl import KEM, CrossTaskAttention, MultiTaskNet

    torch.manual_seed(0)
    kind = spec[0]
    if kind in ("train", "infer"):   # a field preset at its real size: torchvision backbone, Adam, or one eval image
        return _make_preset_step(spec, device)
    if kind == "edges":              # the exact edge metric on one network-like map
        _, H, W, max_dist = spec
        import metrics

        (prob, gt), = _edge_maps(1, H, W)
        meter = metrics.EdgeMeter(max_dist, exact=True)         # 99 thresholds, in this process

        def step():
            meter.reset()
            meter.update(prob, gt)
            meter.compute()
        return step
    if kind == "step":       # a whole training step as train.py takes it: forward, its losses, backward, clip, AdamW
        _, exchange, H, W, B, dim, tasks = spec
        import train

        model = MultiTaskNet(dict(tasks), exchange=exchange, dim=dim).to(device)
        if torch.distributed.is_initialized():       # one of --procs processes: gradients averaged as train.py does
            model = train.data_parallel(model, torch.device(device))
        preset = {**train.COMMON, **train.PRESETS["synthetic"]}
        opt, _ = train.build_optimizer(model, preset)              # the optimiser train.py builds
        images = torch.randn(B, 3, H, W, device=device)
        targets = _random_targets(dict(tasks), B, H, W, device)

        def step():
            losses = train.compute_losses(model(images), targets, list(targets))
            loss = sum(train.TASKS[t].weight * losses[t] for t in losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset["grad_clip"])
            opt.step()
        step.info = {"processes": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
        return step
    _, N, D, B, L, k = spec  # one module, forward + backward on (B, N, D) tokens
    module = {"kem": lambda: KEM(D, L, k), "cross": lambda: CrossTaskAttention(D), "etf": lambda: ETFProjection(D),
              # KEM's cost floor if it projected every token three times, as the equations are written:
              "proj3": lambda: torch.nn.ModuleList(torch.nn.Linear(D, D, bias=False) for _ in range(3))}[kind]()
    module = module.to(device)
    x = torch.randn(B, N, D, device=device, requires_grad=True)

    def step():
        y = sum(p(x) for p in module) if kind == "proj3" else module(x)
        y.sum().backward()
    return step


def _random_targets(tasks, B, H, W, device):
    """Targets in each task's format (labels, metres, unit normals, binary maps), for timing only."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {"depth": lambda: torch.rand(B, 1, H, W, generator=g) * 5 + 0.5,
              "normals": lambda: torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1),
              "edge": lambda: (torch.rand(B, 1, H, W, generator=g) > 0.9).float(),
              "sal": lambda: (torch.rand(B, 1, H, W, generator=g) > 0.5).float()}
    return {t: (shapes[t]() if t in shapes else torch.randint(0, c, (B, H, W), generator=g)).to(device)
            for t, c in tasks.items()}


def _make_preset_step(spec, device):
    """("train", backbone, exchange, H, W, B, dim, tasks, lr, weight_decay): forward, a loss over every
    output, backward and an Adam step; ("infer", backbone, exchange, H, W, dim, tasks): one image, no grad.
    The step's `info` records how many tokens the exchange saw (filled by the warm-up step)."""
    import torch

    from kem_mtl import MultiTaskNet

    kind, backbone, exchange, H, W = spec[:5]
    B, dim, tasks = (spec[5], spec[6], spec[7]) if kind == "train" else (1, spec[5], spec[6])
    model = MultiTaskNet(dict(tasks), backbone=backbone, pretrained=False, exchange=exchange, dim=dim).to(device)
    info = {}
    model.exchange.register_forward_pre_hook(lambda module, inputs: info.update(tokens=inputs[0].shape[1]))
    images = torch.randn(B, 3, H, W, device=device)
    if kind == "train":
        lr, weight_decay = spec[8:10]
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

        def step():
            loss = sum(o.float().square().mean() for o in model(images).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.no_grad()
        def step():
            model(images)
    step.info = info
    return step


def _time_and_memory(spec, repeats, device, queue, threads=None, group=None):
    """Runs in a fresh process: seconds per step and the peak extra memory (MB). group: (rank, world,
    port) of a gloo group to join first, for a step that averages its gradients over processes."""
    import resource
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    if group:
        rank, world, port = group
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    step = _make_step(spec, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the process's high-water mark so far: imports, model and input, nothing computed yet
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
    queue.put((seconds, max(extra, 0) / 2**20, getattr(step, "info", {})))
    if group:
        torch.distributed.destroy_process_group()


def measure(spec, repeats=3, device="cpu", info=False, procs=1):
    """(seconds per step, peak MB) for one spec, in its own process so the memory high-water mark
    belongs to this measurement alone; info=True adds what the step recorded (a dict, e.g. tokens).

    procs > 1: that many processes run the spec side by side, each with cores / procs threads, as
    train.py --procs does; a training step ("step") averages its gradients over them as train.py's
    does (DDP over gloo). The seconds are their slowest, the memory their sum."""
    import multiprocessing as mp
    import queue as queue_module
    import socket

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // procs) if procs > 1 else None
    port = None
    if procs > 1 and spec[0] == "step":
        with socket.socket() as s:                      # a free port for the processes to meet on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    children = [ctx.Process(target=_time_and_memory, args=(spec, repeats, device, queue, threads,
                                                           (rank, procs, port) if port else None))
                for rank in range(procs)]
    for child in children:
        child.start()
    results = []
    while len(results) < procs:  # a child that dies (out of memory, an error) must not leave us waiting forever
        try:
            results.append(queue.get(timeout=1.0))
        except queue_module.Empty:
            if any(not c.is_alive() and c.exitcode for c in children) and queue.empty():
                code = next(c.exitcode for c in children if c.exitcode)
                raise RuntimeError(f"measuring {spec[:2]} failed: its process exited with code {code} "
                                   "(its traceback is above; out of memory? try fewer tokens or a smaller batch)")
    for child in children:
        child.join()
    result = (max(r[0] for r in results), sum(r[1] for r in results), results[0][2])
    return result if info else result[:2]


def _write_json(path, rows, args):
    import json

    with open(path, "w") as f:
        json.dump(dict(machine=machine_line(), args=vars(args), rows=rows), f, indent=1)


# --- exchange: KEM vs cross-attention --------------------------------------------------------

def bench_exchange(argv):
    parser = argparse.ArgumentParser(prog="python -m research.bench exchange",
                                     description="KEM vs full cross-attention: forward+backward time and peak memory.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="token counts N")
    parser.add_argument("--dim", type=int, default=128, help="token width D")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument("--slots", type=int, default=16, help="KEM memory slots L")
    parser.add_argument("--topk", type=float, default=1 / 8, help="k as a fraction of N")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--plot", help="also draw time and memory against N into this PNG")
    args = parser.parse_args(argv)
    print(f"# D={args.dim} B={args.batch} L={args.slots} k=N*{args.topk:g}; forward+backward, "
          f"mean of {args.repeats} after one warm-up; memory = peak above the process before its first step")
    print("| N | KEM ms | cross ms | cross/KEM time | KEM MB | cross MB | 3 token projections ms | KEM/projections |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for N in args.tokens:
        k = max(1, round(args.topk * N))
        kem_s, kem_mb = measure(("kem", N, args.dim, args.batch, args.slots, k), args.repeats, args.device)
        cross_s, cross_mb = measure(("cross", N, args.dim, args.batch, 0, 0), args.repeats, args.device)
        proj_s, _ = measure(("proj3", N, args.dim, args.batch, 0, 0), args.repeats, args.device)
        row = dict(tokens=N, kem_ms=kem_s * 1e3, cross_ms=cross_s * 1e3, kem_mb=kem_mb, cross_mb=cross_mb,
                   proj3_ms=proj_s * 1e3)
        rows.append(row)
        print(f"| {N:,} | {row['kem_ms']:.1f} | {row['cross_ms']:.1f} | {cross_s / kem_s:.1f}x | {kem_mb:.0f} "
              f"| {cross_mb:.0f} | {row['proj3_ms']:.1f} | {kem_s / proj_s:.2f} |", flush=True)
    if args.json:
        _write_json(args.json, rows, args)
    if args.plot:
        plot_exchange(rows, args.plot)
    return rows


def plot_exchange(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = [r["tokens"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_t.loglog(N, [r["cross_ms"] for r in rows], "o-", label="cross-attention")
    ax_t.loglog(N, [r["kem_ms"] for r in rows], "s-", label="KEM")
    ax_t.loglog(N, [r["proj3_ms"] for r in rows], "k:", label="3 projections of every token")
    ax_t.set(xlabel="tokens N", ylabel="forward + backward, ms", title="time")
    ax_m.loglog(N, [r["cross_mb"] for r in rows], "o-", label="cross-attention")
    ax_m.loglog(N, [r["kem_mb"] for r in rows], "s-", label="KEM")
    ax_m.set(xlabel="tokens N", ylabel="peak extra memory, MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- step: a whole training step of MultiTaskNet ---------------------------------------------

def bench_step(argv):
    parser = argparse.ArgumentParser(prog="python -m research.bench step",
                                     description="One training step of MultiTaskNet (6 synthetic tasks) per exchange, "
                                                 "as train.py takes it (its losses, clipping, AdamW).")
    parser.add_argument("--sizes", nargs="+", default=["96x128", "192x256"], help="HxW images")
    parser.add_argument("--batch", type=int, default=8, help="images per step, split over --procs")
    parser.add_argument("--dim", type=int, default=64, help="token width (the synthetic preset's)")
    parser.add_argument("--exchanges", nargs="+", default=["none", "kem", "cross"])
    parser.add_argument("--procs", type=int, nargs="+", default=[1],
                        help="processes sharing the batch, as train.py --procs: one thread each, gradients "
                             "all-reduced (DDP over gloo); 1 = one process, every core")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from synthetic import TASKS

    tasks = tuple(TASKS.items())
    print(f"# MultiTaskNet, tiny backbone, {len(tasks)} tasks, batch {args.batch}, dim {args.dim}; forward, "
          f"train.py's losses, backward (with --procs > 1 its gradient all-reduce), clipping and AdamW; mean of "
          f"{args.repeats} after one warm-up")
    print("| image | tokens N | exchange | processes | ms / step | images / s | peak extra MB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    rows = []
    for size in args.sizes:
        H, W = (int(v) for v in size.split("x"))
        N = len(tasks) * -(-H // 8) * -(-W // 8)                 # the tiny backbone's tokens: stride 8
        for exchange in args.exchanges:
            for procs in args.procs:
                if args.batch % procs:
                    raise SystemExit(f"--procs {procs} must divide --batch {args.batch}")
                spec = ("step", exchange, H, W, args.batch // procs, args.dim, tasks)
                seconds, mb = measure(spec, args.repeats, args.device, procs=procs)
                rows.append(dict(size=size, tokens=N, exchange=exchange, procs=procs, ms=seconds * 1e3,
                                 images_per_s=args.batch / seconds, mb=mb))
                print(f"| {size} | {N:,} | {exchange} | {procs} | {seconds * 1e3:.0f} | {args.batch / seconds:.1f} "
                      f"| {mb:.0f} |", flush=True)
    if args.json:
        _write_json(args.json, rows, args)
    return rows


# --- etf: the cost of projecting tokens into ETF space ---------------------------------------

def bench_etf(argv):
    parser = argparse.ArgumentParser(prog="python -m research.bench etf", description="ETFProjection vs KEM, forward + backward.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"# D={args.dim} B={args.batch}; forward+backward; KEM with L=16, k=N/8")
    print("| N | ETF projection ms | KEM ms | projection / KEM |")
    print("|---:|---:|---:|---:|")
    rows = []
    for N in args.tokens:
        etf_s, _ = measure(("etf", N, args.dim, args.batch, 0, 0), args.repeats, args.device)
        kem_s, _ = measure(("kem", N, args.dim, args.batch, 16, max(1, N // 8)), args.repeats, args.device)
        rows.append(dict(tokens=N, etf_ms=etf_s * 1e3, kem_ms=kem_s * 1e3))
        print(f"| {N:,} | {etf_s * 1e3:.1f} | {kem_s * 1e3:.1f} | {etf_s / kem_s:.2f} |", flush=True)
    if args.json:
        _write_json(args.json, rows, args)
    return rows


BENCHES = {"exchange": bench_exchange, "step": bench_step, "etf": bench_etf}


# --- edges: the exact edge metric on NYUD-sized maps -----------------------------------------

def _edge_maps(count, H, W, background=-4.0, seed=0):
    """`count` (prediction, ground truth) pairs shaped like a network's edge output, each (1, 1, H, W):
    ground truth = boundaries of a random Voronoi partition plus random curves; prediction = some
    edges dropped, spurious ones added, blurred, scored at 1/4 resolution with noise, upsampled
    bilinearly (as the decoders do) and passed through a sigmoid. With the default background logit
    it hovers around 0.02, so the lowest thresholds keep most of the image: the thinning and
    matching then work on large regions, which is the slow case."""
    import numpy as np
    import torch
    from scipy import ndimage
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)

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
        logit = background + 9.0 * low + rng.normal(0, 0.6, low.shape)
        logit = ndimage.zoom(logit, (H / low.shape[0], W / low.shape[1]), order=1)
        return 1 / (1 + np.exp(-logit))

    maps = []
    for _ in range(count):
        gt = drawing(70, 25)
        maps.append((torch.from_numpy(prediction(gt))[None, None].float(), torch.from_numpy(gt)[None, None].long()))
    return maps


def bench_edges(argv):
    """Seconds per 480×640 image for EdgeMeter (99 thresholds), extrapolated to the 654 NYUD val images.

    The maps are synthetic but shaped like a network's output (`_edge_maps`): ground truth = boundaries
    of a random Voronoi partition plus random curves, prediction = a degraded, blurred, upsampled copy
    through a sigmoid. Its background hovers around 0.02, so the lowest thresholds keep most of the
    image: the thinning and matching then work on large regions, which is the slow case.
    """
    import time

    import numpy as np
    import torch

    import metrics

    parser = argparse.ArgumentParser(prog="python -m research.bench edges", description=bench_edges.__doc__)
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
    maps = _edge_maps(args.images, H, W, args.background, args.seed)
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

    parser = argparse.ArgumentParser(prog="python -m research.bench data", description=bench_data.__doc__)
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


# --- presets: what a real nyud / pascal run costs on this machine ----------------------------

def bench_presets(argv):
    """The field presets at protocol size: a training step, its memory, and evaluation per image.

    For each preset (train.PRESETS: dim, batch, Adam, max_iters; datasets: tasks, crop and eval sizes), backbone
    and exchange, each measured in a fresh process: seconds per training step (forward, a loss over
    every output, backward, Adam step) and its peak extra memory, the tokens the exchange sees (read
    from the model by a hook), and the projection for the preset's max_iters. Evaluation per image =
    the forward of one image at the eval size (no grad) + the exact edge metric (EdgeMeter, 99
    thresholds, one process) on a network-like map of that size (`_edge_maps`), projected to the
    official val split.

    Notes: pretrained=False, since weights cannot be downloaded here; the cost is the same. The loss is
    a squared mean per output, not the preset's task losses (their cost is small next to the network).
    train.py spreads the exact edges over worker processes beside the forward, so with spare cores
    evaluation takes less than forward + edges; with 2 cores, about that.
    """
    import datasets
    from kem_mtl import BACKBONES, EXCHANGES
    from train import PRESETS

    parser = argparse.ArgumentParser(prog="python -m research.bench presets", description=bench_presets.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["nyud", "pascal"], choices=sorted(datasets.SPLIT_SIZES))
    parser.add_argument("--backbones", nargs="+", default=["swin_t", "resnet50"], choices=BACKBONES,
                        help="tiny makes a quick check of the harness")
    parser.add_argument("--exchanges", nargs="+", default=["kem", "cross", "none"], choices=EXCHANGES)
    parser.add_argument("--size", type=lambda text: tuple(int(v) for v in text.lower().split("x")), metavar="HxW",
                        help="override both the train crop and the eval size (quick checks only)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    print(f"# train step: forward, loss over every output, backward, Adam; eval: 1 image forward (no grad) "
          f"+ exact edges (99 thresholds, 1 process); mean of {args.repeats} after one warm-up, each in a fresh "
          f"process; memory = peak above the process before its first step; random init (cost as pretrained)")
    print("| preset | backbone | exchange | train crop | tokens | s / step | peak extra MB | steps | projected "
          "| eval size | tokens | forward s / image | edges s / image | val images | projected "
          "| load before → after |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in args.presets:
        preset, tasks = PRESETS[name], tuple(datasets.TASKS[name].items())
        sizes = datasets.DEFAULT_SIZES[name]
        train_hw, eval_hw = (args.size, args.size) if args.size else (sizes["train"], sizes["eval"])
        val_images, steps = datasets.SPLIT_SIZES[name]["val"], preset["max_iters"]
        edges_s, _ = measure(("edges", *eval_hw, preset["edge_max_dist"]), args.repeats, args.device)
        for backbone in args.backbones:
            for exchange in args.exchanges:
                load = os.getloadavg()[0]       # others on the machine slow every number: say how many
                step_s, step_mb, seen = measure(
                    ("train", backbone, exchange, *train_hw, preset["batch_size"], preset["dim"], tasks,
                     preset["lr"], preset["weight_decay"]), args.repeats, args.device, info=True)
                forward_s, _, seen_eval = measure(("infer", backbone, exchange, *eval_hw, preset["dim"], tasks),
                                                  args.repeats, args.device, info=True)
                row = dict(preset=name, backbone=backbone, exchange=exchange, batch=preset["batch_size"],
                           dim=preset["dim"], train_size=list(train_hw), tokens=seen["tokens"], step_s=step_s,
                           step_mb=step_mb, steps=steps, train_hours=steps * step_s / 3600,
                           eval_size=list(eval_hw), eval_tokens=seen_eval["tokens"], forward_s=forward_s,
                           edges_s=edges_s, eval_s_per_image=forward_s + edges_s, val_images=val_images,
                           val_minutes=val_images * (forward_s + edges_s) / 60, load_before=load,
                           load_after=os.getloadavg()[0])
                rows.append(row)
                print(f"| {name} | {backbone} | {exchange} | {'x'.join(map(str, train_hw))} | {row['tokens']:,} "
                      f"| {step_s:.2f} | {step_mb:,.0f} | {steps:,} | {row['train_hours']:,.1f} h "
                      f"| {'x'.join(map(str, eval_hw))} | {row['eval_tokens']:,} | {forward_s:.2f} | {edges_s:.2f} "
                      f"| {val_images:,} | {row['val_minutes']:,.1f} min | {load:.2f} → {row['load_after']:.2f} |",
                      flush=True)
    if args.json:
        _write_json(args.json, rows, args)
    return rows


BENCHES["presets"] = bench_presets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark to run")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the benchmark's own options; `python -m research.bench <what> --help` lists them")
    args = parser.parse_args(argv)
    if not {"-h", "--help"} & set(args.options):
        print(machine_line())
    BENCHES[args.what](args.options)


if __name__ == "__main__":
    sys.exit(main())
