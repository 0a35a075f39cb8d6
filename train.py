"""Train and evaluate a multi-task network with KEM, cross-attention or no exchange.

    python train.py                                   # offline demo: SyntheticRooms, a few minutes on a CPU
    python train.py --dataset nyud                    # NYUD-v2, the field's protocol, pretrained Swin-T
    torchrun --nproc_per_node=4 train.py --dataset pascal       # several GPUs (or machines)
    python train.py --tasks depth --out-dir runs/st-depth       # a single-task baseline
    python train.py --baselines runs/baselines        # ... and Δm against such baselines
    python train.py --resume runs/<run>               # continue an interrupted run exactly
    python train.py --eval-only --ckpt runs/<run>/best.pt       # evaluate a checkpoint

One flat loop (data -> model -> losses -> step -> log -> evaluate -> save) with small helpers above
it. Presets per dataset fill every default (PRESETS below); any flag overrides its preset. A plain
`python train.py` never needs a launcher; under torchrun the same code runs DistributedDataParallel.

Reproducibility, in three pieces:
- the data stream is a function of (seed, position): StreamSampler below shuffles each epoch with
  seed + epoch and shards every global batch across processes, and every sample's augmentation
  is seeded from its position in the stream, so what a sample looks like does not depend on the
  worker, the process or the restart that loads it;
- losses are per-image means averaged over the batch, and the network normalises per image
  (GroupNorm), so N processes with batch b compute what one process computes with batch N b;
- checkpoints hold model, optimiser, scheduler, scaler, iteration and RNG states, written to a
  temporary file and renamed, so `--resume` continues a run exactly and a crash never leaves a
  half-written checkpoint.

Losses (REFERENCE §6, the InvPT family's protocol): cross-entropy for semseg and parts, L1 on valid
depth, L1 on normalised normals over valid pixels, class-balanced BCE for edges (positive weight
0.95), BCE for saliency; 255 (and 0 depth, zero normals) ignored. [OURS] each loss is a mean over
an image's valid pixels, then a mean over the batch (the field pools over the batch's pixels).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import datasets
import metrics
from kem_mtl import BACKBONES, ETF_MODES, EXCHANGES, MultiTaskNet

# --- presets: every default, per dataset ------------------------------------------------------
# nyud / pascal follow the field's protocol (REFERENCE §6); the synthetic preset is ours, sized so
# that `python train.py` finishes in a few minutes on a 2-core laptop CPU and learns every task.

FIELD_WEIGHTS = {"semseg": 1.0, "parts": 2.0, "sal": 5.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
PRESETS = {
    "synthetic": dict(backbone="tiny", pretrained=False, dim=64, train_size=(96, 128), eval_size=(96, 128),
                      batch_size=8, max_iters=1500, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                      warmup_iters=100, grad_clip=1.0, eval_interval=500, log_interval=50, workers=None,
                      edge_max_dist=0.011, train_samples=2000, val_samples=200),
    "nyud": dict(backbone="swin_t", pretrained=True, dim=128, train_size=(448, 576), eval_size=(480, 640),
                 batch_size=2, max_iters=40000, optimizer="adam", lr=2e-5, weight_decay=1e-6,
                 warmup_iters=0, grad_clip=10.0, eval_interval=4000, log_interval=100, workers=4,
                 edge_max_dist=0.011, train_samples=None, val_samples=None),
    "pascal": dict(backbone="swin_t", pretrained=True, dim=128, train_size=(512, 512), eval_size=(512, 512),
                   batch_size=2, max_iters=40000, optimizer="adam", lr=2e-5, weight_decay=1e-6,
                   warmup_iters=0, grad_clip=10.0, eval_interval=4000, log_interval=100, workers=4,
                   edge_max_dist=0.0075, train_samples=None, val_samples=None),
}
COMMON = dict(exchange="kem", etf="none", num_slots=16, topk=0.25, accum=1, seed=0, device="auto",
              amp="none", compile=False, poly_power=0.9, download=True,
              data_seed=0)  # which scenes SyntheticRooms draws: fixed, so every run sees the same val set
# Settings that may change when a run is resumed; every other one must match the checkpoint.
RESUMABLE = {"out_dir", "resume", "device", "workers", "log_interval", "eval_interval", "data_dir", "download",
             "compile", "baselines", "max_iters", "eval_only", "ckpt"}
# Settings that define the network: taken from the checkpoint by --eval-only.
MODEL_KEYS = ("dataset", "tasks", "backbone", "exchange", "etf", "dim", "num_slots", "topk")


class UsageError(Exception):
    """Bad input from the command line: printed as one paragraph, exit code 2, no traceback."""


def parse_args(argv):
    p = argparse.ArgumentParser(description="Multi-task training with KEM (SGW-based MTL, ACCV 2024).",
                                epilog="Every default comes from the dataset's preset; any flag overrides it.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(PRESETS),
                   help="synthetic (the default) needs no download; nyud and pascal download once")
    g.add_argument("--data-dir", help="where datasets live (else $KEM_MTL_DATA, else ~/.cache/kem_mtl)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="fetch a missing real dataset (default); --no-download stops with instructions instead")
    g.add_argument("--tasks", help="comma list, e.g. semseg,depth (default: all of the dataset's; one task = single-task baseline)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (0 loads in the main process)")
    g.add_argument("--image-size", type=_size, metavar="HxW",
                   help="synthetic: the rendered size (train and val); nyud/pascal: the training crop")
    g.add_argument("--train-samples", type=int, help="synthetic only: scenes in the train split")
    g.add_argument("--val-samples", type=int, help="synthetic only: scenes in the val split")
    g = p.add_argument_group("model")
    g.add_argument("--exchange", choices=EXCHANGES, help="how tasks meet: kem (the paper), cross (full attention), none")
    g.add_argument("--etf", choices=ETF_MODES, help="sKEM: project tokens (features), fix the slots (slots), or both")
    g.add_argument("--num-slots", type=int, help="KEM memory slots L (try 8-32)")
    g.add_argument("--topk", type=_number, help="tokens per slot: a count (e.g. 64) or a fraction of all tokens (e.g. 0.25)")
    g.add_argument("--backbone", choices=BACKBONES, help="tiny (CPU, from scratch) or a torchvision Swin/ResNet")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="ImageNet weights for torchvision backbones (--no-pretrained offline)")
    g.add_argument("--dim", type=int, help="token width D")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="images per process per step (the field uses 2 per GPU)")
    g.add_argument("--accum", type=int, help="gradient accumulation steps (effective batch = batch x accum x processes)")
    g.add_argument("--max-iters", type=int, help="optimiser steps")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up steps before the polynomial decay")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, help="seed for the model, the data order and the augmentation")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto picks cuda, then mps, then cpu")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision (bf16 also works on CPUs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (slow start, faster steps)")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--out-dir", help="default runs/<dataset>-<exchange>-<timestamp>")
    g.add_argument("--eval-interval", type=int, help="evaluate (and checkpoint) every this many steps")
    g.add_argument("--log-interval", type=int, help="print a log line every this many steps")
    g.add_argument("--resume", metavar="PATH", help="a run directory or its ckpt.pt: continue it exactly")
    g.add_argument("--eval-only", action="store_true", default=None, help="evaluate --ckpt on the val split and stop")
    g.add_argument("--ckpt", metavar="PATH", help="checkpoint for --eval-only")
    g.add_argument("--baselines", metavar="DIR", help="folder of single-task runs: report Δm against them")
    args = p.parse_args(argv)
    return args, {k for k, v in vars(args).items() if v is not None}


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 96x128, got {text!r}")
    return [h, w]


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def resolve_config(args, given):
    """Preset <- explicit flags, then checks that need several settings at once."""
    args.dataset = args.dataset or "synthetic"
    cfg = {**COMMON, **PRESETS[args.dataset]}
    cfg.update({k: v for k, v in vars(args).items() if k in given or k not in cfg})
    cfg["eval_only"] = bool(cfg["eval_only"])
    if cfg["image_size"]:
        cfg["train_size"] = cfg["image_size"]
        if cfg["dataset"] == "synthetic":
            cfg["eval_size"] = cfg["image_size"]
    for key in ("train_samples", "val_samples"):
        if key in given and cfg["dataset"] != "synthetic":
            raise UsageError(f"--{key.replace('_', '-')} only applies to --dataset synthetic; the real datasets "
                             f"always use their whole split")
        if cfg[key] is not None and cfg[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    all_tasks = datasets.TASKS[cfg["dataset"]]
    if cfg["tasks"] is None:
        cfg["tasks"] = list(all_tasks)
    elif isinstance(cfg["tasks"], str):
        cfg["tasks"] = [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
        unknown = [t for t in cfg["tasks"] if t not in all_tasks]
        if unknown or not cfg["tasks"]:
            raise UsageError(f"unknown task(s) {', '.join(unknown) or '(none given)'} for --dataset "
                             f"{cfg['dataset']}; valid tasks are {', '.join(all_tasks)}")
    topk = cfg["topk"]
    if isinstance(topk, int) and topk < 1 or isinstance(topk, float) and not 0 < topk <= 1:
        raise UsageError(f"--topk must be a count >= 1 or a fraction in (0, 1], got {topk}; try 0.25 or 64")
    if cfg["num_slots"] < 1 or cfg["etf"] in ("slots", "both") and cfg["num_slots"] > cfg["dim"] + 1:
        raise UsageError(f"--num-slots must be between 1 and {cfg['dim'] + 1} (ETF slots need dim >= slots - 1), "
                         f"got {cfg['num_slots']}; try 16")
    if cfg["etf"] in ("slots", "both") and cfg["exchange"] != "kem":
        raise UsageError(f"--etf {cfg['etf']} fixes KEM's memory slots, so it needs --exchange kem "
                         f"(got --exchange {cfg['exchange']}); use --etf features or none with it")
    if cfg["backbone"] == "tiny" and cfg["pretrained"]:
        raise UsageError("the tiny backbone has no pretrained weights; add --no-pretrained or pick --backbone swin_t")
    for key in ("batch_size", "max_iters", "accum", "eval_interval", "log_interval", "dim"):
        if cfg[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["workers"] is None:
        # On a 2-core machine, loader processes only fight the model's threads for the cores
        # (measured: 34 img/s with 0 workers, 29 with 1 or 2), so keep two cores for the model.
        cfg["workers"] = max(0, min(4, (os.cpu_count() or 1) - 2))
    if cfg["workers"] < 0 or cfg["lr"] <= 0:
        raise UsageError(f"--workers must be >= 0 and --lr > 0, got {cfg['workers']} and {cfg['lr']}")
    if cfg["eval_only"] and not cfg["ckpt"]:
        raise UsageError("--eval-only needs --ckpt PATH (e.g. runs/<run>/best.pt)")
    cfg["train_size"], cfg["eval_size"] = list(cfg["train_size"]), list(cfg["eval_size"])
    return cfg


# --- data -----------------------------------------------------------------------------------

class StreamSampler(torch.utils.data.Sampler):
    """An endless, resumable, sharded stream of sample keys for one process.

    Global position p (counting images from the start of training) lies in epoch e = p // n at
    perm_e[p % n], where perm_e is a permutation drawn with seed + e. Process r of R takes the
    positions p = r, r + R, r + 2R, ... (like DistributedSampler, but never-ending and able to
    start anywhere). The key handed to the dataset is (p, index) so the augmentation can be seeded
    from p.
    """

    def __init__(self, num_samples, seed, start, rank=0, world=1):
        self.n, self.seed, self.start, self.rank, self.world = num_samples, seed, start, rank, world

    def __iter__(self):
        p, perm, epoch = self.start + self.rank, None, -1
        while True:
            if p // self.n != epoch:
                epoch = p // self.n
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield p, int(perm[p % self.n])
            p += self.world


class SeededSamples(torch.utils.data.Dataset):
    """dataset[(position, index)]: sample `index`, its random augmentation seeded from `position`."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        s = (self.seed * 1_000_003 + position) % 2**63
        torch.manual_seed(s), np.random.seed(s % 2**32), random.seed(s)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state[0]), np.random.set_state(state[1]), random.setstate(state[2])


