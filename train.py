"""Train and evaluate a multi-task network with KEM, cross-attention or no exchange.

    python train.py                                   # offline demo: SyntheticRooms, about 3 minutes on a 2-core CPU
    python train.py --dataset nyud                    # NYUD-v2, the field's protocol, pretrained Swin-T
    torchrun --nproc_per_node=4 train.py --dataset pascal       # several GPUs (or machines)
    python train.py --tasks depth --exchange none --out-dir runs/st-depth   # a single-task baseline
    python train.py --baselines runs/baselines        # ... and Δm against such baselines
    python train.py --resume runs/<run>               # continue an interrupted run exactly
    python train.py --eval-only --ckpt runs/<run>/best.pt       # evaluate a checkpoint

How to read this file: `run()` at the bottom is the story of a run (processes, inputs, model,
optimiser, resume, data, the loop, the results); `main()` above it turns the command line into a
configuration and starts run() here or in our own processes. Every step run() takes is a small
function further up, in the order it calls them. TASKS is the one table that says, per task, how
it is trained, scored and drawn.

Presets per dataset fill every default (PRESETS); any flag overrides its preset. A plain
`python train.py` never needs a launcher. On a CPU with several cores it splits each batch over
`--procs` single-thread processes of its own (DistributedDataParallel over gloo): small
convolutions use one core well and two cores badly, so two one-thread processes train faster than
one two-thread process (`python bench.py step --procs 1 2` measures it). Under torchrun the same
code runs one process per GPU.

Reproducibility, in three pieces:
- the data stream is a function of (seed, position): StreamSampler shuffles each epoch with
  seed + epoch and shards every global batch across processes, and every sample's augmentation
  is seeded from its position in the stream, so what a sample looks like does not depend on the
  worker, the process or the restart that loads it;
- losses are per-image means averaged over the batch, and the network normalises per image
  (GroupNorm), so N processes with batch b compute what one process computes with batch N b
  (up to float rounding);
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
import dataclasses
import datetime
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import datasets
import metrics
from kem_mtl import BACKBONES, ETF_MODES, EXCHANGES, MultiTaskNet
from train_support import WeightsUnavailable, check_network_options, fetch_pretrained_weights

# --- presets: every default, per dataset ------------------------------------------------------
# nyud / pascal follow the field's protocol (REFERENCE §6); the synthetic preset is ours, sized so
# that `python train.py` finishes in about 3 minutes on a 2-core CPU and learns every task. Image
# sizes and the synthetic sample counts come from datasets.DEFAULT_SIZES / DEFAULT_NUM_SAMPLES.

PRESETS = {
    "synthetic": dict(backbone="tiny", pretrained=False, dim=64, batch_size=8, max_iters=1500, optimizer="adamw",
                      lr=2e-3, weight_decay=1e-4, warmup_iters=100, grad_clip=1.0, eval_interval=500,
                      log_interval=50, edge_max_dist=0.011),
    "nyud": dict(backbone="swin_t", pretrained=True, dim=128, batch_size=2, max_iters=40000, optimizer="adam",
                 lr=2e-5, weight_decay=1e-6, warmup_iters=0, grad_clip=10.0, eval_interval=4000, log_interval=100,
                 edge_max_dist=0.011, workers=4),
    "pascal": dict(backbone="swin_t", pretrained=True, dim=128, batch_size=2, max_iters=40000, optimizer="adam",
                   lr=2e-5, weight_decay=1e-6, warmup_iters=0, grad_clip=10.0, eval_interval=4000, log_interval=100,
                   edge_max_dist=0.0075, workers=4),
}
COMMON = dict(exchange="kem", etf="none", num_slots=16, topk=0.25, topk_mode="mask", freeze_backbone=False, accum=1,
              seed=0, device="auto", amp="auto", compile=False, poly_power=0.9, download=True, workers=None,
              procs="auto",
              data_seed=0)  # which scenes SyntheticRooms draws: fixed, so every run sees the same val set
# Settings that may change when a run is resumed; every other one must match the checkpoint.
RESUMABLE = {"out_dir", "resume", "device", "workers", "log_interval", "eval_interval", "data_dir", "download",
             "compile", "baselines", "max_iters", "eval_only", "ckpt", "procs"}
# Settings that define the network: taken from the checkpoint by --eval-only.
MODEL_KEYS = ("dataset", "tasks", "backbone", "exchange", "etf", "dim", "num_slots", "topk", "topk_mode",
              "freeze_backbone")


class UsageError(Exception):
    """Bad input (flags, data, weights, checkpoints): printed as one paragraph, no traceback."""


class RunStopped(Exception):
    """The run stopped on its own (a training process failed): printed as one paragraph, exit code 1."""


# --- the task table ---------------------------------------------------------------------------
# Everything train.py knows about a task, in one row: adding a task means adding a row.

def _per_image_mean(loss_map, valid):
    """Mean over each image's valid pixels, then over the batch (images with none count as 0)."""
    valid = valid.float()
    per_image = (loss_map * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    return per_image.mean()


def class_loss(logits, target):
    """Cross-entropy per pixel, label 255 ignored."""
    return _per_image_mean(F.cross_entropy(logits, target, ignore_index=255, reduction="none"), target != 255)


def depth_loss(pred, target):
    """L1 in metres where the ground truth is valid (> 0)."""
    return _per_image_mean((pred - target).abs(), target > 0)


def normals_loss(pred, target):
    """L1 between the normalised prediction and the unit ground truth, where it is non-zero."""
    # x / sqrt(sum x^2) rather than F.normalize: torch's norm over dim 1 is ~90x slower here (measured).
    unit = pred / pred.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)
    return _per_image_mean((unit - target).abs().sum(1, keepdim=True), target.abs().sum(1, keepdim=True) > 0)


