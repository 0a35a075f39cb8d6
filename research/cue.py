"""A positive control for the exchange: depth needs a fact that only the semseg branch receives.

    python -m research cue                     # the rows below x the planned pairs (EVIDENCE.md, section 4)
    python -m research cue --pilot             # the labelled pilot (records under runs/cue-pilot/)
    python -m research cue --tables-only       # research/results/cue.json/.md/.png from the records alone

Why [ours]: on SyntheticRooms every task's tokens come from one shared feature map, so an exchange between
the task branches can carry nothing a branch does not already have, and "KEM did not help" cannot be told
from "there was nothing to exchange". Here there is something to exchange, and only the exchange can carry it.

The cue [ours]. Each scene gets a hidden depth scale s, log-uniform in [S_MIN, S_MAX], drawn from a stream
of its own (numpy's default_rng keyed by data seed, split, scene index and a constant, `draw`), so the
scenes and images are those of the data seed. The depth labels are multiplied by s (valid pixels, after
the transform); the image does not show s. The network receives log s as a fourth image channel
(`CueData`), which never reaches the backbone: `CueNet` feeds channels 0-2 to the MultiTaskNet and turns
the fourth, pooled to the token grid, into tokens that a forward pre-hook on the exchange adds to the
tokens of *one* task just before the exchange:

    c_i = W_c [v_i, m_i],    v_i = log s on a cue-carrying token i (else 0),   m_i = 1 if i carries it (else 0)
    F[t] <- F[t] + c        (t = semseg: the rows; t = depth: the oracle; W_c a bias-free Linear(2, D))

- placement "dense": every token cell carries log s (is anything routed at all?);
  placement "sparse": one token cell per image, drawn per scene from the same stream (aligned to the
  token grid, stride 8 for the tiny backbone); the others carry nothing: a slot (or a query) has to
  *select* that token among N, which is where the paper says softmax leaks and top-k does not.
- The marker m [ours, a deviation from a Linear(1, D) of log s alone]: with the value alone the cue token
  stands out from the others only by |log s|, which no score linear in the token can see (q . c log s
  prefers one sign of log s and shuns the other). The marker makes the token findable whatever the sign,
  so the sparse rows test selection rather than a sign trick. In the dense placement m is 1 on every token
  of the task: a constant vector, like the task embedding.
- Distractors (research/distractors.py, kind "other": another image's tokens appended to the exchange's
  input, k held at the real tokens' k) are appended *before* the cue is added [ours, a deviation from
  "cue first"]: added after, another image's tokens would include that image's cue token, with its own
  s: a conflicting fact no exchange could tell from the real one (s is independent of the image), which
  tests confusion, not the leak. Appended first, the distractors are tokens like the N - 1 real ones
  that carry nothing: irrelevant, as the paper's claim has them.

Positional information [ours]. The project adds no positional embedding; a token knows where it is only
through the convolutional features (borders, padding). Neither route needs position here: s is one number
per scene. KEM: a slot retrieves a weighted mean of its top-k tokens (position lost), and every token reads
the slots by content (Write), so what a slot took reaches every depth token. Cross-attention: each depth
token weighs every token by content. A *local* cue (a per-position factor) would need the route to match
positions, which neither has beyond the convolutional features; it is not built here.

Rows (`ROWS`; two tasks, semseg and depth; the synthetic preset otherwise, at IMAGE_SIZE; each seed with
--data-seed = seed): floor (none, cue on semseg: nothing can reach depth) and cross and kem (the
defaults, cue on semseg) for both placements; the oracle (none, cue on every depth token) once; then the
sparse rows cross and kem trained and evaluated with distractors (`--noise`, per real token). With none
the distractors reach nothing (a test in tests/test_experiments.py), so the noisy rows share the clean
floor and oracle of their seed.

The number a reader understands: fraction carried = (floor - row) / (floor - oracle) on depth RMSE,
per seed (0 = nothing got through, 1 = as good as having the cue at every depth token), and the depth
RMSE gain of a row over the floor, 100 (floor - row) / floor (positive = better). Route diagnostics, measured at every
evaluation on the val images (`RouteLog`): for KEM, the share of each slot's top-k that is semseg's
(and distractors'), and with the sparse cue whether the cue-carrying token is in a slot's top-k (recall)
and the largest retrieve weight on it; for cross-attention, the mean weight of depth's queries on the cue
token against 1/N.

Writes research/results/cue.json/.md/.png from the records alone (`report`); the analysis plan, its
families and what each outcome means are in research/EVIDENCE.md (section 4), committed before the first
comparison record.

Letters: B batch, N real tokens (all tasks), M distractors, D width, L slots, h x w token grid, H x W image.

Notes:
- The cue stream is numpy's default_rng([data_seed, split code, index, STREAM]); nothing of the dataset's
  or the training's random streams is drawn, so a run's scenes, augmentation and data order are those of
  the same flags without the cue (a test compares the images).
- One oracle for both placements: the dense one (depth with the cue on every token). A sparse oracle (the
  cue on one of depth's own tokens, no exchange; the pilot ran it) is a weaker reference: depth's decoder
  is convolutional and spreads a one-token cue only locally, so an exchange that broadcasts the cue to
  every depth token can beat it (the pilot: fraction carried above 1 against it). Fraction carried then
  asks how much of the fact's full value reaches depth, for both placements alike.
- Checkpoints hold the CueNet (keys net.*, cue.*): they are read back by wrapping a built network again
  (`load_cue_net`), not by train.load_trained.
"""
import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf

import train
import train_support
from kem_mtl import resolve_topk
from research import distractors, runner, stats
from research.stats import ci, paired, t_interval

S_MIN, S_MAX = 0.7, 1.43             # the hidden depth scale s is log-uniform in [S_MIN, S_MAX]
STREAM = 26_0001                     # the cue stream's own constant in its key
SPLIT_CODE = {"train": 0, "val": 1}
PLACEMENTS = ("dense", "sparse")
TASKS = ("semseg", "depth")          # the cue travels from semseg to depth
ROUTE_LOG = "route.jsonl"            # in a run's folder: one line of route diagnostics per evaluation


def draw(data_seed, split, index, grid):
    """(s, cell) of one scene: the depth scale and the token cell (row-major in the h x w grid) of the
    sparse cue, from the cue's own stream."""
    rng = np.random.default_rng([data_seed, SPLIT_CODE[split], index, STREAM])
    s = float(np.exp(rng.uniform(math.log(S_MIN), math.log(S_MAX))))
    cell = int(rng.integers(grid[0] * grid[1]))
    return s, cell


# --- the data: depth scaled by s, log s as a fourth image channel ---------------------------------------

class CueData(torch.utils.data.Dataset):
    """A split whose depth labels are scaled by each scene's s and whose image carries log s as a 4th channel.

    dataset: the built split (its samples' tensors after the transform). placement: "dense" (log s on every
    pixel) or "sparse" (log s on the pixels of one token cell, `stride` x `stride`, 0 elsewhere).
    """

    def __init__(self, dataset, split, data_seed, placement, stride=8):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.dataset, self.split, self.data_seed, self.placement, self.stride = dataset, split, data_seed, placement, stride

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = dict(self.dataset[i])
        image = sample["image"]                                         # (3, H, W)
        H, W = image.shape[-2:]
        h, w = math.ceil(H / self.stride), math.ceil(W / self.stride)   # the token grid (the net pads to it)
        s, cell = draw(self.data_seed, self.split, i, (h, w))
        if "depth" in sample:
            depth = sample["depth"]
            sample["depth"] = torch.where(depth > 0, depth * s, depth)  # invalid (0) stays invalid
        cue = torch.zeros(1, H, W, dtype=image.dtype)                   # (1, H, W)
        if self.placement == "dense":
            cue.fill_(math.log(s))
        else:
            r, c = divmod(cell, w)
            cue[:, r * self.stride:(r + 1) * self.stride, c * self.stride:(c + 1) * self.stride] = math.log(s)
        sample["image"] = torch.cat([image, cue])                       # (4, H, W)
        sample["meta"] = {**(sample.get("meta") or {}), "cue": {"s": s, "cell": cell if self.placement == "sparse" else None}}
        return sample


@dataclasses.dataclass
class CueDataset:
    """train.Hooks.dataset: every split built as the run would, then wrapped in CueData."""
    placement: str

    def __call__(self, split, cfg, build):
        return CueData(build(), split, cfg["data_seed"], self.placement)


# --- the network: the cue enters one task's tokens just before the exchange --------------------------

class CueNet(nn.Module):
    """A MultiTaskNet taking (B, 4, H, W) images: channels 0-2 go to the network, channel 3 (the cue) is
    pooled to the token grid and added, through a bias-free Linear(2, D) of [value, marker], to the tokens
    of task `route` by a forward pre-hook on the exchange (before the exchange, after any distractors).

    The network itself is unchanged (its backbone and the other task never see the cue). `last_cue`
    keeps, for the diagnostics, the last forward's cue tokens' positions in the exchange's input.
    """

    def __init__(self, net, route):
        super().__init__()
        if route not in net.tasks:
            raise ValueError(f"route must be one of the network's tasks {list(net.tasks)}, got {route!r}")
        self.net, self.route = net, route
        D = net.task_embedding.shape[1]
        self.cue = nn.Linear(2, D, bias=False)                          # [log s, marker] -> a token offset
        self.route_index = list(net.tasks).index(route)
        self._pending = None                                            # (B, h*w, D) for the pre-hook
        self.last_cue = None                                            # {"offset", "hw", "cells": (B, h*w) bool}
        self.handle = net.exchange.register_forward_pre_hook(self._add_cue)

    def forward(self, images):
        if images.shape[1] != 4:
            raise ValueError(f"CueNet takes (B, 4, H, W) images (RGB and the cue), got {tuple(images.shape)}")
        m, stride = self.net.backbone.pad_multiple, self.net.backbone.deep_stride
        H, W = images.shape[-2:]
        cue = nnf.pad(images[:, 3:4], (0, (-W) % m, 0, (-H) % m))       # (B, 1, H', W'), as the net pads
        value = nnf.avg_pool2d(cue, stride).flatten(1)                  # (B, h*w): the cue per token cell
        marker = (value != 0).to(value.dtype)                           # (B, h*w): the cells that carry it
        self._pending = self.cue(torch.stack([value, marker], -1))      # (B, h*w, D)
        self.last_cue = {"hw": value.shape[1], "offset": self.route_index * value.shape[1], "cells": marker.bool()}
        try:
            return self.net(images[:, :3])
        finally:
            self._pending = None

    def _add_cue(self, module, args):
        F_ = args[0]                                                    # (B, N (+ M), D)
        if self._pending is None:
            return None
        hw = self._pending.shape[1]
        a, b = self.route_index * hw, (self.route_index + 1) * hw
        F_ = torch.cat([F_[:, :a], F_[:, a:b] + self._pending.to(F_), F_[:, b:]], dim=1)
        return (F_, *args[1:])


