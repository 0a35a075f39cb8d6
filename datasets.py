"""Datasets for multi-task dense prediction: NYUD-v2, PASCAL-Context and an offline procedural one.

The paper (Zhang et al., arXiv 2410.03778) evaluates on NYUD-v2 and PASCAL-Context but publishes no
data code, so this module reads these datasets the way the field packages them (MTI-Net / ATRC /
InvPT family): the conventions are facts about those packagings, cited below; the code is our own.

Every dataset returns, for ``dataset[i]`` with no transform, a dict (H, W = original image size):

    image    float32 (3, H, W) in [0, 1]
    semseg   int64   (H, W)    classes 0..C-1, 255 = ignore
    parts    int64   (H, W)    human parts 0..6 (0 = background), 255 = ignore     (PASCAL only)
    depth    float32 (1, H, W) metres, 0 = invalid                                 (NYUD only)
    normals  float32 (3, H, W) unit vectors (x, y, z), zero vector = invalid
    edge     float32 (1, H, W) in {0, 1}, 255 = ignore (only ever from padding)
    sal      float32 (1, H, W) in {0, 1}, 255 = ignore                             (PASCAL only)
    meta     {"id": str, "size": (H, W)}  (the original size, also after transforms)

Only the tasks asked for (``tasks=None``: all of ``task_channels(name)``) are read. After a transform
the format is the same, except that ``image`` is ImageNet-normalised and maps have the crop / pad size.

Label conventions (facts from the MTI-Net and InvPT loaders):
  NYUD     segmentation PNG value 0 = unlabelled -> 255, 1..40 -> 0..39; depth 0 = invalid;
           normals zero vector = invalid; edges binary at 0.5. Packaging B ("NYUD_MT": jpg images,
           npy depth / normals / edges) and C ("NYUDv2": png images, normals PNG decoded 2x/255 - 1,
           edge PNG / 255) are detected from the files present.
  PASCAL   semseg PNG 0..20, 255 void; edges where the Laplacian of the PASCAL-Context ``LabelMap``
           is non-zero, thinned to one pixel; human parts merged from the Pascal-Part struct into 6
           parts + background, all 255 when no person part is annotated; normals (distilled PNG,
           2x/255 - 1) kept only on LabelMap classes NYUD also has; saliency PNG / 255 > 0.5.

Where the data live (first match wins):
  1. an explicit ``root`` argument (``--data-dir`` in train.py),
  2. the environment variable ``KEM_MTL_DATA``,
  3. the cache folder ``~/.cache/kem_mtl``.
Inside it, under either name its packagers use (first listed wins when both exist):
  NYUD     ``NYUD_MT/`` (packaging B, MTI-Net / ATRC) or ``NYUDv2/`` (packaging C, InvPT / ATRC),
  PASCAL   ``PASCAL_MT/`` (ASTMT / MTI-Net, what ``PASCAL_MT.tgz`` extracts to) or ``PASCALContext/``
           (what ATRC / InvPT's ``PASCALContext.tar.gz`` extracts to). Both hold the same sub-folders:
           the InvPT loader reads exactly ImageSets/Context, JPEGImages, pascal-context/trainval,
           semseg/{VOC12,pascal-context}, human_parts, normals_distill and sal_distill.
``prepare_dataset`` downloads only when the tree is absent (``.part`` file, checksum when recorded,
atomic rename), extracts safely into a temporary sibling and renames it into place after validation:
no half-written trees. Its downloads are named per host and process, and a valid tree that another
process put in place first counts, so nodes that share a data root but no lock cannot break each
other. Offline it raises a ``DatasetError`` saying what to fetch, where to put it (naming every
accepted folder), and that ``--dataset synthetic`` needs no download; it never falls back silently
to other data.

Imports: torch, numpy, PIL and (inside functions) scipy; no project module at import time. The
synthetic dataset (``build_dataset("synthetic", ...)``, ``task_channels`` / ``class_names`` of
"synthetic") imports synthetic.py inside those functions, and PASCAL edge labels import
``metrics.thin`` inside the function that thins. So copying datasets.py alone gives working NYUD
loaders, and PASCAL ones with metrics.py beside it for the edge task.

Usage:
    from datasets import build_dataset, task_channels
    train = build_dataset("nyud", "train")             # train transforms, crop 448x576
    val = build_dataset("nyud", "val")                 # pad to 480x640, no randomness
    heads = task_channels("nyud")                      # {"semseg": 40, "depth": 1, ...}
    toy = build_dataset("synthetic", "train", num_samples=64)

Notes:
  - Train-time randomness comes from ``TrainTransform(generator=...)``, or by default the global torch
    RNG, which DataLoader seeds in every worker (base seed + worker id): ``torch.manual_seed`` and a
    seeded DataLoader reproduce the augmentations. Don't pass one Generator to several workers: each
    gets a copy in the same state and all would augment identically.
  - Normals stored as PNG (NYUD packaging C, PASCAL) are decoded exactly as 2x/255 - 1, as the field
    does: unit only up to quantisation, and never an exact zero vector, so every pixel of packaging C
    counts as valid (PASCAL's are zeroed off the listed classes).
  - Edge thinning is metrics.thin (imported lazily, see Imports), our implementation of Guo-Hall
    thinning (what MTI-Net calls through scikit-image): it reproduces scikit-image's documented
    example, but was never compared on real label maps.
  - PASCAL semseg is read from ``semseg/VOC12/<id>.png`` when it exists, else from
    ``semseg/pascal-context/<id>.png`` (the order of the MTI-Net loader).
  - Packaging A (the original ASTMT tarball with .mat labels) is not supported.
  - ``PASCALContext.tar.gz`` itself is not picked up: ``prepare_dataset`` downloads and extracts only
    ``PASCAL_MT.tgz``. Extract the InvPT archive into the data root yourself; its tree is then found.
    The ``ImageSets/Parts/`` JSON cache the InvPT loader writes there is neither needed nor read
    (human parts come from the .mat files directly).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset, Subset

# No project module is imported here: synthetic.py (the offline dataset) and metrics.py (thinning of
# PASCAL edge labels) are imported inside the functions that need them (module docstring, Imports).

# ----------------------------------------------------------------------------------------------------
# Constants: tasks, class names, sources

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NAMES = ("nyud", "pascal", "synthetic")  # every dataset name build_dataset accepts

# Facts of the two real packagings. The synthetic dataset's live in synthetic.py: ask task_channels()
# and class_names() below, which answer for every name in NAMES.
TASKS = {  # dataset -> {task: output channels of its prediction head}
    "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
    "pascal": {"semseg": 21, "parts": 7, "sal": 1, "normals": 3, "edge": 1},
}
CLASS_NAMES = {
    "nyud": ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
             "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
             "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refridgerator",
             "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
             "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
             "otherfurniture", "otherprop"],
    "pascal": ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"],
}

ENV_VAR = "KEM_MTL_DATA"
DEFAULT_DATA_ROOT = "~/.cache/kem_mtl"
SOURCES = {  # where each dataset comes from and which folder names it may have under the data root
    "nyud": {"url": "https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw",
             "archive": "NYUD_MT.tgz", "dirs": ("NYUD_MT", "NYUDv2"),
             "layout": "gt_sets/{train,val}.txt, images/<id>.jpg, segmentation/<id>.png, "
                       "depth/<id>.npy, normals/<id>.npy, edge/<id>.npy"},
    "pascal": {"url": "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz",
               "archive": "PASCAL_MT.tgz", "dirs": ("PASCAL_MT", "PASCALContext"),   # ASTMT / InvPT name
               "layout": "ImageSets/Context/{train,val}.txt, JPEGImages/<id>.jpg, "
                         "pascal-context/trainval/<id>.mat, semseg/{VOC12,pascal-context}/<id>.png, "
                         "human_parts/<id>.mat, normals_distill/<id>.png, sal_distill/<id>.png"},
}
# ---- CHECKSUMS: nobody publishes them. After a download that validated, the program prints the size
# ---- and sha256: record them here and later downloads are verified byte for byte. None = unknown.
CHECKSUMS = {"NYUD_MT.tgz": {"size": None, "sha256": None}, "PASCAL_MT.tgz": {"size": None, "sha256": None}}
SPLIT_SIZES = {"nyud": {"train": 795, "val": 654}, "pascal": {"train": 4998, "val": 5105}}

# PASCAL-Context LabelMap classes on which the distilled normals are kept (classes NYUD also has, plus
# tvmonitor): the list the MTI-Net loader derives from its class tables.
PASCAL_NORMALS_CLASSES = np.array("""
3 4 6 9 10 11 13 15 17 18 22 23 29 30 33 34 36 37 38 39 41 43 46 49 50 51 53 55 56 59 61 62
65 66 68 69 72 73 78 83 84 85 87 88 95 96 101 104 105 107 111 113 115 122 124 135 141 142
143 146 150 154 157 158 159 165 172 174 181 183 184 191 193 195 197 199 202 213 215 216 219
220 223 225 228 230 232 233 238 239 242 243 246 250 251 252 255 260 261 263 269 272 273 275
281 283 284 285 286 287 288 290 291 292 293 295 304 307 309 310 314 315 319 323 329 330 331
336 342 345 349 350 351 352 355 357 368 370 371 374 379 380 383 384 397 401 403 405 407 408
411 412 413 414 417 419 421 423 427 429 430 432 440 441 442 443 444 446 454 457""".split(), dtype=np.int64)
# Pascal-Part person part names -> merged part (1 head, 2 torso, 3 upper arm, 4 lower arm incl. hand,
# 5 upper leg, 6 lower leg incl. foot; 0 background), the 6-part table of the MTI-Net loader.
PERSON_CLASS = 15
PART_OF = {name: k for k, names in {
    1: ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"),
    2: ("neck", "torso"), 3: ("luarm", "ruarm"), 4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"), 6: ("llleg", "rlleg", "lfoot", "rfoot")}.items() for name in names}


class DatasetError(RuntimeError):
    """The data on disk are missing, incomplete or not in the expected format (the message says which
    file and what was expected), or a download failed."""


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"name must be one of {list(NAMES)}, got {name!r}")


def task_channels(name: str) -> dict:
    """{task: output channels of its prediction head} for any dataset in NAMES (a fresh copy).
    "synthetic" imports synthetic.py here, so NYUD and PASCAL never need it."""
    _check_name(name)
    if name == "synthetic":
        import synthetic
        return dict(synthetic.TASKS)
    return dict(TASKS[name])


def class_names(name: str) -> list:
    """Semantic class names, index = semseg label, for any dataset in NAMES (a fresh copy)."""
    _check_name(name)
    if name == "synthetic":
        import synthetic
        return list(synthetic.CLASS_NAMES)
    return list(CLASS_NAMES[name])


# ----------------------------------------------------------------------------------------------------
# Data root and small helpers

def resolve_data_root(root=None) -> Path:
    """The data root: ``root`` if given, else ``$KEM_MTL_DATA``, else ``~/.cache/kem_mtl``."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DATA_ROOT).expanduser()