def edge_loss(logits, target):
    """Class-balanced BCE: edges are rare, so positives weigh 0.95 and negatives 0.05."""
    y = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return _per_image_mean(bce * (0.95 * y + 0.05 * (1 - y)), target != 255)


def saliency_loss(logits, target):
    y = (target == 1).float()
    return _per_image_mean(F.binary_cross_entropy_with_logits(logits, y, reduction="none"), target != 255)


def _palette(n):
    return np.random.default_rng(12345).integers(40, 256, size=(max(n, 1), 3), dtype=np.uint8)


def draw_labels(x, channels, truth):
    """(H, W) labels -> RGB, one colour a class, 255 black."""
    rgb = _palette(channels)[np.clip(x, 0, channels - 1)]
    rgb[x == 255] = 0
    return rgb


def draw_depth(x, channels, truth):
    """(1, H, W) metres -> RGB, near yellow, far dark blue; invalid ground truth black."""
    x = x[0]
    valid = x > 0 if truth else np.ones_like(x, dtype=bool)      # a prediction has no invalid pixels
    lo, hi = np.percentile(x[valid], [2, 98]) if valid.any() else (0, 1)
    v = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    anchors = np.array([[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]], float)
    rgb = np.stack([np.interp(v, np.linspace(0, 1, 5), anchors[:, c]) for c in range(3)], -1).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def draw_normals(x, channels, truth):
    """(3, H, W) -> RGB = (n + 1) / 2; zero vectors black."""
    n = x / np.maximum(np.sqrt((x ** 2).sum(0, keepdims=True)), 1e-6)
    rgb = ((n.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    rgb[np.abs(x).sum(0) == 0] = 0
    return rgb


def draw_grey(x, channels, truth):
    """(1, H, W) in [0, 1] (255 = ignored, black) -> grey RGB."""
    grey = (np.clip(np.where(x[0] == 255, 0, x[0]), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)


@dataclasses.dataclass(frozen=True)
class Task:
    weight: float             # loss weight (REFERENCE §6; the same on NYUD and PASCAL)
    loss: Callable            # (raw output as float32, target) -> scalar
    predict: Callable         # raw output (B, C, H, W) -> what the meter and the picture take
    meter: Callable           # (channels, edge options) -> a fresh metrics meter
    draw: Callable            # (one prediction or target as numpy, channels, truth) -> uint8 (H, W, 3)


def _argmax(out):
    return out.argmax(1)


def _sigmoid(out):
    return out.float().sigmoid()


def _as_float(out):
    return out.float()


TASKS = {
    "semseg":  Task(1.0, class_loss, _argmax, lambda c, edge: metrics.SegMeter(c), draw_labels),
    "parts":   Task(2.0, class_loss, _argmax, lambda c, edge: metrics.SegMeter(c), draw_labels),
    "depth":   Task(1.0, depth_loss, _as_float, lambda c, edge: metrics.DepthMeter(), draw_depth),
    "normals": Task(10.0, normals_loss, _as_float, lambda c, edge: metrics.NormalsMeter(), draw_normals),
    "edge":    Task(50.0, edge_loss, _sigmoid, lambda c, edge: metrics.EdgeMeter(**edge), draw_grey),
    "sal":     Task(5.0, saliency_loss, _sigmoid, lambda c, edge: metrics.SaliencyMeter(), draw_grey),
}


def compute_losses(outputs, targets, tasks):
    """{task: loss (float32 scalar)} for the tasks named."""
    return {t: TASKS[t].loss(outputs[t].float(), targets[t]) for t in tasks}


# --- configuration ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Multi-task training with KEM (SGW-based MTL, ACCV 2024).",
                                epilog="Every default comes from the dataset's preset; any flag overrides it.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=datasets.NAMES,
                   help="synthetic (the default) needs no download; nyud and pascal download once")
    g.add_argument("--data-dir", help="where datasets live (else $KEM_MTL_DATA, else ~/.cache/kem_mtl)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="fetch missing data and pretrained weights (default); --no-download stops with instructions")
    g.add_argument("--tasks", help="comma list, e.g. semseg,depth (default: all of the dataset's; one task = single-task baseline)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per process (0 loads in the process itself)")
    g.add_argument("--image-size", type=_size, metavar="HxW",
                   help="synthetic: the rendered size (train and val); nyud/pascal: the training crop")
    g.add_argument("--train-samples", type=int, help="synthetic only: scenes in the train split")
    g.add_argument("--val-samples", type=int, help="synthetic only: scenes in the val split")
    g = p.add_argument_group("model")
    g.add_argument("--exchange", choices=EXCHANGES, help="how tasks meet: kem (the paper), cross (full attention), none")
    g.add_argument("--etf", choices=ETF_MODES,
                   help="sKEM: tokens into ETF space (features), fixed ETF slots (slots), both; normalize = the control")
    g.add_argument("--num-slots", type=int, help="KEM memory slots L (try 8-32)")
    g.add_argument("--topk", type=_number, help="tokens per slot: a count (e.g. 64) or a fraction of all tokens (e.g. 0.25)")
    g.add_argument("--topk-mode", choices=("mask", "post"),
                   help="mask: softmax over the top-k (default); post: softmax, then keep the top-k (the SGW's)")
    g.add_argument("--backbone", choices=BACKBONES, help="tiny (CPU, from scratch) or a torchvision Swin/ResNet")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="ImageNet weights for torchvision backbones (--no-pretrained offline)")
    g.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction,
                   help="do not train the backbone (our 'fixed encoder' reading; off by default)")
    g.add_argument("--dim", type=int, help="token width D")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int,
                   help="images per step: per process under torchrun (the field uses 2 per GPU); split over --procs")
    g.add_argument("--accum", type=int, help="gradient accumulation steps (effective batch = batch x accum x processes)")
    g.add_argument("--max-iters", type=int, help="optimiser steps")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up steps before the polynomial decay")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, help="seed for the model, the data order and the augmentation")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto picks cuda, then mps, then cpu")
    g.add_argument("--procs", type=_procs,
                   help="CPU only: split each batch over this many single-thread processes (auto: up to 4, "
                        "one per core); 1 = one process using every core")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"),
                   help="mixed precision; auto = bf16 on GPUs that have it, else fp16 with a scaler; none on CPUs")
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