@dataclasses.dataclass
class CueModel:
    """train.Hooks.model: distractors (if any) on the exchange first, then the CueNet around the network,
    then the route diagnostics."""
    route: str
    ratio: float = 0.0
    kind: str = "other"
    fix_k: bool = True       # False: k resolved from all tokens, distractors included (the "kem k=N" row)

    def __call__(self, model, cfg):
        if self.ratio > 0:
            distractors.Distractors(model.exchange, self.ratio, self.kind, fix_k=self.fix_k)   # before the cue
        net = CueNet(model, self.route)
        RouteStats(net)
        return net


# --- route diagnostics: what the exchange takes from where, on the val images ---------------------------

class RouteStats:
    """A forward hook on the exchange (first among its forward hooks, so a distractor hook's fixed k is still
    in force) that, in eval mode only, recomputes the exchange's attention and accumulates:
    KEM: per slot, the share of its top-k that is the route task's (semseg), the other task's, distractors';
    with one cue-carrying token per image, whether some slot keeps it (recall), the share of slots that
    keep it, the largest retrieve weight on it. Cross: the mean weight of the other task's queries on the
    cue token, against 1/N. `flush()` returns the means since the last flush and resets."""

    def __init__(self, net):
        self.net = net
        net.route_stats = self
        self.reset()
        net.net.exchange.register_forward_hook(self._hook, prepend=True)

    def reset(self):
        self.sums, self.count, self.cue_count = {}, 0, 0

    def _add(self, key, value, n=1):
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * n

    @torch.no_grad()
    def _hook(self, module, args, out):
        if module.training or self.net.last_cue is None or not hasattr(module, "W_q") and not hasattr(module, "num_slots"):
            return None
        X = args[0]                                                     # (B, N + M, D)
        B, NM, D = X.shape
        cue = self.net.last_cue
        hw, off = cue["hw"], cue["offset"]
        N = hw * len(self.net.net.tasks)
        single = cue["cells"].sum(1) == 1                               # (B,) images with one cue token
        cue_index = off + cue["cells"].float().argmax(1)                # (B,) its index in X
        _, att = module.forward(X, return_attention=True)
        self.count += B
        self.cue_count += int(single.sum())
        if hasattr(module, "num_slots"):
            A = att["retrieve"]                                         # (B, L, N + M)
            k = resolve_topk(module.topk, NM)
            top = A.topk(k, dim=-1).indices                             # (B, L, k)
            route = ((top >= off) & (top < off + hw)).float().mean(-1)  # (B, L) share of the route task
            self._add("route_share", route.mean(1).sum())
            self._add("distractor_share", (top >= N).float().mean((1, 2)).sum())
            if single.any():
                keeps = (top == cue_index[:, None, None]).any(-1)       # (B, L) slot keeps the cue token
                w_cue = A.gather(2, cue_index[:, None, None].expand(B, A.shape[1], 1))[..., 0]   # (B, L)
                self._add("cue_recall", keeps.any(1)[single].float().sum())
                self._add("cue_slot_share", keeps.float().mean(1)[single].sum())
                self._add("cue_max_weight", w_cue.max(1).values[single].sum())
                self._add("cue_weight_chance", (1.0 / k) * int(single.sum()))
        else:
            A = att["attention"]                                        # (B, N + M, N + M)
            other = [i for i in range(len(self.net.net.tasks)) if i * hw != off]
            rows = torch.cat([torch.arange(i * hw, (i + 1) * hw) for i in other])
            if single.any():
                w_cue = A[torch.arange(B)[:, None], rows[None], cue_index[:, None]]   # (B, other task's tokens)
                self._add("cue_weight", w_cue.mean(1)[single].sum())
                self._add("cue_weight_chance", (1.0 / NM) * int(single.sum()))
        return None

    def flush(self):
        out = {"images": self.count, "cue_images": self.cue_count}
        for key, total in self.sums.items():
            n = self.count if key in ("route_share", "distractor_share") else self.cue_count
            out[key] = total / n if n else None
        self.reset()
        return out


