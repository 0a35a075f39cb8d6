"""datasets.py: the real loaders follow the field's label conventions value by value, downloads never leave a broken tree,
and the transforms keep every label consistent with the image.

Pinned down, without network and without the real data:
- NYUD packaging B (written by hand and by `export_nyud_layout` from SyntheticRooms) and packaging C
  (by hand): segmentation 0 -> 255 and k -> k-1, depth as stored (0 invalid), normals as stored or
  decoded 2x/255 - 1, edges binary at 0.5 (C: /255 first), image = the decoded file / 255, meta.
- PASCAL-Context in the PASCAL_MT layout with .mat files written by scipy: semseg (VOC12 before
  pascal-context), edges = thinned non-zero Laplacian of LabelMap (against a loop oracle), normals
  kept only on the listed LabelMap classes, saliency /255 > 0.5, human parts merged from a real
  nested Pascal-Part struct (persons only, later parts paint over earlier ones, all 255 without a
  person part). The same tree under the InvPT name PASCALContext/ is found and reads identically.
- Thinning (metrics.thin, which the PASCAL edge labels use): scikit-image's documented example, a
  per-pixel loop oracle of Guo-Hall on random masks, and its properties (subset, idempotent,
  one-pixel lines kept).
- Copying: `import datasets` loads neither synthetic.py nor metrics.py, and NYUD (and PASCAL without
  edges) load without them; task_channels / class_names answer for every name in NAMES while TASKS /
  CLASS_NAMES hold only the real datasets' facts.
- Downloads from a file:// tarball through the real code path: success, present-and-valid -> no
  download, a manual archive is used, checksum / size mismatch, escaping members, corrupt archives,
  interrupted streams and Ctrl-C (nothing half-written, a retry succeeds), the offline message
  (naming every accepted folder).
- Transforms: flip twice = identity, flip negates normals' x and keeps them unit, scaling divides
  depth and repeats labels, normals stay unit or exactly zero, padding is ignored in every map,
  crops are windows of the input, determinism from a generator or the DataLoader worker seeds.
- Every documented error: missing root / split file / file of an id, unreadable or truncated image,
  labels out of range, shapes that disagree, bad arguments.
- The check before training: prepare_dataset reads every image and label file of a tree in full and
  names every unreadable one in one message; a passing verdict is remembered in the tree until a file
  changes (and not at all in a read-only tree). `PYTHONPATH=. python tests/test_datasets.py` times it
  on a generated tree of NYUD-v2's size.
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.io import savemat

import datasets as D
import synthetic
from datasets import DatasetError
from metrics import thin
from synthetic import SyntheticRooms

pytestmark = pytest.mark.filterwarnings("ignore:.*official split:UserWarning")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection is a test bug: file:// and the fakes below never need one."""
    connect = socket.socket.connect

    def guarded(sock, *args, **kwargs):                             # local (AF_UNIX) sockets stay allowed:
        if sock.family in (socket.AF_INET, socket.AF_INET6):       # DataLoader workers pass tensors over them
            raise AssertionError("a test tried to open a network connection")
        return connect(sock, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", guarded)


# ----------------------------------------------------------------------------------------------------
# Writers for tiny trees

def save(path: Path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, arr)
    else:
        Image.fromarray(arr).save(path, **kw)


def decoded(path: Path) -> torch.Tensor:
    """What an image file decodes to, as the loader must return it: (3, H, W) / 255."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def unit_normals(rng, H, W):
    n = rng.normal(size=(H, W, 3)).astype(np.float32)
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def write_nyud(root: Path, packaging="B", H=6, W=8, splits=(("train", ["a1", "a2"]), ("val", ["b1"]))):
    """A hand-made NYUD tree; returns {id: raw arrays as written}."""
    rng = np.random.default_rng(0)
    raw = {}
    for split, ids in splits:
        save_split(root / "gt_sets" / f"{split}.txt", ids)
        for id_ in ids:
            seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
            seg[0, :3] = [0, 1, 40]
            depth = rng.uniform(0.5, 10, (H, W)).astype(np.float32)
            depth[1, 1] = 0.0
            r = {"image": rng.integers(0, 256, (H, W, 3)).astype(np.uint8), "seg": seg, "depth": depth}
            if packaging == "B":
                r["normals"] = unit_normals(rng, H, W)
                r["normals"][2, 2] = 0.0
                r["edge"] = rng.choice(np.float32([0, 0.25, 0.5, 0.75, 1]), (H, W))
                save(root / "images" / f"{id_}.jpg", r["image"], quality=95)
                save(root / "normals" / f"{id_}.npy", r["normals"])
                save(root / "edge" / f"{id_}.npy", r["edge"])
            else:
                r["normals"] = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
                r["edge"] = rng.choice(np.uint8([0, 127, 128, 255]), (H, W))
                save(root / "images" / f"{id_}.png", r["image"])
                save(root / "normals" / f"{id_}.png", r["normals"])
                save(root / "edge" / f"{id_}.png", r["edge"])
            save(root / "segmentation" / f"{id_}.png", seg)
            save(root / "depth" / f"{id_}.npy", depth)
            raw[id_] = r
    return raw


def save_split(path: Path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def anno_struct(objects):
    """A Pascal-Part `anno` struct: objects = [(class name, class index, mask, [(part, mask), ...])]."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, (name, ind, mask, parts) in enumerate(objects):
        p = np.zeros((0, 0))
        if parts:
            p = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (pname, pmask) in enumerate(parts):
                p[0, j] = (pname, pmask.astype(np.uint8))
        objs[0, k] = (name, np.array([[ind]], dtype=np.uint8), mask.astype(np.uint8), p)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("img", objs)
    return {"anno": anno}


def rows(H, W, r0, r1, c0=0, c1=None):
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


PASCAL_IDS = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}


def write_pascal(root: Path, H=10, W=12):
    """A hand-made PASCAL_MT tree; returns {id: raw arrays as written}."""
    rng = np.random.default_rng(1)
    raw = {}
    for split, ids in PASCAL_IDS.items():
        save_split(root / "ImageSets" / "Context" / f"{split}.txt", ids)
    for k, id_ in enumerate(PASCAL_IDS["train"] + PASCAL_IDS["val"]):
        labelmap = np.ones((H, W), np.uint16)                       # class 1: not in the normals list
        labelmap[:, 6:] = 3                                         # class 3: in the list
        labelmap[2:5, 2:5] = 400 + k                                # 400..402: not in the list
        sem = rng.integers(0, 21, (H, W)).astype(np.uint8)
        sem[0, :3] = [0, 20, 255]
        r = {"image": rng.integers(0, 256, (H, W, 3)).astype(np.uint8), "labelmap": labelmap, "sem": sem,
             "normals": rng.integers(0, 256, (H, W, 3)).astype(np.uint8),
             "sal": rng.choice(np.uint8([0, 127, 128, 255]), (H, W))}
        save(root / "JPEGImages" / f"{id_}.jpg", r["image"], quality=95)
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(root / "pascal-context" / "trainval" / f"{id_}.mat", {"LabelMap": labelmap})
        save(root / "semseg" / "pascal-context" / f"{id_}.png", sem)
        save(root / "normals_distill" / f"{id_}.png", r["normals"])
        save(root / "sal_distill" / f"{id_}.png", r["sal"])
        raw[id_] = r
    # id 1 also has a VOC12 segmentation, which takes precedence
    raw["2008_000001"]["voc"] = np.full((H, W), 7, np.uint8)
    save(root / "semseg" / "VOC12" / "2008_000001.png", raw["2008_000001"]["voc"])
    # human parts: a person with parts (later parts paint over earlier ones), a person without parts,
    # a dog with a "head" part (not a person: ignored); a dog only; a person without any part
    person = rows(H, W, 0, 9)
    objects = {
        "2008_000001": [("person", 15, person, [("hair", rows(H, W, 0, 1)), ("head", rows(H, W, 0, 2)),
                                                ("neck", rows(H, W, 1, 2, 0, 2)), ("torso", rows(H, W, 2, 5)),
                                                ("lhand", rows(H, W, 5, 6, 0, 3)), ("ruleg", rows(H, W, 6, 8)),
                                                ("lfoot", rows(H, W, 8, 9))]),
                        ("person", 15, rows(H, W, 9, 10), []),
                        ("dog", 12, rows(H, W, 9, 10), [("head", rows(H, W, 9, 10))])],
        "2008_000002": [("dog", 12, person, [("head", rows(H, W, 0, 2))])],
        "2008_000003": [("person", 15, person, [])],
    }
    (root / "human_parts").mkdir(parents=True, exist_ok=True)
    for id_, objs in objects.items():
        savemat(root / "human_parts" / f"{id_}.mat", anno_struct(objs))
    return raw


