"""What a run on another device or with several processes relies on, checked on the CPU.

Pinned down: --amp auto is decided by the GPU's compute capability (bf16 only where it is native,
fp16 with a scaler on older GPUs, none on CPUs), with fake capabilities; --resume puts the optimiser
state in each parameter's memory layout (torch's load_state_dict keeps the saved one), restores the
RNG states of the GPUs that exist (never more), and starts a scaler afresh, with a notice, when the
checkpoint's does not fit the precision; the data are prepared once per data root, by one process at
a time, before any process joins the group (two gloo processes and a deliberately slow preparation);
every process gets the same initial weights and data stream, and a dropout RNG of its own, while
process 0 keeps the sequence a single process has.
"""
import hashlib
import json
import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import train
import train_support as support

TINY = ["--image-size", "32x48", "--dim", "16", "--num-slots", "4", "--workers", "0", "--tasks", "semseg,depth"]


def config(args=("--train-samples", "4", "--val-samples", "2")):
    return train.resolve_config(*train.parse_args([*TINY, *args]))


def in_two_processes(work, timeout=120):
    """work(rank) in two forked processes joined like torchrun's (RANK, WORLD_SIZE, ... in the
    environment); returns [result of rank 0, result of rank 1]. Patches made before the call apply."""
    ctx = multiprocessing.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()

    def child(rank):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        try:
            results.put((rank, work(rank)))
        except BaseException as error:                  # report it: the parent would wait forever
            results.put((rank, f"failed: {error!r}"))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    children = [ctx.Process(target=child, args=(rank,)) for rank in (0, 1)]
    for c in children:
        c.start()
    try:
        got = dict(results.get(timeout=timeout) for _ in children)
    finally:
        for c in children:
            c.join(5)
            if c.exitcode is None:
                c.terminate()
    for rank, value in got.items():
        assert not (isinstance(value, str) and value.startswith("failed")), f"process {rank} {value}"
    return [got[0], got[1]]


def digest(model):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values()
                                        if torch.is_tensor(p))).hexdigest()


# --- precision -----------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [
    ((6, 1), "fp16"),     # GTX 10xx
    ((7, 0), "fp16"),     # V100: is_bf16_supported() says True (emulation), yet no bf16 tensor cores
    ((7, 5), "fp16"),     # T4, RTX 20xx
    ((8, 0), "bf16"),     # A100
    ((8, 9), "bf16"),     # L4, RTX 40xx
    ((9, 0), "bf16"),     # H100
])
def test_auto_precision_follows_the_compute_capability(capability, expected):
    assert support.resolve_amp("auto", torch.device("cuda", 0), capability) == expected


def test_auto_precision_elsewhere_and_explicit_choices():
    for device in ("cpu", "mps"):
        assert support.resolve_amp("auto", torch.device(device)) == "none"
    for amp in ("none", "bf16", "fp16"):
        assert support.resolve_amp(amp, torch.device("cuda", 0), (7, 0)) == amp
        assert support.resolve_amp(amp, torch.device("cpu")) == amp


# --- resume on another device, layout or precision -------------------------------------------------

@pytest.mark.parametrize("saved, now", [(torch.contiguous_format, torch.channels_last),
                                        (torch.channels_last, torch.contiguous_format)])
def test_optimizer_state_takes_each_parameters_layout(saved, now):
    """A CPU (NCHW) checkpoint resumed channels-last, and the other way round: same values, the parameter's strides."""
    torch.manual_seed(0)
    before = torch.nn.Conv2d(4, 8, 3).to(memory_format=saved)
    optimizer = torch.optim.Adam(before.parameters(), fused=True)
    before(torch.randn(2, 4, 6, 6).to(memory_format=saved)).square().mean().backward()
    optimizer.step()
    after = torch.nn.Conv2d(4, 8, 3).to(memory_format=now)
    resumed = torch.optim.Adam(after.parameters(), fused=True)
    resumed.load_state_dict(optimizer.state_dict())
    w = after.weight
    assert resumed.state[w]["exp_avg"].stride() != w.stride(), "torch now converts layouts itself: drop match_layouts"
    support.match_layouts(resumed)
    for p, q in zip(before.parameters(), after.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[q][key].stride() == q.stride(), f"{key} of {tuple(q.shape)}"
            assert torch.equal(resumed.state[q][key], optimizer.state[p][key])


def test_cuda_rng_states_are_restored_for_the_gpus_that_exist(monkeypatch):
    """A checkpoint of an 8-GPU machine resumed on a 1-GPU one: one CUDA state restored, no IndexError."""
    torch.manual_seed(1)
    saved = support.rng_states(support.Processes())[0]
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state[0].item())))
    expected = torch.rand(3)
    torch.manual_seed(2)
    support.set_rng_states(saved)
    assert restored == [(0, 0)]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("saved_amp, now_amp", [("bf16", "fp16"), ("none", "fp16"), ("fp16", "bf16")])