@dataclasses.dataclass
class RouteLog:
    """train.Hooks.evaluated: after every evaluation, the route diagnostics since the last one, one JSON line
    in the run's folder (the first process only)."""

    def __call__(self, model, cfg, procs, it, record):
        stats_ = model.route_stats.flush()
        if procs.master:
            train_support.append_jsonl(Path(cfg["out_dir"]) / ROUTE_LOG, {"iter": it, **stats_})


# --- the hidden command: a train.py process with the cue ---------------------------------------------

def train_with_cue(argv):
    """`python -m research _cue --placement P --route T [--ratio R --kind K] -- <train.py flags>`."""
    own, rest = runner.split_extra(argv)
    p = argparse.ArgumentParser(prog="python -m research _cue")
    p.add_argument("--placement", choices=PLACEMENTS, required=True)
    p.add_argument("--route", choices=TASKS, default="semseg", help="the task whose tokens get the cue (depth: the oracle)")
    p.add_argument("--ratio", type=float, default=0.0, help="distractor tokens per real token (0: none)")
    p.add_argument("--kind", choices=distractors.KINDS, default="other")
    p.add_argument("--free-k", action="store_true",
                   help="k resolved from all tokens, distractors included (default: from the real tokens)")
    args = p.parse_args(own)
    hooks = train.Hooks(model=CueModel(args.route, args.ratio, args.kind, not args.free_k),
                        dataset=CueDataset(args.placement),
                        evaluated=RouteLog())
    return train.cli(rest, hooks)


def cue_script(placement, route, ratio=0.0, kind="other", free_k=False):
    """The script part of a cue run: `python -m research _cue ... --` before the train.py flags."""
    noise = ("--ratio", f"{ratio:g}", "--kind", kind, *(("--free-k",) if free_k else ())) if ratio > 0 else ()
    return ("research", "_cue", "--placement", placement, "--route", route, *noise, "--")


def read_route_log(path):
    """The route log's lines, the last per iteration (a resumed run writes the evaluations after its checkpoint again)."""
    return runner.read_log_by_iter(path)


def route_after(run, run_dir, ctx):
    """after-hook of every cue run: the route diagnostics of its last evaluation, and their history; for a
    sparse-cue run with an exchange, `selection_probe` at initialisation and after training."""
    points = read_route_log(run_dir / ROUTE_LOG)
    out = {"route": points[-1] if points else None, "route_history": points}
    script = run.script
    if script[script.index("--placement") + 1] == "sparse" and "none" not in run.flags:
        ratio = float(script[script.index("--ratio") + 1]) if "--ratio" in script else 0.0
        ckpt = run_dir / "ckpt.pt"
        cfg = {**train_support.load_checkpoint(ckpt)[0]["config"], "pretrained": False}
        out["probe"] = {when: selection_probe(build_cue_net(cfg, "semseg", ratio, "--free-k" in script,
                                                            None if when == "init" else ckpt), cfg, "sparse")
                        for when in ("init", "trained")}
    return out


# --- the experiment: rows, plan -------------------------------------------------------------------------

# row -> (exchange flags, the task whose tokens get the cue). Floor and oracle have no exchange.
ROWS = {"floor": (["--exchange", "none"], "semseg"),
        "oracle": (["--exchange", "none"], "depth"),
        "cross": (["--exchange", "cross"], "semseg"),
        "kem": (["--exchange", "kem"], "semseg"),
        "kem k=N": (["--exchange", "kem", "--topk", "1.0"], "semseg")}
EXCHANGE_ROWS = ("cross", "kem", "kem k=N")       # the rows measured against floor and oracle
# "kem k=N": the slots without selection, k = every token (with distractors: every token, distractors included)
IMAGE_SIZE = "48x64"     # [ours] a quarter of the preset's pixels: about 2 min a run on the shared 2-core machine
NOISE = 4.0              # distractors per real token of the noisy rows (the planned level, EVIDENCE.md section 4)
KIND = "other"           # another image's tokens (research/distractors.py)
# The planned pairs (from the pilot's paired SDs, EVIDENCE.md section 4): every row for seeds 0..PAIRS_ALL-1 (question
# A and the secondaries), then only the rows of primary B (B_ROWS) up to PAIRS_B seeds.
PAIRS_ALL, PAIRS_B = 6, 63
SEEDS = list(range(PAIRS_B))
PILOT_SEEDS = [100, 101, 102]       # the pilot's (experiment "cue-pilot"; left out of the analysis)
DEFAULT_ROWS = ("floor", "oracle", "cross", "kem")
ORACLE = "dense"         # the oracle of every placement: depth with the cue on every one of its tokens (see Notes)


def config_name(placement, row, ratio=0.0):
    """"dense kem", "sparse cross other x4"."""
    return f"{placement} {row}" + (f" {KIND} x{ratio:g}" if ratio > 0 else "")


