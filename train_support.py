"""What a training run needs around the model and the loop: train.py's plumbing, in one flat file.

train.py is the file to read for the multi-task training loop; this one holds what a run needs but a
reader of the loop does not: the command line's argument types and error wording, --resume and
--eval-only settings taken from a checkpoint, our own CPU processes, the dataset and weights checks,
the resumable data stream, checkpoint and RNG I/O, JSON records and the evaluation pictures.
Seven headed sections, in the order a run first needs them: errors and the command line, processes
and devices, inputs, data, checkpoints (what is saved sits beside what loads it), records, pictures.

Reproducibility, in three pieces (the data stream and checkpoints live here, the losses in train.py):
- the data stream is a function of (seed, position): StreamSampler shuffles each epoch with
  seed + epoch and shards every global batch across processes, and every sample's augmentation
  is seeded from its position in the stream, so what a sample looks like does not depend on the
  worker, the process or the restart that loads it;
- losses are per-image means averaged over the batch, and the network normalises per image
  (GroupNorm), so N processes with batch b compute what one process computes with batch N b
  (up to float rounding);
- checkpoints hold model, optimiser, scheduler, scaler, iteration, the images seen and every process's RNG states
  (each process draws its own dropout), written before each evaluation to a temporary file and
  renamed, so `--resume` continues a run exactly (evaluating first if that evaluation never
  finished) and a crash never leaves a half-written checkpoint.

Our own processes: on a CPU with several cores, `python train.py` splits each batch over `--procs`
single-thread processes (DistributedDataParallel over gloo): small convolutions use one core well
and two cores badly, so two one-thread processes train faster than one two-thread process
(`python -m research.bench step --procs 1 2` measures it). Under torchrun the same code runs one process per
GPU, each with a whole batch.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import datasets
import metrics


# --- errors and the command line: argument types, and module errors in its words ------------------

class UsageError(Exception):
    """Bad input (flags, data, weights, checkpoints): printed as one paragraph, no traceback."""


class RunStopped(Exception):
    """The run stopped on its own (a training process failed): printed as one paragraph, exit code 1."""


def size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 96x128, got {text!r}")
    return [h, w]


def number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def procs_count(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count >= 1, got {text!r}")
    return int(text)


def minutes(text):
    try:
        value = float(text)
        assert value > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, e.g. 120, got {text!r}")
    return value


_SHOWN = set()       # the warnings this run has printed (a forked process inherits the parent's)


def show_warnings(rank):
    """Warnings as a run prints them: by process 0 alone, each one line ("warning: ..."), each text once
    per run, however many times and places it is raised (a dataset's split-size note comes from every
    check of the tree; both DataLoaders warn about their workers)."""
    if rank:
        warnings.simplefilter("ignore")
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) not in _SHOWN:
            _SHOWN.add(str(message))
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
    warnings.showwarning = show


def as_flags(message, flags, aliases=None):
    """A module's ValueError in the words of the command line, for the parameters that are flags:
    `num_slots` -> `--num-slots`, `exchange='kem'` -> `--exchange kem`, `pretrained=False` -> `--no-pretrained`.
    aliases: {a module's argument: the flag's name} where they differ, e.g. {"seed": "data_seed"}."""
    aliases = aliases or {}

    def flag(name):
        return f"--{aliases.get(name, name).replace('_', '-')}"

    def named(match):
        name, value = match[1], match[3]
        if aliases.get(name, name) not in flags:
            return match[0]
        return {"False": f"--no-{flag(name)[2:]}", "True": flag(name)}.get(value, f"{flag(name)} {value}")

    message = re.sub(r"\b([a-z_]+)=(['\"]?)([\w.]+)\2", named, message)
    bare = "|".join(sorted({"topk_mode", "topk", "num_slots", "dim", *aliases}, key=len, reverse=True))
    return re.sub(rf"(?<![-\w'])({bare})\b(?![=-])", lambda m: flag(m[1]), message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals are one line and exit code 2, like every other bad input (not
    the whole usage block: --help shows that)."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists every flag)\n")


# --- processes and devices -----------------------------------------------------------------------
# How many processes, on which device; our own CPU processes; the process group; precision; the seed.

@dataclasses.dataclass
class Processes:
    rank: int = 0             # this process, 0..world-1; rank 0 writes every file
    world: int = 1            # processes training together (torchrun's or our own --procs)
    device: torch.device = torch.device("cpu")
    own: bool = False         # one of our own CPU processes (spawn_local_procs): they split one batch between
                              # them, and their parent has checked the inputs and may have built the data
    data: dict = None         # {split: dataset} built by that parent before it forked, else None

    @property
    def distributed(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0

    def share(self, batch_size):
        """This process's part of a batch: our own processes split one batch, torchrun's take one each."""
        return batch_size // self.world if self.own else batch_size


def most_processes():
    """The most processes --procs or --workers may start: more is a typo, not a plan."""
    return max(64, os.cpu_count() or 1)


def local_procs(cfg):
    """How many single-thread processes of our own this run uses (1 = this process alone)."""
    launched = "WORLD_SIZE" in os.environ                   # torchrun, or one of our own processes
    cpu = pick_device(cfg["device"], 0).type == "cpu"
    cores = os.cpu_count() or 1
    if cfg["procs"] != "auto" and cfg["procs"] > most_processes():
        raise UsageError(f"--procs {cfg['procs']} would start that many processes on this {cores}-core machine; "
                         f"use at most {cores}, one per core")
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
    if cfg["procs"] > cores:
        warnings.warn(f"--procs {cfg['procs']} is more than this machine's {cores} cores: the processes take turns "
                      f"on them, which is slower than --procs {cores}")
    return cfg["procs"]


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


def spawn_local_procs(target, cfg, ckpt_path, n, hooks=None):
    """target(cfg, ckpt_path, hooks) (train.run or train.evaluate_checkpoint) in n single-thread processes
    (ranks 0..n-1) on this machine, and wait for them. If one fails, the others are stopped and its error is
    raised here, to be reported once. hooks: train.Hooks, handed to every process (pickled where they are
    spawned rather than forked)."""
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
    data = build_all_data(cfg, render_procs=n, hooks=hooks) if fork and cfg["dataset"] == "synthetic" else None
    errors = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // n)
    children = [ctx.Process(target=_local_proc, args=(target, cfg, ckpt_path, hooks, rank, n, port, threads, errors, data))
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


_OWN = {}     # set in each of our own processes by _local_proc, read by setup_processes


def _local_proc(target, cfg, ckpt_path, hooks, rank, world, port, threads, errors, data):
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
    _OWN["data"] = data
    try:
        target(cfg, ckpt_path, hooks)
    except (UsageError, datasets.DatasetError, WeightsUnavailable, FloatingPointError) as error:
        run_error = isinstance(error, FloatingPointError)
        errors.put(("run" if run_error else "usage", str(error)))
        sys.exit(1 if run_error else 2)
    except KeyboardInterrupt:
        sys.exit(130)


def setup_processes(cfg):
    """This process's rank, the world and its device; its inputs checked (before any collective: see
    prepare_inputs); joins the process group when there are several. The group waits --dist-timeout
    minutes for a process (torch's default is 10 for NCCL, 30 for gloo): the nodes of a multi-node run
    prepare their data at their own pace, and those that finish first wait for the others in
    init_process_group and the first collective."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    show_warnings(rank)                                  # our own processes too: only process 0 speaks
    device = pick_device(cfg["device"], int(os.environ.get("LOCAL_RANK", "0")))
    if not _OWN:                                         # our own processes: their parent checked before starting them
        prepare_inputs(cfg)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=cfg["dist_timeout"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True     # TF32 matmuls: ~8x faster on Ampere+, ample precision
        torch.backends.cudnn.allow_tf32 = True           # the same for convolutions
        torch.backends.cudnn.benchmark = True            # fixed crop sizes: let cuDNN pick the fastest kernels
    return Processes(rank, world, device, own=bool(_OWN), data=_OWN.get("data"))


def resolve_amp(amp, device, capability=None):
    """--amp made concrete: "none", "bf16" or "fp16". auto: bf16 on GPUs with native bf16 (compute
    capability >= 8: Ampere and later; no scaler needed), fp16 with a scaler on older ones (V100, T4,
    RTX 20xx), none elsewhere. capability: the GPU's (major, minor), asked of `device` when None.
    torch.cuda.is_bf16_supported() would say yes on the older GPUs too: by default it counts emulation,
    which runs bf16 without tensor cores."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    major, _ = capability or torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def agree_amp(amp, procs):
    """resolve_amp for every process at once: DDP averages every process's gradients, so all must train in
    one precision (an fp16 process scales its gradients, a bf16 one does not; only fp16 ones skip steps on
    overflow). Each process resolves its own, and the lowest choice (none < fp16 < bf16) holds for all: for
    --amp auto on mixed GPUs, what the least capable one supports. Explicit --amp values that differ
    between processes (nodes started with other flags) are refused."""
    everyone = [(amp, resolve_amp(amp, procs.device))]
    if procs.distributed:
        everyone = [None] * procs.world
        dist.all_gather_object(everyone, (amp, resolve_amp(amp, procs.device)))
    if len({flag for flag, _ in everyone}) > 1:
        raise UsageError("the processes were started with different --amp: " + ", ".join(
            f"rank {rank} --amp {flag}" for rank, (flag, _) in enumerate(everyone))
            + "; give every node the same --amp (or none: auto agrees on what every GPU supports)")
    agreed = min((choice for _, choice in everyone), key=("none", "fp16", "bf16").index)
    if procs.master and any(choice != agreed for _, choice in everyone):
        print("note: the GPUs differ (" + ", ".join(f"rank {r} {c}" for r, (_, c) in enumerate(everyone))
              + f"); every process trains in {agreed}, which all of them support", flush=True)
    return agreed


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --- inputs: data and pretrained weights, checked before anything big starts; the Δm baselines ----

class WeightsUnavailable(RuntimeError):
    """The ImageNet weights of a torchvision backbone are not on disk and could not be fetched."""


def fetch_pretrained_weights(name, download=True):
    """The torchvision weights enum of backbone `name`, with its file in torch's hub cache.

    A file already in <torch hub dir>/checkpoints/ is used as is; otherwise it is downloaded once
    (download=False: not even tried). Raises WeightsUnavailable saying where the file must go.
    MultiTaskNet(pretrained=True) then asks torchvision for the same default weights and finds them there.
    """
    try:
        import torchvision
    except ImportError as error:
        raise WeightsUnavailable(f"backbone {name!r} needs torchvision (pip install torchvision); "
                                 f"--backbone tiny works without it") from error
    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.isfile(os.path.join(folder, os.path.basename(weights.url))):
        return weights
    where = (f"They are downloaded once from {weights.url} into {folder}/. Offline, copy that file there "
             f"from a machine with network access, or train from scratch with pretrained=False "
             f"(train.py --no-pretrained)")
    if not download:
        raise WeightsUnavailable(f"the ImageNet weights of {name} are not on this machine and downloading "
                                 f"is switched off. {where}")
    try:
        weights.get_state_dict(progress=False)            # downloads into the cache (and checks the hash)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise WeightsUnavailable(f"could not load the ImageNet weights of {name} ({type(error).__name__}: "
                                 f"{error}). {where}") from None
    return weights


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


def prepare_inputs(cfg):
    """check_inputs in every process, one process at a time per data root (a file lock in it): the first
    downloads while the others wait on the lock, not in a collective that would time out, and then find
    the data present and only check it. Every machine prepares its own copy, so every node of a multi-node
    run has its data, and every process reaches its verdict itself (a problem stops each with the same message)."""
    if cfg["dataset"] == "synthetic" and not cfg["pretrained"]:
        return                                           # nothing to fetch: no lock, no data folder
    try:
        import fcntl                                     # POSIX; elsewhere every process checks on its own
    except ImportError:
        return check_inputs(cfg)
    root = datasets.resolve_data_root(cfg["data_dir"])
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".prepare.lock", "a")
    except OSError:                                      # a read-only data root: nothing can be written there anyway
        return check_inputs(cfg)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)             # released when the file closes, or the process dies
        except OSError:                                  # flock disabled (some Lustre and NFS mounts)
            with exclusive_lock(root / ".prepare.lock.held"):
                return check_inputs(cfg)
        check_inputs(cfg)


@contextlib.contextmanager
def exclusive_lock(path, stale_after=600.0, poll=1.0):
    """prepare_inputs' lock where flock is disabled: the file `path`, created exclusively (O_EXCL: atomic on
    local disks, NFS v3+ and Lustre), holding "<host> <pid>", touched every stale_after / 4 seconds while
    held and removed on release. A waiting process takes it over when it is stale: its holder, a process of
    this host, is gone, or nobody has touched it for stale_after seconds (a holder on another host that died).

    Notes: two processes that find the same stale file at the same moment may both take it over (the window
    is one rename); a holder whose host's clock runs far behind the file server's may look stale."""
    path, me = Path(path), f"{socket.gethostname()} {os.getpid()}"
    told = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:                           # released meanwhile: try again
                continue
            if _stale(path, holder, stale_after):
                with contextlib.suppress(FileNotFoundError):         # set aside, then removed: one remover wins
                    aside = path.with_name(f"{path.name}.stale.{me.replace(' ', '-')}")
                    os.replace(path, aside)
                    os.unlink(aside)
                continue
            if not told:
                print(f"waiting for {' '.join(holder or ['another process'])} to prepare the data ({path}; if no "
                      f"such process runs, delete that file)", file=sys.stderr, flush=True)
                told = True
            time.sleep(poll)
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(stale_after / 4):
            with contextlib.suppress(OSError):
                os.utime(path)
    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            if _lock_holder(path) == me.split():
                path.unlink()


def _lock_holder(path):
    """[host, pid] from a lock file, [] while its holder has not written yet, None if it is gone."""
    try:
        return path.read_text().split()[:2]
    except FileNotFoundError:
        return None


def _stale(path, holder, stale_after):
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > stale_after:
        return True
    if len(holder) < 2 or holder[0] != socket.gethostname() or not holder[1].isdigit():
        return False
    try:
        os.kill(int(holder[1]), 0)                       # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:                                      # exists, but is another user's
        pass
    return False


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


# --- data: a resumable, sharded stream ------------------------------------------------------------

def make_loaders(cfg, procs, batch_size, start_images, hooks=None):
    """(val loader: this process's share of the val split; train batches: an endless iterator, or None
    for --eval-only, and the sizes of both splits). The train stream starts after its first start_images
    images (stream_start: those the checkpoint's steps consumed). The datasets are the parent's
    (procs.data) when our own parent built them. Each loader has its own generator (for its workers' base
    seed, which every sample's SeededSamples seed overrides) and so draws nothing from the global RNG that
    dropout uses: a checkpoint's RNG state is that of the next step."""
    workers, pin = loader_workers(cfg, procs), procs.device.type == "cuda"   # pinned memory: async host->GPU copies
    data = procs.data or build_all_data(cfg, hooks=hooks)
    val_set = data["val"]
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, range(procs.rank, len(val_set), procs.world)), batch_size=batch_size,
        num_workers=workers, collate_fn=collate, pin_memory=pin, generator=torch.Generator())
    if cfg["eval_only"]:
        return val_loader, None, len(val_set), 0
    train_set = data["train"]
    sampler = StreamSampler(len(train_set), cfg["seed"], start_images, procs.rank, procs.world)
    train_loader = torch.utils.data.DataLoader(
        SeededSamples(train_set, cfg["seed"]), batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0, drop_last=True,
        generator=torch.Generator())
    return val_loader, iter(train_loader), len(val_set), len(train_set)


def stream_start(ckpt, step_images, procs):
    """Where a run's train stream starts: after the images its checkpoint's steps consumed (0 for a new run).
    A checkpoint records them (images_seen) with the images per step it was trained with; when this run takes
    another number per step (batch x accum x processes: torchrun with another number of processes; our own
    --procs split one batch and keep it), the stream continues without gap or repeat and the run says so.
    A checkpoint from before images were recorded assumes this run's step, as such runs did."""
    if ckpt is None:
        return 0
    if "images_seen" not in ckpt:
        return ckpt["iteration"] * step_images
    if ckpt["step_images"] != step_images and procs.master:
        print(f"note: the checkpoint was trained with {ckpt['step_images']} images per step ({ckpt['world_size']} "
              f"process(es)), now {step_images} ({procs.world}): the data stream continues after the "
              f"{ckpt['images_seen']} images already seen, the learning-rate schedule by iteration, not "
              f"rescaled", flush=True)
    return ckpt["images_seen"]


def loader_workers(cfg, procs):
    """DataLoader workers per process: none on a CPU (every core computes; loading in the process
    costs less than the cores a worker would take away), else up to 4 of this process's cores."""
    if cfg["workers"] is not None:
        return cfg["workers"]
    return 0 if procs.device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) // procs.world - 1))