def build_data(cfg, split, train):
    kwargs = dict(root=cfg["data_dir"], train=train, tasks=cfg["tasks"], seed=cfg["data_seed"], download=cfg["download"],
                  size=tuple(cfg["train_size"] if train else cfg["eval_size"]))
    num = cfg["train_samples"] if split == "train" else cfg["val_samples"]
    if num is not None:
        kwargs["num_samples"] = num
    if cfg["dataset"] == "synthetic" and split == "train":
        kwargs["cache"] = True   # each scene is rendered once, not once per epoch (~0.25 MB a scene)
    return datasets.build_dataset(cfg["dataset"], split, **kwargs)


def collate(samples):
    """Stack tensors; keep `meta` as a list of dicts."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "meta"}
    batch["meta"] = [s.get("meta") for s in samples]
    return batch


# --- losses -----------------------------------------------------------------------------------

def _per_image_mean(loss_map, valid):
    """Mean over each image's valid pixels, then over the batch (images with none count as 0)."""
    valid = valid.float()
    per_image = (loss_map * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    return per_image.mean()


def task_loss(task, pred, target):
    """One task's loss (float32), ignoring 255 labels, 0 depth and zero normals."""
    pred = pred.float()
    if task in ("semseg", "parts"):
        ce = F.cross_entropy(pred, target.clamp(max=pred.shape[1] - 1) * (target != 255), reduction="none")
        return _per_image_mean(ce, target != 255)
    if task == "depth":
        return _per_image_mean((pred - target).abs(), target > 0)
    if task == "normals":
        valid = target.abs().sum(1, keepdim=True) > 0
        return _per_image_mean((F.normalize(pred, dim=1) - target).abs().sum(1, keepdim=True), valid)
    if task == "edge":  # class-balanced BCE: edges are rare, so positives weigh 0.95, negatives 0.05
        valid, y = target != 255, (target == 1).float()
        bce = F.binary_cross_entropy_with_logits(pred, y, reduction="none")
        return _per_image_mean(bce * (0.95 * y + 0.05 * (1 - y)), valid)
    if task == "sal":
        valid, y = target != 255, (target == 1).float()
        return _per_image_mean(F.binary_cross_entropy_with_logits(pred, y, reduction="none"), valid)
    raise ValueError(f"no loss defined for task {task!r}")


def compute_losses(outputs, batch, tasks):
    return {t: task_loss(t, outputs[t], batch[t]) for t in tasks}


def lr_factor(it, warmup, max_iters, power):
    """Linear warm-up from 1/warmup to 1, then polynomial decay to 0 at max_iters."""
    if it < warmup:
        return (it + 1) / warmup
    return max(0.0, 1 - (it - warmup) / max(1, max_iters - warmup)) ** power


# --- evaluation and pictures -----------------------------------------------------------------

def make_meters(cfg, exact_edges, edge_processes=1):
    channels = datasets.TASKS[cfg["dataset"]]
    meters = {}
    for t in cfg["tasks"]:
        if t in ("semseg", "parts"):
            meters[t] = metrics.SegMeter(channels[t])
        elif t == "depth":
            meters[t] = metrics.DepthMeter()
        elif t == "normals":
            meters[t] = metrics.NormalsMeter()
        elif t == "sal":
            meters[t] = metrics.SaliencyMeter()
        elif t == "edge":
            meters[t] = metrics.EdgeMeter(cfg["edge_max_dist"], exact=exact_edges, processes=edge_processes)
    return meters


def predictions(task, out):
    """Raw network output -> what the metric expects."""
    if task in ("semseg", "parts"):
        return out.argmax(1)
    if task in ("edge", "sal"):
        return out.float().sigmoid()
    return out.float()


@torch.no_grad()
def evaluate(model, loader, cfg, device, autocast, exact_edges, log, edge_processes=1):
    model.eval()
    meters = make_meters(cfg, exact_edges, edge_processes)
    first_batch = None
    total = len(loader)
    for i, batch in enumerate(loader):
        images = batch["image"].to(device, non_blocking=True)
        with autocast:
            outputs = model(images)
        for t, meter in meters.items():
            meter.update(predictions(t, outputs[t]).cpu(), batch[t])
        if first_batch is None:
            first_batch = (batch, {t: o.float().cpu() for t, o in outputs.items()})
        if total >= 100 and (i + 1) % (total // 10) == 0:     # long evaluations show progress
            log(f"  evaluating: {i + 1}/{total} batches")
    metrics.sync_meters(list(meters.values()))
    if "edge" in meters:
        meters["edge"].close()
    model.train()
    return {t: m.compute() for t, m in meters.items()}, first_batch


def load_baselines(folder, cfg):
    """Headline metrics of single-task runs (results.json) in `folder`, averaged per task."""
    found = {}
    for root, _, files in os.walk(folder):
        if "results.json" not in files:
            continue
        with open(os.path.join(root, "results.json")) as f:
            res = json.load(f)
        if res["config"]["dataset"] == cfg["dataset"] and len(res["config"]["tasks"]) == 1:
            t = res["config"]["tasks"][0]
            found.setdefault(t, []).append(res["metrics"][t])
    missing = [t for t in cfg["tasks"] if t not in found]
    if missing:
        raise UsageError(f"--baselines {folder} has no single-task {cfg['dataset']} run for task(s) "
                         f"{', '.join(missing)}; train each with e.g. `python train.py --dataset "
                         f"{cfg['dataset']} --tasks {missing[0]} --out-dir {folder}/{missing[0]}`")
    return {t: {k: float(np.mean([r[k] for r in runs if isinstance(r.get(k), (int, float))]))
                for k in runs[0] if isinstance(runs[0][k], (int, float))} for t, runs in found.items()}


def _palette(n):
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, size=(max(n, 1), 3), dtype=np.uint8)
    return colours


def _colour(task, x, channels):
    """One map (C, H, W) or (H, W) -> uint8 RGB (H, W, 3); ignored pixels black."""
    x = x.numpy()
    if task in ("semseg", "parts"):
        labels = x if x.ndim == 2 else x.argmax(0)
        rgb = _palette(channels)[np.clip(labels, 0, channels - 1)]
        rgb[labels == 255] = 0
        return rgb
    if task == "normals":
        n = x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-6)
        rgb = ((n.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        rgb[np.abs(x).sum(0) == 0] = 0
        return rgb
    x = x[0]
    if task == "depth":  # near = yellow, far = dark blue, invalid = black
        valid = x > 0
        lo, hi = (np.percentile(x[valid], [2, 98]) if valid.any() else (0, 1))
        v = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
        anchors = np.array([[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]], float)
        rgb = np.stack([np.interp(v, np.linspace(0, 1, 5), anchors[:, c]) for c in range(3)], -1).astype(np.uint8)
        rgb[~valid] = 0
        return rgb
    grey = (np.clip(np.where(x == 255, 0, x), 0, 1) * 255).astype(np.uint8)  # edge, sal
    return np.repeat(grey[..., None], 3, -1)


def save_picture(path, batch, outputs, cfg, rows=4):
    """Image | (ground truth, prediction) per task, for the first few val images."""
    from PIL import Image

    channels = datasets.TASKS[cfg["dataset"]]
    mean, std = torch.tensor(datasets.IMAGENET_MEAN)[:, None, None], torch.tensor(datasets.IMAGENET_STD)[:, None, None]
    lines = []
    for i in range(min(rows, batch["image"].shape[0])):
        image = ((batch["image"][i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tiles = [image]
        for t in cfg["tasks"]:
            pred = outputs[t][i]
            if t in ("edge", "sal"):
                pred = pred.sigmoid()
            elif t == "depth":
                pred = pred.clamp(min=1e-3)          # a prediction has no invalid pixels
            tiles += [_colour(t, batch[t][i], channels[t]), _colour(t, pred, channels[t])]
        lines.append(np.concatenate(tiles, axis=1))
    picture = Image.fromarray(np.concatenate(lines, axis=0))
    # a header naming the columns: image, then ground truth and prediction per task
    from PIL import ImageDraw

    W = batch["image"].shape[-1]
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "white")
    canvas.paste(picture, (0, 14))
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(["image"] + [f"{t} {kind}" for t in cfg["tasks"] for kind in ("truth", "pred")]):
        draw.text((col * W + 2, 1), name, fill="black")
    canvas.save(path)


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-save leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}; give a run directory holding ckpt.pt, or a .pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as error:  # truncated or not a checkpoint at all
        raise UsageError(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); "
                         f"it may be incomplete - use the run's other checkpoint (best.pt or ckpt.pt)") from error


def config_differences(saved, cfg, keys):
    return [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


def strict_json(x):
    """NaN / inf -> None, so every JSON file we write parses anywhere (json.dumps writes bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def write_json(path, record):
    with open(path, "w") as f:
        json.dump(strict_json(record), f, indent=1, allow_nan=False)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def rng_states():
    """Every generator's state, as tensors and plain Python values (so torch.load(weights_only=True) reads it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device auto or cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but this PyTorch has no MPS support; use --device auto or cpu")
    return torch.device(name)


def _fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


# --- the program ------------------------------------------------------------------------------

def main(argv=None):
    args, given = parse_args(argv)
    start_time = time.time()

    # -- processes: one by default, several under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")))
    master = rank == 0

    def log(message):
        if master:
            print(message, flush=True)

    # -- configuration: preset, flags, checkpoint
    cfg = resolve_config(args, given)
    ckpt = None
    if cfg["resume"]:
        # The run's own settings come back from the checkpoint; flags may change only RESUMABLE ones.
        ckpt, ckpt_path = load_checkpoint(cfg["resume"])
        differ = config_differences(ckpt["config"], cfg, [k for k in given if k not in RESUMABLE])
        if differ:
            raise UsageError(f"--resume {cfg['resume']} was trained with other settings: " + "; ".join(differ)
                             + ". Drop those flags to continue the run, or start a new run with a new --out-dir")
        cfg = {**ckpt["config"], **{k: cfg[k] for k in given if k in RESUMABLE}}
        cfg["out_dir"] = os.path.dirname(os.path.abspath(ckpt_path))
    elif cfg["eval_only"]:
        ckpt, ckpt_path = load_checkpoint(cfg["ckpt"])
        differ = config_differences(ckpt["config"], cfg, [k for k in MODEL_KEYS if k in given])
        if differ:
            raise UsageError(f"--ckpt {cfg['ckpt']} holds a different network than the flags ask for: "
                             + "; ".join(differ) + ". Drop those flags: --eval-only takes them from the checkpoint")
        cfg.update({k: ckpt["config"][k] for k in (*MODEL_KEYS, "eval_size", "edge_max_dist", "val_samples", "seed")})
        cfg["out_dir"] = cfg["out_dir"] or os.path.dirname(os.path.abspath(ckpt_path))
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg["out_dir"] = cfg["out_dir"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['exchange']}-{stamp}")
        if os.path.exists(os.path.join(cfg["out_dir"], "config.json")):
            raise UsageError(f"--out-dir {cfg['out_dir']} already holds a run; continue it with --resume "
                             f"{cfg['out_dir']}, or choose another --out-dir")
    baselines = load_baselines(cfg["baselines"], cfg) if cfg["baselines"] else None

    # -- device, precision, seeds
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "gloo")
    device = pick_device(cfg["device"], local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])

    # -- model and optimiser
    channels = datasets.TASKS[cfg["dataset"]]
    model = MultiTaskNet({t: channels[t] for t in cfg["tasks"]}, backbone=cfg["backbone"], pretrained=cfg["pretrained"]
                         and not cfg["eval_only"], exchange=cfg["exchange"], etf=cfg["etf"], dim=cfg["dim"],
                         num_slots=cfg["num_slots"], topk=cfg["topk"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    num_params = sum(p.numel() for p in model.parameters())
    optim_cls = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = optim_cls(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg["warmup_iters"], cfg["max_iters"], cfg["poly_power"]))
    start_iter, best_score = 0, -math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if cfg["resume"]:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_score = ckpt["iteration"], ckpt["best_score"]
        set_rng_states(ckpt["rng"])
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- data
    pin = device.type == "cuda"
    val_set = build_data(cfg, "val", train=False)
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, range(rank, len(val_set), world)), batch_size=cfg["batch_size"],
        num_workers=cfg["workers"], collate_fn=collate, pin_memory=pin)
    out_dir = cfg["out_dir"]
    if master:
        os.makedirs(out_dir, exist_ok=True)

    def run_eval(it, exact):
        t0 = time.time()
        # Exact edge matching on full-size real images is CPU work: spread it over worker processes
        # when this is the only training process (tiny synthetic images are faster inline).
        processes = 1 if distributed or cfg["dataset"] == "synthetic" else max(1, min(4, os.cpu_count() or 1))
        results, first = evaluate(model.module if distributed else model, val_loader, cfg, device,
                                  autocast, exact, log, processes)
        record = {"kind": "eval", "iter": it, "exact_edges": exact, "metrics": results,
                  "seconds": round(time.time() - t0, 2)}
        if baselines is not None and exact:
            record["delta_m"] = metrics.delta_m(results, baselines)
        if master:
            save_picture(os.path.join(out_dir, f"eval_{it:06d}.png"), first[0], first[1], cfg)
        return record

    def summary(record):
        parts = []
        for t, res in record["metrics"].items():
            key = metrics.HEADLINE[t][0]
            key = key if key in res else f"{key}_approx"
            parts.append(f"{t} {key} {res[key]:.4f}")
        if "delta_m" in record:
            parts.append(f"Δm {record['delta_m']:+.2f}%")
        return " | ".join(parts)

    if cfg["eval_only"]:
        log(f"evaluating {cfg['ckpt']} (iteration {ckpt['iteration']}) on {len(val_set)} val images")
        record = run_eval(ckpt["iteration"], exact=True)
        log("eval: " + summary(record))
        if master:
            name = os.path.splitext(os.path.basename(ckpt_path))[0]
            write_json(os.path.join(out_dir, f"eval_{name}.json"), {**record, "checkpoint": os.path.abspath(ckpt_path)})
        if distributed:
            dist.destroy_process_group()
        return record

    train_set = build_data(cfg, "train", train=True)
    step_images = cfg["batch_size"] * cfg["accum"] * world
    sampler = StreamSampler(len(train_set), cfg["seed"], start_iter * step_images, rank, world)
    train_loader = torch.utils.data.DataLoader(
        SeededSamples(train_set, cfg["seed"]), batch_size=cfg["batch_size"], sampler=sampler,
        num_workers=cfg["workers"], collate_fn=collate, pin_memory=pin,
        persistent_workers=cfg["workers"] > 0, drop_last=True)
    batches = iter(train_loader)

    # -- outputs: config.json once; on resume, forget log lines written after the checkpoint
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:
        if cfg["resume"] and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["iter"] <= start_iter]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        write_json(os.path.join(out_dir, "config.json"),
                   {**cfg, "world_size": world, "torch": torch.__version__, "parameters": num_params})
    log(f"{cfg['dataset']}: {len(train_set)} train / {len(val_set)} val images, tasks {', '.join(cfg['tasks'])}; "
        f"{cfg['exchange']} exchange, etf {cfg['etf']}, {cfg['backbone']} backbone, {num_params / 1e6:.2f} M parameters; "
        f"{device.type}, {world} process(es), amp {cfg['amp']}; writing to {out_dir}")
    if start_iter:
        log(f"resuming at iteration {start_iter}")

    # -- the loop
    weights = {t: FIELD_WEIGHTS[t] for t in cfg["tasks"]}
    running = {t: torch.zeros((), device=device) for t in cfg["tasks"]}
    window_start, window_iters, train_images, train_seconds = time.time(), 0, 0, 0.0
    last_record = None
    for it in range(start_iter, cfg["max_iters"]):
        for micro in range(cfg["accum"]):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = {t: batch[t].to(device, non_blocking=True) for t in cfg["tasks"]}
            sync = micro == cfg["accum"] - 1 or not distributed
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                losses = compute_losses(model(images), targets, cfg["tasks"])
                loss = sum(weights[t] * losses[t] for t in losses) / cfg["accum"]
            scaler.scale(loss).backward()
            for t in losses:
                running[t] += losses[t].detach() / cfg["accum"]
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window_iters += 1
        done = it + 1

        evaluating = done % cfg["eval_interval"] == 0 or done == cfg["max_iters"]
        if done % cfg["log_interval"] == 0 or evaluating:
            # One host sync per log line: the per-task sums, averaged over processes and checked for
            # NaN / inf here (so no checkpoint is written after a bad step).
            sums = torch.stack(list(running.values()))
            if distributed:
                dist.all_reduce(sums)
                sums /= world
            values = {t: v / window_iters for t, v in zip(running, sums.tolist())}
            bad = [t for t, v in values.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"the {', '.join(bad)} loss became {values[bad[0]]} between iterations {done - window_iters} "
                    f"and {done}; the run stops here, and {os.path.join(out_dir, 'ckpt.pt')} (if any) still "
                    f"holds the last good state. Try a lower --lr, --amp none, or --grad-clip 1")
            elapsed = time.time() - window_start
            speed = window_iters * step_images / elapsed
            train_images += window_iters * step_images
            train_seconds += elapsed
            total = sum(weights[t] * v for t, v in values.items())
            eta = (cfg["max_iters"] - done) * elapsed / window_iters
            log(f"iter {done}/{cfg['max_iters']} | loss {total:.4f} | "
                + " ".join(f"{t} {v:.4f}" for t, v in values.items())
                + f" | lr {scheduler.get_last_lr()[0]:.2e} | {speed:.1f} img/s | eta {_fmt_time(eta)}")
            if master:
                append_jsonl(metrics_path, {"kind": "train", "iter": done, "loss": total, "losses": values,
                                            "lr": scheduler.get_last_lr()[0], "images_per_s": speed})
            running = {t: torch.zeros((), device=device) for t in cfg["tasks"]}
            window_start, window_iters = time.time(), 0

        if evaluating:
            final = done == cfg["max_iters"]
            log(f"evaluating at iteration {done}" + (" (exact edge matching)" if final and "edge" in cfg["tasks"] else ""))
            record = run_eval(done, exact=final)
            log("eval: " + summary(record))
            last_record = record
            # best.pt: by the first task's headline metric (exact at every eval, unlike odsF and Δm).
            key, sign = metrics.HEADLINE[cfg["tasks"][0]]
            score = sign * record["metrics"][cfg["tasks"][0]].get(key, record["metrics"][cfg["tasks"][0]].get(f"{key}_approx"))
            if master:
                append_jsonl(metrics_path, record)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "iteration": done, "best_score": max(best_score, score), "rng": rng_states(), "config": cfg}
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
                if score > best_score:
                    save_checkpoint(os.path.join(out_dir, "best.pt"), state)
            best_score = max(best_score, score)
            window_start = time.time()   # evaluation time is not training time

    # -- results
    if master and last_record is not None:
        results = {"config": cfg, "iteration": cfg["max_iters"], "metrics": last_record["metrics"],
                   "delta_m": last_record.get("delta_m"), "parameters": num_params,
                   "train_images_per_s": train_images / train_seconds if train_seconds else None,
                   "wall_time_s": time.time() - start_time}
        write_json(os.path.join(out_dir, "results.json"), results)
        log(f"done in {_fmt_time(time.time() - start_time)}; results in {os.path.join(out_dir, 'results.json')}")
    if distributed:
        dist.destroy_process_group()
    return last_record


def cli(argv=None):
    """main() with bad input reported as one paragraph and a non-zero exit code, no traceback."""
    try:
        main(argv)
    except (UsageError, datasets.DatasetError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume <out-dir> (the last checkpoint is intact)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