def cue_run(experiment, placement, row, seed, max_iters, eval_interval, extra, ratio=0.0):
    exchange_flags, route = ROWS[row]
    flags = runner.train_flags(["--tasks", ",".join(TASKS), *exchange_flags, "--image-size", IMAGE_SIZE,
                                "--data-seed", str(seed)], seed, max_iters, eval_interval, extra)
    group = exchange_flags[1]
    return runner.Run(experiment, config_name(placement, row, ratio), seed, flags,
                      prefix=cue_script(placement, route, ratio, KIND, free_k=row == "kem k=N"), after=route_after,
                      group=group,
                      steps=max_iters)


def main(argv):
    """`python -m research cue [options] [-- train.py flags]`."""
    p = runner.parser("cue", "A positive control for the exchange: depth scaled by a hidden per-scene factor whose "
                             "cue reaches only semseg's tokens; floor, oracle, cross and kem, dense and sparse cue, "
                             "the sparse rows also with distractors.")
    p.set_defaults(seeds=None, eval_interval=500, tasks=",".join(TASKS))
    p.add_argument("--pilot", action="store_true", help=f"the labelled pilot: experiment cue-pilot, seeds {PILOT_SEEDS}")
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    p.add_argument("--noise", type=float, nargs="*", default=[NOISE],
                   help="distractors per real token for the sparse exchange rows (0 or none: clean only)")
    p.add_argument("--noise-rows", nargs="+", default=["cross", "kem", "kem k=N"], choices=list(EXCHANGE_ROWS))
    return runner.run(p, argv, plan, lambda args, command: report(args.results, command, pilot=args.pilot))


def plan(args, extra, ctx):
    """One phase, seed by seed (a seed's pairs finish together); per seed the primaries' rows first."""
    if args.tasks != list(TASKS):
        raise SystemExit(f"the cue experiment trains {','.join(TASKS)} (the cue travels from semseg to depth)")
    experiment = "cue-pilot" if args.pilot else "cue"
    seeds = args.seeds or (PILOT_SEEDS if args.pilot else SEEDS)
    runs = []
    b_rows = {config_name("sparse", "floor"), config_name(ORACLE, "oracle"),
              *(config_name("sparse", r, NOISE) for r in ("cross", "kem"))}
    for s in seeds:
        one = []
        for placement in args.placements:
            for row in (r for r in args.rows if r != "oracle" or placement == ORACLE or args.pilot):
                one.append(cue_run(experiment, placement, row, s, args.max_iters, args.eval_interval, extra))
        for ratio in (r for r in args.noise or [] if r > 0):
            if "sparse" in args.placements:
                for row in args.noise_rows:
                    one.append(cue_run(experiment, "sparse", row, s, args.max_iters, args.eval_interval, extra, ratio))
        first = {config_name(p_, r) for p_, r in (("dense", "floor"), ("dense", "oracle"), ("dense", "kem"),
                                                  ("sparse", "floor"), ("sparse", "oracle"))}
        first |= {config_name("sparse", r, x) for r in ("cross", "kem") for x in args.noise or [] if x > 0}
        if not args.pilot and s >= PAIRS_ALL:                  # the planned pairs beyond PAIRS_ALL: primary B only
            one = [r for r in one if r.config in b_rows]
        runs += sorted(one, key=lambda r: r.config not in first)
    return [runs]


# --- the report: fraction carried, relative depth RMSE, the families, the route --------------------------

def depth_rmse(rec):
    return rec["metrics"]["depth"]["rmse"]


def per_seed(records):
    """{config: {seed: depth RMSE}} of the records."""
    out = {}
    for (config, seed), rec in records.items():
        out.setdefault(config, {})[seed] = depth_rmse(rec)
    return out


def fraction_carried(rmse, placement, config):
    """{seed: (floor - row) / (floor - oracle)}: the floor of the row's placement, the oracle of ORACLE (depth
    with the cue on every one of its tokens), the same seed."""
    floor, oracle = rmse.get(f"{placement} floor", {}), rmse.get(f"{ORACLE} oracle", {})
    row = rmse.get(config, {})
    return {s: (floor[s] - row[s]) / (floor[s] - oracle[s]) for s in row if s in floor and s in oracle}


def gain(rmse, placement, config):
    """{seed: 100 (floor - row) / floor}: the row's depth RMSE gain over the floor, % (positive = better)."""
    floor, row = rmse.get(f"{placement} floor", {}), rmse.get(config, {})
    return {s: 100 * (floor[s] - row[s]) / floor[s] for s in row if s in floor}


def _placement(config):
    return config.split()[0]


def _noisy(config):
    return f" {KIND} x" in config