def build_all_data(cfg, render_procs=1, hooks=None):
    """{split: dataset} for every split the run reads (val, and train unless --eval-only); where a study
    gives hooks.dataset (train.Hooks), that hook makes each split, with build_data at hand."""
    splits = ["val"] if cfg["eval_only"] else ["val", "train"]
    hook = hooks.dataset if hooks is not None else None
    if hook is None:
        return {split: build_data(cfg, split, render_procs) for split in splits}
    return {split: hook(split, cfg, functools.partial(build_data, cfg, split, render_procs)) for split in splits}


def build_data(cfg, split, render_procs=1, **options):
    """The dataset of `split` (train transforms for "train"); SyntheticRooms renders every scene once
    and keeps it (~0.25 MB each). options: more of datasets.build_dataset's (a study's edit_scene)."""
    train = split == "train"
    num = cfg["train_samples"] if train else cfg["val_samples"]
    return datasets.build_dataset(cfg["dataset"], split, root=cfg["data_dir"], train=train, tasks=cfg["tasks"],
                                  seed=cfg["data_seed"], download=False, num_samples=num,
                                  size=tuple(cfg["train_size"] if train else cfg["eval_size"]),
                                  cache=cfg["dataset"] == "synthetic", render_procs=render_procs, **options)


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


def collate(samples):
    """Stack tensors; keep `meta` as a list of dicts."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "meta"}
    batch["meta"] = [s.get("meta") for s in samples]
    return batch


# --- checkpoints ---------------------------------------------------------------------------------
# The settings of --resume and --eval-only; the state saved, then restored; the RNG states out and in.

# Settings that may change when a run is resumed; every other one must match the checkpoint.
# amp and channels_last among them: a run may continue on another device, in the precision and layout that fit it.
RESUMABLE = {"out_dir", "resume", "device", "workers", "log_interval", "eval_interval", "data_dir", "download",
             "compile", "baselines", "max_iters", "eval_only", "ckpt", "procs", "amp", "channels_last",
             "dist_timeout"}

# Settings that define the network: taken from the checkpoint by --eval-only.
MODEL_KEYS = ("dataset", "tasks", "backbone", "exchange", "etf", "dim", "num_slots", "topk", "topk_mode",
              "freeze_backbone")


def restore_config(cfg, given, defaults):
    """--resume and --eval-only take the run's settings from their checkpoint. Returns (cfg, checkpoint
    path or None); a new run gets its out_dir here, once, so that every process writes to the same one.
    defaults: every setting's default, for settings added since a checkpoint was written."""
    if cfg["resume"]:
        ckpt, path = load_checkpoint(cfg["resume"])
        # The run's own settings come back from the checkpoint; flags may change only RESUMABLE ones.
        differ = config_differences(ckpt["config"], cfg, [k for k in given if k not in RESUMABLE], defaults)
        if differ:
            raise UsageError(f"--resume {cfg['resume']} was trained with other settings: " + "; ".join(differ)
                             + ". Drop those flags to continue the run, or start a new run with a new --out-dir")
        # (and settings added since the checkpoint was written: their defaults).
        cfg = {**defaults, **ckpt["config"], **{k: cfg[k] for k in given if k in RESUMABLE}}
        cfg["out_dir"] = os.path.dirname(os.path.abspath(path))
        return cfg, path
    if cfg["eval_only"]:
        ckpt, path = load_checkpoint(cfg["ckpt"])
        differ = config_differences(ckpt["config"], cfg, [k for k in MODEL_KEYS if k in given], defaults)
        if differ:
            raise UsageError(f"--ckpt {cfg['ckpt']} holds a different network than the flags ask for: "
                             + "; ".join(differ) + ". Drop those flags: --eval-only takes them from the checkpoint")
        saved = {**defaults, **ckpt["config"]}         # settings added since the checkpoint: their defaults
        cfg.update({k: saved[k] for k in (*MODEL_KEYS, "eval_size", "edge_max_dist", "val_samples", "seed",
                                           "data_seed")})
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