def _procs(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count >= 1, got {text!r}")
    return int(text)


def as_flags(message, flags):
    """A module's ValueError in the words of the command line, for the parameters that are flags:
    `num_slots` -> `--num-slots`, `exchange='kem'` -> `--exchange kem`, `pretrained=False` -> `--no-pretrained`."""
    def flag(name):
        return f"--{name.replace('_', '-')}"

    def named(match):
        name, value = match[1], match[3]
        if name not in flags:
            return match[0]
        return {"False": f"--no-{name.replace('_', '-')}", "True": flag(name)}.get(value, f"{flag(name)} {value}")

    message = re.sub(r"\b([a-z_]+)=(['\"]?)([\w.]+)\2", named, message)
    return re.sub(r"(?<![-\w'])(topk_mode|topk|num_slots|dim)\b(?![=-])", lambda m: flag(m[1]), message)


def resolve_config(args, given):
    """Preset <- explicit flags, then every rule that needs several settings at once."""
    args.dataset = args.dataset or "synthetic"
    name = args.dataset
    cfg = {**COMMON, **PRESETS[name]}
    cfg["train_size"], cfg["eval_size"] = (list(datasets.DEFAULT_SIZES[name][s]) for s in ("train", "eval"))
    synthetic = name == "synthetic"
    for split in ("train", "val"):
        cfg[f"{split}_samples"] = datasets.DEFAULT_NUM_SAMPLES[split] if synthetic else None
    cfg.update({k: v for k, v in vars(args).items() if k in given or k not in cfg})
    cfg["eval_only"] = bool(cfg["eval_only"])
    if cfg["image_size"]:
        cfg["train_size"] = cfg["image_size"]
        if synthetic:
            cfg["eval_size"] = cfg["image_size"]
    for key in ("train_samples", "val_samples"):
        if key in given and not synthetic:
            raise UsageError(f"--{key.replace('_', '-')} only applies to --dataset synthetic; the real datasets "
                             f"always use their whole split")
    all_tasks = datasets.task_channels(name)
    if isinstance(cfg["tasks"], str):
        cfg["tasks"] = [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
        unknown = [t for t in cfg["tasks"] if t not in all_tasks]
        if unknown or not cfg["tasks"]:
            raise UsageError(f"unknown task(s) {', '.join(unknown) or '(none given)'} for --dataset "
                             f"{name}; valid tasks are {', '.join(all_tasks)}")
    cfg["tasks"] = cfg["tasks"] or list(all_tasks)
    for key in ("batch_size", "max_iters", "accum", "eval_interval", "log_interval", "train_samples", "val_samples"):
        if cfg[key] is not None and cfg[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["lr"] <= 0 or cfg["workers"] is not None and cfg["workers"] < 0:
        raise UsageError(f"--lr must be > 0 and --workers >= 0, got {cfg['lr']} and {cfg['workers']}")
    if cfg["eval_only"] and not cfg["ckpt"]:
        raise UsageError("--eval-only needs --ckpt PATH (e.g. runs/<run>/best.pt)")
    try:        # the network's rules live in kem_mtl; here they only get the command line's words
        check_network_options(all_tasks, **{k: cfg[k] for k in ("backbone", "pretrained", "exchange", "etf", "dim",
                                                                 "num_slots", "topk", "topk_mode")})
    except ValueError as error:
        raise UsageError(as_flags(str(error), flags=set(vars(args)))) from None
    return cfg


def restore_config(cfg, given):
    """--resume and --eval-only take the run's settings from their checkpoint. Returns (cfg, checkpoint
    path or None); a new run gets its out_dir here, once, so that every process writes to the same one."""
    if cfg["resume"]:
        ckpt, path = load_checkpoint(cfg["resume"])
        # The run's own settings come back from the checkpoint; flags may change only RESUMABLE ones.
        differ = config_differences(ckpt["config"], cfg, [k for k in given if k not in RESUMABLE])
        if differ:
            raise UsageError(f"--resume {cfg['resume']} was trained with other settings: " + "; ".join(differ)
                             + ". Drop those flags to continue the run, or start a new run with a new --out-dir")
        cfg = {**ckpt["config"], **{k: cfg[k] for k in given if k in RESUMABLE}}
        cfg["out_dir"] = os.path.dirname(os.path.abspath(path))
        return cfg, path
    if cfg["eval_only"]:
        ckpt, path = load_checkpoint(cfg["ckpt"])
        differ = config_differences(ckpt["config"], cfg, [k for k in MODEL_KEYS if k in given])
        if differ:
            raise UsageError(f"--ckpt {cfg['ckpt']} holds a different network than the flags ask for: "
                             + "; ".join(differ) + ". Drop those flags: --eval-only takes them from the checkpoint")
        cfg.update({k: ckpt["config"][k] for k in (*MODEL_KEYS, "eval_size", "edge_max_dist", "val_samples", "seed")})
        if "batch_size" not in given:                   # batched as in training: the same numbers, to the bit
            cfg["batch_size"] = ckpt["config"]["batch_size"]
        cfg["pretrained"] = False                       # the checkpoint holds every weight
        cfg["out_dir"] = cfg["out_dir"] or os.path.dirname(os.path.abspath(path))
        return cfg, path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['exchange']}-{stamp}")
    if os.path.exists(os.path.join(cfg["out_dir"], "config.json")):
        raise UsageError(f"--out-dir {cfg['out_dir']} already holds a run; continue it with --resume "
                         f"{cfg['out_dir']}, or choose another --out-dir")
    return cfg, None


def config_differences(saved, cfg, keys):
    saved = {**COMMON, **saved}            # settings added since the checkpoint was written: their defaults
    return [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


# --- processes and devices --------------------------------------------------------------------

@dataclasses.dataclass
class Processes:
    rank: int = 0             # this process, 0..world-1; rank 0 writes every file
    world: int = 1            # processes training together (torchrun's or our own --procs)
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0


def local_procs(cfg):
    """How many single-thread processes of our own this run uses (1 = this process alone)."""
    launched = "WORLD_SIZE" in os.environ                   # torchrun, or one of our own processes
    cpu = pick_device(cfg["device"], 0).type == "cpu"
    cores = os.cpu_count() or 1
    if cfg["procs"] == "auto":
        if launched or not cpu:
            return 1
        # Up to 4 processes, one per core, each taking an equal share of the batch.
        return max(n for n in range(1, min(cores, 4) + 1) if cfg["batch_size"] % n == 0)
    if cfg["procs"] > 1 and (launched or not cpu):
        raise UsageError(f"--procs {cfg['procs']} splits batches over processes on a CPU; "
                         + ("under torchrun use --procs 1" if launched else "on a GPU use torchrun instead"))
    if cfg["batch_size"] % cfg["procs"]:
        raise UsageError(f"--procs {cfg['procs']} must divide --batch-size {cfg['batch_size']}; try --procs 1 or 2")
    return cfg["procs"]


def spawn_local_procs(cfg, ckpt_path, n):
    """run() in n single-thread processes (ranks 0..n-1) on this machine, and wait for them. If one
    fails, the others are stopped and its error is raised here, to be reported once."""
    import torch.multiprocessing as mp

    with socket.socket() as s:                           # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork where it is safe (Linux, CPU only: nothing in this process has run a tensor op or touched a
    # GPU yet) saves every child the 3-4 s of importing torch again; spawn elsewhere.
    fork = sys.platform == "linux" and not torch.cuda.is_initialized()
    ctx = mp.get_context("fork" if fork else "spawn")
    # Forked children share the parent's memory: render the synthetic scenes once, here, with every
    # core, instead of once in every child (n times the work). Spawned children build their own.
    data = build_all_data(cfg, render_procs=n) if fork and cfg["dataset"] == "synthetic" else None
    errors = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // n)
    children = [ctx.Process(target=_local_proc, args=(cfg, ckpt_path, rank, n, port, threads, errors, data))
                for rank in range(n)]
    for child in children:
        child.start()
    try:
        while any(c.is_alive() for c in children) and all(c.exitcode in (None, 0) for c in children):
            time.sleep(0.1)
    except KeyboardInterrupt:                            # Ctrl-C reaches the children too; let them stop
        for c in children:
            c.join()
        raise
    for c in children:                                   # one failed: the others would wait for it forever
        if c.exitcode is None:
            c.terminate()
        c.join()
    if not errors.empty():
        kind, message = errors.get()
        raise (UsageError if kind == "usage" else RunStopped)(message)
    failed = [c.exitcode for c in children if c.exitcode]
    if failed:
        raise RunStopped(f"a training process stopped with exit code {failed[0]} (see its output above)")


def _local_proc(cfg, ckpt_path, rank, world, port, threads, errors, data):
    """One of spawn_local_procs' processes: joins the group through the environment, like torchrun's."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    parent = os.getppid()

    def orphan_watch():                                  # the parent was killed: stop too, write nothing more
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=orphan_watch, daemon=True).start()
    try:
        run(cfg, ckpt_path, split_batch=world, inputs_checked=True, data=data)
    except (UsageError, datasets.DatasetError, WeightsUnavailable, FloatingPointError) as error:
        run_error = isinstance(error, FloatingPointError)
        errors.put(("run" if run_error else "usage", str(error)))
        sys.exit(1 if run_error else 2)
    except KeyboardInterrupt:
        sys.exit(130)


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


def setup_processes(cfg):
    """This process's rank, the world and its device; joins the process group when there are several."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(cfg["device"], int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True     # TF32 matmuls: ~8x faster on Ampere+, ample precision
        torch.backends.cudnn.allow_tf32 = True           # the same for convolutions
        torch.backends.cudnn.benchmark = True            # fixed crop sizes: let cuDNN pick the fastest kernels
    return Processes(rank, world, device)


def precision(cfg, device):
    """The autocast context and the gradient scaler for cfg["amp"] on `device`."""
    amp = cfg["amp"]
    if amp == "auto":      # bf16 where the GPU has it (no scaler needed), else fp16 with a scaler; CPUs: none
        amp = "none" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return autocast, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --- inputs: data and pretrained weights, checked before anything big starts ------------------

def check_inputs(cfg):
    """Make sure the dataset and the pretrained weights are on disk (fetching them if allowed).
    Every problem is collected, so a user learns about the data and the weights in one go."""
    problems = []
    if cfg["dataset"] != "synthetic":
        try:
            datasets.prepare_dataset(cfg["dataset"], cfg["data_dir"], download_ok=cfg["download"])
        except datasets.DatasetError as error:
            problems.append(str(error))
    if cfg["pretrained"]:
        try:
            fetch_pretrained_weights(cfg["backbone"], download=cfg["download"])
        except WeightsUnavailable as error:
            problems.append(str(error))
    if problems:
        raise UsageError("\n\n".join(problems))


def check_inputs_once(cfg, procs):
    """check_inputs on rank 0 only (one download, not one per process); every rank gets its verdict."""
    problem = None
    if procs.master:
        try:
            check_inputs(cfg)
        except UsageError as error:
            problem = str(error)
    if procs.distributed:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise UsageError(problem)


# --- data -------------------------------------------------------------------------------------

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
        cpu_rng = torch.random.default_generator       # the transforms draw from the CPU generator only
        state = cpu_rng.get_state(), np.random.get_state(), random.getstate()
        s = (self.seed * 1_000_003 + position) % 2**63
        # default_generator.manual_seed, not torch.manual_seed: the latter also seeds every
        # accelerator lazily, recording a stack trace each time (0.6 ms a sample, measured).
        cpu_rng.manual_seed(s), np.random.seed(s % 2**32), random.seed(s)
        try:
            return self.dataset[index]
        finally:
            cpu_rng.set_state(state[0]), np.random.set_state(state[1]), random.setstate(state[2])


def build_data(cfg, split, render_procs=1):
    """The dataset of `split` (train transforms for "train"); SyntheticRooms renders every scene once
    and keeps it (~0.25 MB each)."""
    train = split == "train"
    num = cfg["train_samples"] if train else cfg["val_samples"]
    return datasets.build_dataset(cfg["dataset"], split, root=cfg["data_dir"], train=train, tasks=cfg["tasks"],
                                  seed=cfg["data_seed"], download=False, num_samples=num,
                                  size=tuple(cfg["train_size"] if train else cfg["eval_size"]),
                                  cache=cfg["dataset"] == "synthetic", render_procs=render_procs)


def build_all_data(cfg, render_procs=1):
    """{split: dataset} for every split the run reads (val, and train unless --eval-only)."""
    splits = ["val"] if cfg["eval_only"] else ["val", "train"]
    return {split: build_data(cfg, split, render_procs) for split in splits}


def collate(samples):
    """Stack tensors; keep `meta` as a list of dicts."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "meta"}
    batch["meta"] = [s.get("meta") for s in samples]
    return batch


def loader_workers(cfg, procs):
    """DataLoader workers per process: none on a CPU (every core computes; loading in the process
    costs less than the cores a worker would take away), else up to 4 of this process's cores."""
    if cfg["workers"] is not None:
        return cfg["workers"]
    return 0 if procs.device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) // procs.world - 1))


def make_loaders(cfg, procs, batch_size, start_iter, data=None):
    """(val loader: this process's share of the val split; train batches: an endless iterator, or None
    for --eval-only). The train stream starts where iteration start_iter left it. data: the datasets,
    if the parent process built them (build_all_data)."""
    workers, pin = loader_workers(cfg, procs), procs.device.type == "cuda"   # pinned memory: async host->GPU copies
    data = data or build_all_data(cfg)
    val_set = data["val"]
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, range(procs.rank, len(val_set), procs.world)), batch_size=batch_size,
        num_workers=workers, collate_fn=collate, pin_memory=pin)
    if cfg["eval_only"]:
        return val_loader, None, len(val_set), 0
    train_set = data["train"]
    step_images = batch_size * cfg["accum"] * procs.world
    sampler = StreamSampler(len(train_set), cfg["seed"], start_iter * step_images, procs.rank, procs.world)
    train_loader = torch.utils.data.DataLoader(
        SeededSamples(train_set, cfg["seed"]), batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0, drop_last=True)
    return val_loader, iter(train_loader), len(val_set), len(train_set)


