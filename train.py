"""Train and evaluate a multi-task network with KEM, cross-attention or no exchange.

    python train.py                                   # offline demo: SyntheticRooms, about 3 minutes on a 2-core CPU
    python train.py --dataset nyud                    # NYUD-v2, the field's protocol, pretrained Swin-T
    torchrun --nproc_per_node=4 train.py --dataset pascal       # several GPUs (or machines)
    python train.py --tasks depth --exchange none --out-dir runs/st-depth   # a single-task baseline
    python train.py --baselines runs/baselines        # ... and Δm against such baselines
    python train.py --resume runs/<run>               # continue an interrupted run exactly
    python train.py --eval-only --ckpt runs/<run>/best.pt       # evaluate a checkpoint

How to read this file, top to bottom: the presets (every default, per dataset); TASKS, the one table
that says per task how it is trained, scored and drawn; the configuration (flags over a preset);
the model and its optimiser; one training step and the evaluation; then the program: `Hooks` (what
an experiment may change in a run), `main()`, which configures a run, `start()` and `run()`, the
story of a run, `evaluate_checkpoint()` for --eval-only, and `cli()`, which reports bad input.
What a run needs around the loop (our own CPU processes,
the resumable data stream, checkpoint and record files, input checks, pictures) is in
train_support.py, imported as `support`; its docstring says how a run stays reproducible.

A plain `python train.py` never needs a launcher: on a CPU with several cores it splits each batch
over `--procs` single-thread processes of its own; under torchrun the same code runs one process per GPU.

Losses (the InvPT family's protocol): cross-entropy for semseg and parts, L1 on valid depth, L1 on
normalised normals over valid pixels, class-balanced BCE for edges (positive weight 0.95), BCE for
saliency; 255 (and 0 depth, zero normals) ignored. [ours] each loss is a mean over an image's valid
pixels, then a mean over the batch (the field pools over the batch's pixels).
"""
import argparse
import contextlib
import dataclasses
import math
import os
import socket
import sys
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch.nn.parallel import DistributedDataParallel as DDP

import datasets
import metrics
import train_support as support
from etf import l2_normalize
from kem_mtl import BACKBONES, ETF_MODES, EXCHANGES, MultiTaskNet
from train_support import RunStopped, UsageError, WeightsUnavailable

# --- presets: every default, per dataset ------------------------------------------------------
# nyud / pascal follow the field's protocol; the synthetic preset is ours, sized so that
# `python train.py` finishes in about 3 minutes on a 2-core CPU and learns every task. Image
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
              procs="auto", channels_last=False, dist_timeout=120,
              data_seed=0)  # which scenes SyntheticRooms draws (--data-seed): 0 unless a run sets it


# --- the task table ---------------------------------------------------------------------------
# Everything train.py knows about a task, in one row: adding a task means adding a row. The draw
# functions are train_support's last section, "pictures".

def _per_image_mean(loss_map, valid):
    """Mean over each image's valid pixels, then over the batch (images with none count as 0)."""
    valid = valid.float()
    per_image = (loss_map * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    return per_image.mean()


def class_loss(logits, target):
    """Cross-entropy per pixel, label 255 ignored."""
    return _per_image_mean(nnf.cross_entropy(logits, target, ignore_index=255, reduction="none"), target != 255)


def depth_loss(pred, target):
    """L1 in metres where the ground truth is valid (> 0)."""
    return _per_image_mean((pred - target).abs(), target > 0)


def normals_loss(pred, target):
    """L1 between the normalised prediction and the unit ground truth, where it is non-zero."""
    unit = l2_normalize(pred, dim=1)
    return _per_image_mean((unit - target).abs().sum(1, keepdim=True), target.abs().sum(1, keepdim=True) > 0)


def edge_loss(logits, target):
    """Class-balanced BCE: edges are rare, so positives weigh 0.95 and negatives 0.05."""
    y = (target == 1).float()
    bce = nnf.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return _per_image_mean(bce * (0.95 * y + 0.05 * (1 - y)), target != 255)


def saliency_loss(logits, target):
    y = (target == 1).float()
    return _per_image_mean(nnf.binary_cross_entropy_with_logits(logits, y, reduction="none"), target != 255)


@dataclasses.dataclass(frozen=True)
class Task:
    weight: float             # loss weight (the field's; the same on NYUD and PASCAL)
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
    "semseg":  Task(1.0, class_loss, _argmax, lambda c, edge: metrics.SegMeter(c), support.draw_labels),
    "parts":   Task(2.0, class_loss, _argmax, lambda c, edge: metrics.SegMeter(c), support.draw_labels),
    "depth":   Task(1.0, depth_loss, _as_float, lambda c, edge: metrics.DepthMeter(), support.draw_depth),
    "normals": Task(10.0, normals_loss, _as_float, lambda c, edge: metrics.NormalsMeter(), support.draw_normals),
    "edge":    Task(50.0, edge_loss, _sigmoid, lambda c, edge: metrics.EdgeMeter(**edge), support.draw_grey),
    "sal":     Task(5.0, saliency_loss, _sigmoid, lambda c, edge: metrics.SaliencyMeter(), support.draw_grey),
}


