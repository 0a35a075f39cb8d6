"""The GPU, MPS and multi-process paths' failure modes, reproduced on the CPU (issue 25).

Pinned down, one section per item of the issue:
1. precision(): --amp none builds no autocast at all (PyTorch before 2.5 refuses even a disabled
   one on MPS: a stand-in autocast plays that PyTorch), fp16 / bf16 stop with a message naming the
   PyTorch they need where the installed one cannot autocast the device to them, and bf16 is refused
   where autocast would switch itself off with a warning (PyTorch 2.5 on MPS);
2. a resumed optimiser keeps this run's fused / foreach / capturable, whatever the checkpoint's groups
   say (a checkpoint of an unfused optimiser resumed in fp16 crashed its first step), and each `step`
   in the form that kernel expects;
3. every process trains in one precision: the least capable GPU decides (fake capabilities in two of
   our own processes), config.json says which, and explicit --amp values that differ are refused;
4. a checkpoint records the images seen and the world size, and a run resumed with another number of
   torchrun processes continues the data stream after the images actually consumed, and says so;
5. the process group waits --dist-timeout minutes, long enough for another node's download;
6. where flock is disabled the data are prepared under a lock file created exclusively (host, pid,
   taken over when stale); downloads use per-host temporary names, and a valid tree another node
   put in place first counts as success;
7. a process other than rank 0 that stops says why, under its rank and host;
and the minor ones: under DDP the gradients stay in DDP's buckets between steps (no copy per step),
and the MPS RNG state is saved and restored.
"""
import copy
import datetime
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import datasets
import train
import train_support as support
from test_devices import in_two_processes
from train_support import UsageError

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--image-size", "32x32", "--dim", "16", "--num-slots", "4", "--workers", "0", "--tasks", "semseg,depth"]
TINY = [*SMALL, "--train-samples", "16", "--val-samples", "4"]         # SMALL alone for a real dataset
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="our own processes inherit a patch only when forked")


def config(*args, flags=TINY):
    return train.resolve_config(*train.parse_args([*flags, *args]))


# --- 1. precision where the installed PyTorch lacks the autocast ------------------------------------

REAL_AUTOCAST = torch.autocast


def torch_2_4_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """torch.autocast as PyTorch 2.4 has it: no MPS autocast, and the device is refused before
    `enabled` is even read."""
    if device_type == "mps":
        raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
    return REAL_AUTOCAST(device_type, dtype=dtype, enabled=enabled)


def torch_2_5_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """PyTorch 2.5's: MPS autocast in float16 only; asked for bfloat16 it warns and switches itself off."""
    if device_type != "mps":
        return REAL_AUTOCAST(device_type, dtype=dtype, enabled=enabled)
    autocast = REAL_AUTOCAST("cpu", dtype=dtype, enabled=enabled)      # stands for the MPS one
    if enabled and dtype != torch.float16:
        warnings.warn("In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
                      "MPS Autocast only supports dtype of torch.float16 currently.")
        autocast._enabled = False
    return autocast


def test_no_autocast_is_built_when_none_is_wanted(monkeypatch):
    """`python train.py` on a Mac with torch 2.4: --amp auto resolves to none on MPS, and must start."""
    monkeypatch.setattr(torch, "autocast", torch_2_4_autocast)
    autocast, scaler = train.precision("none", torch.device("mps"))
    with autocast:
        assert not torch.is_autocast_enabled("cpu")
    assert not scaler.is_enabled()


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_on_a_device_without_autocast_names_the_pytorch_needed(monkeypatch, amp):
    monkeypatch.setattr(torch, "autocast", torch_2_4_autocast)
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(UsageError) as error:
        train.precision(amp, torch.device("mps"))
    message = str(error.value)
    needed = {"fp16": "2.5", "bf16": "2.6"}[amp]
    for part in (f"--amp {amp}", "mps", "2.4.1", f"PyTorch {needed}", "--amp none"):
        assert part in message, f"{part!r} not in: {message}"


def test_bf16_that_autocast_would_switch_off_is_refused(monkeypatch):
    """PyTorch 2.5 on MPS: fp16 autocasts; bf16 would train in fp32 after a warning, so it stops instead."""
    monkeypatch.setattr(torch, "autocast", torch_2_5_autocast)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    autocast, scaler = train.precision("fp16", torch.device("mps"))
    assert autocast.fast_dtype == torch.float16 and scaler.is_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no warning leaks out: the message says it all
        with pytest.raises(UsageError) as error:
            train.precision("bf16", torch.device("mps"))
    message = str(error.value)
    for part in ("--amp bf16", "2.5.1", "PyTorch 2.6", "macOS 14", "--amp fp16",
                 "only supports dtype of torch.float16"):
        assert part in message, f"{part!r} not in: {message}"


