"""How `python train.py --dataset nyud|pascal` fails on a machine without network, as a user meets it.

Pinned down, through the real command line in a subprocess: every start-up failure is one short
message on stderr, a non-zero exit code and no traceback. The data are looked at before the
pretrained weights, and when both are missing the message names both, so one reading fixes
everything. `--no-download` stops before any connection is even tried (a local proxy that counts
connections proves it); without it the program does try, and says what failed. Checkpoints that are
not checkpoints, damaged ones and ones of another network are refused by name, never with PyTorch's
unpickler text. "No network" is made real for the subprocess: every HTTP(S) request goes through a
proxy on localhost that answers nothing, and torch's cache is an empty folder.
"""
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import datasets
from synthetic import SyntheticRooms

ROOT = Path(__file__).resolve().parent.parent


class DeadProxy:
    """A TCP server on localhost that accepts connections, counts them and closes them at once."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"


@pytest.fixture
def offline(tmp_path):
    """(run, proxy): run(args) runs train.py with the network unreachable and an empty torch cache."""
    proxy = DeadProxy()
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "KEM_MTL_DATA": str(tmp_path / "nodata"),
           "NO_PROXY": "", "no_proxy": ""}
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[var] = proxy.url

    def run(args):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out-dir", str(tmp_path / "run")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    yield run, proxy
    proxy.sock.close()


def assert_one_message(proc, *needles, max_lines=25):
    err = proc.stderr
    assert proc.returncode != 0, f"exit code 0:\n{proc.stdout}\n{err}"
    assert "Traceback" not in err and "weights_only" not in err, err
    assert len(err.strip().splitlines()) <= max_lines, f"{len(err.splitlines())} lines:\n{err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def nyud_tree(root):
    source = SyntheticRooms("train", 3, size=(32, 48), seed=1, tasks=["semseg", "depth", "normals", "edge"])
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2)), root / "NYUD_MT", "train")
    datasets.export_nyud_layout(torch.utils.data.Subset(source, range(2, 3)), root / "NYUD_MT", "val")
    return root


@pytest.mark.parametrize("dataset, folder", [("nyud", "NYUD_MT"), ("pascal", "PASCAL_MT")])
def test_no_data_and_no_weights_names_both_after_trying(offline, tmp_path, dataset, folder):
    run, proxy = offline
    proc = run(["--dataset", dataset, "--data-dir", str(tmp_path / "nowhere"), "--max-iters", "1"])
    err = assert_one_message(proc, f"{dataset}:", folder, "--dataset synthetic",
                             "could not load the ImageNet weights of swin_t", "--no-pretrained")
    assert err.index(f"{dataset}:") < err.index("ImageNet weights"), "the data are looked at first"
    assert proxy.connections >= 2, "both downloads were tried"


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_no_data_without_pretrained_weights_names_only_the_data(offline, tmp_path, dataset):
    run, _ = offline
    proc = run(["--dataset", dataset, "--data-dir", str(tmp_path / "nowhere"), "--no-pretrained", "--max-iters", "1"])
    err = assert_one_message(proc, "--dataset synthetic", str(tmp_path / "nowhere"))
    assert "ImageNet" not in err


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_no_download_stops_before_any_connection(offline, tmp_path, dataset):
    run, proxy = offline
    proc = run(["--dataset", dataset, "--data-dir", str(tmp_path / "nowhere"), "--no-download", "--max-iters", "1"])
    assert_one_message(proc, "downloading is switched off", "ImageNet weights of swin_t", "not on this machine")
    assert proxy.connections == 0


def test_data_present_weights_unreachable_names_only_the_weights(offline, tmp_path):
    run, _ = offline
    proc = run(["--dataset", "nyud", "--data-dir", str(nyud_tree(tmp_path / "data")), "--max-iters", "1"])
    err = assert_one_message(proc, "could not load the ImageNet weights of swin_t", str(tmp_path / "torch"))
    assert "--dataset synthetic" not in err, "the data were found: nothing to say about them"


def test_resnet_weights_are_named_too(offline, tmp_path):
    run, _ = offline
    proc = run(["--dataset", "nyud", "--data-dir", str(nyud_tree(tmp_path / "data")), "--backbone", "resnet50",
                "--max-iters", "1"])
    assert_one_message(proc, "ImageNet weights of resnet50")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--image-size", "32x48", "--dim", "16",
                           "--num-slots", "4", "--train-samples", "4", "--val-samples", "2", "--batch-size", "2",
                           "--max-iters", "1", "--eval-interval", "1", "--procs", "1", "--tasks", "semseg,depth",
                           "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "ckpt.pt"


def test_a_file_that_is_not_a_checkpoint(offline, tmp_path):
    run, _ = offline
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the run\n")
    assert_one_message(run(["--eval-only", "--ckpt", str(notes)]), f"cannot read checkpoint {notes}",
                       "is not a checkpoint")


def test_a_damaged_checkpoint(offline, tmp_path, tiny_checkpoint):
    run, _ = offline
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    assert_one_message(run(["--eval-only", "--ckpt", str(broken)]), "is damaged or incomplete")
    assert_one_message(run(["--resume", str(broken)]), "is damaged or incomplete")


def test_a_checkpoint_of_another_network(offline, tmp_path, tiny_checkpoint):
    run, _ = offline
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoders.depth")}
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    assert_one_message(run(["--eval-only", "--ckpt", str(edited)]), "does not fit the network it describes",
                       "decoders.depth")


def test_a_checkpoint_from_before_the_paper_notation(offline, tmp_path, tiny_checkpoint):
    """KEM's projections were nn.Linear layers before; such checkpoints are refused with the reason."""
    run, _ = offline
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["model"] = {(k + ".weight" if k.startswith("exchange.W_") else k): (v.T if k.startswith("exchange.W_") else v)
                     for k, v in ckpt["model"].items()}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert_one_message(run(["--eval-only", "--ckpt", str(old)]), "written before KEM", "train the run again")