# --- model and optimiser ----------------------------------------------------------------------

def build_model(cfg):
    """The network a config describes (module-level name lookup, so a subclass patched in is used)."""
    channels = datasets.task_channels(cfg["dataset"])
    return MultiTaskNet({t: channels[t] for t in cfg["tasks"]}, backbone=cfg["backbone"],
                        pretrained=cfg["pretrained"], exchange=cfg["exchange"], etf=cfg["etf"], dim=cfg["dim"],
                        num_slots=cfg["num_slots"], topk=cfg["topk"], topk_mode=cfg.get("topk_mode", "mask"),
                        freeze_backbone=cfg.get("freeze_backbone", False))


def data_parallel(model, device):
    """The model for one of several processes: DDP averages its gradients over them during backward
    (gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, no copy in and out)."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def lr_factor(it, warmup, max_iters, power):
    """Linear warm-up from 1/warmup to 1, then polynomial decay to 0 at max_iters."""
    if it < warmup:
        return (it + 1) / warmup
    return max(0.0, 1 - (it - warmup) / max(1, max_iters - warmup)) ** power


def build_optimizer(model, cfg):
    """Adam(W) over the trainable parameters, and the warm-up + polynomial schedule.

    The fused kernel updates all parameters in one pass instead of a loop over tensor groups: the same
    update up to rounding, and on a CPU it is what makes the optimiser step cheap next to the model's."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim_cls = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.Adam
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = optim_cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg["warmup_iters"], cfg["max_iters"], cfg["poly_power"]))
    return optimizer, scheduler