def _manual_help(name: str, data_root: Path) -> str:
    """How to get the data by hand, appended to every 'data absent' error."""
    src = SOURCES[name]
    return (f"\n  URL: {src['url']}"
            f"\n  expected layout: {data_root / src['dirs'][0]}/ with {src['layout']}"
            f"\n  accepted folder names under the data root: {', '.join(d + '/' for d in src['dirs'])}"
            f"\n  manual download: put {src['archive']} into {data_root}/ (it is checked and extracted on"
            f" the next run), or extract it there yourself"
            f"\n  data root order: --data-dir, then ${ENV_VAR}, then {DEFAULT_DATA_ROOT}"
            f"\n  offline: --dataset synthetic trains on procedural data and needs no download")


def _check_tasks(name: str, tasks) -> tuple:
    """Validate a task subset against task_channels(name); returns it in the canonical order."""
    valid = task_channels(name)
    if tasks is None:
        return tuple(valid)
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in valid]
    if unknown or not tasks:
        raise ValueError(f"tasks for {name!r} must be a non-empty subset of {list(valid)}, got {list(tasks)}")
    return tuple(t for t in valid if t in tasks)


@contextlib.contextmanager
def _reading(path: Path, what: str):
    """Turn any failure while reading `path` into a DatasetError that names the file."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as e:  # PIL, numpy and scipy raise many kinds; the message keeps the original
        raise DatasetError(f"cannot read {path} (expected {what}): {type(e).__name__}: {e}") from e


def _read_rgb(path: Path) -> torch.Tensor:
    """An image file as float32 (3, H, W) in [0, 1]; truncated or unreadable files raise."""
    with _reading(path, "an RGB image"), Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))                         # (H, W, 3) uint8; forces a full decode
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _read_png(path: Path, rgb: bool = False) -> np.ndarray:
    """A PNG as an array: (H, W, 3) uint8 when rgb, else a single-channel (H, W) map."""
    with _reading(path, "an RGB PNG" if rgb else "a single-channel PNG"), Image.open(path) as im:
        if im.mode == "1":
            im = im.convert("L")                                    # bilevel -> 0 / 255
        if (im.mode == "RGB") != rgb or im.mode in ("RGBA", "LA", "CMYK", "YCbCr"):
            raise DatasetError(f"{path}: expected {'an 8-bit RGB' if rgb else 'a single-channel'} PNG, "
                               f"got PIL mode {im.mode!r}")
        return np.array(im)


def _read_npy(path: Path, shape: str) -> np.ndarray:
    """A .npy array of finite numbers with shape "HW" ((H, W) or (H, W, 1)) or "HW3"."""
    with _reading(path, f"a .npy array of shape {shape}"):
        arr = np.load(path, allow_pickle=False)
    if shape == "HW" and arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != len(shape) or (shape == "HW3" and arr.shape[2] != 3):
        raise DatasetError(f"{path}: expected an array of shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: contains NaN or infinite values")
    return arr.astype(np.float32)


def _binary(x: np.ndarray) -> torch.Tensor:
    """A map thresholded at 0.5 as float32 (1, H, W) in {0, 1}."""
    return torch.from_numpy((x > 0.5).astype(np.float32))[None]


def _decode_normals_png(path: Path) -> np.ndarray:
    """Normals stored as RGB PNG: x = 2 * value / 255 - 1 per channel, (H, W, 3) float32."""
    return 2.0 * _read_png(path, rgb=True).astype(np.float32) / 255.0 - 1.0


def _read_split(path: Path) -> list:
    if not path.is_file():
        raise DatasetError(f"split file {path} is missing (expected one image id per line)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {path} lists no ids")
    return ids


# ----------------------------------------------------------------------------------------------------
# Edges from a label map: Laplacian, then thinning (metrics.thin: the same Guo-Hall thinning the
# edge metric applies to predictions, so labels and scored predictions are thinned alike)

def _label_edges(labelmap: np.ndarray) -> np.ndarray:
    """Pixels where the 4-neighbour Laplacian of the label map is non-zero, thinned: (H, W) bool.
    Border handling mirrors without repeating the edge pixel (scipy "mirror" = reflect-101)."""
    from scipy.ndimage import convolve

    from metrics import thin  # the one project import of the real loaders (PASCAL edge labels only)
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    lap = convolve(labelmap.astype(np.float64), kernel, mode="mirror")
    return thin(lap != 0)


def _read_parts(path: Path, hw: tuple) -> np.ndarray:
    """Merged human parts (H, W) int64 from a Pascal-Part annotation; all 255 without person parts."""
    from scipy.io import loadmat
    target = np.zeros(hw, dtype=np.int64)
    with _reading(path, "a Pascal-Part annotation: anno[0][0][1][0] = objects (class, mask, parts)"):
        objects = loadmat(path)["anno"][0][0][1]
        for obj in (objects[0] if objects.size else []):
            if int(np.ravel(obj[1])[0]) != PERSON_CLASS or len(obj[3]) == 0:
                continue
            for part in obj[3][0]:                                  # painted in file order
                name, mask = str(part[0][0]), np.asarray(part[1]).astype(bool)
                if name not in PART_OF:
                    raise DatasetError(f"{path}: unknown person part {name!r}; known: {sorted(PART_OF)}")
                if mask.shape != tuple(hw):
                    raise DatasetError(f"{path}: part {name!r} mask has shape {mask.shape}, "
                                       f"the image is {tuple(hw)}")
                target[mask] = PART_OF[name]
    if not (target > 0).any():                                      # no person part annotated
        target[:] = IGNORE_INDEX
    return target


# ----------------------------------------------------------------------------------------------------
# The two real datasets

class _Folder(Dataset):
    """Shared machinery: locate the dataset folder, read the split, check files, assemble samples.

    Subclasses define `name` (key of TASKS), `dirs` (folder names under a data root), `marker` (a
    subfolder that identifies the dataset folder), `split_dir` (holding <split>.txt), `needs` (files
    each task reads), `_file(kind, id)` and `_load(id, hw)`.
    """
    name, dirs, marker, split_dir, needs = "", (), "", "", {}

    def __init__(self, root, split: str, transform=None, tasks=None):
        self.tasks = _check_tasks(self.name, tasks)
        self.root = self._locate(root)
        self.split = split
        self.split_file = self.root / self.split_dir / f"{split}.txt"
        self.ids = _read_split(self.split_file)
        self.transform = transform
        self._setup()
        kinds = {"image"} | {k for t in self.tasks for k in self.needs[t]}
        for id_ in self.ids:                                        # every listed id has its files
            for kind in sorted(kinds):
                path = self._file(kind, id_)
                if not path.is_file():
                    raise DatasetError(f"id {id_!r} listed in {self.split_file} has no {kind} file: "
                                       f"expected {path}")

    def _locate(self, root) -> Path:
        base = resolve_data_root(root)
        for cand in (base, *(base / d for d in self.dirs)):
            if (cand / self.marker).is_dir():
                return cand
        what = "does not exist" if not base.exists() else f"holds no {self.marker}/ folder"
        raise DatasetError(f"{self.__class__.__name__}: {base} {what}; expected the dataset folder or a "
                           f"data root containing it." + _manual_help(self.name, base))

    def _setup(self):
        """Hook run after the split is read (NYUD detects its packaging here)."""

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        id_ = self.ids[index]
        image = _read_rgb(self._file("image", id_))                 # (3, H, W)
        H, W = image.shape[1:]
        sample = {"image": image}
        for task, (value, path) in self._load(id_, (H, W)).items():
            if tuple(value.shape[-2:]) != (H, W):
                raise DatasetError(f"{path}: {task} has size {tuple(value.shape[-2:])}, but the image "
                                   f"{self._file('image', id_)} is {(H, W)}")
            sample[task] = value
        sample["meta"] = {"id": id_, "size": (int(H), int(W))}
        return self.transform(sample) if self.transform is not None else sample


def _nyud_semseg(path: Path) -> torch.Tensor:
    """NYUD segmentation PNG (0 = unlabelled, 1..40) -> (H, W) int64 with 255 = ignore, 0..39."""
    raw = _read_png(path).astype(np.int64)
    if raw.min() < 0 or raw.max() > 40:
        raise DatasetError(f"{path}: segmentation values must lie in 0..40 (0 = unlabelled), found "
                           f"{raw.min()}..{raw.max()}")
    return torch.from_numpy(np.where(raw == 0, IGNORE_INDEX, raw - 1))


def _check_normals(arr: np.ndarray, path: Path) -> torch.Tensor:
    """(H, W, 3) normals -> (3, H, W); components beyond [-1, 1] mean a wrong encoding."""
    if np.abs(arr).max(initial=0.0) > 1.0 + 1e-3:
        raise DatasetError(f"{path}: normals must be unit vectors (components in [-1, 1]), found "
                           f"|component| up to {np.abs(arr).max():.3f}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class NYUD(_Folder):
    """NYUD-v2 (795 train / 654 val): semseg (40 classes), depth, normals, edge.

    Args:
        root: the dataset folder (holding gt_sets/) or a data root holding NYUD_MT/ or NYUDv2/;
            None resolves the data root (see the module docstring). Nothing is downloaded here; use
            `prepare_dataset` or `build_dataset` for that.
        split: name of a file in gt_sets/ ("train" or "val").
        transform: callable on the sample dict, or None.
        tasks: None (all of TASKS["nyud"]) or a subset; only those files are read.

    Packaging B (jpg + npy) or C (png) is detected from the image of the split's first id.
    """
    name, dirs, marker, split_dir = "nyud", SOURCES["nyud"]["dirs"], "gt_sets", "gt_sets"
    needs = {"semseg": ("semseg",), "depth": ("depth",), "normals": ("normals",), "edge": ("edge",)}
    LAYOUTS = {  # packaging -> kind -> path pattern
        "B": {"image": "images/{}.jpg", "semseg": "segmentation/{}.png", "depth": "depth/{}.npy",
              "normals": "normals/{}.npy", "edge": "edge/{}.npy"},
        "C": {"image": "images/{}.png", "semseg": "segmentation/{}.png", "depth": "depth/{}.npy",
              "normals": "normals/{}.png", "edge": "edge/{}.png"},
    }

    def _setup(self):
        first = self.ids[0]
        found = [p for p, lay in self.LAYOUTS.items() if (self.root / lay["image"].format(first)).is_file()]
        if not found:
            raise DatasetError(f"id {first!r} listed in {self.split_file} has no image: expected "
                               f"{self.root / 'images' / first}.jpg (packaging B) or .png (packaging C)")
        self.packaging = found[0]

    def _file(self, kind, id_):
        return self.root / self.LAYOUTS[self.packaging][kind].format(id_)

    def _load(self, id_, hw):
        out, png = {}, self.packaging == "C"
        for task in self.tasks:
            path = self._file(task, id_)
            if task == "semseg":
                value = _nyud_semseg(path)
            elif task == "depth":
                depth = _read_npy(path, "HW")
                if depth.min(initial=0.0) < 0:
                    raise DatasetError(f"{path}: depth must be >= 0 metres (0 = invalid), found {depth.min()}")
                value = torch.from_numpy(depth)[None]
            elif task == "normals":
                value = _check_normals(_decode_normals_png(path) if png else _read_npy(path, "HW3"), path)
            else:  # edge: binary at 0.5 (packaging C stores 0 / 255)
                value = _binary(_read_png(path) / 255.0 if png else _read_npy(path, "HW"))
            out[task] = (value, path)
        return out


class PASCALContext(_Folder):
    """PASCAL-Context (4,998 train / 5,105 val) in the PASCAL_MT layout: semseg (21), parts (7),
    sal, normals, edge.

    Arguments as for NYUD; root is the folder holding ImageSets/ or a data root holding PASCAL_MT/
    (ASTMT / MTI-Net's name) or PASCALContext/ (ATRC / InvPT's name for the same inner layout; the
    first one present wins), split a file in ImageSets/Context/.
    """
    name, dirs, marker, split_dir = "pascal", SOURCES["pascal"]["dirs"], "ImageSets", "ImageSets/Context"
    needs = {"semseg": ("semseg",), "parts": ("parts",), "sal": ("sal",),
             "normals": ("normals", "labelmap"), "edge": ("labelmap",)}
    LAYOUT = {"image": "JPEGImages/{}.jpg", "labelmap": "pascal-context/trainval/{}.mat",
              "parts": "human_parts/{}.mat", "normals": "normals_distill/{}.png",
              "sal": "sal_distill/{}.png"}

    def _file(self, kind, id_):
        if kind == "semseg":                                        # VOC12 first, as MTI-Net does
            voc = self.root / "semseg" / "VOC12" / f"{id_}.png"
            return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{id_}.png"
        return self.root / self.LAYOUT[kind].format(id_)

    def _load(self, id_, hw):
        from scipy.io import loadmat
        out, lm_path = {}, self._file("labelmap", id_)
        if "edge" in self.tasks or "normals" in self.tasks:
            with _reading(lm_path, "a .mat file with key 'LabelMap'"):
                labelmap = np.asarray(loadmat(lm_path)["LabelMap"]).astype(np.int64)  # (H, W) classes
            if labelmap.ndim != 2:
                raise DatasetError(f"{lm_path}: LabelMap must be 2-D, got shape {labelmap.shape}")
        for task in self.tasks:
            path = self._file("labelmap" if task == "edge" else task, id_)
            if task == "semseg":
                sem = _read_png(path).astype(np.int64)
                bad = np.setdiff1d(np.unique(sem), np.r_[0:21, IGNORE_INDEX])
                if bad.size:
                    raise DatasetError(f"{path}: semseg values must be 0..20 or 255, found {bad.tolist()}")
                value = torch.from_numpy(sem)
            elif task == "parts":
                value = torch.from_numpy(_read_parts(path, hw))
            elif task == "sal":
                value = _binary(_read_png(path) / 255.0)
            elif task == "normals":
                normals = _decode_normals_png(path)                 # (H, W, 3)
                if normals.shape[:2] != labelmap.shape:
                    raise DatasetError(f"{path}: normals have size {normals.shape[:2]}, but its LabelMap "
                                       f"{lm_path} has {labelmap.shape}")
                normals[~np.isin(labelmap, PASCAL_NORMALS_CLASSES)] = 0.0
                value = _check_normals(normals, path)
            else:  # edge
                value = torch.from_numpy(_label_edges(labelmap).astype(np.float32))[None]
            out[task] = (value, path)
        return out


# ----------------------------------------------------------------------------------------------------
# Validation, downloads, safe extraction

_DATASET_CLASSES = {"nyud": NYUD, "pascal": PASCALContext}


def _decoded_hw(path: Path):
    """(H, W) of a file read in full (every pixel decoded, every array read: a truncated file raises), or
    None for the nested Pascal-Part .mat files."""
    if path.suffix == ".npy":
        return tuple(np.load(path).shape[:2])
    if path.suffix == ".mat":
        from scipy.io import loadmat
        labels = loadmat(str(path)).get("LabelMap")
        return None if labels is None else tuple(labels.shape[:2])
    with Image.open(path) as im:
        im.load()
        return im.size[::-1]


def _try_decode(path: Path):
    """_decoded_hw(path), or the reason it cannot be read (a str)."""
    try:
        return _decoded_hw(path)
    except Exception as e:  # PIL, numpy and scipy raise many kinds
        return f"cannot read it: {type(e).__name__}: {e}"


VERDICT = ".kem_mtl_checked.json"   # in a dataset folder: the files validate_tree(full=True) found readable


def _tree_stamp(root: Path, files) -> str:
    """A fingerprint of the files' names, sizes and modification times: any change to a file changes it."""
    stamp = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        stamp.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return stamp.hexdigest()