def config_differences(saved, cfg, keys, defaults):
    saved = {**defaults, **saved}          # settings added since the checkpoint was written: their defaults
    return [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]


def checkpoint_state(model, optimizer, scheduler, scaler, done, best_score, cfg, procs, images_seen, step_images):
    """What --resume needs to continue after iteration `done`: called by every process (each adds its RNG
    states), returned on process 0 (None elsewhere). best_score: the best of the evaluations before `done`
    (the checkpoint is written before its own). images_seen: images the stream gave out in the steps up to
    `done`; step_images: images per step now (stream_start reads both, with the world size)."""
    rng = rng_states(procs)
    if not procs.master:
        return None
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "iteration": done, "best_score": best_score, "rng": rng, "config": cfg,
            "images_seen": images_seen, "world_size": procs.world, "step_images": step_images}


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


def restore_state(ckpt, path, model, optimizer, scheduler, scaler, procs, seed):
    """--resume: a checkpoint's weights and everything else the loop needs to continue exactly, on any
    device and in any precision. Returns (start iteration, best score of the evaluations before it); a new
    run (ckpt None) starts at 0. Either way each process ends with its own RNG state (seed_ranks)."""
    if ckpt is None:
        seed_ranks(seed, procs)
        return 0, -math.inf
    load_weights(model, ckpt, path)
    settings = kernel_settings(optimizer)              # this run's kernel, before the checkpoint's overwrites it
    optimizer.load_state_dict(ckpt["optimizer"])
    match_kernels(optimizer, settings)
    match_layouts(optimizer)
    scheduler.load_state_dict(ckpt["scheduler"])
    load_scaler(scaler, ckpt["scaler"], procs)
    seed_ranks(seed, procs, ckpt["rng"])
    # The schedule of this run's --max-iters: the scheduler's lambdas are this run's (a state_dict holds none).
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(ckpt["iteration"])
    return ckpt["iteration"], ckpt["best_score"]


