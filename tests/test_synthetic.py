"""synthetic.py: SyntheticRooms keeps every promise its docstring makes.

Pinned down:
- format: keys, dtypes, shapes and value ranges of dataset[i]; meta id and original size; the
  task subset; the transform hook; negative indices; every documented ValueError and the IndexError.
- geometry: normals recomputed from the depth map (back-projected with the returned intrinsics,
  cross product of central differences) agree with the stored normals away from instance
  boundaries (median angle under 2 degrees), also after a horizontal flip that negates n_x; every
  valid normal faces the camera; floors point up (n_y < 0) and ceilings down in the documented
  frame; depth > 0 exactly where the normal is non-zero; semseg labelled everywhere, holes included.
- labels: every semantic (and instance) boundary is an edge, and every edge pixel touches another
  instance (edges are thin); saliency is exactly the free-standing classes; parts are 1..6 on the
  person, 0 elsewhere, all 255 when no person is visible, and both cases occur.
- determinism: the same (seed, split, index) gives identical tensors (torch.equal), in a fresh
  object and in a DataLoader worker; another index, split or seed gives another scene; the train
  and val scene streams are disjoint; the cache is bit-identical to rendering on demand.
- balance: over 200 training samples every class appears and none covers more than 45% of the
  labelled pixels (rendered at 48 x 64 to stay fast; the scene does not depend on the size, and a
  separate test checks that the class shares barely move with the resolution).
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import synthetic as S
from synthetic import CLASS_NAMES, PART_NAMES, TASKS, SyntheticRooms

sizes = st.tuples(st.integers(16, 40), st.integers(16, 56))
seeds = st.integers(0, 2**32 - 1)
indices = st.integers(0, 10**6)
splits = st.sampled_from(S.SPLITS)


def render(split, seed, index, size):
    """The numpy arrays of one sample (a dataset just long enough to hold `index`)."""
    return SyntheticRooms(split, index + 1, size=size, seed=seed).render(index)


def angles_deg(a, b):
    """Angle between unit vectors a, b (3, ...), stable near 0 and 180 degrees."""
    return np.degrees(2 * np.arctan2(np.linalg.norm(a - b, axis=0), np.linalg.norm(a + b, axis=0)))


def normals_from_depth(depth, K):
    """Oracle: unit normals (3, H-2, W-2) in the dataset's frame from a z-depth map (H, W).

    Back-project every pixel, X = z K^-1 (u, v, 1) (OpenCV axes: x right, y down, z forward), take
    the cross product of the central differences along u and v, orient it towards the camera
    (n . X < 0) and negate z (the dataset's frame has z towards the viewer).
    """
    H, W = depth.shape
    f, cx, cy = K[0, 0], K[0, 2], K[1, 2]
    z = depth.astype(np.float64)
    P = np.stack([(np.arange(W) - cx) / f * z, (np.arange(H)[:, None] - cy) / f * z, z])   # (3, H, W)
    du = P[:, 1:-1, 2:] - P[:, 1:-1, :-2]
    dv = P[:, 2:, 1:-1] - P[:, :-2, 1:-1]
    n = np.cross(du, dv, axis=0)
    n /= np.maximum(np.linalg.norm(n, axis=0), 1e-12)
    n *= -np.sign((n * P[:, 1:-1, 1:-1]).sum(0))
    n[2] *= -1
    return n


def interior(instance, depth):
    """(H-2, W-2) mask of pixels whose 4-neighbours are valid and on the same instance."""
    c = instance[1:-1, 1:-1]
    same = ((instance[:-2, 1:-1] == c) & (instance[2:, 1:-1] == c)
            & (instance[1:-1, :-2] == c) & (instance[1:-1, 2:] == c))
    valid = depth > 0
    return same & valid[1:-1, 1:-1] & valid[:-2, 1:-1] & valid[2:, 1:-1] & valid[1:-1, :-2] & valid[1:-1, 2:]


# ------------------------------------------------------------------------------------------------
# Format


@settings(deadline=None, max_examples=25)
@given(splits, seeds, indices, sizes)
@example("train", 0, 0, (8, 8))
@example("val", 2**64 + 5, 3, (9, 31))
def test_sample_format_and_ranges(split, seed, index, size):
    H, W = size
    ds = SyntheticRooms(split, index + 1, size=size, seed=seed)
    s = ds[index]
    assert set(s) == {"image", "meta", *TASKS}
    expected = {"image": (torch.float32, (3, H, W)), "semseg": (torch.int64, (H, W)),
                "depth": (torch.float32, (1, H, W)), "normals": (torch.float32, (3, H, W)),
                "edge": (torch.float32, (1, H, W)), "sal": (torch.float32, (1, H, W)),
                "parts": (torch.int64, (H, W))}
    for key, (dtype, shape) in expected.items():
        assert s[key].dtype == dtype and tuple(s[key].shape) == shape, (key, s[key].dtype, tuple(s[key].shape))
    assert 0 <= s["image"].min() and s["image"].max() <= 1, (s["image"].min(), s["image"].max())
    q = s["image"] * 255
    assert torch.equal(q, q.round()), "the image is quantised to 8 bits"
    assert 0 <= s["semseg"].min() and s["semseg"].max() < len(CLASS_NAMES), s["semseg"].unique()
    parts = s["parts"]
    assert (parts == 255).all() or (0 <= parts.min() and parts.max() < len(PART_NAMES)), parts.unique()
    for key in ("edge", "sal"):
        assert ((s[key] == 0) | (s[key] == 1)).all(), (key, s[key].unique())
    depth, normals = s["depth"][0], s["normals"]
    assert (depth >= 0).all() and torch.isfinite(depth).all(), depth.min()
    norms = normals.norm(dim=0)
    valid = depth > 0
    assert torch.equal(norms > 0, valid), \
        f"normals non-zero at {(norms > 0).sum()} pixels, depth valid at {valid.sum()}"
    assert (norms[valid] - 1).abs().max() < 1e-6, (norms[valid] - 1).abs().max()
    assert (normals[:, ~valid] == 0).all()
    assert valid.float().mean() > 0.5, f"only {valid.float().mean():.2f} of the depth is valid"
    assert depth[valid].max() < 12, f"deeper than any room: {depth.max():.2f} m"
    assert s["meta"] == {"id": f"synthetic-{split}-s{seed}-{index:06d}", "size": (H, W)}
    assert all(type(x) is int for x in s["meta"]["size"])


def test_tasks_subset_transform_and_indexing():
    ds = SyntheticRooms("val", 3, size=(16, 20), tasks=["depth", "semseg", "depth"])
    s = ds[-1]
    assert list(s) == ["image", "depth", "semseg", "meta"]
    full = SyntheticRooms("val", 3, size=(16, 20))[2]
    assert torch.equal(s["depth"], full["depth"]) and torch.equal(s["image"], full["image"])
    seen = []
    wrapped = SyntheticRooms("val", 3, size=(16, 20), tasks=["edge"], transform=lambda d: seen.append(d) or "done")
    assert wrapped[0] == "done" and list(seen[0]) == ["image", "edge", "meta"]
    assert len(ds) == 3
    assert "cache=False" in repr(ds)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="test"), r"split must be one of \['train', 'val'\], got 'test'"),
    (dict(num_samples=0), r"num_samples must be an int >= 1, got 0"),
    (dict(num_samples=2.5), r"num_samples must be an int >= 1, got 2.5"),
    (dict(num_samples=True), r"num_samples must be an int >= 1, got True"),
    (dict(size=(7, 32)), r"size must be at least 8x8 pixels, got 7x32"),
    (dict(size=(32,)), r"size must be a pair of ints \(H, W\), got \(32,\)"),
    (dict(size=(16.0, 16)), r"size must be a pair of ints \(H, W\), got \(16.0, 16\)"),
    (dict(size=None), r"size must be a pair of ints \(H, W\), got None"),
    (dict(seed=-1), r"seed must be an int >= 0, got -1"),
    (dict(seed=1.5), r"seed must be an int >= 0, got 1.5"),
    (dict(tasks="semseg"),
     r"tasks must be a list of task names, got the string 'semseg' \(did you mean \['semseg'\]\?\)"),
    (dict(tasks=["semseg", "segm"]), r"tasks must be a non-empty list of names from \['semseg', 'depth', 'normals', "
                                     r"'edge', 'sal', 'parts'\], got \['semseg', 'segm'\] \(unknown: \['segm'\]\)"),
    (dict(tasks=[]), r"tasks must be a non-empty list of names from .*got \[\]"),
    (dict(transform="flip"), r"transform must be callable or None, got str"),
    (dict(cache="yes"), r"cache must be True or False, got 'yes'"),
    (dict(cache=True, render_procs=0), r"render_procs must be an int >= 1, got 0"),
])
def test_documented_errors(kwargs, message):
    args = dict(split="train", num_samples=2, size=(16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SyntheticRooms(**args)


@pytest.mark.parametrize("index", [3, -4, 10**9])
def test_index_out_of_range(index):
    with pytest.raises(IndexError, match=f"index {index} out of range for SyntheticRooms of length 3"):
        SyntheticRooms("train", 3, size=(16, 16))[index]


# ------------------------------------------------------------------------------------------------
# Geometry


@settings(deadline=None, max_examples=25)
@given(splits, seeds, indices, st.tuples(st.integers(24, 48), st.integers(32, 64)))
@example("train", 0, 0, (96, 128))
@example("val", 1, 7, (24, 32))
@example("val", 271, 984, (28, 59))        # a grazing silhouette pixel once had n . ray = 0
def test_normals_agree_with_depth_and_face_the_camera(split, seed, index, size):
    a = render(split, seed, index, size)
    depth, normals, K = a["depth"][0], a["normals"], a["K"]
    mask = interior(a["instance"], depth)                     # (H-2, W-2)
    assert mask.sum() > 50, f"only {mask.sum()} interior pixels"
    err = angles_deg(normals_from_depth(depth, K), normals[:, 1:-1, 1:-1])[mask]
    assert np.median(err) < 2, f"median {np.median(err):.2f} deg, 90th percentile {np.percentile(err, 90):.2f}"
    # a horizontal flip of the image negates n_x: the flipped depth must explain the flipped normals
    flipped = normals[:, :, ::-1] * np.array([-1, 1, 1], np.float32)[:, None, None]
    err_flip = angles_deg(normals_from_depth(depth[:, ::-1], K), flipped[:, 1:-1, 1:-1])[mask[:, ::-1]]
    assert np.median(err_flip) < 2, f"after a flip: median {np.median(err_flip):.2f} deg"
    # facing the camera: n . ray < 0, with the ray ((u - cx) / f, (v - cy) / f, -1) in this frame
    H, W = depth.shape
    f, cx, cy = K[0, 0], K[0, 2], K[1, 2]
    dot = normals[0] * (np.arange(W) - cx) / f + normals[1] * (np.arange(H)[:, None] - cy) / f - normals[2]
    valid = depth > 0
    assert (dot[valid] < 0).all(), \
        f"{(dot[valid] >= 0).sum()} valid normals face away, max n.ray {dot[valid].max():.3f}"
    # y points down the image: the floor's normal points up (n_y < 0), the ceiling's down
    floor, ceiling = valid & (a["semseg"] == S.FLOOR), valid & (a["semseg"] == S.CEILING)
    assert (normals[1][floor] < -0.5).all() and (normals[1][ceiling] > 0.5).all()


def test_holes_are_invalid_depth_and_normals_but_labelled():
    ds = SyntheticRooms("train", 30, size=(48, 64))
    holes = 0
    for i in range(len(ds)):
        s = ds[i]
        invalid = s["depth"][0] == 0
        holes += int(invalid.sum())
        assert (s["normals"][:, invalid] == 0).all()
        assert ((s["semseg"] >= 0) & (s["semseg"] < len(CLASS_NAMES))).all(), "semseg is labelled in holes too"
        assert (s["edge"] != 255).all() and (s["sal"] != 255).all()
    assert 0 < holes < 0.1 * 30 * 48 * 64, f"{holes} invalid pixels over 30 images"


# ------------------------------------------------------------------------------------------------
# Labels


@settings(deadline=None, max_examples=30)
@given(splits, seeds, indices, sizes)
@example("train", 0, 5, (8, 8))
def test_every_semantic_boundary_is_an_edge_and_edges_are_thin(split, seed, index, size):
    a = render(split, seed, index, size)
    edge, semseg, inst = a["edge"][0] > 0, a["semseg"], a["instance"]
    for label in (semseg, inst):
        across = label[:, :-1] != label[:, 1:]                # (H, W-1) left/right pairs
        missed = across & ~(edge[:, :-1] | edge[:, 1:])
        assert not missed.any(), f"{missed.sum()} left/right boundary pairs without an edge"
        across = label[:-1] != label[1:]                      # (H-1, W) top/bottom pairs
        missed = across & ~(edge[:-1] | edge[1:])
        assert not missed.any(), f"{missed.sum()} top/bottom boundary pairs without an edge"
    # every edge pixel touches another instance, so edges are one pixel either side of a boundary
    touches = np.zeros_like(edge)
    touches[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    touches[:, 1:] |= inst[:, :-1] != inst[:, 1:]
    touches[:-1] |= inst[:-1] != inst[1:]
    touches[1:] |= inst[:-1] != inst[1:]
    assert not (edge & ~touches).any(), f"{(edge & ~touches).sum()} edge pixels away from any boundary"
    assert np.array_equal(a["sal"][0] > 0, np.isin(semseg, S.SALIENT)), "saliency = box, ball, cylinder, person"


def test_parts_valid_only_as_documented():
    ds = SyntheticRooms("val", 40, size=(48, 64), tasks=["semseg", "parts"])
    with_person = without = 0
    for i in range(len(ds)):
        s = ds[i]
        person, parts = s["semseg"] == S.PERSON, s["parts"]
        if person.any():
            with_person += 1
            assert ((parts[person] >= 1) & (parts[person] < len(PART_NAMES))).all(), parts[person].unique()
            assert (parts[~person] == 0).all(), parts[~person].unique()
        else:
            without += 1
            assert (parts == 255).all(), f"sample {i} has no person but parts {parts.unique()}"
    assert with_person >= 20 and without >= 2, (with_person, without)


def test_all_parts_and_classes_are_used():
    ds = SyntheticRooms("train", 60, size=(48, 64), tasks=["parts"])
    seen = set()
    for i in range(len(ds)):
        seen |= set(ds[i]["parts"].unique().tolist())
    assert seen == set(range(len(PART_NAMES))) | {255}, sorted(seen)


# ------------------------------------------------------------------------------------------------
# Determinism


@settings(deadline=None, max_examples=15)
@given(splits, seeds, indices)
def test_same_seed_same_sample_and_others_differ(split, seed, index):
    size = (16, 24)
    a = SyntheticRooms(split, index + 2, size=size, seed=seed)[index]
    b = SyntheticRooms(split, index + 2, size=size, seed=seed)[index]
    for key in TASKS.keys() | {"image"}:
        assert torch.equal(a[key], b[key]), key
    other_split = "val" if split == "train" else "train"
    for other in (SyntheticRooms(split, index + 2, size=size, seed=seed)[index + 1],
                  SyntheticRooms(other_split, index + 2, size=size, seed=seed)[index],
                  SyntheticRooms(split, index + 2, size=size, seed=seed + 1)[index]):
        assert not torch.equal(a["image"], other["image"])
        assert not torch.equal(a["depth"], other["depth"])


def test_train_and_val_never_share_a_scene():
    n = 300

    def signature(ds, i):
        scene = ds.scene(i)
        return tuple(np.round(np.concatenate([scene["room"], scene["camera"]["pos"]]), 9))

    train, val = SyntheticRooms("train", n), SyntheticRooms("val", n)
    train_scenes = {signature(train, i) for i in range(n)}
    val_scenes = {signature(val, i) for i in range(n)}
    assert len(train_scenes) == n and len(val_scenes) == n
    assert not train_scenes & val_scenes


def test_identical_in_a_dataloader_worker_and_from_the_cache():
    ds = SyntheticRooms("train", 4, size=(16, 24))
    cached = SyntheticRooms("train", 4, size=(16, 24), cache=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    for i, s in enumerate(loader):
        direct, from_cache = ds[i], cached[i]
        for key in TASKS.keys() | {"image"}:
            assert torch.equal(s[key], direct[key]), (i, key)
            assert torch.equal(from_cache[key], direct[key]) and from_cache[key].dtype == direct[key].dtype, (i, key)


def test_a_cache_rendered_by_several_processes_is_the_same():
    one = SyntheticRooms("val", 7, size=(16, 24), tasks=["semseg", "depth", "edge"], cache=True)
    three = SyntheticRooms("val", 7, size=(16, 24), tasks=["semseg", "depth", "edge"], cache=True, render_procs=3)
    assert len(three._cache) == 7
    for i in range(7):
        for key in ("image", "semseg", "depth", "edge"):
            assert torch.equal(one[i][key], three[i][key]) and one[i][key].dtype == three[i][key].dtype, (i, key)


def test_scene_is_the_same_at_every_size():
    small, large = SyntheticRooms("val", 40, size=(48, 64)), SyntheticRooms("val", 40, size=(96, 128))
    share = lambda ds: np.bincount(np.concatenate([ds[i]["semseg"].numpy().ravel() for i in range(len(ds))]),
                                   minlength=len(CLASS_NAMES)) / (len(ds) * ds.size[0] * ds.size[1])
    diff = np.abs(share(small) - share(large)).max()
    assert diff < 0.01, f"class shares move by {diff:.3f} between 48x64 and 96x128"


# ------------------------------------------------------------------------------------------------
# Balance


def test_class_balance_over_200_samples():
    """About 2 s: 200 renders at 48 x 64 (the scene does not depend on the size)."""
    ds = SyntheticRooms("train", 200, size=(48, 64), tasks=["semseg"])
    counts = np.zeros(len(CLASS_NAMES))
    for i in range(len(ds)):
        counts += np.bincount(ds[i]["semseg"].numpy().ravel(), minlength=len(CLASS_NAMES))
    share = counts / counts.sum()
    table = ", ".join(f"{name} {100 * p:.1f}%" for name, p in zip(CLASS_NAMES, share))
    assert (share > 0).all(), f"a class never appears: {table}"
    assert share.max() < 0.45, f"a class covers more than 45% of the pixels: {table}"