def comparisons(rmse, planned=True):
    """The planned tests (EVIDENCE.md section 4): two primaries, each alone at α = 0.05, and a Holm family of
    secondaries per question, each on its planned seeds (`PLANNED`). A family is tested only when every member
    has all its planned pairs; before that its members are described (mean, interval) and marked pending.
    planned=False (the pilot): every recorded pair, tested as it stands."""
    named = f"{NOISE:g}"
    seeds_of = {"A": range(PAIRS_ALL), "A secondary": range(PAIRS_ALL), "B": range(PAIRS_B),
                "B secondary": range(PAIRS_ALL)}

    def member(key, label, a, b=None, measure="fraction"):
        f = fraction_carried if measure == "fraction" else gain
        pa = f(rmse, _placement(a), a)
        pb = f(rmse, _placement(b), b) if b else {s: 0.0 for s in pa}
        if planned:
            pa = {s: v for s, v in pa.items() if s in seeds_of[key]}
        return {"label": label, "measure": measure, "a": a, "b": b, **paired(pa, pb)}

    noisy_kem, noisy_cross = f"sparse kem {KIND} x{named}", f"sparse cross {KIND} x{named}"
    out = {"A": [member("A", "A: kem − none, depth RMSE gain over the floor (%), dense cue, clean", "dense kem",
                        measure="gain")],
           "B": [member("B", f"B: kem − cross, fraction carried, sparse cue, {KIND} x{named}", noisy_kem, noisy_cross)],
           "A secondary": [member("A secondary", "cross − none, gain (%), dense", "dense cross", measure="gain"),
                           member("A secondary", "kem − cross, gain (%), dense", "dense kem", "dense cross",
                                  measure="gain"),
                           member("A secondary", "kem − none, gain (%), sparse, clean", "sparse kem", measure="gain"),
                           member("A secondary", "cross − none, gain (%), sparse, clean", "sparse cross",
                                  measure="gain")],
           "B secondary": [member("B secondary", "kem − cross, fraction carried, sparse, clean", "sparse kem",
                                  "sparse cross"),
                           member("B secondary", f"kem: {KIND} x{named} − clean, fraction carried, sparse", noisy_kem,
                                  "sparse kem"),
                           member("B secondary", f"cross: {KIND} x{named} − clean, fraction carried, sparse",
                                  noisy_cross, "sparse cross"),
                           member("B secondary", f"(kem's − cross's) change with {KIND} x{named}, fraction carried, "
                                                 f"sparse", noisy_kem, "sparse kem"),
                           member("B secondary", f"kem k=N − kem, fraction carried, sparse, {KIND} x{named}",
                                  f"sparse kem k=N {KIND} x{named}", noisy_kem)]}
    changes = out["B secondary"]                              # the difference of the two changes, per seed
    k_change = dict(zip(changes[1]["seeds"], changes[1]["differences"]))
    c_change = dict(zip(changes[2]["seeds"], changes[2]["differences"]))
    changes[3].update(b="(cross's change)", **paired(k_change, c_change))
    names = {"A": "cue A (primary)", "B": "cue B (primary)", "A secondary": "cue A secondary",
             "B secondary": "cue B secondary"}
    for key, members in out.items():
        need = len(seeds_of[key]) if planned else 2
        if all(c["n"] >= need for c in members):
            stats.family(names[key], members)
            continue
        for c in members:                                     # not all planned pairs yet: described, not tested
            c.update(family=names[key], m=len(members), p=None, p_holm=None,
                     signs=stats.seed_signs(c["differences"]) if c["n"] else "—",
                     verdict=f"pending ({c['n']} of {need} planned pairs)")
    return out


def row_table(rmse, records):
    """Per config: depth RMSE, gain over the floor, fraction carried (mean and 95% t-interval over seeds), route."""
    order = []
    for placement in PLACEMENTS:
        for row in ROWS:
            order.append(config_name(placement, row))
        for c in sorted(c for c in rmse if _placement(c) == placement and _noisy(c)):
            order.append(c)
    out = []
    for config in (c for c in order if c in rmse):
        placement = _placement(config)
        routes = [rec.get("route") or {} for (c, _), rec in sorted(records.items()) if c == config]

        def mean_of(key):
            v = [r[key] for r in routes if r.get(key) is not None]
            return float(np.mean(v)) if v else None

        out.append({"config": config, "seeds": sorted(rmse[config]), "rmse": t_interval(list(rmse[config].values())),
                    "rmse_by_seed": rmse[config],
                    "gain": t_interval(list(gain(rmse, placement, config).values())),
                    "fraction": t_interval(list(fraction_carried(rmse, placement, config).values())),
                    "fraction_by_seed": fraction_carried(rmse, placement, config),
                    "route": {k: mean_of(k) for k in ("route_share", "distractor_share", "cue_recall", "cue_slot_share",
                                                      "cue_max_weight", "cue_weight", "cue_weight_chance")}})
    return out