def test_precision_on_the_cpu_is_unchanged():
    autocast, scaler = train.precision("none", torch.device("cpu"))
    with autocast:
        assert not torch.is_autocast_enabled("cpu")
    autocast, scaler = train.precision("bf16", torch.device("cpu"))
    with autocast:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not scaler.is_enabled()


# --- 2. a resumed optimiser runs this run's kernel ---------------------------------------------------

def test_a_checkpoint_of_an_unfused_optimizer_resumes_in_fp16(tmp_path):
    """Written where the optimiser is not fused (MPS: build_optimizer passes fused=False), resumed where it
    is and --amp picks fp16: the fused step takes the scaler's inf flag, the unfused one asserted."""
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "2", "--procs", "1", "--log-interval", "1"]
    assert train.cli([*args, "--amp", "none", "--max-iters", "1", "--eval-interval", "1", "--out-dir", str(out)]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(fused=False, foreach=None, capturable=False)      # what an MPS run writes
    torch.save(ckpt, out / "ckpt.pt")
    assert train.cli(["--resume", str(out), "--amp", "fp16", "--max-iters", "3"]) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"][0]["fused"] is True


def test_restored_groups_take_the_fresh_optimizers_kernel_settings_and_step_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    saved = torch.optim.AdamW(model.parameters(), fused=True)       # fused: step a float32 tensor on the device
    model(torch.randn(4, 3)).square().mean().backward()
    saved.step()
    for fused, foreach in ((False, True), (False, False)):          # resumed unfused (as on MPS)
        fresh = torch.optim.AdamW(model.parameters(), fused=fused, foreach=foreach)
        settings = support.kernel_settings(fresh)
        fresh.load_state_dict(copy.deepcopy(saved.state_dict()))
        assert fresh.param_groups[0]["fused"] is True, "torch now keeps the fresh settings: drop match_kernels"
        support.match_kernels(fresh, settings)
        group = fresh.param_groups[0]
        assert (group["fused"], group["foreach"], group["capturable"]) == (fused, foreach, False)
        step = fresh.state[model.weight]["step"]
        assert step.device.type == "cpu" and step.item() == 1
        fresh.step()                                                 # the unfused kernel accepts it
        assert fresh.state[model.weight]["step"].item() == 2


# --- 3. one precision for every process ----------------------------------------------------------------

@linux_only
def test_processes_on_different_gpus_agree_on_the_least_capable_ones_precision(tmp_path, monkeypatch):
    """Two of our own processes, one on a (fake) Ampere card, one on a (fake) Turing card: both train in
    fp16 with a scaler, which both cards support, and config.json says fp16."""
    real_resolve = support.resolve_amp
    cards = {0: (8, 6), 1: (7, 5)}                       # an RTX 3090 beside an RTX 2080

    def on_mixed_cards(amp, device, capability=None):
        return real_resolve(amp, torch.device("cuda", 0), cards[int(os.environ.get("RANK", "0"))])

    monkeypatch.setattr(support, "resolve_amp", on_mixed_cards)
    seen = tmp_path / "seen.jsonl"

    def record(model, cfg, procs, it, result):
        with open(seen, "a") as f:
            f.write(json.dumps({"rank": procs.rank, "amp": cfg["amp_resolved"]}) + "\n")

    out = tmp_path / "run"
    code = train.cli([*TINY, "--batch-size", "2", "--procs", "2", "--max-iters", "1", "--eval-interval", "1",
                      "--out-dir", str(out)], hooks=train.Hooks(evaluated=record))
    assert code == 0
    per_rank = {r["rank"]: r["amp"] for r in map(json.loads, seen.read_text().splitlines())}
    assert per_rank == {0: "fp16", 1: "fp16"}, per_rank
    assert json.loads((out / "config.json").read_text())["amp_resolved"] == "fp16"


def test_explicit_amp_that_differs_between_processes_is_refused():
    """Two nodes started with different flags: each process stops with the same message, before training."""
    def work(rank):
        cfg = config("--amp", "none" if rank == 0 else "bf16", "--device", "cpu")
        try:
            train.start(cfg, train.Hooks())
        except UsageError as error:
            return str(error)
        return "started"

    messages = in_two_processes(work)
    for message in messages:
        assert "--amp" in message and "none" in message and "bf16" in message, messages


# --- 4. the data stream after a change of world size ---------------------------------------------------

class RecordedStart(support.StreamSampler):
    starts = []

    def __init__(self, num_samples, seed, start, rank=0, world=1):
        RecordedStart.starts.append(start)
        super().__init__(num_samples, seed, start, rank, world)


def test_a_resume_on_fewer_torchrun_processes_continues_after_the_images_seen(tmp_path, monkeypatch, capsys):
    """Two torchrun processes of 2 images each, 2 steps: 8 images seen. Resumed in one process, the
    stream continues at image 8 (not 2 steps x 2 images = 4, which replays half), and the run says so."""
    out = tmp_path / "run"
    common = [*TINY, "--batch-size", "2", "--log-interval", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "train.py")]
    proc = subprocess.run([*launcher, *common, "--max-iters", "2", "--eval-interval", "2", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["images_seen"], ckpt["world_size"], ckpt["step_images"]) == (8, 2, 4)
    RecordedStart.starts = []
    monkeypatch.setattr(support, "StreamSampler", RecordedStart)
    assert train.cli(["--resume", str(out), "--max-iters", "3", "--procs", "1"]) == 0
    assert RecordedStart.starts == [8]
    said = capsys.readouterr().out
    assert "4 images per step" in said and "now 2" in said and "after the 8 images" in said, said
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["iteration"], ckpt["images_seen"], ckpt["world_size"], ckpt["step_images"]) == (3, 10, 1, 2)