def load_weights(model, ckpt, path):
    """The checkpoint's weights into `model`, or a UsageError saying why they do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        old = any(k.endswith(("W_qr.weight", "W_q.weight")) or k.startswith("etf_features.") for k in ckpt["model"])
        reason = ("it was written before KEM and cross-attention held their projections as the paper's D x D "
                  "matrices, and this version cannot load it; train the run again" if old else
                  str(error).split("\n\t")[0] + " (" + "; ".join(str(error).split("\n\t")[1:3])[:300] + ")")
        raise UsageError(f"the checkpoint {path} does not fit the network it describes: {reason}") from None


def restore_state(ckpt, path, cfg, model, optimizer, scheduler, scaler):
    """A checkpoint's weights (--eval-only, --resume) and, to resume, everything else the loop needs.
    Returns (start iteration, best score so far)."""
    if ckpt is None:
        return 0, -math.inf
    load_weights(model, ckpt, path)
    if not cfg["resume"]:
        return 0, -math.inf
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):   # the schedule of this --max-iters
        group["lr"] = base * lr_factor(ckpt["iteration"], cfg["warmup_iters"], cfg["max_iters"], cfg["poly_power"])
    return ckpt["iteration"], ckpt["best_score"]


# --- one training step, its log line, evaluation, pictures --------------------------------------

def train_step(model, batches, cfg, procs, autocast, scaler, optimizer, scheduler, running):
    """One optimiser step over cfg["accum"] micro-batches. Adds the detached per-task losses to
    `running` (no host sync here: the values are read at log intervals only)."""
    device, channels_last = procs.device, procs.device.type == "cuda"
    for micro in range(cfg["accum"]):
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:                               # convolutions run fastest channels-last on GPUs
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {t: batch[t].to(device, non_blocking=True) for t in cfg["tasks"]}
        sync = micro == cfg["accum"] - 1 or not procs.distributed       # all-reduce on the last micro-batch only
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            losses = compute_losses(model(images), targets, cfg["tasks"])
            loss = sum(TASKS[t].weight * losses[t] for t in losses) / cfg["accum"]
        scaler.scale(loss).backward()
        for t in losses:
            running[t] += losses[t].detach() / cfg["accum"]
    if cfg["grad_clip"] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    scaler.step(optimizer)          # with fp16, the scaler syncs once here to skip steps with inf gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def log_window(running, iters, seconds, step_images, cfg, procs, done):
    """The per-task mean losses of the last `iters` steps (averaged over processes): one host sync.
    Stops the run on NaN / inf, before any checkpoint is written after the bad step."""
    sums = torch.stack(list(running.values()))
    if procs.distributed:
        dist.all_reduce(sums)
        sums /= procs.world
    values = {t: v / iters for t, v in zip(running, sums.tolist())}
    bad = [t for t, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"the {', '.join(bad)} loss became {values[bad[0]]} between iterations {done - iters} and {done}; the "
            f"run stops here, and {os.path.join(cfg['out_dir'], 'ckpt.pt')} (if any) still holds the last good "
            f"state. Try a lower --lr, --amp none, or --grad-clip 1")
    total = sum(TASKS[t].weight * v for t, v in values.items())
    return {"kind": "train", "iter": done, "loss": total, "losses": values, "images_per_s": iters * step_images / seconds}


@torch.no_grad()
def evaluate(model, loader, cfg, procs, autocast, exact_edges):
    """Metrics of every task over the whole val split (pooled over processes) and the first batch
    with its outputs (for the picture). exact_edges: the exact (slow) or approximate edge metric."""
    model.eval()
    channels = datasets.task_channels(cfg["dataset"])
    # Exact edge matching on full-size real images is CPU work: spread it over worker processes when
    # this is the only process (tiny synthetic images are faster inline).
    processes = 1 if procs.distributed or cfg["dataset"] == "synthetic" else max(1, min(4, os.cpu_count() or 1))
    edge = dict(max_dist=cfg["edge_max_dist"], exact=exact_edges, processes=processes)
    meters = {t: TASKS[t].meter(channels[t], edge) for t in cfg["tasks"]}
    first, total = None, len(loader)
    for i, batch in enumerate(loader):
        with autocast:
            outputs = model(batch["image"].to(procs.device, non_blocking=True))
        for t, meter in meters.items():
            meter.update(TASKS[t].predict(outputs[t]).cpu(), batch[t])
        if first is None:
            first = (batch, {t: TASKS[t].predict(o).cpu() for t, o in outputs.items()})
        if procs.master and total >= 100 and (i + 1) % (total // 10) == 0:     # long evaluations show progress
            print(f"  evaluating: {i + 1}/{total} batches", flush=True)
    metrics.sync_meters(list(meters.values()))
    if "edge" in meters:
        meters["edge"].close()
    model.train()
    return {t: m.compute() for t, m in meters.items()}, first


def evaluate_and_record(model, loader, cfg, procs, autocast, it, exact, baselines):
    """evaluate(), the picture of the first val images, the log line, and the record to keep."""
    t0 = time.time()
    results, (batch, predictions) = evaluate(model, loader, cfg, procs, autocast, exact)
    record = {"kind": "eval", "iter": it, "exact_edges": exact, "metrics": results, "seconds": round(time.time() - t0, 2)}
    if baselines is not None and exact:
        record["delta_m"] = metrics.delta_m(results, baselines)
    if procs.master:
        save_picture(os.path.join(cfg["out_dir"], f"eval_{it:06d}.png"), batch, predictions, cfg)
        print("eval: " + summary(results, record.get("delta_m")), flush=True)
    return record


def summary(results, delta_m=None):
    """One line: each task's headline metric (and Δm)."""
    parts = []
    for t, res in results.items():
        key = metrics.HEADLINE[t][0]
        key = key if key in res else f"{key}_approx"
        parts.append(f"{t} {key} {res[key]:.4f}")
    if delta_m is not None:
        parts.append(f"Δm {delta_m:+.2f}%")
    return " | ".join(parts)