def load_weights(model, ckpt, path):
    """The checkpoint's weights into `model`, or a UsageError saying why they do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        old = any(k.endswith(("W_qr.weight", "W_q.weight")) or k.startswith("etf_features.") for k in ckpt["model"])
        reason = ("it was written before KEM and cross-attention held their projections as the paper's D x D "
                  "matrices, which this code cannot load; train the run again" if old else
                  str(error).split("\n\t")[0] + " (" + "; ".join(str(error).split("\n\t")[1:3])[:300] + ")")
        raise UsageError(f"the checkpoint {path} does not fit the network it describes: {reason}") from None


KERNEL_KEYS = ("fused", "foreach", "capturable")     # which implementation an optimizer's step runs


def kernel_settings(optimizer):
    """Each param group's kernel settings, as this run built them (build_optimizer: fused where the device has it)."""
    return [{k: group[k] for k in KERNEL_KEYS if k in group} for group in optimizer.param_groups]


def match_kernels(optimizer, settings):
    """The kernel this run built, not the checkpoint's. load_state_dict restores each group's fused / foreach /
    capturable from the file: a checkpoint of an unfused optimizer (MPS) resumed where it is fused would keep
    the unfused step, which rejects the scaler's inf flag that fp16 hands the fused one (an AssertionError at
    the first step), and elsewhere would run the slower kernel. Each `step` then takes the form that kernel
    expects: a float32 tensor on the parameter's device for fused and capturable, a CPU tensor otherwise."""
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                step = state["step"]
                state["step"] = step.to(device=p.device, dtype=torch.float32) if on_device else step.to("cpu")