def test_a_checkpoint_without_the_images_seen_resumes_as_before(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "2", "--procs", "1"]
    assert train.cli([*args, "--max-iters", "2", "--eval-interval", "2", "--out-dir", str(out)]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["images_seen"], ckpt["world_size"], ckpt["step_images"]) == (4, 1, 2)
    for key in ("images_seen", "world_size", "step_images"):
        del ckpt[key]
    torch.save(ckpt, out / "ckpt.pt")
    RecordedStart.starts = []
    monkeypatch.setattr(support, "StreamSampler", RecordedStart)
    assert train.cli(["--resume", str(out), "--max-iters", "3"]) == 0
    assert RecordedStart.starts == [4] and "images per step" not in capsys.readouterr().out


# --- 5. the process group's timeout covers another node's data preparation ---------------------------

def test_the_process_group_waits_dist_timeout_minutes(monkeypatch):
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert config()["dist_timeout"] >= 60                # a download of several GB fits in the default
    support.setup_processes(config("--device", "cpu", "--dist-timeout", "90"))
    assert joined == [("gloo", {"timeout": datetime.timedelta(minutes=90)})]


# --- 6. the lock and the download on cluster file systems -------------------------------------------------

def test_where_flock_is_disabled_an_exclusive_lock_file_serialises_the_preparation(tmp_path, monkeypatch):
    """flock raises (a Lustre or NFS mount without locks): no traceback; one process prepares, the other
    waits for the lock file, then finds the data."""
    import fcntl

    def no_locks(*args):
        raise OSError(37, "No locks available")

    log = tmp_path / "prepared.jsonl"

    def slow_check(cfg):
        started, folder = time.time(), tmp_path / "NYUD_MT"
        downloads = not folder.exists()
        held = (tmp_path / ".prepare.lock.held").read_text().split()
        if downloads:
            time.sleep(2)
            folder.mkdir()
        with open(log, "a") as f:
            f.write(json.dumps(dict(started=started, finished=time.time(), downloads=downloads, held=held)) + "\n")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(support, "check_inputs", slow_check)
    cfg = config("--dataset", "nyud", "--no-pretrained", "--backbone", "tiny", "--data-dir", str(tmp_path),
                 flags=SMALL)
    in_two_processes(lambda rank: support.prepare_inputs(cfg))
    first, second = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["started"])
    assert [first["downloads"], second["downloads"]] == [True, False]
    assert second["started"] >= first["finished"]
    assert first["held"][0] == socket.gethostname() and first["held"][1] != second["held"][1]   # host, pid
    assert not (tmp_path / ".prepare.lock.held").exists()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder, age", [(("here", "dead"), 0), (("node-b", 1), 3600)],
                         ids=["a process of this host that is gone", "another host, untouched for an hour"])