def headline_score(results, task):
    """Higher is better: the first task's headline metric, signed (exact at every eval, unlike odsF)."""
    key, sign = metrics.HEADLINE[task]
    return sign * results[task].get(key, results[task].get(f"{key}_approx"))


def save_picture(path, batch, predictions, cfg, rows=4):
    """Image | (ground truth, prediction) per task for the first few val images, under a header."""
    from PIL import Image, ImageDraw

    channels = datasets.task_channels(cfg["dataset"])
    mean, std = torch.tensor(datasets.IMAGENET_MEAN)[:, None, None], torch.tensor(datasets.IMAGENET_STD)[:, None, None]
    lines = []
    for i in range(min(rows, batch["image"].shape[0])):
        image = ((batch["image"][i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tiles = [image]
        for t in cfg["tasks"]:
            draw = TASKS[t].draw
            tiles += [draw(batch[t][i].numpy(), channels[t], True), draw(predictions[t][i].numpy(), channels[t], False)]
        lines.append(np.concatenate(tiles, axis=1))
    picture = Image.fromarray(np.concatenate(lines, axis=0))
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "white")
    canvas.paste(picture, (0, 14))
    W = batch["image"].shape[-1]
    names = ["image"] + [f"{t} {kind}" for t in cfg["tasks"] for kind in ("truth", "pred")]
    for col, name in enumerate(names):
        ImageDraw.Draw(canvas).text((col * W + 2, 1), name, fill="black")
    canvas.save(path)


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
                         f"{cfg['dataset']} --tasks {missing[0]} --exchange none --out-dir {folder}/{missing[0]}`")
    return {t: {k: float(np.mean([r[k] for r in runs if isinstance(r.get(k), (int, float))]))
                for k in runs[0] if isinstance(runs[0][k], (int, float))} for t, runs in found.items()}


# --- checkpoints and files ----------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-save leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """(checkpoint dict, its path) or a UsageError that says what is wrong with the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}; give a run directory holding ckpt.pt, or a .pt file")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"              # torch.save writes a zip archive
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if zipped else None
    except Exception:                                    # truncated, or a zip of something else
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "config", "iteration"} <= ckpt.keys():
        what = "is damaged or incomplete (an interrupted copy?)" if zipped else "is not a checkpoint"
        raise UsageError(f"cannot read checkpoint {path}: the file {what}. train.py writes runs/<run>/ckpt.pt "
                         f"and best.pt; use one of those")
    return ckpt, path


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