def tarball(src_dir: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src_dir, arcname=arcname)
    return dest


# ----------------------------------------------------------------------------------------------------
# NYUD

def test_nyud_packaging_b_by_hand_values(tmp_path):
    root = tmp_path / "NYUD_MT"
    raw = write_nyud(root, "B")
    ds = D.NYUD(tmp_path, "train")                                  # a data root holding NYUD_MT/
    assert ds.packaging == "B" and ds.root == root and len(ds) == 2
    for i, id_ in enumerate(["a1", "a2"]):
        s, r = ds[i], raw[id_]
        assert set(s) == {"image", "semseg", "depth", "normals", "edge", "meta"}
        assert s["meta"] == {"id": id_, "size": (6, 8)}
        assert torch.equal(s["image"], decoded(root / "images" / f"{id_}.jpg"))
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 6, 8)
        want_sem = np.where(r["seg"] == 0, 255, r["seg"].astype(np.int64) - 1)
        assert s["semseg"].dtype == torch.int64 and torch.equal(s["semseg"], torch.from_numpy(want_sem))
        assert s["semseg"][0, :3].tolist() == [255, 0, 39]
        assert torch.equal(s["depth"], torch.from_numpy(r["depth"])[None]) and s["depth"][0, 1, 1] == 0
        assert torch.equal(s["normals"], torch.from_numpy(r["normals"]).permute(2, 0, 1))
        assert torch.equal(s["normals"][:, 2, 2], torch.zeros(3))
        assert torch.equal(s["edge"], torch.from_numpy((r["edge"] > 0.5).astype(np.float32))[None])
        assert s["edge"].sum() < (r["edge"] >= 0.5).sum()          # 0.5 itself is not an edge


def test_nyud_packaging_c_by_hand_values(tmp_path):
    raw = write_nyud(tmp_path / "NYUDv2", "C")
    ds = D.NYUD(tmp_path, "val")
    assert ds.packaging == "C" and len(ds) == 1
    s, r = ds[0], raw["b1"]
    assert torch.equal(s["image"], torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255)
    want_n = 2.0 * r["normals"].astype(np.float64) / 255.0 - 1.0
    torch.testing.assert_close(s["normals"], torch.from_numpy(want_n).permute(2, 0, 1).float(), rtol=0, atol=1e-6)
    assert s["normals"].dtype == torch.float32
    want_edge = np.select([r["edge"] <= 127, r["edge"] >= 128], [0.0, 1.0])   # 127/255 < 0.5 < 128/255
    assert torch.equal(s["edge"], torch.from_numpy(want_edge).float()[None])
    assert torch.equal(s["semseg"], torch.from_numpy(np.where(r["seg"] == 0, 255, r["seg"].astype(np.int64) - 1)))
    assert torch.equal(s["depth"][0], torch.from_numpy(r["depth"]))


def test_nyud_reads_only_the_requested_tasks(tmp_path):
    write_nyud(tmp_path, "B")
    (tmp_path / "depth" / "a2.npy").unlink()
    s = D.NYUD(tmp_path, "train", tasks=["semseg", "edge"])[1]
    assert set(s) == {"image", "semseg", "edge", "meta"}
    with pytest.raises(DatasetError, match=r"id 'a2' listed in .*train\.txt has no depth file: expected .*a2\.npy"):
        D.NYUD(tmp_path, "train")


def synthetic_tree(root: Path, size=(24, 32), n=(3, 2)):
    """SyntheticRooms exported in packaging B; returns the two source datasets."""
    src = {split: SyntheticRooms(split, k, size=size, seed=3) for split, k in zip(("train", "val"), n)}
    for split, ds in src.items():
        D.export_nyud_layout(ds, root, split)
    return src


def test_export_nyud_layout_round_trips_through_the_real_loader(tmp_path):
    src = synthetic_tree(tmp_path / "NYUD_MT")
    for split in ("train", "val"):
        ds = D.NYUD(tmp_path, split)
        assert ds.packaging == "B" and len(ds) == len(src[split])
        for i in range(len(ds)):
            got, want = ds[i], src[split][i]
            assert got["meta"] == want["meta"]
            for task in ("semseg", "depth", "normals", "edge"):
                assert torch.equal(got[task], want[task]), task
            assert torch.equal(got["image"], decoded(ds._file("image", want["meta"]["id"])))
            assert (got["image"] - want["image"]).abs().mean() < 0.02           # JPEG, quality 95
    assert D.validate_tree("nyud", tmp_path / "NYUD_MT", full=True) == {"train": 3, "val": 2}


class FakeDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_export_rejects_what_packaging_b_cannot_hold(tmp_path):
    good = fake_sample(4, 5, seed=0, valid_only=True)
    good["semseg"] = good["semseg"].clamp(max=39)
    D.export_nyud_layout(FakeDataset([good]), tmp_path / "ok", "train")
    bad_sem = {**good, "semseg": torch.full((4, 5), 40)}
    with pytest.raises(ValueError, match="semseg must be 0..39 or 255.*40"):
        D.export_nyud_layout(FakeDataset([bad_sem]), tmp_path / "x")
    with pytest.raises(ValueError, match=r"untransformed samples \(image in \[0, 1\]\)"):
        D.export_nyud_layout(FakeDataset([D.normalize(good)]), tmp_path / "x")
    with pytest.raises(ValueError, match="edge maps must be 0 / 1"):
        D.export_nyud_layout(FakeDataset([{**good, "edge": torch.full((1, 4, 5), 255.0)}]), tmp_path / "x")


# ----------------------------------------------------------------------------------------------------
# PASCAL-Context

def oracle_laplacian_nonzero(lm):
    """4-neighbour Laplacian with reflect-101 borders, one pixel at a time."""
    H, W = lm.shape
    ref = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    out = np.zeros((H, W), bool)
    for i in range(H):
        for j in range(W):
            s = sum(int(lm[ref(i + a, H), ref(j + b, W)]) for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1)))
            out[i, j] = s - 4 * int(lm[i, j]) != 0
    return out