def test_a_stale_lock_file_is_taken_over(tmp_path, holder, age):
    """Left by a process of this host that is gone, or by another host and not touched for too long."""
    path = tmp_path / "lock"
    host = socket.gethostname() if holder[0] == "here" else holder[0]
    pid = dead_pid() if holder[1] == "dead" else holder[1]
    path.write_text(f"{host} {pid}\n")
    os.utime(path, (time.time() - age, time.time() - age))
    with support.exclusive_lock(path, poll=0.01):
        assert path.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
    assert not path.exists()


def test_a_live_lock_file_is_waited_for(tmp_path):
    path = tmp_path / "lock"
    path.write_text("node-b 1\n")                       # another host's process, recently touched
    got = threading.Event()

    def take():
        with support.exclusive_lock(path, poll=0.01):
            got.set()
    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert not got.is_set()
    path.unlink()                                        # the holder finishes
    assert got.wait(5)
    thread.join(5)


def test_downloads_use_per_host_names_and_a_tree_another_node_placed_counts(tmp_path, monkeypatch):
    """Node A downloads while node B (sharing the data root, not the lock) puts a valid tree in place first:
    A's files carry its host name, nothing of B's is touched, and A takes B's tree instead of failing."""
    from test_datasets import synthetic_tree, tarball

    synthetic_tree(tmp_path / "src" / "NYUD_MT", size=(16, 20), n=(2, 1))
    (tmp_path / "served").mkdir()
    blob = tarball(tmp_path / "src" / "NYUD_MT", tmp_path / "served" / "NYUD_MT.tgz", "NYUD_MT").read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    (data / "NYUD_MT.tgz.node-b.part").write_bytes(b"node B's half")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    names = []

    class Served:
        def __init__(self):
            self.stream = io.BytesIO(blob)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            names.extend(sorted(os.listdir(data)))
            if not (data / "NYUD_MT").exists():          # node B finishes first
                synthetic_tree(data / "NYUD_MT", size=(16, 20), n=(2, 1))
            return self.stream.read(n)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the small split's warning
        path = datasets.prepare_dataset("nyud", data, url="https://example.invalid/NYUD_MT.tgz",
                                        opener=lambda url: Served())
    assert path == data / "NYUD_MT"
    ours = [n for n in names if n.endswith(".part") and "node-b" not in n]
    assert ours and all("node-a" in n for n in ours), names
    assert sorted(os.listdir(data)) == ["NYUD_MT", "NYUD_MT.tgz.node-b.part"]


# --- 7. every process that stops says why ----------------------------------------------------------------

def test_a_process_other_than_rank_0_says_why_it_stopped(monkeypatch, capsys, tmp_path):
    """Node 1 of a torchrun job given a --resume path that exists only on node 0."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.cli(["--resume", str(tmp_path / "only-on-node-0")]) == 2
    err = capsys.readouterr().err
    assert f"rank 1/2 on {socket.gethostname()}" in err and "no checkpoint at" in err, err


# --- minor: gradients in DDP's buckets; the MPS RNG ----------------------------------------------------

def test_under_ddp_the_gradients_stay_in_the_buckets_between_steps():
    """zero_grad(set_to_none=True) would leave DDP's reducer to copy each new gradient into its bucket."""
    cfg = config("--batch-size", "2", "--device", "cpu")

    def work(rank):
        procs = support.setup_processes(cfg)
        support.seed_everything(0)
        model = train.build_model(cfg)
        optimizer, scheduler = train.build_optimizer(model, cfg)
        batches = support.make_loaders(cfg, procs, 1, 0)[1]
        ddp = train.data_parallel(model, procs.device)
        autocast, scaler = train.precision("none", procs.device)
        running = {t: torch.zeros(()) for t in cfg["tasks"]}
        pointers = []
        for _ in range(3):
            train.train_step(ddp, batches, cfg, procs, autocast, scaler, optimizer, scheduler, running)
            pointers.append([p.grad.data_ptr() if p.grad is not None else None for p in model.parameters()])
        return pointers[1:]             # DDP rebuilds its buckets once, in the second step

    for second, third in in_two_processes(work):
        assert None not in second and second == third


def test_the_mps_rng_state_is_saved_and_restored(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *args: torch.full((4,), 7, dtype=torch.uint8))
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, *args: restored.append(state[0].item()))
    saved = support.rng_states(support.Processes())[0]
    assert torch.equal(saved["mps"], torch.full((4,), 7, dtype=torch.uint8))
    support.set_rng_states(saved)
    assert restored == [7]