def match_layouts(optimizer):
    """Optimizer state in each parameter's memory layout. load_state_dict moves the state to the
    parameter's device and dtype but keeps the saved layout (checked), and CUDA's fused Adam needs state,
    gradient and parameter in one layout: a CPU checkpoint holds NCHW state, a --channels-last run has
    channels-last parameters (and the other way round)."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(value)         # p's device, dtype and strides


def load_scaler(scaler, saved, procs):
    """The checkpoint's fp16 loss scale, if it fits this run's precision; else the scaler starts fresh.
    (A bf16 or fp32 run saves an empty state, which an fp16 scaler refuses.)"""
    if bool(saved) == scaler.is_enabled():
        scaler.load_state_dict(saved)
    elif procs.master:
        print("note: the checkpoint's gradient scaler does not fit this run's --amp (fp16 and bf16/none "
              "differ); the loss scale starts fresh", flush=True)


def rng_states(procs):
    """Every generator's state in every process (a list in rank order on process 0, None elsewhere), as
    tensors and plain Python values (so torch.load(weights_only=True) reads it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():               # dropout on a Mac draws from the MPS generator
        states["mps"] = torch.mps.get_rng_state()
    if not procs.distributed:
        return [states]
    gathered = [None] * procs.world if procs.master else None
    dist.gather_object(states, gathered, dst=0)
    return gathered


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():          # the GPUs that exist here, of those saved
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def seed_ranks(seed, procs, saved=None):
    """Each process's own RNG for dropout and stochastic depth (drawn in training only; the initial weights
    come from `seed` on every process, the data stream from StreamSampler and SeededSamples). A new run:
    process 0 keeps the sequence `seed` started, process r > 0 restarts from seed + r. A resumed run: each
    process its saved states (rng_states); checkpoints from before per-process states hold one dict."""
    saved = [saved] if isinstance(saved, dict) else saved or []
    if procs.rank < len(saved):
        set_rng_states(saved[procs.rank])
    elif procs.rank > 0:
        torch.manual_seed(seed + procs.rank)             # CPU and every GPU


# --- records and log lines ------------------------------------------------------------------------

def start_outputs(cfg, procs, start_iter, extra):
    """config.json once; on resume, forget the log lines written after the checkpoint. Every process
    calls it; returns (the path of metrics.jsonl, the evaluation recorded at start_iter or None). A
    checkpoint is written before its evaluation, so a resumed run whose checkpoint's evaluation is not
    on record (it failed, or the run stopped during it) evaluates first."""
    path, recorded = os.path.join(cfg["out_dir"], "metrics.jsonl"), None
    if procs.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if cfg["resume"] and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["iter"] <= start_iter]
            with open(path, "w") as f:
                f.writelines(kept)
            evals = [json.loads(line) for line in kept if json.loads(line)["kind"] == "eval"]
            recorded = next((r for r in evals if r["iter"] == start_iter), None)
        write_json(os.path.join(cfg["out_dir"], "config.json"), {**cfg, **extra})
    if procs.distributed and start_iter:
        verdict = [recorded]
        dist.broadcast_object_list(verdict, src=0)
        recorded = verdict[0]
    return path, recorded