def oracle_thin(mask):
    """Guo-Hall thinning written from the paper's 1-based formulation, one pixel at a time."""
    img = np.asarray(mask, bool).copy()
    H, W = img.shape
    offsets = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]  # x1..x8
    while True:
        changed = False
        for sub in (1, 2):
            dels = []
            for i in range(H):
                for j in range(W):
                    if not img[i, j]:
                        continue
                    nb = [0 <= i + a < H and 0 <= j + b < W and bool(img[i + a, j + b]) for a, b in offsets]
                    x = lambda k: nb[(k - 1) % 8]
                    c = sum(1 for k in range(1, 5) if not x(2 * k - 1) and (x(2 * k) or x(2 * k + 1)))
                    n1 = sum(x(2 * k - 1) or x(2 * k) for k in range(1, 5))
                    n2 = sum(x(2 * k) or x(2 * k + 1) for k in range(1, 5))
                    g3 = (not ((x(2) or x(3) or not x(8)) and x(1)) if sub == 1
                          else not ((x(6) or x(7) or not x(4)) and x(5)))
                    if c == 1 and 2 <= min(n1, n2) <= 3 and g3:
                        dels.append((i, j))
            for i, j in dels:
                img[i, j] = False
            changed |= bool(dels)
        if not changed:
            return img


def test_pascal_values_by_hand(tmp_path):
    raw = write_pascal(tmp_path / "PASCAL_MT")
    ds = D.PASCALContext(tmp_path, "train")
    assert len(ds) == 2 and ds.tasks == ("semseg", "parts", "sal", "normals", "edge")
    s1, s2 = ds[0], ds[1]
    r1, r2 = raw["2008_000001"], raw["2008_000002"]
    assert s1["meta"] == {"id": "2008_000001", "size": (10, 12)}
    assert torch.equal(s1["image"], decoded(tmp_path / "PASCAL_MT" / "JPEGImages" / "2008_000001.jpg"))
    # semseg: VOC12 first, else pascal-context; 255 kept
    assert torch.equal(s1["semseg"], torch.full((10, 12), 7))
    assert s2["semseg"].dtype == torch.int64 and torch.equal(s2["semseg"], torch.from_numpy(r2["sem"].astype(np.int64)))
    assert s2["semseg"][0, :3].tolist() == [0, 20, 255]
    # saliency: /255 > 0.5
    assert torch.equal(s1["sal"], torch.from_numpy((r1["sal"] >= 128).astype(np.float32))[None])
    # normals: 2x/255 - 1 where LabelMap holds a listed class (3), zero on classes 1 and 400
    dec = 2.0 * r1["normals"].astype(np.float64) / 255.0 - 1.0
    want = np.where(np.isin(r1["labelmap"], [3])[..., None], dec, 0.0)
    torch.testing.assert_close(s1["normals"], torch.from_numpy(want).permute(2, 0, 1).float(), rtol=0, atol=1e-6)
    assert (s1["normals"][:, :, :6] == 0).all() and (s1["normals"][:, :, 6:].abs().sum(0) > 0).all()
    # edges: thinned non-zero Laplacian of LabelMap, against loop oracles
    want_edge = oracle_thin(oracle_laplacian_nonzero(r1["labelmap"]))
    assert torch.equal(s1["edge"], torch.from_numpy(want_edge.astype(np.float32))[None])
    assert 0 < want_edge.sum() < oracle_laplacian_nonzero(r1["labelmap"]).sum()   # thinning did work
    # parts: 1 head (hair, head), 2 torso (neck paints over head), 4 lower arm (lhand), 5 upper leg,
    # 6 lower leg (lfoot), 0 elsewhere (the dog's "head" and the part-less person are not painted)
    want_parts = np.zeros((10, 12), np.int64)
    want_parts[0:2] = 1
    want_parts[1, 0:2] = 2
    want_parts[2:5] = 2
    want_parts[5, 0:3] = 4
    want_parts[6:8] = 5
    want_parts[8] = 6
    assert torch.equal(s1["parts"], torch.from_numpy(want_parts))
    assert torch.equal(s2["parts"], torch.full((10, 12), 255))             # only a dog
    assert torch.equal(D.PASCALContext(tmp_path, "val", tasks=["parts"])[0]["parts"], torch.full((10, 12), 255))


def test_pascal_task_subset_and_dtypes(tmp_path):
    write_pascal(tmp_path)
    s = D.PASCALContext(tmp_path, "val", tasks=("sal", "edge"))[0]
    assert set(s) == {"image", "sal", "edge", "meta"}
    assert s["sal"].shape == s["edge"].shape == (1, 10, 12) and s["edge"].dtype == torch.float32
    assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}


def test_pascal_under_the_invpt_folder_name_is_found_and_read_alike(tmp_path):
    # ATRC / InvPT's PASCALContext.tar.gz extracts to PASCALContext/ with PASCAL_MT's inner layout
    write_pascal(tmp_path / "mt" / "PASCAL_MT")
    write_pascal(tmp_path / "invpt" / "PASCALContext")
    for split in ("train", "val"):
        mt, invpt = D.PASCALContext(tmp_path / "mt", split), D.PASCALContext(tmp_path / "invpt", split)
        assert invpt.root == tmp_path / "invpt" / "PASCALContext" and invpt.ids == mt.ids
        for i in range(len(mt)):
            assert_samples_equal(invpt[i], mt[i])                   # every task, value for value
    data = tmp_path / "invpt"
    assert D.prepare_dataset("pascal", data, download_ok=False) == data / "PASCALContext"   # no download
    s = D.build_dataset("pascal", "val", root=data, size=(16, 16), download=False)[0]
    assert s["image"].shape == (3, 16, 16) and s["meta"] == {"id": "2008_000003", "size": (10, 12)}
    shutil.copytree(tmp_path / "mt" / "PASCAL_MT", data / "PASCAL_MT")
    assert D.PASCALContext(data, "val").root == data / "PASCAL_MT"   # both present: the first name wins


# ----------------------------------------------------------------------------------------------------
# Thinning

def test_thin_matches_the_documented_scikit_image_example():
    # input and output of the example in scikit-image's documentation of morphology.thin
    square = np.zeros((7, 7), bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    want = np.zeros((7, 7), bool)
    want[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True
    assert np.array_equal(thin(square), want)


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 9), st.integers(1, 9), st.floats(0.2, 0.95), st.integers(0, 2**31 - 1))
@example(2, 2, 1.0, 0)
@example(3, 9, 1.0, 0)
def test_thin_equals_the_loop_oracle_and_is_a_thinning(H, W, p, seed):
    mask = np.random.default_rng(seed).random((H, W)) < p
    got = thin(mask)
    assert np.array_equal(got, oracle_thin(mask))
    assert not (got & ~mask).any()                                  # only removes pixels
    assert np.array_equal(thin(got), got)                         # nothing left to remove


def test_thin_keeps_one_pixel_lines_and_thins_bands():
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert np.array_equal(thin(line), line)
    band = np.zeros((6, 12), bool)
    band[1:4, 1:11] = True                                          # three pixels thick
    thinned = thin(band)
    assert (thinned[:, 3:9].sum(0) == 1).all()                      # one pixel thick away from the ends
    with pytest.raises(ValueError, match="2-D binary image"):
        thin(np.zeros((2, 2, 2)))


