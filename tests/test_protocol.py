"""The field presets at their real sizes, end to end on the CPU, through train.py's command line.

`python train.py --dataset nyud` and `--dataset pascal` as their presets define them (Swin-T, dim 128,
batch 2, Adam, train crops 448x576 / 512x512, evaluation at 480x640 / 512x512 with exact edges), with
nothing changed but --no-pretrained (no weights download), --no-download, a data directory written
here, and a few iterations. The data, at full size:
- NYUD_MT, packaging B, 480x640, exported from SyntheticRooms (its 10 classes use part of the
  40-class head): 4 train / 2 val images;
- PASCAL_MT with the real variety of image sizes (375x500, 500x375, 333x500, ...), every file the
  loader reads written in its real format: JPEG images, ImageSets/Context splits, the
  pascal-context LabelMap .mat, semseg PNGs, the Pascal-Part struct .mat (a person with parts in
  some images, only other objects in the rest), distilled normals and saliency PNGs: 4 train / 2 val.
For each preset: 2 iterations ending in an exact evaluation (Swin-T forward/backward at the crop
size, padding to the eval size, exact edges at full size, the picture, both checkpoints, metrics
finite and in range); `--resume` to iteration 3 (continues from 2, writes its results); `--eval-only`
on the final checkpoint (the run's final metrics again). The subprocesses get an unreachable proxy,
so a download attempt would fail instead of reaching the network.

Measured on the project's 2-core CPU while other test suites shared it: 8 minutes for both presets
(NYUD 4.7, PASCAL 3.2; load 6.5 to 8.4), PASCAL alone 1.7 minutes at load 3.3 to 5.5; about 5.5
CPU-minutes in all, so about 3 minutes at best on an idle 2-core machine. Run it alone with
`python tests/test_protocol.py` (this file through pytest; extra arguments go to pytest, e.g. `-k pascal`)
or `python -m pytest tests/test_protocol.py`.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

ROOT = Path(__file__).resolve().parent.parent
SPLITS = {"train": 4, "val": 2}
# (H, W) of PASCAL images: VOC's usual 500-pixel long side, landscape and portrait
PASCAL_SIZES = {"train": [(375, 500), (500, 375), (333, 500), (500, 333)], "val": [(500, 366), (281, 500)]}
HEADLINE = {"semseg": ("mIoU", 0, 1), "parts": ("mIoU", 0, 1), "depth": ("rmse", 0, math.inf),   # task -> key, range
            "normals": ("mean", 0, 180), "sal": ("maxF", 0, 1), "edge": ("odsF", 0, 1)}


def run(args, timeout=1200):
    """train.py with `args` in a fresh process; network requests go to a closed local port."""
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- the data trees -----------------------------------------------------------------------------

def write_nyud_tree(data_root):
    """NYUD_MT packaging B at 480x640 from SyntheticRooms: train and val scenes."""
    import datasets
    from synthetic import SyntheticRooms

    for split, n in SPLITS.items():
        rooms = SyntheticRooms(split, n, size=(480, 640), seed=0, tasks=["semseg", "depth", "normals", "edge"])
        datasets.export_nyud_layout(rooms, data_root / "NYUD_MT", split)


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _pascal_sample(rng, H, W, person):
    """Plausible maps of one PASCAL image: a LabelMap of Voronoi regions (context classes, some on the
    normals list), one object (a person with parts, or a dog), and the labels derived from them."""
    from datasets import PASCAL_NORMALS_CLASSES

    yx = np.stack(np.mgrid[0:H, 0:W], -1).reshape(-1, 1, 2)
    seeds = rng.uniform(0, 1, (8, 2)) * (H, W)
    region = np.argmin(((yx - seeds) ** 2).sum(-1), axis=1).reshape(H, W)       # (H, W) in 0..7
    off_list = np.setdiff1d(np.arange(1, 460), PASCAL_NORMALS_CLASSES)
    classes = np.where(np.arange(8) % 2 == 0, rng.choice(PASCAL_NORMALS_CLASSES, 8), rng.choice(off_list, 8))
    labelmap = classes[region].astype(np.uint16)
    top, left, h, w = H // 5, W // 3, 3 * H // 5, W // 4                        # the object's box
    obj = np.zeros((H, W), bool)
    obj[top:top + h, left:left + w] = True
    labelmap[obj] = PASCAL_NORMALS_CLASSES[7] if person else off_list[0]
    semseg = np.zeros((H, W), np.uint8)                                          # background ...
    semseg[obj] = 15 if person else 12                                           # ... person or dog,
    border = np.zeros((H, W), bool)                                              # void band at its border
    border[max(top - 2, 0):top + h + 2, max(left - 2, 0):left + w + 2] = True
    border[top + 2:top + h - 2, left + 2:left + w - 2] = False
    semseg[border] = 255
    normal = rng.normal(size=(9, 3)) + (0, 0, 2.0)                               # facing the camera
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    normals = normal[np.where(obj, 8, region)]                                   # (H, W, 3)
    colour = rng.uniform(40, 220, (9, 3))[np.where(obj, 8, region)] * (0.5 + 0.5 * normals[..., 2:])
    image = np.clip(colour + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    parts = []
    if person:
        def rows(a, b, c0, c1):                                                  # a band of the box
            return _box(H, W, top + int(a * h), top + int(b * h), left + int(c0 * w), left + int(c1 * w))
        parts = [("head", rows(0, 0.15, 0.3, 0.7)), ("torso", rows(0.15, 0.5, 0.2, 0.8)),
                 ("luarm", rows(0.15, 0.35, 0, 0.2)), ("llarm", rows(0.35, 0.5, 0, 0.2)),
                 ("ruarm", rows(0.15, 0.35, 0.8, 1)), ("rhand", rows(0.35, 0.5, 0.8, 1)),
                 ("luleg", rows(0.5, 0.75, 0.2, 0.5)), ("ruleg", rows(0.5, 0.75, 0.5, 0.8)),
                 ("llleg", rows(0.75, 1, 0.2, 0.5)), ("rfoot", rows(0.75, 1, 0.5, 0.8))]
    anno = anno_struct([("person", 15, obj, parts)] if person else [("dog", 12, obj, [])])
    return dict(image=image, labelmap=labelmap, semseg=semseg, anno=anno,
                normals=np.round((normals + 1) * 127.5).astype(np.uint8), sal=np.where(obj, 255, 0).astype(np.uint8))


def anno_struct(objects):
    """A Pascal-Part `anno` struct as scipy writes it: objects = [(class name, class index, mask, parts)],
    parts = [(part name, mask)]; read back as anno[0][0][1][0] = objects (the MTI-Net loader's reading)."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, (name, index, mask, parts) in enumerate(objects):
        p = np.zeros((0, 0))
        if parts:
            p = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (part, part_mask) in enumerate(parts):
                p[0, j] = (part, part_mask.astype(np.uint8))
        objs[0, k] = (name, np.array([[index]], dtype=np.uint8), mask.astype(np.uint8), p)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("img", objs)
    return {"anno": anno}


def _box(H, W, r0, r1, c0, c1):
    mask = np.zeros((H, W), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def write_pascal_tree(data_root):
    """PASCAL_MT at the real images' sizes, every file in the format the real tree has."""
    root, rng, k = data_root / "PASCAL_MT", np.random.default_rng(0), 0
    (root / "ImageSets" / "Context").mkdir(parents=True)
    for split, sizes in PASCAL_SIZES.items():
        ids = []
        for H, W in sizes:
            id_, k = f"2008_{k + 1:06d}", k + 1
            s = _pascal_sample(rng, H, W, person=k % 2 == 1)
            _save(root / "JPEGImages" / f"{id_}.jpg", s["image"], quality=90)
            (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
            savemat(root / "pascal-context" / "trainval" / f"{id_}.mat", {"LabelMap": s["labelmap"]})
            _save(root / "semseg" / "pascal-context" / f"{id_}.png", s["semseg"])
            (root / "human_parts").mkdir(parents=True, exist_ok=True)
            savemat(root / "human_parts" / f"{id_}.mat", s["anno"])
            _save(root / "normals_distill" / f"{id_}.png", s["normals"])
            _save(root / "sal_distill" / f"{id_}.png", s["sal"])
            ids.append(id_)
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


# --- the runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["nyud", "pascal"])
def protocol(request, tmp_path_factory):
    """Tree, 2 iterations, --resume to 3, --eval-only: what each step left behind."""
    preset, tmp = request.param, tmp_path_factory.mktemp(request.param)
    (write_nyud_tree if preset == "nyud" else write_pascal_tree)(tmp)
    out = tmp / "run"
    first = run(["--dataset", preset, "--data-dir", str(tmp), "--no-download", "--no-pretrained", "--max-iters", "2",
                 "--eval-interval", "2", "--log-interval", "1", "--out-dir", str(out)])
    after_two = {name: (out / name).read_text() for name in ("config.json", "results.json", "metrics.jsonl")}
    resumed = run(["--resume", str(out), "--max-iters", "3"])
    # --eval-only takes the network from the checkpoint, the data location from the flags
    evaluated = run(["--eval-only", "--ckpt", str(out / "ckpt.pt"), "--data-dir", str(tmp), "--no-download"])
    return dict(preset=preset, out=out, after_two=after_two, procs=(first, resumed, evaluated))


def check_metrics(results, tasks):
    """Every task scored; headline metrics (exact odsF, not the approximation) in range; numbers finite."""
    assert set(results) == set(tasks), results.keys()
    for task, values in results.items():
        key, lo, hi = HEADLINE[task]
        assert key in values and lo <= values[key] <= hi, f"{task}: {key} = {values.get(key)}"
        for name, value in values.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{task} {name} = {value}"


def test_two_iterations_at_protocol_size_write_every_output(protocol):
    out, preset = protocol["out"], protocol["preset"]
    for name in ("config.json", "metrics.jsonl", "ckpt.pt", "best.pt", "results.json", "eval_000002.png"):
        assert (out / name).is_file(), f"{name} missing; stdout:\n{protocol['procs'][0].stdout}"
    config = json.loads(protocol["after_two"]["config.json"])
    train_size, eval_size = {"nyud": ([448, 576], [480, 640]), "pascal": ([512, 512], [512, 512])}[preset]
    assert (config["backbone"], config["pretrained"], config["dim"], config["batch_size"], config["optimizer"]) == \
        ("swin_t", False, 128, 2, "adam")
    assert config["train_size"] == train_size and config["eval_size"] == eval_size
    results = json.loads(protocol["after_two"]["results.json"])
    assert results["iteration"] == 2
    check_metrics(results["metrics"], config["tasks"])
    records = [json.loads(line) for line in protocol["after_two"]["metrics.jsonl"].splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [(r["iter"], r["exact_edges"]) for r in records if r["kind"] == "eval"] == [(2, True)]
    H, W = eval_size                   # image | truth, prediction per task, one row per val image shown
    picture = Image.open(out / "eval_000002.png")
    assert picture.width == W * (1 + 2 * len(config["tasks"])) and (picture.height - 14) % H == 0, picture.size


def test_resume_continues_to_iteration_3(protocol):
    out = protocol["out"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [2, 3]
    results = json.loads((out / "results.json").read_text())
    assert results["iteration"] == 3 and (out / "eval_000003.png").is_file()
    check_metrics(results["metrics"], results["config"]["tasks"])
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["iteration"] == 3


def test_eval_only_reproduces_the_final_metrics(protocol):
    out = protocol["out"]
    evaluated = json.loads((out / "eval_ckpt.json").read_text())
    final = json.loads((out / "results.json").read_text())["metrics"]
    assert evaluated["iter"] == 3 and evaluated["exact_edges"]
    assert_close(evaluated["metrics"], final, "metrics")


def assert_close(got, want, where):
    """Nested dicts / lists of numbers equal to float rounding (None stands for NaN)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and got is not None:
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), f"{where}: --eval-only {got}, the run {want}"
    else:
        assert got == want, f"{where}: --eval-only {got!r}, the run {want!r}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", *sys.argv[1:]]))