def write_json(path, record):
    with open(path, "w") as f:
        json.dump(strict_json(record), f, indent=1, allow_nan=False)


def strict_json(x):
    """NaN / inf -> None, so every JSON file we write parses anywhere (json.dumps writes bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


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


# --- pictures: the evaluation picture, and the draw column of train.TASKS -------------------------

def save_picture(path, batch, predictions, cfg, draw, rows=4):
    """Image | (ground truth, prediction) per task for the first few val images, under a header.
    draw: {task: its draw function (one prediction or target as numpy, channels, truth) -> uint8 RGB}."""
    from PIL import Image, ImageDraw

    channels = datasets.task_channels(cfg["dataset"])
    mean, std = torch.tensor(datasets.IMAGENET_MEAN)[:, None, None], torch.tensor(datasets.IMAGENET_STD)[:, None, None]
    lines = []
    for i in range(min(rows, batch["image"].shape[0])):
        image = ((batch["image"][i, :3] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        tiles = [image]
        for t in cfg["tasks"]:
            tiles += [draw[t](batch[t][i].numpy(), channels[t], True),
                      draw[t](predictions[t][i].numpy(), channels[t], False)]
        lines.append(np.concatenate(tiles, axis=1))
    picture = Image.fromarray(np.concatenate(lines, axis=0))
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "white")
    canvas.paste(picture, (0, 14))
    W = batch["image"].shape[-1]
    names = ["image"] + [f"{t} {kind}" for t in cfg["tasks"] for kind in ("truth", "pred")]
    for col, name in enumerate(names):
        ImageDraw.Draw(canvas).text((col * W + 2, 1), name, fill="black")
    canvas.save(path)


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