# ----------------------------------------------------------------------------------------------------
# Bad input

def test_missing_root_split_file_and_empty_split(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)nope does not exist.*--dataset synthetic") as e:
        D.NYUD(tmp_path / "nope", "train")
    assert "NYUD_MT.tgz" in str(e.value) and "gt_sets" in str(e.value)
    with pytest.raises(DatasetError, match=r"holds no ImageSets/ folder"):
        D.PASCALContext(tmp_path, "train")
    write_nyud(tmp_path, "B")
    with pytest.raises(DatasetError, match=r"split file .*gt_sets/test\.txt is missing"):
        D.NYUD(tmp_path, "test")
    save_split(tmp_path / "gt_sets" / "empty.txt", [])
    with pytest.raises(DatasetError, match=r"empty\.txt lists no ids"):
        D.NYUD(tmp_path, "empty")
    save_split(tmp_path / "gt_sets" / "ghost.txt", ["ghost"])
    with pytest.raises(DatasetError, match=r"id 'ghost' listed in .*ghost\.txt has no image.*ghost\.jpg"):
        D.NYUD(tmp_path, "ghost")


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    write_nyud(tmp_path, "B")
    jpg = tmp_path / "images" / "a1.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    with pytest.raises(DatasetError, match=r"cannot read .*a1\.jpg \(expected an RGB image\)"):
        D.NYUD(tmp_path, "train")[0]
    (tmp_path / "images" / "a2.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"cannot read .*a2\.jpg"):
        D.NYUD(tmp_path, "train")[1]
    (tmp_path / "depth" / "b1.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match=r"cannot read .*b1\.npy"):
        D.NYUD(tmp_path, "val")[0]


def test_every_unreadable_file_is_named_in_one_message_before_training(tmp_path):
    """validate_tree(full=True), which prepare_dataset runs on every tree it finds, reads every image and
    label file in full: a JPEG cut short and a damaged .npy, anywhere in either split, are both named."""
    synthetic_tree(tmp_path / "NYUD_MT", n=(4, 3))
    tree = tmp_path / "NYUD_MT"
    jpg, npy = tree / "images" / "synthetic-train-s3-000002.jpg", tree / "normals" / "synthetic-val-s3-000001.npy"
    jpg.write_bytes(jpg.read_bytes()[:-200])           # a truncated JPEG: its header still reads
    npy.write_bytes(npy.read_bytes()[:1000])
    with pytest.raises(DatasetError) as error:
        D.prepare_dataset("nyud", tmp_path, download_ok=False)
    message = str(error.value)
    assert "2 of the 35 files" in message and str(jpg) in message and str(npy) in message, message
    assert "truncated" in message, message
    assert D.NYUD(tmp_path, "train")[0], "the first samples still load: only the full read finds these"


def test_the_verdict_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    synthetic_tree(tmp_path / "NYUD_MT", n=(3, 2))
    reads = []
    original = D._try_decode
    monkeypatch.setattr(D, "_try_decode", lambda path: reads.append(path) or original(path))
    D.validate_tree("nyud", tmp_path / "NYUD_MT", full=True)
    assert len(reads) == 25 and (tmp_path / "NYUD_MT" / D.VERDICT).is_file()    # 5 ids x (image + 4 labels)
    D.prepare_dataset("nyud", tmp_path, download_ok=False)
    assert len(reads) == 25, "the same, unchanged files: not read again"
    depth = tmp_path / "NYUD_MT" / "depth" / "synthetic-val-s3-000000.npy"
    os.utime(depth, ns=(depth.stat().st_atime_ns, depth.stat().st_mtime_ns + 1))
    D.validate_tree("nyud", tmp_path / "NYUD_MT", full=True)
    assert len(reads) == 50, "one file changed: everything is read again"
    depth.write_bytes(depth.read_bytes()[:-8])         # damaged after a passing verdict: found
    with pytest.raises(DatasetError, match=r"(?s)1 of the 25 files .*val-s3-000000\.npy: cannot read it"):
        D.validate_tree("nyud", tmp_path / "NYUD_MT", full=True)


def test_a_read_only_tree_is_checked_every_time(tmp_path, monkeypatch):
    synthetic_tree(tmp_path / "NYUD_MT", n=(1, 1))
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only")))
    assert D.validate_tree("nyud", tmp_path / "NYUD_MT", full=True) == {"train": 1, "val": 1}
    assert not (tmp_path / "NYUD_MT" / D.VERDICT).exists()


@pytest.mark.parametrize("kind, value, message", [
    ("seg", 41, r"segmentation values must lie in 0\.\.40.*found 0\.\.41"),
    ("depth", -1.0, r"depth must be >= 0 metres"),
    ("depth", np.nan, r"contains NaN or infinite values"),
    ("normals", 1.5, r"normals must be unit vectors .*1\.500"),
])
def test_labels_out_of_range_name_the_file(tmp_path, kind, value, message):
    raw = write_nyud(tmp_path, "B")
    arr = raw["a1"][kind].copy()
    arr.flat[5] = value
    path = {"seg": "segmentation/a1.png", "depth": "depth/a1.npy", "normals": "normals/a1.npy"}[kind]
    save(tmp_path / path, arr)
    with pytest.raises(DatasetError, match=rf"{path}: {message}"):
        D.NYUD(tmp_path, "train")[0]


def test_shapes_that_disagree_name_both_files(tmp_path):
    write_nyud(tmp_path, "B")
    save(tmp_path / "depth" / "a1.npy", np.ones((6, 9), np.float32))
    with pytest.raises(DatasetError, match=r"depth/a1\.npy: depth has size \(6, 9\), but the image .*a1\.jpg is \(6, 8\)"):
        D.NYUD(tmp_path, "train")[0]
    with pytest.raises(DatasetError, match=r"depth/a1\.npy: depth has size \(6, 9\)"):
        D.validate_tree("nyud", tmp_path, full=True)                # found from the headers as well
    save(tmp_path / "normals" / "a2.npy", np.zeros((6, 8, 2), np.float32))
    with pytest.raises(DatasetError, match=r"normals/a2\.npy: expected an array of shape HW3, got \(6, 8, 2\)"):
        D.NYUD(tmp_path, "train")[1]
    save(tmp_path / "segmentation" / "b1.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"b1\.png: expected a single-channel PNG, got PIL mode 'RGB'"):
        D.NYUD(tmp_path, "val")[0]


def test_pascal_bad_labels_name_the_file(tmp_path):
    write_pascal(tmp_path)
    save(tmp_path / "semseg" / "pascal-context" / "2008_000002.png", np.full((10, 12), 30, np.uint8))
    with pytest.raises(DatasetError, match=r"2008_000002\.png: semseg values must be 0\.\.20 or 255, found \[30\]"):
        D.PASCALContext(tmp_path, "train", tasks=["semseg"])[1]
    savemat(tmp_path / "human_parts" / "2008_000002.mat",
            anno_struct([("person", 15, rows(10, 12, 0, 2), [("tail", rows(10, 12, 0, 1))])]))
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: unknown person part 'tail'"):
        D.PASCALContext(tmp_path, "train", tasks=["parts"])[1]
    savemat(tmp_path / "human_parts" / "2008_000002.mat",
            anno_struct([("person", 15, rows(10, 12, 0, 2), [("head", rows(9, 12, 0, 1))])]))
    with pytest.raises(DatasetError, match=r"part 'head' mask has shape \(9, 12\), the image is \(10, 12\)"):
        D.PASCALContext(tmp_path, "train", tasks=["parts"])[1]
    savemat(tmp_path / "human_parts" / "2008_000002.mat", {"other": np.zeros(2)})
    with pytest.raises(DatasetError, match=r"cannot read .*2008_000002\.mat \(expected a Pascal-Part annotation"):
        D.PASCALContext(tmp_path, "train", tasks=["parts"])[1]
    savemat(tmp_path / "pascal-context" / "trainval" / "2008_000003.mat", {"LabelMap": np.ones((10, 11))})
    with pytest.raises(DatasetError, match=r"2008_000003\.mat: edge has size \(10, 11\), but the image .*\(10, 12\)"):
        D.PASCALContext(tmp_path, "val", tasks=["edge"])[0]
    with pytest.raises(DatasetError, match=r"2008_000003\.png: normals have size \(10, 12\), but its LabelMap "
                                           r".*2008_000003\.mat has \(10, 11\)"):
        D.PASCALContext(tmp_path, "val", tasks=["normals"])[0]
    savemat(tmp_path / "pascal-context" / "trainval" / "2008_000003.mat", {"Labels": np.ones((10, 12))})
    with pytest.raises(DatasetError, match=r"2008_000003\.mat \(expected a \.mat file with key 'LabelMap'\)"):
        D.PASCALContext(tmp_path, "val", tasks=["normals"])[0]
    savemat(tmp_path / "pascal-context" / "trainval" / "2008_000003.mat", {"LabelMap": np.ones((2, 10, 12))})
    with pytest.raises(DatasetError, match=r"2008_000003\.mat: LabelMap must be 2-D, got shape \(2, 10, 12\)"):
        D.PASCALContext(tmp_path, "val", tasks=["edge"])[0]


def test_bad_arguments_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match=r"name must be one of \['nyud', 'pascal', 'synthetic'\], got 'coco'"):
        D.build_dataset("coco", "train")
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val', got 'test'"):
        D.build_dataset("synthetic", "test")
    with pytest.raises(ValueError, match=r"tasks for 'nyud' must be a non-empty subset of .*'sal'"):
        D.NYUD(tmp_path, "train", tasks=["semseg", "sal"])
    with pytest.raises(ValueError, match=r"num_samples must be >= 1"):
        D.build_dataset("synthetic", "train", num_samples=0)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        D.build_dataset("synthetic", "train", size=(0, 5))
    with pytest.raises(ValueError, match=r"name must be one of \['nyud', 'pascal'\]"):
        D.prepare_dataset("synthetic")
    with pytest.raises(ValueError, match=r"eval pad size \(4, 4\) is smaller than sample 'x' of size \(5, 6\)"):
        D.EvalTransform((4, 4))(fake_sample(5, 6, seed=0))


# ----------------------------------------------------------------------------------------------------
# Data root, downloads, extraction

def test_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KEM_MTL_DATA", raising=False)
    assert D.resolve_data_root() == tmp_path / "home" / ".cache" / "kem_mtl"
    monkeypatch.setenv("KEM_MTL_DATA", str(tmp_path / "env"))
    assert D.resolve_data_root() == tmp_path / "env"
    assert D.resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    write_nyud(tmp_path / "env" / "NYUD_MT", "B")
    assert D.NYUD(None, "val").root == tmp_path / "env" / "NYUD_MT"   # root=None follows the same order


@pytest.fixture
def nyud_archive(tmp_path):
    """A packaging-B NYUD_MT.tgz of a few synthetic samples, and its file:// URL."""
    synthetic_tree(tmp_path / "src" / "NYUD_MT", size=(16, 20), n=(2, 1))
    (tmp_path / "served").mkdir()
    path = tarball(tmp_path / "src" / "NYUD_MT", tmp_path / "served" / "NYUD_MT.tgz", "NYUD_MT")
    return path, path.as_uri()


def test_download_extract_validate_and_clean_up(tmp_path, nyud_archive):
    archive, url = nyud_archive
    data = tmp_path / "data"
    with pytest.warns(UserWarning, match=r"train split .* has 2 ids, the official split has 795"):
        path = D.prepare_dataset("nyud", data, url=url)
    assert path == data / "NYUD_MT" and sorted(os.listdir(data)) == ["NYUD_MT"]  # no archive, .part or temp
    got, want = D.NYUD(data, "train"), D.NYUD(tmp_path / "src", "train")
    assert [got[i]["meta"] for i in range(2)] == [want[i]["meta"] for i in range(2)]
    assert all(torch.equal(got[i]["semseg"], want[i]["semseg"]) for i in range(2))
    # present and valid: no download (an opener that would fail proves it), also when the root given
    # is the dataset folder itself
    assert D.prepare_dataset("nyud", data, url="file:///nonexistent", opener=fail_if_called) == path
    assert D.prepare_dataset("nyud", path, opener=fail_if_called) == path


def fail_if_called(url):
    raise AssertionError(f"no download expected, got a request for {url}")


def test_a_manual_archive_is_extracted_without_downloading(tmp_path, nyud_archive):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(nyud_archive[0], data / "NYUD_MT.tgz")
    path = D.prepare_dataset("nyud", data, opener=fail_if_called)
    assert path == data / "NYUD_MT" and sorted(os.listdir(data)) == ["NYUD_MT", "NYUD_MT.tgz"]  # user's file kept


@pytest.mark.parametrize("record", [{"size": None, "sha256": "0" * 64}, {"size": 1, "sha256": None}])
def test_checksum_or_size_mismatch_leaves_nothing_behind(tmp_path, nyud_archive, monkeypatch, record):
    monkeypatch.setitem(D.CHECKSUMS, "NYUD_MT.tgz", record)
    data = tmp_path / "data"
    mismatch = r"download of file://.*NYUD_MT\.tgz: (sha256 .* does not match|size \d+ bytes, expected 1)"
    with pytest.raises(DatasetError, match=mismatch):
        D.prepare_dataset("nyud", data, url=nyud_archive[1])
    assert os.listdir(data) == []


def test_a_recorded_checksum_that_matches_is_accepted(tmp_path, nyud_archive, monkeypatch):
    import hashlib
    blob = nyud_archive[0].read_bytes()
    monkeypatch.setitem(D.CHECKSUMS, "NYUD_MT.tgz", {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
    assert D.prepare_dataset("nyud", tmp_path / "data", url=nyud_archive[1]).name == "NYUD_MT"


def evil_tarball(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("NYUD_MT/gt_sets/train.txt")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"a1\n"))
        bad = tarfile.TarInfo({"dotdot": "NYUD_MT/../../escaped.txt", "absolute": "/tmp/kem_mtl_escaped.txt",
                               "symlink": "NYUD_MT/link"}[kind])
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../../outside"
            tar.addfile(bad)
        else:
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_members_escaping_the_target_are_refused(tmp_path, kind):
    archive = evil_tarball(tmp_path / "evil.tgz", kind)
    target = tmp_path / "a" / "b" / "target"
    target.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"member .* would be written outside"):
        D.safe_extract(archive, target)
    assert os.listdir(target) == [] and not (tmp_path / "a" / "escaped.txt").exists()
    assert not Path("/tmp/kem_mtl_escaped.txt").exists()
    data = tmp_path / "data"                                        # through prepare_dataset: nothing left
    with pytest.raises(DatasetError, match=r"(?s)nyud: .*would be written outside.*--dataset synthetic"):
        D.prepare_dataset("nyud", data, url=archive.as_uri())
    assert os.listdir(data) == [] and not (tmp_path / "escaped.txt").exists()


def test_corrupt_or_wrong_archives_are_rejected_and_removed(tmp_path):
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"\x1f\x8b this is not gzip data" * 10)
    with pytest.raises(DatasetError, match=r"cannot extract .*NYUD_MT\.tgz"):
        D.prepare_dataset("nyud", tmp_path / "d1", url=garbage.as_uri())
    assert os.listdir(tmp_path / "d1") == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hello")
    wrong = tarball(tmp_path / "other", tmp_path / "wrong.tgz", "other")
    with pytest.raises(DatasetError, match=r"holds no gt_sets/ folder"):
        D.prepare_dataset("nyud", tmp_path / "d2", url=wrong.as_uri())
    assert os.listdir(tmp_path / "d2") == []


class BrokenStream(io.BytesIO):
    """Serves the first `fail_at` bytes, then raises `error` (a dropped connection, Ctrl-C)."""
    def __init__(self, data, fail_at, error):
        super().__init__(data)
        self.fail_at, self.error = fail_at, error

    def read(self, n=-1):
        if self.tell() >= self.fail_at:
            raise self.error
        return super().read(self.fail_at - self.tell())


def test_interrupted_download_leaves_nothing_and_a_retry_succeeds(tmp_path, nyud_archive):
    blob, data = nyud_archive[0].read_bytes(), tmp_path / "data"
    opener = lambda url: BrokenStream(blob, len(blob) // 2, ConnectionResetError("connection reset by peer"))
    with pytest.raises(DatasetError, match=r"downloading file://.* failed: ConnectionResetError"):
        D.prepare_dataset("nyud", data, url=nyud_archive[1], opener=opener)
    assert os.listdir(data) == []
    assert D.prepare_dataset("nyud", data, url=nyud_archive[1]) == data / "NYUD_MT"


def test_ctrl_c_during_a_download_removes_the_part_file(tmp_path, nyud_archive):
    blob = nyud_archive[0].read_bytes()
    dest = tmp_path / "NYUD_MT.tgz"
    with pytest.raises(KeyboardInterrupt):
        D.download("file:///x", dest, opener=lambda url: BrokenStream(blob, 100, KeyboardInterrupt()))
    assert sorted(os.listdir(tmp_path)) == ["served", "src"]           # no NYUD_MT.tgz(.part)


def test_offline_message_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        D.prepare_dataset("pascal", data)
    msg = str(e.value)
    for part in (D.SOURCES["pascal"]["url"], "URLError", f"{data}/PASCAL_MT/", "ImageSets/Context/{train,val}.txt",
                 "PASCAL_MT/, PASCALContext/", f"put PASCAL_MT.tgz into {data}/", "--data-dir", "KEM_MTL_DATA",
                 "--dataset synthetic"):
        assert part in msg, part
    assert os.listdir(data) == []
    with pytest.raises(DatasetError, match=r"(?s)not under .* downloading is switched off.*--dataset synthetic"):
        D.build_dataset("nyud", "train", root=tmp_path / "empty", download=False)


def gdown_fake(behaviour):
    """A stand-in for gdown.download that accepts exactly the installed gdown's arguments (a call the
    real one would refuse fails here too), records the call and then does `behaviour(kwargs)`."""
    import inspect

    import gdown
    signature, calls = inspect.signature(gdown.download), []

    def fake(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return behaviour(calls[-1])
    return fake, calls


def test_nyud_download_goes_through_gdown_and_cleans_up(tmp_path, monkeypatch):
    import gdown

    def fail(kwargs):                                               # gdown keeps partial bytes beside output
        Path(kwargs["output"] + "x1y2z3w4.part").write_bytes(b"half a tarball")
        raise ConnectionError("no route to drive")
    fake, calls = gdown_fake(fail)
    monkeypatch.setattr(gdown, "download", fake)
    with pytest.raises(DatasetError) as e:
        D.prepare_dataset("nyud", tmp_path)
    assert [c["id"] for c in calls] == ["14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw"]
    assert "14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw" in str(e.value)
    assert "ConnectionError: no route to drive" in str(e.value) and "NYUD_MT.tgz" in str(e.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(gdown, "download", gdown_fake(lambda kwargs: None)[0])
    with pytest.raises(DatasetError, match="gdown could not download"):
        D.prepare_dataset("nyud", tmp_path)
    assert os.listdir(tmp_path) == []


def test_nyud_download_through_gdown_succeeds(tmp_path, monkeypatch, nyud_archive):
    import gdown

    def succeed(kwargs):                                            # what gdown does on success
        shutil.copy(nyud_archive[0], kwargs["output"])
        return kwargs["output"]
    monkeypatch.setattr(gdown, "download", gdown_fake(succeed)[0])
    data = tmp_path / "data"
    assert D.prepare_dataset("nyud", data) == data / "NYUD_MT" and os.listdir(data) == ["NYUD_MT"]


def test_pascal_end_to_end_from_a_file_url(tmp_path):
    write_pascal(tmp_path / "src" / "PASCAL_MT")
    archive = tarball(tmp_path / "src" / "PASCAL_MT", tmp_path / "PASCAL_MT.tgz", "PASCAL_MT")
    assert D.prepare_dataset("pascal", tmp_path / "data", url=archive.as_uri()) == tmp_path / "data" / "PASCAL_MT"
    s = D.build_dataset("pascal", "val", root=tmp_path / "data", size=(16, 16))[0]
    assert s["image"].shape == (3, 16, 16) and s["meta"] == {"id": "2008_000003", "size": (10, 12)}
    assert (s["parts"] == 255).all() and (s["semseg"][10:] == 255).all() and (s["edge"][:, :, 12:] == 255).all()


# ----------------------------------------------------------------------------------------------------
# Transforms

def fake_sample(H, W, seed, valid_only=False):
    """Every task, random; unless valid_only, one ignore / invalid pixel per map."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(3, H, W, generator=g)
    n = n / n.norm(dim=0, keepdim=True)
    s = {"image": torch.rand(3, H, W, generator=g), "semseg": torch.randint(0, 5, (H, W), generator=g),
         "parts": torch.randint(0, 7, (H, W), generator=g), "depth": torch.rand(1, H, W, generator=g) * 5 + 0.5,
         "normals": n, "edge": torch.randint(0, 2, (1, H, W), generator=g).float(),
         "sal": torch.randint(0, 2, (1, H, W), generator=g).float(), "meta": {"id": "x", "size": (H, W)}}
    if not valid_only:
        s["semseg"][0, 0] = s["parts"][-1, -1] = 255
        s["depth"][0, 0, -1] = 0.0
        s["normals"][:, -1, 0] = 0.0
    return s


def assert_samples_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) if k == "meta" else torch.equal(a[k], b[k]), k


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_flip_twice_is_the_identity_and_flip_negates_normals_x(H, W, seed):
    s = fake_sample(H, W, seed)
    f = D.hflip(s)
    assert_samples_equal(D.hflip(f), s)
    for k in ("image", "semseg", "parts", "depth", "edge", "sal"):
        assert torch.equal(f[k], s[k].flip(-1)), k
    assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(f["normals"][1:], s["normals"][1:].flip(-1))
    torch.testing.assert_close(f["normals"].norm(dim=0), s["normals"].norm(dim=0).flip(-1), rtol=0, atol=0)


def test_scaling_by_two_repeats_labels_and_halves_depth():
    s = fake_sample(3, 4, seed=1)
    up = D.rescale(s, 2.0)
    rep = lambda x: x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    for k in ("semseg", "parts", "edge", "sal"):
        assert torch.equal(up[k], rep(s[k])) and up[k].dtype == s[k].dtype, k
    assert torch.equal(up["depth"], rep(s["depth"]) / 2)            # an image twice as large: twice as close
    assert torch.equal(up["image"], F.interpolate(s["image"][None], scale_factor=2, mode="bilinear")[0])
    invalid = rep((s["normals"] == 0).all(0))
    assert (up["normals"][:, invalid] == 0).all()                   # the invalid pixel stays invalid
    torch.testing.assert_close(up["normals"].norm(dim=0)[~invalid], torch.ones(int((~invalid).sum())))
    down = D.rescale(fake_sample(4, 6, seed=2), 0.5)
    src = fake_sample(4, 6, seed=2)
    assert down["depth"].shape == (1, 2, 3) and torch.equal(down["depth"], src["depth"][:, 1::2, 1::2] / 0.5)


@settings(deadline=None, max_examples=40)
@given(st.integers(2, 10), st.integers(2, 10), st.floats(0.5, 2.0), st.integers(0, 2**31 - 1))
def test_scaled_normals_are_unit_or_exactly_zero(H, W, scale, seed):
    s = fake_sample(H, W, seed)
    out = D.rescale(s, scale)["normals"]
    norm = out.norm(dim=0)
    valid = norm > 0
    torch.testing.assert_close(norm[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
    assert (out[:, ~valid] == 0).all()
    # oracle: bilinear resize, then divide by torch's own norm (rescale computes it another way)
    n = F.interpolate(s["normals"][None], size=out.shape[-2:], mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[:, valid], (n / n.norm(dim=0))[:, valid], rtol=0, atol=1e-6)


def test_padding_values_and_eval_transform():
    s = fake_sample(3, 4, seed=3)
    p = D.pad_to(s, (5, 7))
    for k, v in p.items():
        if k == "meta":
            assert v == s["meta"]
            continue
        assert v.shape[-2:] == (5, 7) and torch.equal(v[..., :3, :4], s[k]), k
    pad = torch.ones(5, 7, dtype=torch.bool)
    pad[:3, :4] = False
    for k in ("semseg", "parts"):
        assert (p[k][pad] == 255).all()
    for k in ("edge", "sal"):
        assert (p[k][0][pad] == 255).all()
    assert (p["depth"][0][pad] == 0).all() and (p["normals"][:, pad] == 0).all()
    e = D.EvalTransform((5, 7))
    state = torch.get_rng_state()
    out1, out2 = e(s), e(s)
    assert torch.equal(torch.get_rng_state(), state)                # no randomness drawn
    assert_samples_equal(out1, out2)
    assert (out1["image"][:, pad] == 0).all()                       # mean colour -> exactly 0
    mean, std = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(out1["image"][:, :3, :4], (s["image"] - mean) / std)


@st.composite
def crop_cases(draw):
    H, W = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    h, w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    return H, W, h, w, draw(st.integers(0, 2**31 - 1))


@settings(deadline=None, max_examples=40)
@given(crop_cases())
@example((3, 3, 8, 8, 0))
def test_train_transform_padding_is_ignored_in_every_map(case):
    H, W, h, w, seed = case
    s = fake_sample(H, W, seed, valid_only=True)
    out = D.TrainTransform((h, w), generator=torch.Generator().manual_seed(seed))(s)
    assert out["meta"] == s["meta"] and all(out[k].shape[-2:] == (h, w) for k in out if k != "meta")
    pad = out["semseg"] == 255                                      # the input had no ignore pixel
    for k in ("parts",):
        assert torch.equal(out[k] == 255, pad)
    for k in ("edge", "sal"):
        assert torch.equal(out[k][0] == 255, pad)
    assert torch.equal(out["depth"][0] == 0, pad) and torch.equal((out["normals"] == 0).all(0), pad)
    assert (out["image"][:, pad] == 0).all()
    torch.testing.assert_close(out["normals"][:, ~pad].norm(dim=0), torch.ones(int((~pad).sum())), rtol=0, atol=1e-5)


def test_train_crop_is_a_window_of_the_input_possibly_mirrored():
    s = fake_sample(6, 7, seed=4, valid_only=True)
    s["semseg"] = torch.arange(42).view(6, 7)                       # every pixel distinct
    seen_flip = set()
    for seed in range(12):
        out = D.TrainTransform((4, 5), scale_range=(1, 1), jitter=0,
                               generator=torch.Generator().manual_seed(seed))(s)
        matches = [(i, j, f) for i in range(3) for j in range(3) for f in (False, True)
                   if torch.equal(out["semseg"], (s["semseg"].flip(-1) if f else s["semseg"])[i:i + 4, j:j + 5])]
        assert len(matches) == 1, matches
        i, j, f = matches[0]
        seen_flip.add(f)
        src = D.hflip(s) if f else s
        assert torch.equal(out["depth"], src["depth"][..., i:i + 4, j:j + 5])
        assert torch.equal(out["normals"], src["normals"][..., i:i + 4, j:j + 5])
    assert seen_flip == {False, True}


def test_train_transform_is_deterministic_given_a_seed():
    s = fake_sample(10, 12, seed=5)
    run = lambda seed: D.TrainTransform((8, 8), generator=torch.Generator().manual_seed(seed))(s)
    assert_samples_equal(run(7), run(7))
    assert not torch.equal(run(7)["image"], run(8)["image"])
    torch.manual_seed(3)
    a = D.TrainTransform((8, 8))(s)                                 # the global RNG
    torch.manual_seed(3)
    assert_samples_equal(a, D.TrainTransform((8, 8))(s))


def test_jitter_changes_only_the_image():
    s = fake_sample(4, 5, seed=6)
    j = D.jitter(s, 1.3, 0.7, 1.2)
    assert all(j[k] is s[k] for k in s if k != "image")
    assert 0 <= j["image"].min() and j["image"].max() <= 1 and not torch.equal(j["image"], s["image"])
    torch.testing.assert_close(D.jitter(s, 1.0, 1.0, 1.0)["image"], s["image"])


class Repeated(torch.utils.data.Dataset):
    """The same sample n times through a transform: differences come from the augmentation only."""
    def __init__(self, sample, n, transform):
        self.sample, self.n, self.transform = sample, n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.sample)


def test_dataloader_worker_seeds_make_augmentation_reproducible():
    ds = Repeated(fake_sample(8, 8, seed=7), 4, D.TrainTransform((6, 6)))
    load = lambda: [b["image"] for b in torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))]
    first, second = load(), load()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])                      # the two workers differ


# ----------------------------------------------------------------------------------------------------
# build_dataset

def test_build_dataset_synthetic_and_real(tmp_path):
    # the synthetic preset's defaults live in DEFAULT_NUM_SAMPLES / DEFAULT_SIZES and nowhere else
    assert D.DEFAULT_NUM_SAMPLES == {"train": 2000, "val": 200}
    assert D.DEFAULT_SIZES["synthetic"] == {"train": (96, 128), "eval": (96, 128)}
    assert len(D.build_dataset("synthetic", "train")) == 2000 and len(D.build_dataset("synthetic", "val")) == 200
    s = D.build_dataset("synthetic", "val", num_samples=2, tasks=["semseg", "depth"])[1]
    assert set(s) == {"image", "semseg", "depth", "meta"} and s["image"].shape == (3, 96, 128)
    assert isinstance(D.build_dataset("synthetic", "val", num_samples=1), SyntheticRooms)
    synthetic_tree(tmp_path / "NYUD_MT", size=(16, 20), n=(2, 1))
    train = D.build_dataset("nyud", "train", root=tmp_path, size=(12, 12))
    assert isinstance(train.transform, D.TrainTransform) and train[0]["semseg"].shape == (12, 12)
    val = D.build_dataset("nyud", "val", root=tmp_path)             # default eval pad 480 x 640
    v = val[0]
    assert v["image"].shape == (3, 480, 640) and (v["semseg"][16:] == 255).all() and v["meta"]["size"] == (16, 20)
    assert len(D.build_dataset("nyud", "train", root=tmp_path, num_samples=1)) == 1
    assert D.build_dataset("nyud", "train", root=tmp_path, train=False, size=(16, 20))[0]["image"].shape == (3, 16, 20)


# ----------------------------------------------------------------------------------------------------
# Copying datasets.py alone: no project import at module level, per-dataset facts for every name

ISOLATION_SCRIPT = """
import json, sys
loaded = lambda: {m: m in sys.modules for m in ("synthetic", "metrics")}
steps = {}
import datasets
steps["import datasets"] = loaded()
datasets.task_channels("nyud"), datasets.class_names("pascal")
steps["facts of nyud / pascal"] = loaded()
ds = datasets.build_dataset("nyud", "train", root=sys.argv[1], size=(4, 4), download=False)
ds[0], ds[1]
steps["build_dataset nyud + samples"] = loaded()
datasets.PASCALContext(sys.argv[2], "val", tasks=["semseg", "parts", "sal", "normals"])[0]
steps["pascal without edges"] = loaded()
datasets.PASCALContext(sys.argv[2], "val", tasks=["edge"])[0]
steps["pascal edges"] = loaded()
datasets.task_channels("synthetic")
steps["task_channels synthetic"] = loaded()
print(json.dumps(steps))
"""


def test_datasets_alone_reads_nyud_and_imports_synthetic_and_metrics_only_when_needed(tmp_path):
    write_nyud(tmp_path / "nyud" / "NYUD_MT", "B")
    write_pascal(tmp_path / "pascal" / "PASCAL_MT")
    repo = Path(D.__file__).parent
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", ISOLATION_SCRIPT, str(tmp_path / "nyud"),
                           str(tmp_path / "pascal")], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout.splitlines()[-1])
    none, thin_only = {"synthetic": False, "metrics": False}, {"synthetic": False, "metrics": True}
    assert steps == {"import datasets": none, "facts of nyud / pascal": none,
                     "build_dataset nyud + samples": none, "pascal without edges": none,
                     "pascal edges": thin_only,                             # metrics.thin, imported lazily
                     "task_channels synthetic": {"synthetic": True, "metrics": True}}, steps


def test_task_channels_and_class_names_answer_for_every_name():
    assert D.NAMES == ("nyud", "pascal", "synthetic")
    assert set(D.TASKS) == set(D.CLASS_NAMES) == {"nyud", "pascal"}       # facts of the real packagings
    for name in ("nyud", "pascal"):
        assert D.task_channels(name) == D.TASKS[name] and D.class_names(name) == D.CLASS_NAMES[name]
    assert D.task_channels("synthetic") == synthetic.TASKS and D.class_names("synthetic") == synthetic.CLASS_NAMES
    for name in D.NAMES:                                            # semseg head width = number of classes
        assert D.task_channels(name)["semseg"] == len(D.class_names(name)), name
    assert (len(D.class_names("nyud")), len(D.class_names("pascal"))) == (40, 21)
    heads, names = D.task_channels("synthetic"), D.class_names("synthetic")
    heads["semseg"], names[0] = -1, "changed"                       # callers get copies
    assert D.task_channels("synthetic") == synthetic.TASKS and D.class_names("synthetic")[0] != "changed"
    for fn in (D.task_channels, D.class_names):
        with pytest.raises(ValueError, match=r"name must be one of \['nyud', 'pascal', 'synthetic'\], got 'coco'"):
            fn("coco")
    for gone in ("thin", "SyntheticRooms", "PART_NAMES"):           # import these from metrics / synthetic
        assert not hasattr(D, gone), gone


# ----------------------------------------------------------------------------------------------------
# What the full check costs: PYTHONPATH=. python tests/test_datasets.py [folder]

def nyud_size_tree(root: Path, distinct=24):
    """A packaging-B tree of NYUD-v2's real size (795 train + 654 val ids, 480 x 640 images, jpg + png +
    three .npy each) under root/NYUD_MT: `distinct` SyntheticRooms scenes rendered and exported once, then
    copied to every other id (copies, not links: every file is read on its own)."""
    tree = root / "NYUD_MT"
    if (tree / "gt_sets" / "val.txt").is_file():
        return tree
    source = SyntheticRooms("train", distinct, size=(480, 640), seed=0, tasks=["semseg", "depth", "normals", "edge"])
    D.export_nyud_layout(source, tree, "train")
    rendered = (tree / "gt_sets" / "train.txt").read_text().split()
    for split, n in reversed(D.SPLIT_SIZES["nyud"].items()):       # train.txt, which lists the rendered ids, last
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for i, id_ in enumerate(ids):
            for pattern in D.NYUD.LAYOUTS["B"].values():
                shutil.copyfile(tree / pattern.format(rendered[i % distinct]), tree / pattern.format(id_))
        save_split(tree / "gt_sets" / f"{split}.txt", ids)
    for id_ in rendered:
        for pattern in D.NYUD.LAYOUTS["B"].values():
            (tree / pattern.format(id_)).unlink()
    return tree


if __name__ == "__main__":
    import tempfile
    import time

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "kem_mtl_nyud_size"
    tree = nyud_size_tree(folder)
    files = sum(1 for f in tree.rglob("*") if f.is_file() and f.name != D.VERDICT)
    gigabytes = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file()) / 1e9
    (tree / D.VERDICT).unlink(missing_ok=True)
    t0 = time.perf_counter()
    D.validate_tree("nyud", tree, full=True)
    t1 = time.perf_counter()
    D.validate_tree("nyud", tree, full=True)
    t2 = time.perf_counter()
    print(f"{tree}: {files} files, {gigabytes:.1f} GB, {os.cpu_count()} cores. Full decode check: "
          f"{t1 - t0:.1f} s the first time; {t2 - t1:.2f} s once its verdict is remembered "
          f"(delete {tree.parent} afterwards)")