def check_files(root: Path, files: dict) -> None:
    """Read every file in full, once: {file: (its kind, the image it must match in size, or None)}. Every
    problem is named in one DatasetError. A passing verdict is remembered in root/VERDICT with the files'
    fingerprint (_tree_stamp), so the next check of the same, unchanged files costs a stat each; where root
    is read-only, every check reads everything again."""
    verdict, stamp = root / VERDICT, _tree_stamp(root, files)
    try:
        if json.loads(verdict.read_text()).get("stamp") == stamp:
            return
    except (OSError, ValueError, AttributeError):
        pass
    from concurrent.futures import ThreadPoolExecutor   # the decoders release the GIL
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        hw = dict(zip(files, pool.map(_try_decode, files)))
    problems = []
    for f, (kind, image) in files.items():
        if isinstance(hw[f], str):
            problems.append(f"{f}: {hw[f]}")
        elif image is not None and hw[f] is not None and not isinstance(hw[image], str) and hw[f] != hw[image]:
            problems.append(f"{f}: {kind} has size {hw[f]}, but the image {image} is {hw[image]}")
    if problems:
        raise DatasetError(f"{len(problems)} of the {len(files)} files in {root} cannot be used (every image and "
                           f"label file is read once, before training); replace or re-extract them:\n  "
                           + "\n  ".join(problems))
    try:
        tmp = verdict.with_name(f"{VERDICT}.{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "files": len(files)}))
        os.replace(tmp, verdict)
    except OSError:
        pass


def validate_tree(name: str, path, *, full: bool = False) -> dict:
    """Check a dataset folder: both split files, every id's files present, the first sample of each
    split loads, and (full=True) every image and label file of every task reads in full and has its
    image's size (check_files: remembered in the folder until a file changes). Warns when a split
    size differs from the official one. Returns {split: number of ids}; raises DatasetError."""
    counts, files, splits = {}, {}, []
    for split, expected in SPLIT_SIZES[name].items():
        ds = _DATASET_CLASSES[name](path, split)
        counts[split] = len(ds)
        splits.append(ds)
        if len(ds) != expected:
            warnings.warn(f"{name} {split} split in {ds.split_file} has {len(ds)} ids, the official split "
                          f"has {expected}", stacklevel=2)
        for id_ in ds.ids if full else ():
            image = ds._file("image", id_)
            files[image] = ("image", None)
            files.update({ds._file(kind, id_): (kind, image) for kind in {k for t in ds.tasks for k in ds.needs[t]}})
    if full:
        check_files(ds.root, files)
    for ds in splits:
        ds[0]                                                       # and the labels' own rules, on one sample
    return counts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, size=None, sha256=None, label=None):
    """Check a file against a recorded size / sha256 (None = not recorded, skipped)."""
    label, actual = label or path.name, path.stat().st_size
    if size is not None and actual != size:
        raise DatasetError(f"{label}: size {actual} bytes, expected {size}")
    if sha256 is not None and (digest := _sha256(path)) != sha256:
        raise DatasetError(f"{label}: sha256 {digest} does not match the recorded {sha256}")