def _fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def report(results, command="python -m research cue --tables-only", pilot=False):
    """research/results/cue(-pilot).json/.md and cue.png from the records alone."""
    results = Path(results)
    experiment = "cue-pilot" if pilot else "cue"
    records = runner.load_records(results, experiment)
    if not records:
        raise SystemExit(f"no records under {results / 'runs' / experiment}; run `python -m research cue"
                         f"{' --pilot' if pilot else ''}` first")
    rmse = per_seed(records)
    rows = row_table(rmse, records)
    tests = comparisons(rmse, planned=not pilot)
    lines = ["| row | seeds | depth RMSE | gain over the floor, % | fraction carried | KEM: semseg share of top-k | "
             "distractor share | cue token kept by a slot | largest slot weight on it (chance 1/k) | "
             "cross: depth's weight on the cue token (chance 1/N) |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = r["route"]
        chance = q["cue_weight_chance"]
        lines.append(f"| {r['config']} | {len(r['seeds'])} | {ci(r['rmse'], 3, '')} | {ci(r['gain'])} | "
                     f"{ci(r['fraction'])} | {_fmt(q['route_share'])} | {_fmt(q['distractor_share'])} | "
                     f"{_fmt(q['cue_recall'])} | "
                     + (f"{_fmt(q['cue_max_weight'])} ({_fmt(chance)})" if q["cue_max_weight"] is not None else "—")
                     + " | " + (f"{_fmt(q['cue_weight'], 4)} ({_fmt(chance, 4)})" if q["cue_weight"] is not None else "—")
                     + " |")
    test_lines = [stats.COLUMNS, stats.RULE]
    for key in ("A", "B", "A secondary", "B secondary"):
        test_lines += [stats.row(c, c["label"], 3) for c in tests[key]]
    missing = ""
    label = "PILOT (labelled; left out of the analysis): " if pilot else ""
    text = (f"{label}The cue control (research/cue.py): semseg + depth at {IMAGE_SIZE}, depth labels scaled by a hidden "
            f"per-scene s (log-uniform in [{S_MIN}, {S_MAX}]) whose cue log s reaches the network only through one "
            f"task's tokens just before the exchange (rows: semseg's; oracle: depth's); each seed with its own data "
            f"seed. Fraction carried = (floor − row) / (floor − oracle) on depth RMSE, per seed, against the floor of "
            f"the row's placement and the {ORACLE} oracle (depth with the cue on every token) for both (0 = nothing "
            f"got through, 1 = as good as the oracle); gain = 100 (floor − row) / floor. Mean and 95% t-interval over "
            f"seeds. Route (means over seeds, val images, last evaluation): KEM's share of its slots' top-k that is "
            f"semseg's and that is distractors'; sparse cue: the share of images whose cue token some slot keeps, the "
            f"largest retrieve weight on it; cross: the mean weight of depth's queries on the cue token. Noisy rows: "
            f"'{KIND}' distractors (another image's tokens, appended before the cue is added, k fixed from the real "
            f"tokens) trained and evaluated with them; they share the clean floor and oracle (with none nothing can "
            f"reach depth). Regenerate: `{command}`\n\n" + "\n".join(lines)
            + "\n\nPlanned tests (EVIDENCE.md section 4): each primary alone at α = 0.05; the secondaries of each question "
              f"Holm-adjusted together; A, its secondaries and B's on seeds 0-{PAIRS_ALL - 1}, B on seeds 0-{PAIRS_B - 1}. "
              "A family is tested only when all its planned pairs are recorded ('pending' until then; the pilot: "
              "every recorded pair). Differences paired by seed:\n\n" + "\n".join(test_lines) + missing + "\n")
    name = "cue-pilot" if pilot else "cue"
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps(train_support.strict_json(
        {"command": command, "rows": rows, "tests": tests}), indent=1, default=str))
    if not pilot:
        plot(rows, results / "cue.png")
    print(text)
    return {"rows": rows, "tests": tests}


def plot(rows, path):
    """Fraction carried per row and placement, clean and with distractors (95% t-intervals)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("dense", False), ("sparse", False), ("sparse", True)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rows_by = {r["config"]: r for r in rows}
    names = [n for n in ("cross", "kem", "kem k=N") if any(c.startswith(f"{p} {n}") for p, _ in groups for c in rows_by)]
    for gi, (placement, noisy) in enumerate(groups):
        for ni, name in enumerate(names):
            config = config_name(placement, name, NOISE if noisy else 0.0)
            if config not in rows_by or rows_by[config]["fraction"]["mean"] is None:
                continue
            f = rows_by[config]["fraction"]
            x = gi + (ni - (len(names) - 1) / 2) * 0.22
            err = [[f["mean"] - f["ci95"][0]], [f["ci95"][1] - f["mean"]]] if f["ci95"] else None
            labelled = name in ax.get_legend_handles_labels()[1]
            ax.errorbar([x], [f["mean"]], yerr=err, fmt="o", capsize=3, color=f"C{ni}", label=None if labelled else name)
            ax.scatter([x + 0.06] * len(rows_by[config]["fraction_by_seed"]),
                       list(rows_by[config]["fraction_by_seed"].values()), s=8, color=f"C{ni}", alpha=0.5)
    ax.axhline(0, color="grey", lw=0.6, ls="--")
    ax.axhline(1, color="grey", lw=0.6, ls="--")
    ax.text(2.45, 1.0, "oracle", fontsize=7, va="bottom", ha="right")
    ax.text(2.45, 0.0, "floor", fontsize=7, va="bottom", ha="right")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["dense cue, clean", "sparse cue, clean", f"sparse cue, {KIND} x{NOISE:g}"])
    ax.set_ylabel("fraction of the cue carried\n(floor − row) / (floor − oracle)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the pilot: paired SDs and the pairs the plan needs -------------------------------------------------

def power(effect, sd, n, alpha=stats.ALPHA):
    """Power of the two-sided paired t-test with n pairs to find a true mean difference `effect` when the
    differences' SD is `sd` (the noncentral t)."""
    from scipy import stats as st

    df, nc = n - 1, effect / sd * math.sqrt(n)
    t = st.t.ppf(1 - alpha / 2, df)
    upper, lower = st.nct.sf(t, df, nc), st.nct.cdf(-t, df, nc)
    upper = 1.0 if math.isnan(upper) else upper                     # scipy returns NaN far in the tail
    lower = 0.0 if math.isnan(lower) else lower
    return float(min(1.0, upper + lower))