def test_a_scaler_of_another_precision_starts_fresh_with_a_notice(saved_amp, now_amp, capsys):
    saved = train.precision(saved_amp, torch.device("cpu"))[1]
    scaler = train.precision(now_amp, torch.device("cpu"))[1]
    fresh = scaler.state_dict()
    support.load_scaler(scaler, saved.state_dict(), support.Processes())
    assert scaler.state_dict() == fresh
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "the loss scale starts fresh" in out, out


def test_a_scaler_of_the_same_precision_is_restored(capsys):
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler = torch.amp.GradScaler("cpu")
    support.load_scaler(scaler, saved.state_dict(), support.Processes())
    assert scaler.get_scale() == 1024.0 and capsys.readouterr().out == ""


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """A checkpoint written before --channels-last existed (its config lacks the key) still resumes."""
    out = tmp_path / "run"
    args = [*TINY, "--train-samples", "4", "--val-samples", "2", "--batch-size", "2", "--procs", "1"]
    assert train.cli([*args, "--max-iters", "1", "--eval-interval", "1", "--out-dir", str(out)]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ("channels_last", "amp_resolved"):
        del ckpt["config"][key]
    torch.save(ckpt, out / "ckpt.pt")
    assert train.cli(["--resume", str(out), "--max-iters", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["channels_last"] is False


# --- several processes -------------------------------------------------------------------------------

def test_data_are_prepared_once_per_data_root_before_any_process_joins_the_group(tmp_path, monkeypatch):
    """Two gloo processes, a preparation that takes seconds: the first to take the lock 'downloads', the
    other waits on the lock (not in a collective, which would time out on a long download), then finds the
    data and only checks them; neither is in a process group meanwhile; then both join and all-reduce."""
    log, slow = tmp_path / "prepared.jsonl", 3.0

    def slow_check(cfg):
        started, in_group = time.time(), dist.is_initialized()
        folder = tmp_path / "NYUD_MT"
        downloads = not folder.exists()
        if downloads:
            time.sleep(slow)
            folder.mkdir()
        with open(log, "a") as f:
            f.write(json.dumps(dict(rank=os.environ["RANK"], started=started, finished=time.time(),
                                    downloads=downloads, in_group=in_group)) + "\n")

    monkeypatch.setattr(support, "check_inputs", slow_check)
    cfg = config(["--dataset", "nyud", "--no-pretrained", "--backbone", "tiny", "--data-dir", str(tmp_path),
                  "--device", "cpu"])

    def work(rank):
        support.setup_processes(cfg)
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        return total.item()

    assert in_two_processes(work) == [3.0, 3.0]
    first, second = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["started"])
    assert [first["downloads"], second["downloads"]] == [True, False]
    assert second["started"] >= first["finished"], "the second process checked while the first still prepared"
    assert not first["in_group"] and not second["in_group"]


def test_processes_share_weights_and_data_stream_but_not_the_dropout_rng():
    """Initial weights equal in both processes and to one process's; the data stream is one process's
    batch split between them; the RNG that dropout draws from differs per process, and process 0's
    continues where a single process's does (a single-process run is unchanged)."""
    cfg = config()

    def first_steps(procs, batch_size):
        support.seed_everything(cfg["seed"])
        model = train.build_model(cfg)
        support.restore_state(None, None, model, None, None, None, procs, cfg["seed"])
        batch = next(support.make_loaders(cfg, procs, batch_size, 0)[1])
        return digest(model), torch.rand(4).tolist(), batch["image"].numpy()     # numpy: no shared memory

    def work(rank):
        return first_steps(support.setup_processes(cfg), 1)

    (weights0, draw0, images0), (weights1, draw1, images1) = in_two_processes(work)
    weights, draw, images = first_steps(support.Processes(), 2)
    assert weights0 == weights1 == weights
    assert (images0[0] == images[0]).all() and (images1[0] == images[1]).all()
    assert draw0 == draw and draw1 != draw0