def compute_losses(outputs, targets, tasks):
    """{task: loss (float32 scalar)} for the tasks named."""
    return {t: TASKS[t].loss(outputs[t].float(), targets[t]) for t in tasks}


# --- configuration ----------------------------------------------------------------------------

def preset_defaults(name):
    """Every flag's default under dataset `name`'s preset, as --help shows it."""
    cfg = {**COMMON, **PRESETS[name], "tasks": ",".join(datasets.task_channels(name)),
           "image_size": "x".join(map(str, datasets.DEFAULT_SIZES[name]["train"]))}
    if name == "synthetic":
        cfg.update(train_samples=datasets.DEFAULT_NUM_SAMPLES["train"], val_samples=datasets.DEFAULT_NUM_SAMPLES["val"])
    else:
        cfg["image_size"] += f"; evaluation pads to {'x'.join(map(str, datasets.DEFAULT_SIZES[name]['eval']))}"
    cfg["workers"] = "auto: 0 on a CPU, else up to 4" if cfg["workers"] is None else cfg["workers"]
    return {k: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v for k, v in cfg.items()}


def parse_args(argv):
    first = support.ArgumentParser(add_help=False, allow_abbrev=False)    # which preset --help describes
    first.add_argument("--dataset")
    name = first.parse_known_args(argv)[0].dataset
    name = name if name in PRESETS else "synthetic"
    first_task = next(iter(datasets.task_channels(name)))
    p = support.ArgumentParser(description="Multi-task training with KEM (SGW-based MTL, ACCV 2024).",
                               epilog=f"Defaults are the {name} preset's; `--dataset NAME --help` shows another's "
                                      f"({', '.join(PRESETS)}). Any flag overrides them.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=datasets.NAMES,
                   help="synthetic (the default) needs no download; nyud and pascal download once")
    g.add_argument("--data-dir", help="where datasets live (else $KEM_MTL_DATA, else ~/.cache/kem_mtl)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="fetch missing data and pretrained weights; --no-download stops with instructions")
    g.add_argument("--tasks", help="comma list, e.g. semseg,depth (one task = single-task baseline)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per process (0 loads in the process itself)")
    g.add_argument("--image-size", type=support.size, metavar="HxW",
                   help="synthetic: the rendered size (train and val); nyud/pascal: the training crop")
    g.add_argument("--train-samples", type=int, help="synthetic only: scenes in the train split")
    g.add_argument("--val-samples", type=int, help="synthetic only: scenes in the val split")
    g.add_argument("--data-seed", type=int,
                   help="synthetic only: which scenes SyntheticRooms draws for train and val (--seed does not "
                        "change them)")
    g = p.add_argument_group("model")
    g.add_argument("--exchange", choices=EXCHANGES, help="how tasks meet: kem (the paper), cross (full attention), none")
    g.add_argument("--etf", choices=ETF_MODES,
                   help="sKEM: tokens into ETF space (features), fixed ETF slots (slots), both; normalize = the control")
    g.add_argument("--num-slots", type=int, help="KEM memory slots L (try 8-32; more slots than tokens is warned about)")
    g.add_argument("--topk", type=support.number,
                   help="tokens per slot: a count (e.g. 64) or a fraction of all tokens (e.g. 0.25)")
    g.add_argument("--topk-mode", choices=("mask", "post"),
                   help="mask: softmax over the top-k; post: softmax, then keep the top-k (the SGW's)")
    g.add_argument("--backbone", choices=BACKBONES, help="tiny (CPU, from scratch) or a torchvision Swin/ResNet")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="ImageNet weights for torchvision backbones (--no-pretrained offline)")
    g.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction,
                   help="do not train the backbone (our 'fixed encoder' reading)")
    g.add_argument("--dim", type=int, help="token width D: below 8, a multiple of 8 below 64, or a multiple of 16 "
                                            "(the network's GroupNorms)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int,
                   help="images per step: per process under torchrun (the field uses 2 per GPU); split over --procs")
    g.add_argument("--accum", type=int, help="gradient accumulation steps (effective batch = batch x accum x processes)")
    g.add_argument("--max-iters", type=int, help="optimiser steps")
    g.add_argument("--lr", type=float, help="peak learning rate (> 0)")
    g.add_argument("--weight-decay", type=float, help="weight decay (0 = none)")
    g.add_argument("--warmup-iters", type=int,
                   help="linear warm-up steps before the polynomial decay (0 = none; at least --max-iters: the run "
                        "never reaches --lr)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0 = no clipping; not negative)")
    g.add_argument("--seed", type=int, help=f"seed for the model, the data order and the augmentation (0 to {2**32 - 1})")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto picks cuda, then mps, then cpu")
    g.add_argument("--procs", type=support.procs_count,
                   help="CPU only: split each batch over this many single-thread processes (auto: up to 4, "
                        "one per core); 1 = one process using every core")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"),
                   help="mixed precision; auto = bf16 on GPUs with native bf16 (compute capability >= 8), else fp16 "
                        "with a scaler (several GPUs: what every one supports); none on CPUs and Macs (the start-up "
                        "line says which)")
    g.add_argument("--dist-timeout", type=support.minutes, metavar="MINUTES",
                   help="several processes: how long one waits for the others, first while each node prepares its "
                        f"data (a download of several GB), then in every collective (default {COMMON['dist_timeout']})")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step (slow start, faster steps); evaluation runs uncompiled")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="model and images channels-last (unmeasured on GPUs, where GroupNorm converts back to NCHW)")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--out-dir", help="default runs/<dataset>-<exchange>-<timestamp>. It receives ckpt.pt (the latest "
                                     "state, for --resume), best.pt (the evaluation with the best headline metric of "
                                     f"the first task in --tasks, here {first_task} "
                                     f"{metrics.HEADLINE[first_task][0]}) and results.json (the last evaluation)")
    g.add_argument("--eval-interval", type=int, help="evaluate (and checkpoint) every this many steps")
    g.add_argument("--log-interval", type=int, help="print a log line every this many steps")
    g.add_argument("--resume", metavar="PATH",
                   help="a run directory or its ckpt.pt: continue it exactly (under torchrun with another number "
                        "of processes: after the images already seen, with the new batch x accum x processes)")
    g.add_argument("--eval-only", action="store_true", default=None, help="evaluate --ckpt on the val split and stop")
    g.add_argument("--ckpt", metavar="PATH", help="checkpoint for --eval-only")
    g.add_argument("--baselines", metavar="DIR", help="folder of single-task runs: report Δm against them")
    shown = preset_defaults(name)
    for action in p._actions:
        if action.dest in shown:
            action.help += f" (default: {shown[action.dest]})"
    args = p.parse_args(argv)
    return args, {k for k, v in vars(args).items() if v is not None}


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
    for key in ("train_samples", "val_samples", "data_seed"):
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
    most = support.most_processes()
    if cfg["workers"] is not None and not 0 <= cfg["workers"] <= most:
        raise UsageError(f"--workers must lie in 0..{most} (0 loads the data in the process itself), got {cfg['workers']}")
    if cfg["eval_only"] and not cfg["ckpt"]:
        raise UsageError("--eval-only needs --ckpt PATH (e.g. runs/<run>/best.pt)")
    check_optimisation(cfg, given)
    # The dataset's rules live in datasets / synthetic, the network's in kem_mtl; here they only get the
    # command line's words (and their warnings too, printed once).
    flags = set(vars(args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for split, size in (("train", "train_size"), ("val", "eval_size")):
                datasets.check_options(name, size=cfg[size], num_samples=cfg[f"{split}_samples"], seed=cfg["data_seed"])
        except ValueError as error:
            raise UsageError(support.as_flags(str(error), flags, aliases={
                "num_samples": f"{split}_samples", "seed": "data_seed", "size": "image_size"})) from None
        try:
            MultiTaskNet.check_options({t: all_tasks[t] for t in cfg["tasks"]}, image_size=cfg["train_size"],
                                       **{k: cfg[k] for k in ("backbone", "pretrained", "exchange", "etf", "dim",
                                                              "num_slots", "topk", "topk_mode")})
        except (ValueError, ImportError) as error:
            raise UsageError(support.as_flags(str(error), flags)) from None
    for warning in caught:
        warnings.warn(support.as_flags(str(warning.message), flags), stacklevel=2)
    check_memory(cfg)
    return cfg


def check_optimisation(cfg, given):
    """The optimiser's and the schedule's rules (UsageError), and a warning for values typed (`given`) that
    work but are almost certainly a mistake."""
    for key, what, ok in (("lr", "> 0", cfg["lr"] > 0), ("weight_decay", ">= 0 (0 = none)", cfg["weight_decay"] >= 0),
                          ("grad_clip", ">= 0 (0 = no clipping)", cfg["grad_clip"] >= 0)):
        if not (ok and math.isfinite(cfg[key])):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number {what}, got {cfg[key]}")
    if cfg["warmup_iters"] < 0:
        raise UsageError(f"--warmup-iters must be >= 0 (0 = no warm-up), got {cfg['warmup_iters']}")
    if not 0 <= cfg["seed"] < 2**32:
        raise UsageError(f"--seed must lie in 0..{2**32 - 1} (NumPy takes no other seeds), got {cfg['seed']}")
    if "warmup_iters" in given and cfg["warmup_iters"] >= cfg["max_iters"]:
        warnings.warn(f"--warmup-iters {cfg['warmup_iters']} is not below --max-iters {cfg['max_iters']}: the "
                      f"learning rate never reaches --lr {cfg['lr']:g}", stacklevel=3)
    if cfg["optimizer"] == "adamw" and cfg["lr"] * cfg["weight_decay"] >= 1:
        warnings.warn(f"--lr {cfg['lr']:g} x --weight-decay {cfg['weight_decay']:g} >= 1: AdamW multiplies every "
                      f"weight by 1 - lr x weight decay <= 0 at each step", stacklevel=3)
    if cfg["lr"] >= 1:
        warnings.warn(f"--lr {cfg['lr']:g} moves every weight by about that much at each Adam step; learning rates "
                      f"that train lie far below 1 (the presets use 2e-3 and 2e-5)", stacklevel=3)


def check_memory(cfg):
    """Refuse a run that cannot fit in this machine's memory, counting only what it surely holds: the
    network's weights, the rendered SyntheticRooms scenes and one batch of images (float32).

    The weights are counted on PyTorch's meta device, where building allocates nothing, but whose random
    initialisers take ~1.5 s to load: only when --dim and --num-slots make D x D or L x D matrices of more
    than 2^24 numbers (below that, the network is a few hundred MB at most)."""
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                    # not known here (Windows): no check
        return
    weights = 0
    if cfg["dim"] * max(cfg["dim"], cfg["num_slots"]) > 2**24:
        try:
            with torch.device("meta"):
                weights = 4 * sum(p.numel() for p in build_model({**cfg, "pretrained": False}).parameters())
        except (RuntimeError, OverflowError, TypeError):            # sizes past what PyTorch can even count
            weights = math.inf
    splits = [("val", "eval_size")] + ([] if cfg["eval_only"] else [("train", "train_size")])
    scenes = sum(datasets.cache_bytes(cfg["dataset"], cfg[f"{split}_samples"], cfg[size], cfg["tasks"])
                 for split, size in splits)
    batch = max(4 * 3 * cfg["batch_size"] * math.prod(cfg[size]) for _, size in splits)
    if weights + scenes + batch > available:
        parts = sorted([(weights, "the network's weights", "--dim, --num-slots, --backbone"),
                        (scenes, "the rendered scenes", "--train-samples, --val-samples, --image-size"),
                        (batch, "one batch of images", "--batch-size, --image-size")], reverse=True)
        raise UsageError(f"this run cannot fit in this machine's {available / 1e9:.1f} GB of memory: before anything "
                         f"else is counted, " + ", ".join(f"{_bytes(size)} for {what} ({flags})"
                                                          for size, what, flags in parts if size)
                         + "; make the largest of these smaller")


def _bytes(n):
    """n bytes for a reader: 64 GB, 471 kB."""
    if n == math.inf:
        return "more than PyTorch can count"
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")) if n >= s or s == 1)
    return f"{n / scale:.3g} {unit}"


# --- devices, model and optimiser --------------------------------------------------------------

# The first PyTorch that autocasts a device to each type, where older ones do not (CUDA and CPU: all we support).
AUTOCAST_SINCE = {("mps", "fp16"): "2.5", ("mps", "bf16"): "2.6 (on macOS 14 or later)"}


def precision(amp, device):
    """The autocast context and the gradient scaler for a resolved --amp (support.resolve_amp) on `device`.
    none: no autocast object at all (before 2.5, PyTorch refuses an MPS autocast even when it is disabled).
    fp16 / bf16: a UsageError where the installed PyTorch cannot autocast the device to that type, whether it
    refuses the device or would switch autocast off with a warning and silently train in fp32."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if amp == "none":
        return contextlib.nullcontext(), scaler
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            autocast, reason = torch.autocast(device.type, dtype=dtype), None
        except RuntimeError as error:
            autocast, reason = None, str(error)
    if autocast is not None and getattr(autocast, "_enabled", True):
        for w in caught:                                # warnings that did not switch it off: passed on
            warnings.warn(w.message, w.category)
        return autocast, scaler
    reason = " ".join((reason or " ".join(str(w.message) for w in caught) or "autocast switched itself off").split())
    since = AUTOCAST_SINCE.get((device.type, amp))
    raise UsageError(f"--amp {amp}: this PyTorch ({torch.__version__}) cannot autocast {device.type} to {dtype} "
                     f"(it says: {reason})" + (f"; PyTorch {since} can" if since else "") + ". Use --amp none "
                     "(float32)" + (" or --amp fp16" if amp == "bf16" else "") + ", or a PyTorch that can")


def build_model(cfg):
    """The network a config describes."""
    channels = datasets.task_channels(cfg["dataset"])
    return MultiTaskNet({t: channels[t] for t in cfg["tasks"]}, backbone=cfg["backbone"],
                        pretrained=cfg["pretrained"], exchange=cfg["exchange"], etf=cfg["etf"], dim=cfg["dim"],
                        num_slots=cfg["num_slots"], topk=cfg["topk"], topk_mode=cfg.get("topk_mode", "mask"),
                        freeze_backbone=cfg.get("freeze_backbone", False))


def load_trained(ckpt_path):
    """(network in eval mode, its run's config, the checkpoint's iteration) from a train.py checkpoint: the one
    way a checkpoint is read outside the loop (the lab, the notebooks), with the loop's own checks and
    messages. No pretrained weights are fetched: the checkpoint holds every weight."""
    ckpt, path = support.load_checkpoint(ckpt_path)
    model = build_model({**ckpt["config"], "pretrained": False})
    support.load_weights(model, ckpt, path)
    return model.eval(), ckpt["config"], ckpt["iteration"]


def data_parallel(model, device):
    """The model for one of several processes: DDP averages its gradients over them during backward
    (gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, no copy in and out, as long
    as they are zeroed rather than set to None between steps: train_step).

    PyTorch's "Grad strides do not match bucket view strides" warning is not shown: on a CPU, large
    batches make the 1x1 convolutions return weight gradients whose strides differ only along their
    size-1 dimensions (same memory layout, contiguous), which DDP's exact comparison reports."""
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
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


# --- one training step, its log line, evaluation ------------------------------------------------

def train_step(model, batches, cfg, procs, autocast, scaler, optimizer, scheduler, running):
    """One optimiser step over cfg["accum"] micro-batches. Adds the detached per-task losses to
    `running` (no host sync here: the values are read at log intervals only)."""
    device = procs.device
    for micro in range(cfg["accum"]):
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        if cfg["channels_last"]:
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
    scaler.step(optimizer)          # fp16: the fused step reads the scaler's inf flag on the device (no host sync)
    scaler.update()
    # Under DDP the gradients are views of its buckets: zeroing them keeps them there, while None would leave
    # DDP's reducer to copy every new gradient into its bucket. A single process has nothing to zero: None.
    optimizer.zero_grad(set_to_none=not procs.distributed)
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
    with its outputs (for the picture; None when this process's share is empty). exact_edges: the exact
    (slow) or approximate edge metric."""
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
    """evaluate(), the picture of the first val images, the log line, and the record to keep. A process
    whose share of the val split is empty (fewer val images than processes) still takes part in the sums."""
    t0 = time.time()
    results, first = evaluate(model, loader, cfg, procs, autocast, exact)
    record = {"kind": "eval", "iter": it, "exact_edges": exact, "metrics": results, "seconds": round(time.time() - t0, 2)}
    if baselines is not None and exact:
        record["delta_m"] = metrics.delta_m(results, baselines)
    if procs.master and first is not None:     # process 0 holds the first val image whenever there is one
        support.save_picture(os.path.join(cfg["out_dir"], f"eval_{it:06d}.png"), *first, cfg,
                             {t: TASKS[t].draw for t in cfg["tasks"]})
        print("eval: " + support.summary(results, record.get("delta_m")), flush=True)
    return record


def headline_score(results, task):
    """Higher is better: the first task's headline metric, signed (exact at every eval, unlike odsF)."""
    key, sign = metrics.HEADLINE[task]
    return sign * results[task].get(key, results[task].get(f"{key}_approx"))


# --- the program ------------------------------------------------------------------------------

@dataclasses.dataclass
class Hooks:
    """What an experiment may change in a run (the studies in research/ use them): passed to cli(),
    main(), run() and evaluate_checkpoint(); the defaults change nothing. When our own CPU processes are
    spawned rather than forked (not on Linux), the hooks travel to them pickled: module-level functions
    or instances of module-level classes, not closures."""
    model: Callable = None       # (model, cfg) -> model: alter or wrap the network right after it is built
    dataset: Callable = None     # (split, cfg, build) -> dataset: build(**options) makes the split as the run
    #                              would (options: datasets.build_dataset's, e.g. edit_scene); return it or a wrapper
    optimizer: Callable = None   # (model, optimizer, scheduler, cfg) -> None: once both exist (e.g. step hooks)
    evaluated: Callable = None   # (model, cfg, procs, it, record) -> None: after every evaluation, every process


def main(argv=None, hooks=None):
    """Configure a run from the command line, then run it: here, or in our own CPU processes."""
    hooks = hooks or Hooks()
    args, given = parse_args(argv)
    cfg = resolve_config(args, given)                   # preset <- flags; every rule checked here
    cfg, ckpt_path = support.restore_config(cfg, given, COMMON)   # --resume / --eval-only: the run's own settings
    story = evaluate_checkpoint if cfg["eval_only"] else run
    n = support.local_procs(cfg)
    if n == 1:
        return story(cfg, ckpt_path, hooks)
    support.check_inputs(cfg)                           # data and weights once, before the processes start
    support.spawn_local_procs(story, cfg, ckpt_path, n, hooks)   # each runs story() on its share of every batch


def start(cfg, hooks):
    """What every run begins with: its processes and device, its inputs checked, the Δm baselines, its
    precision, and the seeded network (as hooks.model leaves it) on its device."""
    procs = support.setup_processes(cfg)                # data and weights checked before any collective
    baselines = support.load_baselines(cfg["baselines"], cfg) if cfg["baselines"] else None
    cfg["amp_resolved"] = support.agree_amp(cfg["amp"], procs)     # the same in every process; into config.json
    autocast, scaler = precision(cfg["amp_resolved"], procs.device)
    support.seed_everything(cfg["seed"])                # the same initial weights in every process
    model = build_model(cfg)
    if hooks.model:
        model = hooks.model(model, cfg)
    model = model.to(procs.device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return procs, baselines, autocast, scaler, model


def run(cfg, ckpt_path=None, hooks=None):
    """The story of a training run: set-up, model and optimiser, resume, data, the loop, the results.
    ckpt_path: the checkpoint to continue (--resume), else None. hooks: what an experiment changes (Hooks)."""
    start_time = time.time()
    hooks = hooks or Hooks()
    procs, baselines, autocast, scaler, model = start(cfg, hooks)
    log = print if procs.master else (lambda *a, **k: None)

    # -- optimiser; for --resume, the checkpoint's weights, optimiser, scheduler, scaler and RNG states
    num_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = build_optimizer(model, cfg)
    if hooks.optimizer:
        hooks.optimizer(model, optimizer, scheduler, cfg)
    ckpt = support.load_checkpoint(ckpt_path)[0] if ckpt_path else None
    start_iter, best_score = support.restore_state(ckpt, ckpt_path, model, optimizer, scheduler, scaler, procs,
                                                   cfg["seed"])     # and each process's own dropout RNG
    raw_model = model                   # evaluation runs this uncompiled module: compiled, other image sizes fail
    if cfg["compile"]:
        model = torch.compile(model)
    if procs.distributed:
        model = data_parallel(model, procs.device)

    # -- data: this process's share of every batch, the stream continuing after the images already seen
    batch_size = procs.share(cfg["batch_size"])
    step_images = batch_size * cfg["accum"] * procs.world
    start_images = support.stream_start(ckpt, step_images, procs)
    val_loader, batches, num_val, num_train = support.make_loaders(cfg, procs, batch_size, start_images, hooks)
    out_dir = cfg["out_dir"]
    metrics_path, recorded = support.start_outputs(cfg, procs, start_iter, {
        "world_size": procs.world, "torch": torch.__version__, "parameters": num_params})
    if recorded:                        # the checkpoint's own evaluation finished before the run stopped
        best_score = max(best_score, headline_score(recorded["metrics"], cfg["tasks"][0]))
    log(f"{cfg['dataset']}: {num_train} train / {num_val} val images, tasks {', '.join(cfg['tasks'])}; "
        f"{cfg['exchange']} exchange, etf {cfg['etf']}, {cfg['backbone']} backbone, {num_params / 1e6:.2f} M "
        f"parameters; {procs.device.type}, {procs.world} process(es), amp {cfg['amp_resolved']}"
        + (" (auto)" if cfg["amp"] == "auto" else "") + f"; writing to {out_dir}"
        + (f"; resuming at iteration {start_iter}" if start_iter else ""), flush=True)

    # -- the loop: a step; every log_interval a log line; every eval_interval a checkpoint, then an evaluation
    running = {t: torch.zeros((), device=procs.device) for t in cfg["tasks"]}
    window_start, window_iters, train_images, train_seconds, last = time.time(), 0, 0, 0.0, None
    pending = ckpt is not None and recorded is None     # a checkpoint whose evaluation never finished: evaluate first
    for done in range(start_iter + 1 - pending, cfg["max_iters"] + 1):      # done: steps taken
        if done > start_iter:
            train_step(model, batches, cfg, procs, autocast, scaler, optimizer, scheduler, running)
            window_iters += 1
        evaluating = done % cfg["eval_interval"] == 0 or done == cfg["max_iters"] or done == start_iter
        if window_iters and (done % cfg["log_interval"] == 0 or evaluating):
            seconds = time.time() - window_start
            line = log_window(running, window_iters, seconds, step_images, cfg, procs, done)
            train_images, train_seconds = train_images + window_iters * step_images, train_seconds + seconds
            eta = (cfg["max_iters"] - done) * seconds / window_iters
            log(f"iter {done}/{cfg['max_iters']} | loss {line['loss']:.4f} | "
                + " ".join(f"{t} {v:.4f}" for t, v in line["losses"].items())
                + f" | lr {scheduler.get_last_lr()[0]:.2e} | {line['images_per_s']:.1f} img/s | "
                  f"eta {support.fmt_time(eta)}", flush=True)
            if procs.master:
                support.append_jsonl(metrics_path, {**line, "lr": scheduler.get_last_lr()[0]})
            running = {t: torch.zeros((), device=procs.device) for t in cfg["tasks"]}
            window_start, window_iters = time.time(), 0
        if evaluating:                  # the checkpoint first: a failed evaluation loses no training
            state = support.checkpoint_state(raw_model, optimizer, scheduler, scaler, done, best_score, cfg, procs,
                                             start_images + (done - start_iter) * step_images, step_images)
            if procs.master:
                support.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), state)
            final = done == cfg["max_iters"]
            exact = " (exact edge matching)" if final and "edge" in cfg["tasks"] else ""
            log(f"evaluating at iteration {done}{exact}", flush=True)
            last = evaluate_and_record(raw_model, val_loader, cfg, procs, autocast, done, final, baselines)
            if hooks.evaluated:
                hooks.evaluated(raw_model, cfg, procs, done, last)
            score = headline_score(last["metrics"], cfg["tasks"][0])
            if procs.master:
                support.append_jsonl(metrics_path, last)
                if score > best_score:  # best.pt: the checkpoint of the best evaluation, with its score
                    support.save_checkpoint(os.path.join(out_dir, "best.pt"), {**state, "best_score": score})
            best_score = max(best_score, score)
            window_start = time.time()   # evaluation time is not training time

    # -- results: the final evaluation, the training speed, the wall time
    if procs.master and last is not None:
        support.write_json(os.path.join(out_dir, "results.json"),
                           {"config": cfg, "iteration": cfg["max_iters"], "metrics": last["metrics"],
                            "delta_m": last.get("delta_m"), "parameters": num_params,
                            "train_images_per_s": train_images / train_seconds if train_seconds else None,
                            "wall_time_s": time.time() - start_time})
        print(f"done in {support.fmt_time(time.time() - start_time)}; "
              f"results in {os.path.join(out_dir, 'results.json')}")
    return finish(procs, last)


def evaluate_checkpoint(cfg, ckpt_path, hooks=None):
    """--eval-only: a checkpoint's metrics on the val split (exact edges), into eval_<checkpoint>.json."""
    hooks = hooks or Hooks()
    procs, baselines, autocast, _, model = start(cfg, hooks)
    ckpt = support.load_checkpoint(ckpt_path)[0]
    support.load_weights(model, ckpt, ckpt_path)       # evaluated uncompiled, as in training (--compile is ignored)
    val_loader, _, num_val, _ = support.make_loaders(cfg, procs, procs.share(cfg["batch_size"]), 0, hooks)
    if procs.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"evaluating {ckpt_path} (iteration {ckpt['iteration']}) on {num_val} val images", flush=True)
    record = evaluate_and_record(model, val_loader, cfg, procs, autocast, ckpt["iteration"], True, baselines)
    if hooks.evaluated:
        hooks.evaluated(model, cfg, procs, ckpt["iteration"], record)
    if procs.master:
        name = os.path.splitext(os.path.basename(ckpt_path))[0]
        support.write_json(os.path.join(cfg["out_dir"], f"eval_{name}.json"),
                           {**record, "checkpoint": os.path.abspath(ckpt_path)})
    return finish(procs, record)


def finish(procs, record):
    if procs.distributed:
        dist.destroy_process_group()
    return record


def cli(argv=None, hooks=None):
    """main() with bad input reported as one paragraph and a non-zero exit code, no traceback."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun every process that stops says why, under its rank and host: nodes can fail differently
    # (a --resume path on one node only), and a silent one leaves the others waiting in a collective.
    who = f"[rank {rank}/{world} on {socket.gethostname()}] " if world > 1 else ""
    support.show_warnings(rank)                         # one line each, once per run, process 0 only
    try:
        main(argv, hooks)
    except (UsageError, datasets.DatasetError, WeightsUnavailable, FloatingPointError, RunStopped) as error:
        print(f"{who}error: {error}", file=sys.stderr, flush=True)
        return 1 if isinstance(error, (FloatingPointError, RunStopped)) else 2
    except KeyboardInterrupt:
        if rank == 0:                                   # Ctrl-C reaches every process: one notice is enough
            print("interrupted; continue with --resume <out-dir> (the last checkpoint is intact)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