def detectable(sd, n, target=0.8):
    """The smallest mean difference the paired t-test with n pairs finds with power `target`."""
    from scipy.optimize import brentq

    return float(brentq(lambda e: power(e, sd, n) - target, 1e-9 * sd, 10 * sd))


def pairs_needed(sd, effect, target=0.8, least=5):
    """The fewest pairs (at least `least`) for which `effect` is found with power `target`."""
    n = least
    while power(effect, sd, n) < target:
        n += 1
    return n


# --- why a route fails: what reaches the selection, at initialisation and after training -------------------

SELECTION = ("R", "W_qr", "W_kr")              # which tokens each slot takes
VALUES = ("W_vr", "W_qw", "W_kw", "W_vw")      # what the slots carry and how tokens read it


def build_cue_net(cfg, route="semseg", ratio=0.0, free_k=False, ckpt=None):
    """The network of a cue run (distractor hooks, CueNet, route statistics), at initialisation (seeded as
    train.py seeds it) or with a checkpoint's weights."""
    train_support.seed_everything(cfg["seed"])
    net = CueModel(route, ratio, KIND, not free_k)(train.build_model(cfg), cfg)
    if ckpt is not None:
        net.load_state_dict(train_support.load_checkpoint(ckpt)[0]["model"])
    return net


@torch.enable_grad()
def selection_probe(net, cfg, placement, batches=4):
    """On the first `batches` val batches (train mode off, the run's distractors on): per (image, slot) whether
    the sparse cue token is in the slot's top-k and the slot's weight on it; and the gradient norms of depth's
    loss reaching KEM's selection (R, W_qr, W_kr), its values (W_vr, W_qw, W_kw, W_vw) and the cue's
    embedding, summed over the batches."""
    data = CueData(train_support.build_data(cfg, "val"), "val", cfg["data_seed"], placement)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(min(len(data), batches * cfg["batch_size"]))),
                                         batch_size=cfg["batch_size"], collate_fn=train_support.collate)
    exchange = net.net.exchange
    kept, weight, chance = [], [], None
    seen = {}

    def grab(module, args, out):
        seen["X"] = args[0]
        seen["att"] = module.forward(args[0], return_attention=True)[1]

    handle = exchange.register_forward_hook(grab, prepend=True)
    net.eval()
    net.zero_grad()
    try:
        for batch in loader:
            out = net(batch["image"])
            loss = train.compute_losses(out, {"depth": batch["depth"]}, ["depth"])["depth"]
            loss.backward()
            cue_ = net.last_cue
            idx = cue_["offset"] + cue_["cells"].float().argmax(1)                  # (B,)
            if hasattr(exchange, "num_slots"):
                A = seen["att"]["retrieve"].detach()                               # (B, L, N + M)
                top = A.topk(int((A[0, 0] > 0).sum()), dim=-1).indices             # (B, L, k): the kept tokens
                kept.append((top == idx[:, None, None]).any(-1).float())            # (B, L)
                weight.append(A.gather(2, idx[:, None, None].expand(-1, A.shape[1], 1))[..., 0])
                chance = 1 / top.shape[-1]
            else:
                A = seen["att"]["attention"].detach()                              # (B, N + M, N + M)
                hw = cue_["hw"]
                rows = [i for i in range(len(net.net.tasks) * hw) if not cue_["offset"] <= i < cue_["offset"] + hw]
                weight.append(A[torch.arange(A.shape[0]), :, idx][:, rows].mean(1, keepdim=True))   # depth's queries
                chance = 1 / A.shape[-1]
    finally:
        handle.remove()

    def norm(names):
        grads = [getattr(exchange, n).grad for n in names if getattr(exchange, n, None) is not None]
        grads = [g for g in grads if g is not None]
        return math.sqrt(sum(float(g.norm()) ** 2 for g in grads)) if grads else None

    out = {"cue_weight": float(torch.cat(weight).mean()), "cue_weight_max_slot": float(torch.cat(weight).max(1).values.mean()),
           "chance": chance, "grad_cue_embedding": float(net.cue.weight.grad.norm())}
    if kept:
        out.update(cue_in_topk=float(torch.cat(kept).mean()), cue_in_some_topk=float(torch.cat(kept).max(1).values.mean()),
                   grad_selection=norm(SELECTION), grad_values=norm(VALUES))
        out["ratio"] = out["grad_selection"] / out["grad_values"] if out["grad_values"] else None
    return out