def start_outputs(cfg, start_iter, extra):
    """config.json once; on resume, forget the log lines written after the checkpoint."""
    path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    if cfg["resume"] and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["iter"] <= start_iter]
        with open(path, "w") as f:
            f.writelines(kept)
    write_json(os.path.join(cfg["out_dir"], "config.json"), {**cfg, **extra})
    return path


def _fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


# --- the program ------------------------------------------------------------------------------

def main(argv=None):
    """Configure a run from the command line, then run it: here, or in our own CPU processes."""
    args, given = parse_args(argv)
    cfg = resolve_config(args, given)                   # preset <- flags; every rule checked here
    cfg, ckpt_path = restore_config(cfg, given)         # --resume / --eval-only: the run's own settings
    n = local_procs(cfg)
    if n == 1:
        return run(cfg, ckpt_path)
    check_inputs(cfg)                                   # data and weights once, before the processes start
    spawn_local_procs(cfg, ckpt_path, n)                # each runs run(cfg) on its share of every batch


def run(cfg, ckpt_path, split_batch=1, inputs_checked=False, data=None):
    """The story of a run: processes, inputs, model, optimiser, resume, data, the loop, the results.
    split_batch: how many of our own processes share cfg["batch_size"] (spawn_local_procs);
    data: {split: dataset} when the parent built them (build_all_data), else built here."""
    start_time = time.time()
    procs = setup_processes(cfg)
    log = print if procs.master else (lambda *a, **k: None)
    if not inputs_checked:
        check_inputs_once(cfg, procs)                   # data and weights before the big allocations
    baselines = load_baselines(cfg["baselines"], cfg) if cfg["baselines"] else None
    autocast, scaler = precision(cfg, procs.device)
    seed_everything(cfg["seed"])

    # -- model and optimiser; a checkpoint's weights, and for --resume its optimiser and RNG states
    model = build_model(cfg).to(procs.device)
    if procs.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = build_optimizer(model, cfg)
    ckpt = load_checkpoint(ckpt_path)[0] if ckpt_path else None
    start_iter, best_score = restore_state(ckpt, ckpt_path, cfg, model, optimizer, scheduler, scaler)
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if procs.distributed:
        model = data_parallel(model, procs.device)
    eval_model = model.module if procs.distributed else model

    # -- data: this process's share of every batch
    batch_size = cfg["batch_size"] // split_batch
    val_loader, batches, num_val, num_train = make_loaders(cfg, procs, batch_size, start_iter, data)
    out_dir = cfg["out_dir"]
    if procs.master:
        os.makedirs(out_dir, exist_ok=True)
    if cfg["eval_only"]:
        log(f"evaluating {ckpt_path} (iteration {ckpt['iteration']}) on {num_val} val images", flush=True)
        record = evaluate_and_record(eval_model, val_loader, cfg, procs, autocast, ckpt["iteration"], True, baselines)
        if procs.master:
            name = os.path.splitext(os.path.basename(ckpt_path))[0]
            write_json(os.path.join(out_dir, f"eval_{name}.json"), {**record, "checkpoint": os.path.abspath(ckpt_path)})
        return finish(procs, record)
    if procs.master:
        metrics_path = start_outputs(cfg, start_iter, {"world_size": procs.world, "torch": torch.__version__,
                                                       "parameters": num_params})
    log(f"{cfg['dataset']}: {num_train} train / {num_val} val images, tasks {', '.join(cfg['tasks'])}; "
        f"{cfg['exchange']} exchange, etf {cfg['etf']}, {cfg['backbone']} backbone, {num_params / 1e6:.2f} M "
        f"parameters; {procs.device.type}, {procs.world} process(es), amp {cfg['amp']}; writing to {out_dir}"
        + (f"; resuming at iteration {start_iter}" if start_iter else ""), flush=True)

    # -- the loop: a step; every log_interval a log line; every eval_interval an evaluation and a checkpoint
    step_images = batch_size * cfg["accum"] * procs.world
    running = {t: torch.zeros((), device=procs.device) for t in cfg["tasks"]}
    window_start, window_iters, train_images, train_seconds, last = time.time(), 0, 0, 0.0, None
    for it in range(start_iter, cfg["max_iters"]):
        train_step(model, batches, cfg, procs, autocast, scaler, optimizer, scheduler, running)
        done, window_iters = it + 1, window_iters + 1
        evaluating = done % cfg["eval_interval"] == 0 or done == cfg["max_iters"]
        if done % cfg["log_interval"] == 0 or evaluating:
            seconds = time.time() - window_start
            line = log_window(running, window_iters, seconds, step_images, cfg, procs, done)
            train_images, train_seconds = train_images + window_iters * step_images, train_seconds + seconds
            eta = (cfg["max_iters"] - done) * seconds / window_iters
            log(f"iter {done}/{cfg['max_iters']} | loss {line['loss']:.4f} | "
                + " ".join(f"{t} {v:.4f}" for t, v in line["losses"].items())
                + f" | lr {scheduler.get_last_lr()[0]:.2e} | {line['images_per_s']:.1f} img/s | eta {_fmt_time(eta)}",
                flush=True)
            if procs.master:
                append_jsonl(metrics_path, {**line, "lr": scheduler.get_last_lr()[0]})
            running = {t: torch.zeros((), device=procs.device) for t in cfg["tasks"]}
            window_start, window_iters = time.time(), 0
        if evaluating:
            final = done == cfg["max_iters"]
            log(f"evaluating at iteration {done}" + (" (exact edge matching)" if final and "edge" in cfg["tasks"] else ""),
                flush=True)
            last = evaluate_and_record(eval_model, val_loader, cfg, procs, autocast, done, final, baselines)
            score = headline_score(last["metrics"], cfg["tasks"][0])
            if procs.master:
                append_jsonl(metrics_path, last)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": done,
                         "best_score": max(best_score, score), "rng": rng_states(), "config": cfg}
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
                if score > best_score:
                    save_checkpoint(os.path.join(out_dir, "best.pt"), state)
            best_score = max(best_score, score)
            window_start = time.time()   # evaluation time is not training time

    # -- results: the final evaluation, the training speed, the wall time
    if procs.master and last is not None:
        write_json(os.path.join(out_dir, "results.json"),
                   {"config": cfg, "iteration": cfg["max_iters"], "metrics": last["metrics"],
                    "delta_m": last.get("delta_m"), "parameters": num_params,
                    "train_images_per_s": train_images / train_seconds if train_seconds else None,
                    "wall_time_s": time.time() - start_time})
        print(f"done in {_fmt_time(time.time() - start_time)}; results in {os.path.join(out_dir, 'results.json')}")
    return finish(procs, last)


def finish(procs, record):
    if procs.distributed:
        dist.destroy_process_group()
    return record


def cli(argv=None):
    """main() with bad input reported as one paragraph and a non-zero exit code, no traceback."""
    quiet = int(os.environ.get("RANK", "0")) != 0         # several processes: only rank 0 speaks
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"   # one line, no source
    try:
        main(argv)
    except (UsageError, datasets.DatasetError, WeightsUnavailable, FloatingPointError, RunStopped) as error:
        if not quiet:
            print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, (FloatingPointError, RunStopped)) else 2
    except KeyboardInterrupt:
        if not quiet:
            print("interrupted; continue with --resume <out-dir> (the last checkpoint is intact)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