def download(url: str, dest, *, size=None, sha256=None, opener=None) -> Path:
    """Download `url` to `dest` through `dest.part`, verify size / sha256 when given, rename atomically.

    Google Drive links go through gdown (its confirm-token handling); anything else (https, file://)
    is streamed with urllib, or with `opener(url)` when given (a callable returning a binary file-like
    object, for tests). On any failure, including Ctrl-C, the .part file is removed: `dest` exists
    only when complete and verified. Raises DatasetError naming the URL.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        if "drive.google.com" in url:
            _gdown(url, part)
        else:
            _stream(url, part, opener or (lambda u: urllib.request.urlopen(u, timeout=60)))
        _verify(part, size, sha256, label=f"download of {url}")
        os.replace(part, dest)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if isinstance(e, DatasetError) or not isinstance(e, Exception):
            raise                                                   # ours, or KeyboardInterrupt
        raise DatasetError(f"downloading {url} failed: {type(e).__name__}: {e}") from e
    return dest


def _gdown(url: str, part: Path):
    """Google Drive through gdown (it handles the confirm token). gdown keeps its own partial files
    next to its output, so it writes into a private temporary folder that is always removed."""
    try:
        import gdown  # only the NYUD download needs it
    except ImportError as e:
        raise DatasetError("the NYUD download needs the gdown package (pip install gdown)") from e
    tmp = Path(tempfile.mkdtemp(prefix=".gdown.", dir=part.parent))
    try:
        file_id = url.rstrip("/").split("/d/")[-1].split("/")[0]     # .../file/d/<id>[/view]
        out = gdown.download(id=file_id, output=str(tmp / part.stem), quiet=False)   # `id=`: gdown >= 4.7 and 6.x
        if out is None:
            raise DatasetError(f"gdown could not download {url}")
        os.replace(out, part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream(url: str, part: Path, opener):
    """Copy url -> part in 1 MiB blocks, printing progress to stderr about twice a second."""
    with opener(url) as response, open(part, "wb") as out:
        total = int(getattr(response, "headers", {}).get("Content-Length") or 0)
        done, last = 0, 0.0
        while block := response.read(1 << 20):
            out.write(block)
            done += len(block)
            if time.monotonic() - last > 0.5 or done == total:
                last = time.monotonic()
                of = f" / {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
                print(f"\r  {part.name[:-5]}: {done / 1e6:.1f}{of}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def safe_extract(archive, target) -> None:
    """Extract a tarball into `target`, refusing any member that would land outside it (absolute
    paths, '..', links pointing out, device files). Uses tarfile's "data" filter where it exists,
    plus our own check so older Pythons are safe too. Raises DatasetError naming the member."""
    target = Path(target).resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:                                       # an absolute name resolves outside too
                dest = (target / m.name).resolve()
                link = ((dest.parent / m.linkname) if m.issym() else (target / m.linkname) if m.islnk()
                        else dest).resolve()                        # where a link points
                if not (dest.is_relative_to(target) and link.is_relative_to(target)) or m.isdev():
                    raise DatasetError(f"{archive}: member {m.name!r} would be written outside {target} "
                                       f"or is a device file; refusing to extract this archive")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members=members, filter="data")
            else:
                tar.extractall(target, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot extract {archive}: {type(e).__name__}: {e}") from e


def _find_tree(name: str, top: Path):
    """The dataset folder inside an extracted archive: `top` itself or one level below."""
    marker = _DATASET_CLASSES[name].marker
    for cand in (top, *sorted(p for p in top.iterdir() if p.is_dir())):
        if (cand / marker).is_dir():
            return cand
    raise DatasetError(f"the archive holds no {marker}/ folder at its top or one level below")


def prepare_dataset(name: str, root=None, *, download_ok: bool = True, url=None, opener=None) -> Path:
    """Make sure dataset `name` ("nyud" or "pascal") is present and valid under the data root and
    return its folder. Present and valid -> nothing is downloaded. Absent -> the archive (an existing
    `<data root>/<archive>` is used as is, e.g. a manual download) is fetched from `url` (default
    SOURCES[name]["url"]), extracted into a temporary sibling, validated and renamed into place.
    Raises DatasetError with manual-download instructions when that is impossible."""
    if name not in SOURCES:
        raise ValueError(f"name must be one of {sorted(SOURCES)}, got {name!r}")
    src, data_root = SOURCES[name], resolve_data_root(root)
    present = ([data_root] if (data_root / _DATASET_CLASSES[name].marker).is_dir()   # root = the folder itself
               else [data_root / d for d in src["dirs"] if (data_root / d).is_dir()])
    if present:
        validate_tree(name, present[0], full=True)
        return present[0]
    archive = data_root / src["archive"]
    fetched = not archive.is_file()
    if fetched:     # named per host and process: nodes that share the data root but no lock keep apart
        archive = data_root / f"{src['archive']}.{socket.gethostname()}-{os.getpid()}"
    try:
        if fetched:
            if not download_ok:
                raise DatasetError(f"{name} is not under {data_root} and downloading is switched off")
            data_root.mkdir(parents=True, exist_ok=True)
            print(f"downloading {name} from {url or src['url']} into {data_root}", file=sys.stderr)
            download(url or src["url"], archive, opener=opener, **CHECKSUMS[src["archive"]])
        else:
            _verify(archive, **CHECKSUMS[src["archive"]])
        tmp = Path(tempfile.mkdtemp(prefix=f".{src['archive']}.", dir=data_root))
        try:
            safe_extract(archive, tmp)
            tree = _find_tree(name, tmp)
            validate_tree(name, tree, full=True)
            is_c = name == "nyud" and NYUD(tree, "train", tasks="semseg").packaging == "C"
            final = data_root / src["dirs"][1 if is_c else 0]
            try:
                os.replace(tree, final)                             # atomic: the tree appears complete
            except OSError:
                if not final.is_dir():
                    with _reading(final, "a free place for the extracted tree"):
                        raise
                validate_tree(name, final)      # another node sharing the data root was first: its valid tree counts
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except DatasetError as e:
        if fetched:
            archive.unlink(missing_ok=True)                         # a bad download must not be reused
        raise DatasetError(f"{name}: {e}" + _manual_help(name, data_root)) from e
    if fetched:
        print(f"{src['archive']}: size {archive.stat().st_size}, sha256 {_sha256(archive)} (record these "
              f"in datasets.CHECKSUMS)", file=sys.stderr)
        archive.unlink()
    return final


# ----------------------------------------------------------------------------------------------------
# Transforms on the sample dict (torch tensors; "meta" passes through unchanged)

PAD_VALUE = {"semseg": IGNORE_INDEX, "parts": IGNORE_INDEX, "edge": IGNORE_INDEX, "sal": IGNORE_INDEX,
             "depth": 0.0, "normals": 0.0}                             # image: the ImageNet mean


def _resize(x: torch.Tensor, hw: tuple, mode: str) -> torch.Tensor:
    """Resize a (C, H, W) or (H, W) tensor; labels go through float and back (exact up to 2^24)."""
    y = nnf.interpolate(x.reshape(1, -1, *x.shape[-2:]).float(), size=hw, mode=mode,
                      **({"align_corners": False} if mode == "bilinear" else {}))
    return y.reshape(*x.shape[:-2], *hw).to(x.dtype)


def rescale(sample: dict, s: float) -> dict:
    """Scale every map by s: image bilinear, labels and depth nearest with depth divided by s (an
    image enlarged s times looks s times closer), normals bilinear then re-normalised with the
    validity mask resized nearest, so invalid (zero) normals stay zero."""
    if s == 1:
        return dict(sample)                                         # exactly the identity
    H, W = sample["image"].shape[-2:]
    hw = (max(1, round(H * s)), max(1, round(W * s)))
    out = {}
    for key, x in sample.items():
        if key == "meta":
            out[key] = x
        elif key == "image":
            out[key] = _resize(x, hw, "bilinear")
        elif key == "normals":
            valid = _resize((x != 0).any(0).float(), hw, "nearest-exact") > 0      # (h, w)
            n = _resize(x, hw, "bilinear")                                          # (3, h, w)
            norm = n.square().sum(0).sqrt()     # (h, w); n.norm(dim=0) measured 30-80x slower on CPU
            out[key] = torch.where(valid & (norm > 1e-6), n / norm.clamp_min(1e-6), torch.zeros(()))
        else:
            y = _resize(x, hw, "nearest-exact")
            out[key] = y / s if key == "depth" else y
    return out


def pad_to(sample: dict, hw: tuple) -> dict:
    """Pad every map at the bottom and right to at least hw with its ignore value, so pixel (i, j)
    keeps its coordinates and predictions can be cropped back to meta["size"]."""
    H, W = sample["image"].shape[-2:]
    ph, pw = max(0, hw[0] - H), max(0, hw[1] - W)
    if ph == pw == 0:
        return dict(sample)
    out = {}
    for key, x in sample.items():
        if key == "meta":
            out[key] = x
        elif key == "image":                                        # mean colour: 0 once normalised
            out[key] = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1).repeat(1, H + ph, W + pw)
            out[key][:, :H, :W] = x
        else:
            out[key] = nnf.pad(x, (0, pw, 0, ph), value=PAD_VALUE[key])
    return out


def hflip(sample: dict) -> dict:
    """Mirror left-right; normals' x component changes sign (the surface now faces the other way)."""
    out = {k: (v if k == "meta" else v.flip(-1)) for k, v in sample.items()}
    if "normals" in out:
        out["normals"] = out["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def crop(sample: dict, top: int, left: int, hw: tuple) -> dict:
    """The window [top, top + h) x [left, left + w) of every map."""
    return {k: (v if k == "meta" else v[..., top:top + hw[0], left:left + hw[1]]) for k, v in sample.items()}


def jitter(sample: dict, brightness: float, contrast: float, saturation: float) -> dict:
    """Photometric change of the [0, 1] image only: scale the intensity, the spread around the mean
    grey, and the distance of each pixel from its grey value; clamp to [0, 1]."""
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    img = sample["image"] * brightness
    mean = (luma * img).sum(0).mean()
    img = (img - mean) * contrast + mean
    gray = (luma * img).sum(0, keepdim=True)                        # (1, H, W)
    return {**sample, "image": ((img - gray) * saturation + gray).clamp(0, 1)}


def normalize(sample: dict) -> dict:
    """ImageNet normalisation of the image (the pretrained backbones expect it)."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return {**sample, "image": (sample["image"] - mean) / std}


class TrainTransform:
    """jitter -> random scale -> random crop to `size` (ignore-padded) -> random flip -> normalise.

    s ~ U(scale_range) ((0.5, 2.0) as in ATRC / InvPT), the crop window uniform over the padded sample,
    flip with probability 1/2, jitter factors ~ U(1 - jitter, 1 + jitter) (a reduced form of the
    InvPT family's PhotoMetricDistortion: no hue shift). Jitter runs first so the padding keeps
    exactly the mean colour. Random numbers come from `generator`, or the global torch RNG when None.
    """
    def __init__(self, size, *, scale_range=(0.5, 2.0), jitter=0.25, generator=None):
        self.size, self.scale_range, self.jitter, self.generator = tuple(size), scale_range, jitter, generator

    def _uniform(self, lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=self.generator).item()

    def __call__(self, sample: dict) -> dict:
        (h, w), j = self.size, self.jitter
        sample = jitter(sample, *(self._uniform(1 - j, 1 + j) for _ in range(3)))
        sample = pad_to(rescale(sample, self._uniform(*self.scale_range)), (h, w))
        H, W = sample["image"].shape[-2:]
        top = int(torch.randint(H - h + 1, (), generator=self.generator))
        left = int(torch.randint(W - w + 1, (), generator=self.generator))
        sample = crop(sample, top, left, (h, w))
        if torch.rand((), generator=self.generator).item() < 0.5:
            sample = hflip(sample)
        return normalize(sample)


class EvalTransform:
    """Pad to exactly `size` (padded pixels ignored), normalise; no randomness. A sample larger than
    `size` is an error: evaluation never crops ground truth away."""
    def __init__(self, size):
        self.size = tuple(size)

    def __call__(self, sample: dict) -> dict:
        H, W = sample["image"].shape[-2:]
        if H > self.size[0] or W > self.size[1]:
            raise ValueError(f"eval pad size {self.size} is smaller than sample {sample.get('meta', {}).get('id')!r} "
                             f"of size {(H, W)}; pass a size of at least that")
        return normalize(pad_to(sample, self.size))


# ----------------------------------------------------------------------------------------------------
# What train.py calls, and an exporter to packaging B

# The one place the default sizes live, the synthetic preset's included: train.py reads these rather
# than restating them. NYUD / PASCAL: the InvPT family's train crops and eval pads.
DEFAULT_SIZES = {"nyud": {"train": (448, 576), "eval": (480, 640)},
                 "pascal": {"train": (512, 512), "eval": (512, 512)},
                 "synthetic": {"train": (96, 128), "eval": (96, 128)}}
# Samples per split of the synthetic dataset when num_samples is None; like DEFAULT_SIZES, the one
# place train.py's synthetic preset takes them from.
DEFAULT_NUM_SAMPLES = {"train": 2000, "val": 200}


def check_options(name: str, *, size, num_samples=None, seed=0) -> None:
    """ValueError (naming the argument, the value, what works) for options build_dataset refuses, without
    reading a file or rendering a scene. size: the (h, w) crop or pad; num_samples, seed: as there."""
    _check_name(name)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None for the default), got {num_samples}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {tuple(size)}")
    if name == "synthetic":
        from synthetic import SyntheticRooms  # its own rules: the smallest image, the seed
        SyntheticRooms.check_options(num_samples or 1, size, seed)


def cache_bytes(name: str, num_samples: int, size, tasks) -> int:
    """The memory build_dataset(..., cache=True) holds for a split: SyntheticRooms' rendered scenes (the
    real datasets are read from disk, sample by sample)."""
    if name != "synthetic":
        return 0
    from synthetic import SyntheticRooms
    return SyntheticRooms.cache_bytes(num_samples, size, tasks)


def build_dataset(name: str, split: str, *, root=None, train=None, size=None, tasks=None,
                  download=True, num_samples=None, seed=0, cache=False, render_procs=1, edit_scene=None) -> Dataset:
    """A ready dataset for train.py.

    Args:
        name: "nyud", "pascal" or "synthetic".
        split: "train" or "val".
        root: data root (see the module docstring); ignored for synthetic.
        train: train transforms if True, eval transforms if False; default split == "train".
        size: (h, w) crop size for training, pad size for eval; default DEFAULT_SIZES[name].
        tasks: None (all of task_channels(name)) or a subset.
        download: fetch a missing real dataset (False -> DatasetError with instructions instead).
        num_samples: synthetic: number of samples (default DEFAULT_NUM_SAMPLES[split]); real datasets:
            keep only the first num_samples ids (quick runs).
        seed: synthetic scene seed.
        cache: synthetic: render every scene once, up front, and keep it in memory.
        render_procs: synthetic with cache: render in this many forked processes.
        edit_scene: synthetic only: SyntheticRooms' scene edit (a function applied to each drawn scene).
    """
    _check_name(name)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tasks = _check_tasks(name, tasks)
    train = split == "train" if train is None else train
    size = tuple(size or DEFAULT_SIZES[name]["train" if train else "eval"])
    check_options(name, size=size, num_samples=num_samples, seed=seed)
    transform = TrainTransform(size) if train else EvalTransform(size)
    if name == "synthetic":
        from synthetic import SyntheticRooms  # only the offline dataset needs synthetic.py
        return SyntheticRooms(split, num_samples or DEFAULT_NUM_SAMPLES[split], size=size, seed=seed,
                              tasks=list(tasks), transform=transform, cache=cache, render_procs=render_procs,
                              edit_scene=edit_scene)
    if edit_scene is not None:
        raise ValueError(f"edit_scene edits SyntheticRooms' scenes; {name} has none to edit")
    path = prepare_dataset(name, root, download_ok=download)
    ds = _DATASET_CLASSES[name](path, split, transform=transform, tasks=tasks)
    return ds if num_samples is None else Subset(ds, range(min(num_samples, len(ds))))


def export_nyud_layout(dataset, root, split: str = "train", *, quality: int = 95) -> Path:
    """Write every sample of `dataset` (untransformed, format of this module) in packaging B under
    `root` and list their ids in gt_sets/<split>.txt; call once per split. Images become JPEG (lossy),
    semseg PNG with +1 offset and 255 -> 0 (so classes must be < 40), depth / normals / edge .npy.
    Tasks the samples lack are skipped. Returns `root` (the dataset folder, e.g. <data root>/NYUD_MT)."""
    root = Path(root)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(len(dataset)):
        s = dataset[i]
        id_ = str(s.get("meta", {}).get("id", f"{split}_{i:05d}"))
        img = s["image"]
        if img.min() < 0 or img.max() > 1:
            raise ValueError(f"export_nyud_layout needs untransformed samples (image in [0, 1]); sample {i} "
                             f"has values in [{img.min():.2f}, {img.max():.2f}]")
        rgb = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(rgb).save(root / "images" / f"{id_}.jpg", quality=quality, subsampling=0)
        if "semseg" in s:
            sem = s["semseg"]
            if not ((sem < 40) | (sem == IGNORE_INDEX)).all() or sem.min() < 0:
                raise ValueError(f"packaging B holds 40 classes: semseg must be 0..39 or 255, sample {i} has "
                                 f"{sorted(set(sem.unique().tolist()) - set(range(40)) - {IGNORE_INDEX})}")
            png = torch.where(sem == IGNORE_INDEX, 0, sem + 1).to(torch.uint8).numpy()
            Image.fromarray(png).save(root / "segmentation" / f"{id_}.png")
        if "depth" in s:
            np.save(root / "depth" / f"{id_}.npy", s["depth"][0].numpy().astype(np.float32))
        if "normals" in s:
            np.save(root / "normals" / f"{id_}.npy", s["normals"].permute(1, 2, 0).numpy().astype(np.float32))
        if "edge" in s:
            if not ((s["edge"] == 0) | (s["edge"] == 1)).all():
                raise ValueError(f"edge maps must be 0 / 1 to export (no ignore pixels); sample {i} is not")
            np.save(root / "edge" / f"{id_}.npy", s["edge"][0].numpy().astype(np.float32))
        ids.append(id_)
    (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
