"""SyntheticRooms: a procedural, offline multi-task dataset in which every label comes from one 3-D scene.

Why it exists. The real benchmarks (NYUD-v2, PASCAL-Context) are downloads of several gigabytes.
This dataset needs nothing but numpy, and it is built so that multi-task learning has something to
share: depth, surface normals, classes, edges, saliency and human parts all come from the same
ray-cast scene, and the image is formed from it so that every task needs more than colour.

The scene (all units are metres, world frame x, y horizontal, z up):

    room     an axis-aligned box [0, Lx] x [0, Ly] x [0, Lz]: floor, ceiling and four walls
    objects  up to 7 boxes (rotated about z), balls and cylinders (upright or lying) on the floor
    person   with probability PERSON_PROB, a standing figure made of primitives: a sphere head,
             cylinders for torso, arms and legs, each limb split into an upper and a lower part
    decals   pictures and doors painted on a wall, a mat painted on the floor: new classes and
             semantic boundaries with no geometric boundary (the surface stays flat)
    camera   pinhole, backed against a random wall, looking into the room: random horizontal field
             of view, height, yaw, downward pitch and a little roll

Every pixel casts one ray; the nearest hit decides everything about that pixel (instance, class,
depth, normal, texture coordinates). Labels, for an image of H x W pixels:

    semseg   (H, W) int64 class ids 0..len(CLASS_NAMES)-1; every pixel is labelled (no 255)
    depth    (1, H, W) float32 z-depth in metres: the distance along the optical axis, not along the
             ray, as NYUD's depth maps are. 0 marks an invalid (hole) pixel.
    normals  (3, H, W) float32 unit vectors in the camera frame, analytic (from the primitive, not
             from the depth map); the zero vector marks an invalid (hole) pixel.
    edge     (1, H, W) float32 in {0, 1}: instance boundaries, one pixel wide. For every pair of
             4-neighbours that belong to different instances, the nearer pixel of the pair is an
             edge, so contours hug the occluding object. Different classes are always different
             instances, so every semantic boundary is an edge. Each wall is its own instance (room
             corners are edges); the person is one instance (part boundaries are not edges, as in
             PASCAL, whose edges come from the object label map).
    sal      (1, H, W) float32 in {0, 1}: the free-standing objects (box, ball, cylinder, person).
             Decals are not salient: they are paint on the wall, not things in front of it.
    parts    (H, W) int64 PART_NAMES ids; 0 (background) off the person; all 255 (ignore) when no
             person pixel is visible, which is what PASCAL does for images without people.

Camera frame of the normals (our reading of NYUD's convention; see Notes): x to the right of the
image, y down the image, z out of the screen towards the viewer. A surface facing the camera has
n . ray < 0, where ray is the viewing direction from the camera to the point, (x, y, -1) / norm in
this frame; a wall seen head-on has n = (0, 0, 1), the floor seen from above has n_y < 0. A
horizontal flip of the image negates n_x (which is what the datasets.py transforms do).

Image formation (every cue that makes the tasks depend on geometry, not colour alone):

    albedo   textures in world (or object) coordinates in metres: checker tiles, stripes, wavy grain,
             blotches, which shrink with distance and squash with slant through the pinhole.
             Colour palettes overlap on purpose: a beige box on a beige wall is common.
    shading  I = albedo * (a * (3 + n_z) / 4 + (1 - a) * max(0, n . L)): a hemisphere ambient term
             a plus a Lambertian directional light L from a random direction above, so planes of
             different orientation get different brightness.
    fog      I = I * exp(-sigma * depth) + c_fog * (1 - exp(-sigma * depth)): depth is visible in contrast.
    camera   auto-exposure to a random mean level, white balance, vignetting, zero-mean sensor
             noise, clip to [0, 1], quantise to 8 bits (as real images are; the cache is lossless).

Invalid depth like a Kinect's: a few elliptic holes, and projector shadows, the strip of far surface
just left of a near object that the sensor's projector (assumed to the camera's right, baseline b)
cannot see, f * b * (1/z_near - 1/z_far) pixels wide. Depth is 0 and normals are zero there; classes,
edges and parts are still labelled.

Determinism: sample i of (seed, split) is drawn from numpy.random.default_rng(SeedSequence(seed,
spawn_key=(split_key, i))): a pure function of (seed, split, i), identical in any DataLoader worker.
train and val use different spawn keys (independent streams: they never share a scene). All scene
parameters are drawn before anything that depends on the image size, so the same (seed, split, i) is
the same room at every resolution (only the sensor noise differs).

Use:

    from synthetic import SyntheticRooms, CLASS_NAMES, TASKS
    ds = SyntheticRooms("train", 2000, size=(96, 128), seed=0)
    sample = ds[0]                  # dict of tensors, see SyntheticRooms
    arrays = ds.render(0)           # the same as numpy arrays, plus intrinsics and camera pose

    python synthetic.py out.png     # a grid of a few samples with all their labels (synthetic_picture.py,
                                    # matplotlib)

Speed: vectorised numpy; each primitive is ray-cast only inside the screen rectangle its bounding
box projects to.

Notes:
    - NYUD's normal convention is not documented with the MTI-Net files. We follow the NYU Depth
      toolkit colouring as other datasets describe it (red = right, green = down, blue = towards the
      camera); if the real files disagree, change `_to_output_frame` (on real data, floors: n_y < 0).
    - Shadows and inter-reflections are not rendered (the light only shades); decals are painted where
      their rectangle meets the host surface; labels and image are not anti-aliased below a pixel.
"""
import functools
import math
import multiprocessing
import operator
import sys

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Public names

CLASS_NAMES = ["wall", "floor", "ceiling", "box", "ball", "cylinder", "picture", "mat", "door", "person"]
# Seven entries like PASCAL's merged human-parts table, so models sized for PASCAL parts fit unchanged.
PART_NAMES = ["background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg"]
TASKS = {"semseg": len(CLASS_NAMES), "depth": 1, "normals": 3, "edge": 1, "sal": 1, "parts": len(PART_NAMES)}
SPLITS = ("train", "val")
IGNORE = 255
PERSON_PROB = 0.8  # the other 20% of images carry all-255 parts, as PASCAL's person-free images do

WALL, FLOOR, CEILING, BOX, BALL, CYLINDER, PICTURE, MAT, DOOR, PERSON = range(len(CLASS_NAMES))
SALIENT = (BOX, BALL, CYLINDER, PERSON)
HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = range(1, len(PART_NAMES))

_SPLIT_KEY = {"train": 0, "val": 1}  # spawn keys of the two independent seed streams
_COMPACT = {"semseg": np.uint8, "parts": np.uint8, "edge": bool, "sal": bool}   # cache dtypes (others stay float32)
_MIN_SIZE = 8

# ------------------------------------------------------------------------------------------------
# Colours and textures

# sRGB-ish reflectances in [0, 1]. Class palettes below overlap on purpose.
_COLOURS = {
    "white": (0.92, 0.92, 0.90), "cream": (0.93, 0.87, 0.74), "beige": (0.80, 0.72, 0.58), "black": (0.10, 0.10, 0.11),
    "light grey": (0.70, 0.70, 0.72), "grey": (0.50, 0.50, 0.52), "dark grey": (0.28, 0.28, 0.30),
    "tan": (0.72, 0.55, 0.38), "brown": (0.50, 0.33, 0.20), "dark brown": (0.30, 0.20, 0.12), "red": (0.70, 0.18, 0.15),
    "orange": (0.90, 0.50, 0.15), "yellow": (0.90, 0.80, 0.30), "green": (0.30, 0.55, 0.30), "sage": (0.60, 0.68, 0.55),
    "blue": (0.20, 0.35, 0.70), "pale blue": (0.65, 0.75, 0.85), "navy": (0.12, 0.15, 0.35), "pink": (0.85, 0.60, 0.65),
    "skin 1": (0.90, 0.72, 0.60), "skin 2": (0.72, 0.52, 0.38), "skin 3": (0.42, 0.28, 0.20),
}
_PALETTE = {
    WALL: ["white", "cream", "beige", "light grey", "pale blue", "sage", "pink"],
    FLOOR: ["tan", "brown", "dark brown", "grey", "beige", "dark grey", "light grey"],
    CEILING: ["white", "cream", "light grey"],
    BOX: ["tan", "brown", "white", "grey", "red", "blue", "beige", "cream"],
    BALL: ["red", "orange", "yellow", "blue", "green", "white", "pink", "tan"],
    CYLINDER: ["grey", "dark grey", "white", "green", "navy", "tan", "yellow", "beige"],
    PICTURE: ["blue", "green", "red", "orange", "yellow", "navy", "pale blue", "white", "sage"],
    MAT: ["red", "navy", "green", "beige", "grey", "brown", "pink", "tan"],
    DOOR: ["white", "brown", "dark brown", "tan", "light grey", "cream"],
    "frame": ["dark brown", "black", "white", "tan", "grey"],
    "shirt": ["red", "blue", "navy", "white", "green", "grey", "yellow", "black", "beige", "pink"],
    "trousers": ["navy", "black", "dark grey", "beige", "blue", "brown", "tan"],
    "skin": ["skin 1", "skin 2", "skin 3"],
    "hair": ["black", "dark brown", "brown", "tan", "grey"],
}
_PALETTE = {key: np.array([_COLOURS[name] for name in names]) for key, names in _PALETTE.items()}  # (n, 3)

PLAIN, CHECKER, STRIPES, WAVY, BLOTCH = range(5)   # texture kinds, see _texture
# Checker needs flat faces: its cells are cut by grid planes, and on a curved surface that touches
# a grid plane (a cylinder cap) rounding noise would flicker. So only planar classes use it.
_KINDS = {
    WALL: [PLAIN, PLAIN, STRIPES, BLOTCH], FLOOR: [CHECKER, WAVY, BLOTCH, STRIPES],
    CEILING: [PLAIN, PLAIN, BLOTCH], BOX: [PLAIN, STRIPES, WAVY, CHECKER],
    BALL: [PLAIN, STRIPES, BLOTCH], CYLINDER: [PLAIN, STRIPES, BLOTCH],
    PICTURE: [BLOTCH, STRIPES, WAVY], MAT: [STRIPES, CHECKER, BLOTCH], DOOR: [PLAIN, WAVY],
    "shirt": [PLAIN, PLAIN, STRIPES],
}


def _colour(rng, palette, jitter=0.08):
    """One colour of a palette (a key of _PALETTE), each channel scaled by 1 +- jitter: (3,) float32."""
    colours = _PALETTE[palette]
    u = rng.random(4)
    base = colours[int(u[0] * len(colours))]
    return np.minimum(base * (1 - jitter + 2 * jitter * u[1:]), 1, dtype=np.float32)


def _material(rng, cls, scale=(0.15, 0.6), axis=None):
    """A random texture for a surface of class `cls` (see _texture for the kinds).

    `scale` is the range of the pattern period in metres; `axis` fixes the stripe direction
    (None: random). Returns a dict of float32 arrays (cheap to evaluate, no Python objects inside).
    """
    kinds, colours = _KINDS[cls], _PALETTE[cls]
    u = rng.random(18)
    c1 = np.minimum(colours[int(u[0] * len(colours))] * (0.92 + 0.16 * u[1:4]), 1)
    # the second colour: a darker shade of the first, or another colour of the class
    c2 = c1 * (0.55 + 0.3 * u[5]) if u[4] < 0.5 else \
        np.minimum(colours[int(u[6] * len(colours))] * (0.92 + 0.16 * u[7:10]), 1)
    period = scale[0] + (scale[1] - scale[0]) * u[10]
    k = rng.standard_normal((3, 3))
    if axis is not None:
        k[0] = axis
    k *= (2 * math.pi / period) / np.sqrt((k * k).sum(1, keepdims=True))  # wave vectors, rad / m
    return {"kind": kinds[int(u[11] * len(kinds))], "c1": c1.astype(np.float32), "c2": c2.astype(np.float32),
            "period": np.float32(period), "k": k.astype(np.float32),
            "phase": (2 * math.pi * u[12:15]).astype(np.float32), "offset": u[15:18].astype(np.float32)}


def _dot(k, P):
    """k . P for a fixed 3-vector k and points P of shape (3, ...): (...)."""
    return np.einsum("i,i...->...", k, P)


def _texture(mat, P):
    """Albedo (3, ...) of material `mat` at texture coordinates P (3, ...) in metres.

    Each kind mixes c1 + (c2 - c1) * m with a pattern m in [0, 1]: PLAIN m = 0; CHECKER cubic
    cells of side `period` (on a plane: tiles); STRIPES a sinusoid along k0; WAVY stripes whose phase
    wanders along k1 (wood grain, planks); BLOTCH three crossed sinusoids (carpet, paint).
    """
    kind, k, ph = mat["kind"], mat["k"], mat["phase"]
    shape = (3,) + (1,) * (P.ndim - 1)
    c1 = mat["c1"].reshape(shape)
    if kind == PLAIN:
        return np.broadcast_to(c1, P.shape)
    if kind == CHECKER:
        o, s = mat["offset"], mat["period"]
        cells = np.floor(P[0] / s + o[0]) + np.floor(P[1] / s + o[1]) + np.floor(P[2] / s + o[2])
        m = cells - 2 * np.floor(cells / 2)                     # parity: 0 or 1
    elif kind == STRIPES:
        m = 0.5 + 0.5 * np.sin(_dot(k[0], P) + ph[0])
    elif kind == WAVY:
        m = 0.5 + 0.5 * np.sin(_dot(k[0], P) + 2.5 * np.sin(0.25 * _dot(k[1], P) + ph[1]))
    elif kind == BLOTCH:
        m = 0.5 + (np.sin(_dot(k[0], P) + ph[0]) + np.sin(_dot(k[1], P) + ph[1])
                   + np.sin(_dot(k[2], P) + ph[2])) / 6
    else:
        raise ValueError(f"unknown texture kind {kind}")
    return c1 + (mat["c2"] - mat["c1"]).reshape(shape) * m[None]


# ------------------------------------------------------------------------------------------------
# Scene sampling. Everything is in metres and radians; nothing depends on the image size.

def _camera_rotation(yaw, pitch, roll):
    """Camera-to-world rotation R (3, 3): its columns are the camera axes in OpenCV order (x right,
    y down, z forward) expressed in the world frame (z up). pitch < 0 looks down."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    forward = np.array([cp * cy, cp * sy, sp])
    right = np.array([sy, -cy, 0.0])
    down = np.array([sp * cy, sp * sy, -cp])              # forward x right: (right, down, forward) is right-handed
    right, down = (math.cos(roll) * right + math.sin(roll) * down,
                   -math.sin(roll) * right + math.cos(roll) * down)
    return np.stack([right, down, forward], axis=1)


def _wall_hit(cam_xy, heading, room):
    """Where a horizontal ray from the camera meets the walls: (wall instance id 2..5, point (2,))."""
    d = np.array([math.cos(heading), math.sin(heading)])
    t, wall = np.inf, -1
    for axis in range(2):
        if abs(d[axis]) < 1e-9:
            continue
        ta = ((room[axis] if d[axis] > 0 else 0.0) - cam_xy[axis]) / d[axis]
        if ta < t:
            t, wall = ta, 2 + 2 * axis + int(d[axis] > 0)
    return wall, cam_xy + t * d


def _place(rng, scene, radius, r_range, tries=16):
    """A floor point (x, y) for a footprint of `radius` metres in view of the camera, inside the room
    and clear of the footprints placed so far; None when all `tries` candidates fail."""
    cam, room = scene["camera"], scene["room"]
    u = rng.random((2, tries))
    r = r_range[0] + (r_range[1] - r_range[0]) * u[0]
    a = cam["yaw"] + (u[1] - 0.5) * 0.9 * cam["hfov"]                # inside the horizontal view
    x, y = cam["pos"][0] + r * np.cos(a), cam["pos"][1] + r * np.sin(a)   # (tries,) candidates
    m = radius + 0.02
    ok = (x > m) & (y > m) & (x < room[0] - m) & (y < room[1] - m)
    F = scene["footprints"]                                          # (k, 3): x, y, radius
    ok &= (((x[:, None] - F[:, 0]) ** 2 + (y[:, None] - F[:, 1]) ** 2) > (radius + F[:, 2] + 0.05) ** 2).all(1)
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    scene["footprints"] = np.vstack([F, [[x[i], y[i], radius]]])
    return np.array([x[i], y[i]])


def _sample_person(rng, scene):
    """A standing figure: a sphere head and five capped cylinders (torso, two arms, two legs).

    Cylinder i spans s in [0, h_i] along its axis from its base b_i; pixels with s < split_i get
    part parts_lo_i and colour colour_lo_i, the rest parts_hi_i / colour_hi_i (elbows and knees).
    Returns a dict of arrays, or None when no free spot was found.
    """
    u = rng.random(12)
    height = 1.5 + 0.4 * u[0]
    sc = height / 1.75                                    # proportions of a 1.75 m adult
    xy = _place(rng, scene, 0.3 * sc, (1.6, 4.5))
    if xy is None:
        return None
    face = 2 * math.pi * u[1]
    fwd, lat, up = np.array([math.cos(face), math.sin(face), 0.0]), np.array([-math.sin(face), math.cos(face), 0.0]), \
        np.array([0.0, 0.0, 1.0])
    base = np.array([xy[0], xy[1], 0.0])
    skin, shirt, trousers = _colour(rng, "skin"), _colour(rng, "shirt"), _colour(rng, "trousers")
    sleeve = shirt if u[2] < 0.4 else skin               # long or short sleeves (lower arm colour)
    hip, shoulder = 0.47 * height, 0.81 * height
    head_r = 0.11 * sc
    head_c = base + up * (shoulder + 0.8 * head_r)          # the head sits on the shoulders (no neck)
    torso_r, arm_r, leg_r, arm_len = 0.16 * sc, 0.045 * sc, 0.07 * sc, 0.36 * height
    b, a, r, h, split, lo, hi, c_lo, c_hi = [], [], [], [], [], [], [], [], []

    def cylinder(b_, a_, r_, h_, split_, parts, colours):
        for lst, v in zip((b, a, r, h, split, lo, hi, c_lo, c_hi), (b_, a_, r_, h_, split_) + parts + colours):
            lst.append(v)

    torso_h = shoulder - hip + 0.05 * sc                   # from just below the hips to the shoulders
    cylinder(base + up * (hip - 0.05 * sc), up, torso_r, torso_h, 0.0, (TORSO, TORSO), (shirt, shirt))
    for side, (tilt, swing) in zip((-1, 1), (u[3:5], u[5:7])):
        tilt, swing = 0.05 + 0.4 * tilt, 0.7 * (swing - 0.5)  # radians: out to the side, forward/back
        axis = -up * math.cos(tilt) + side * lat * math.sin(tilt) + fwd * math.sin(swing)
        shoulder_pt = base + up * (shoulder - arm_r) + side * lat * (torso_r + arm_r + 0.01)
        # axis from the shoulder down: s < split is the upper arm
        cylinder(shoulder_pt, axis / np.linalg.norm(axis), arm_r, arm_len, arm_len / 2,
                 (UPPER_ARM, LOWER_ARM), (shirt, sleeve))
    for side, step in zip((-1, 1), u[7:9]):
        foot = base + side * lat * 0.085 * sc + fwd * 0.24 * (step - 0.5)
        # axis from the foot up: s < split is the lower leg
        cylinder(foot, up, leg_r, hip, hip / 2, (LOWER_LEG, UPPER_LEG), (trousers, trousers))
    shirt_mat = _material(rng, "shirt", (0.05, 0.15))
    shirt_mat.update(c1=shirt, c2=(shirt * 0.6).astype(np.float32))
    return {"b": np.array(b), "a": np.array(a), "r": np.array(r), "h": np.array(h), "split": np.array(split),
            "parts_lo": np.array(lo), "parts_hi": np.array(hi),
            "colour_lo": np.array(c_lo, np.float32), "colour_hi": np.array(c_hi, np.float32), "torso": 0,
            "shirt": shirt_mat,
            "head_c": head_c, "head_r": head_r, "skin": skin, "hair": _colour(rng, "hair"),
            # hair covers the head above a plane tilted towards the back of the head
            "hair_dir": (up - 0.6 * fwd) / math.hypot(1, 0.6), "hair_offset": 0.25 * head_r}


def sample_scene(rng):
    """Draw one scene (room, camera, light, decals, person, objects, holes) from a numpy Generator.

    Returns a dict; the renderer reads it and SyntheticRooms.scene(i) hands it out for inspection.
    """
    u = rng.random(16)
    room = np.array([3.5 + 3.5 * u[0], 3.5 + 3.5 * u[1], 2.5 + 0.7 * u[2]])   # Lx, Ly, Lz
    # --- camera: backed against a random wall, looking into the room
    hfov = math.radians(50 + 22 * u[3])                 # NYUD's Kinect: about 58 degrees
    back_wall = int(4 * u[4])                           # 0: x = 0, 1: x = Lx, 2: y = 0, 3: y = Ly
    along, off = 0.2 + 0.6 * u[5], 0.3 + 0.7 * u[6]     # position along that wall (fraction), metres from it
    into = (0.0, math.pi, 0.5 * math.pi, -0.5 * math.pi)[back_wall]
    xy = [np.array([off, along * room[1]]), np.array([room[0] - off, along * room[1]]),
          np.array([along * room[0], off]), np.array([along * room[0], room[1] - off])][back_wall]
    yaw = into + 1.4 * (u[7] - 0.5)
    pitch = -math.radians(-3 + 38 * u[8])               # from 3 degrees up to 35 down
    roll = math.radians(4 * (u[9] - 0.5))
    cam_pos = np.array([xy[0], xy[1], 1.0 + 0.7 * u[10]])
    camera = {"pos": cam_pos, "yaw": yaw, "pitch": pitch, "roll": roll, "hfov": hfov,
              "R": _camera_rotation(yaw, pitch, roll)}
    scene = {"room": room, "camera": camera, "footprints": np.array([[cam_pos[0], cam_pos[1], 0.6]])}
    # --- light and camera response
    el, az = math.radians(25 + 50 * u[11]), 2 * math.pi * u[12]
    scene["light"] = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    v = rng.random(10)
    scene["ambient"] = 0.25 + 0.25 * v[0]
    scene["fog"] = (0.12 * v[1], (0.4 + 0.4 * v[2]) * (0.9 + 0.2 * v[3:6]))   # sigma (1/m), colour
    scene["white_balance"] = 0.92 + 0.16 * rng.random(3)
    scene["exposure"] = 0.35 + 0.2 * v[6]               # auto-exposure target: mean image value
    scene["vignette"] = 0.35 * v[7]
    scene["noise"] = 0.004 + 0.021 * v[8]               # sensor noise standard deviation
    # --- room surfaces (all walls share one paint, as in most rooms)
    horizontal = rng.standard_normal(3) * np.array([1.0, 1.0, 0.0])
    scene["materials"] = {WALL: _material(rng, WALL, (0.1, 0.5), axis=horizontal),
                          FLOOR: _material(rng, FLOOR, (0.2, 0.8), axis=horizontal),
                          CEILING: _material(rng, CEILING, (0.5, 1.5))}
    # --- decals: pictures and a door on walls in view, a mat on the floor in view
    decals = []
    wall_colour = scene["materials"][WALL]["c1"]
    for cls, prob in ((PICTURE, 0.9), (PICTURE, 0.6), (DOOR, 0.7)):
        w = rng.random(5)
        if w[0] >= prob:
            continue
        wall, hit = _wall_hit(cam_pos[:2], yaw + (w[1] - 0.5) * 0.9 * hfov, room)
        s_axis = 1 if wall in (2, 3) else 0               # walls x = const run along y, and vice versa
        if cls == PICTURE:
            hw, hh = 0.25 + 0.45 * w[2], 0.2 + 0.3 * w[3]
            zc = min(1.1 + 0.7 * w[4], room[2] - hh - 0.1)
        else:
            hw, hh = 0.4 + 0.1 * w[2], 0.98 + 0.1 * w[3]
            zc = hh                                       # a door stands on the floor
        sc = float(np.clip(hit[s_axis], hw + 0.05, room[s_axis] - hw - 0.05))
        mat = _material(rng, cls, (0.08, 0.3))
        for _ in range(8):                                # keep it visible against its wall
            if np.abs(mat["c1"] - wall_colour).sum() >= 0.25:
                break
            mat["c1"] = _colour(rng, cls)
        decals.append({"cls": cls, "host": wall, "s_axis": s_axis, "centre": np.array([sc, zc]),
                       "half": np.array([hw, hh]), "yaw": 0.0, "mat": mat,
                       "frame": (0.04 + 0.08 * rng.random(), _colour(rng, "frame"))})
    w = rng.random(6)
    if w[0] < 0.75:
        heading = yaw + (w[1] - 0.5) * 0.7 * hfov
        dist = 1.3 + 2.2 * w[2]
        centre = np.clip(cam_pos[:2] + dist * np.array([math.cos(heading), math.sin(heading)]), 0.3, room[:2] - 0.3)
        decals.append({"cls": MAT, "host": 0, "s_axis": None, "centre": centre,
                       "half": np.array([0.4 + 0.8 * w[3], 0.3 + 0.6 * w[4]]), "yaw": math.pi * w[5],
                       "mat": _material(rng, MAT, (0.08, 0.4)), "frame": (0.1 * rng.random(), _colour(rng, MAT))})
    scene["decals"] = decals
    # --- the person first (it needs the most room), then the objects, all resting on the floor
    scene["person"] = _sample_person(rng, scene) if rng.random() < PERSON_PROB else None
    objects = []
    for _ in range(int(rng.integers(3, 8))):
        w = rng.random(6)
        kind = (BOX, BALL, CYLINDER)[int(3 * w[0])]
        if kind == BOX:
            half = np.array([0.15 + 0.4 * w[1], 0.15 + 0.4 * w[2], 0.12 + 0.6 * w[3]])
            xy = _place(rng, scene, math.hypot(half[0], half[1]), (1.3, 5.0))
            if xy is not None:
                objects.append({"type": "box", "cls": BOX, "c": np.array([xy[0], xy[1], half[2]]),
                                "half": half, "yaw": math.pi * w[4], "mat": _material(rng, BOX)})
        elif kind == BALL:
            r = 0.12 + 0.26 * w[1]
            xy = _place(rng, scene, r, (1.2, 4.5))
            if xy is not None:
                objects.append({"type": "sphere", "cls": BALL, "c": np.array([xy[0], xy[1], r]), "r": r,
                                "mat": _material(rng, BALL, (0.08, 0.3))})
        else:
            r, h, lying = 0.1 + 0.25 * w[1], 0.3 + 1.0 * w[2], w[3] < 0.3
            heading = math.pi * w[4]
            a = np.array([math.cos(heading), math.sin(heading), 0.0]) if lying else np.array([0.0, 0.0, 1.0])
            xy = _place(rng, scene, math.hypot(h / 2, r) if lying else r, (1.3, 5.0))
            if xy is not None:
                centre = np.array([xy[0], xy[1], r if lying else h / 2])
                rings = a if w[5] < 0.5 else None         # stripes around the axis, or any direction
                objects.append({"type": "cyl", "cls": CYLINDER, "b": centre - a * h / 2, "a": a, "r": r, "h": h,
                                "mat": _material(rng, CYLINDER, (0.08, 0.4), axis=rings)})
    scene["objects"] = objects
    # --- Kinect-like invalid depth: elliptic holes (image-relative) and projector shadows (metric)
    n_holes = int(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]))
    scene["holes"] = np.column_stack([rng.random((n_holes, 2)), 0.01 + 0.05 * rng.random((n_holes, 2))])
    scene["baseline"] = 0.04 * rng.random()             # projector-camera baseline, metres
    return scene


# ------------------------------------------------------------------------------------------------
# Ray casting. Rays are D = R @ ((u - cx) / f, (v - cy) / f, 1): their camera-z component is 1, so
# the ray parameter t of a hit *is* its z-depth. D is not unit length; the quadratics allow for it.
# Misses are t = inf. Camera-space letters: h, w the height and width of the pixel window being cast.

_INF = np.float32(np.inf)
_EPS = np.float32(1e-4)
_CORNERS = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], bool)   # (8, 3): take hi where True


def _hit_sphere(o, D, DD, c, r):
    """Nearest hit of rays o + t D (D: (3, h, w), DD = |D|^2) with a sphere: t (h, w), normals (3, h, w)."""
    oc = (o - c).astype(np.float32)
    b = _dot(oc, D)                                           # (h, w)
    disc = b * b - DD * np.float32(oc @ oc - r * r)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / DD                          # NaN where the ray misses
    t = np.where(t > _EPS, t, _INF)
    n = (oc[:, None, None] + np.where(t < _INF, t, 0) * D) / np.float32(r)
    return t, n


def _hit_cylinder(o, D, DD, b, a, r, h):
    """Nearest hit of the rays with a finite cylinder with both caps: base point b, unit axis a,
    radius r, height h. Returns t (h, w), normals (3, h, w) and s (h, w), the hit's coordinate
    along the axis (0 at the base, h at the top)."""
    oc = o - b                                                # (3,) float64: scalar work stays exact
    oa = float(oc @ a)                                        # the camera's axis coordinate
    C = np.float32(oc @ oc - oa * oa - r * r)
    a32, oc32 = a.astype(np.float32), oc.astype(np.float32)
    Da = _dot(a32, D)                                         # (h, w) D . a
    A = DD - Da * Da                                          # |D_perp|^2
    B = _dot(oc32, D) - Da * np.float32(oa)                   # D_perp . oc_perp
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-B - np.sqrt(B * B - A * C)) / A            # NaN on a miss, inf along the axis
        s_side = np.float32(oa) + t_side * Da
        t_side = np.where((t_side > _EPS) & (s_side >= 0) & (s_side <= h), t_side, _INF)
        # caps: the ray enters the slab 0 <= s <= h through the nearer plane; a hit if inside the disc
        inv = 1 / Da
        t_cap = np.minimum(np.float32(-oa) * inv, np.float32(h - oa) * inv)
        radial = C + t_cap * (2 * B + t_cap * A)              # |oc_perp + t D_perp|^2 - r^2
        t_cap = np.where((t_cap > _EPS) & (radial <= 0), t_cap, _INF)
    side = t_side <= t_cap
    t = np.minimum(t_side, t_cap)
    tt = np.where(t < _INF, t, 0)
    s = np.float32(oa) + tt * Da
    axis = a32[:, None, None]
    n_side = (oc32[:, None, None] + tt * D - s * axis) / np.float32(r)
    n_cap = np.where(s > h / 2, np.float32(1), np.float32(-1)) * axis
    return t, np.where(side, n_side, n_cap), s


def _hit_box(o, D, c, half, yaw):
    """Box rotated by `yaw` about z with centre c and half sizes `half` (slab method in the box frame).
    Returns t (h, w) and world normals (3, h, w)."""
    cs, sn = math.cos(yaw), math.sin(yaw)
    oc = o - c
    ol = (cs * oc[0] + sn * oc[1], -sn * oc[0] + cs * oc[1], oc[2])      # camera in the box frame
    Dl = (cs * D[0] + sn * D[1], -sn * D[0] + cs * D[1], D[2])           # rays in the box frame
    with np.errstate(divide="ignore", invalid="ignore"):
        tn, tf = [], []
        for k in range(3):
            inv = 1 / Dl[k]
            t1, t2 = (-half[k] - ol[k]) * inv, (half[k] - ol[k]) * inv
            tn.append(np.minimum(t1, t2))
            tf.append(np.maximum(t1, t2))
    t_near = np.maximum(np.maximum(tn[0], tn[1]), tn[2])
    t_far = np.minimum(np.minimum(tf[0], tf[1]), tf[2])
    t = np.where((t_near <= t_far) & (t_near > _EPS), t_near, _INF).astype(np.float32)
    # entry face: the slab that was entered last; its normal is -sign(D_k) e_k in the box frame
    nl = [np.where(tn[k] == t_near, -np.sign(Dl[k]), 0) for k in range(3)]
    nl[1] = np.where(nl[0] != 0, 0, nl[1])                   # edge-on ties: keep one face
    nl[2] = np.where((nl[0] != 0) | (nl[1] != 0), 0, nl[2])
    n = np.stack([cs * nl[0] - sn * nl[1], sn * nl[0] + cs * nl[1], nl[2]]).astype(np.float32)
    return t, n


def _to_output_frame(R, n_world):
    """World normals (3, H, W) to the output camera frame: x right, y down, z towards the viewer.

    R's columns are the OpenCV camera axes (x right, y down, z forward) in the world, so R^T n gives
    OpenCV coordinates; NYUD's convention (our reading, see the module Notes) points z the other way.
    """
    n = np.einsum("ji,jhw->ihw", R.astype(np.float32), n_world)   # (3, H, W) OpenCV camera frame
    n[2] *= -1
    return n


class _Canvas:
    """The per-pixel buffers of one render and the z-test that fills them."""

    def __init__(self, scene, H, W):
        cam = scene["camera"]
        self.H, self.W = H, W
        self.f = (W / 2) / math.tan(cam["hfov"] / 2)          # focal length, pixels
        self.cx, self.cy = (W - 1) / 2, (H - 1) / 2           # principal point; pixel centres at integers
        self.R, self.o64 = cam["R"], cam["pos"]
        self.o = cam["pos"].astype(np.float32)
        R = self.R.astype(np.float32)
        xn = (np.arange(W, dtype=np.float32) - np.float32(self.cx)) / np.float32(self.f)   # (W,)
        yn = (np.arange(H, dtype=np.float32) - np.float32(self.cy)) / np.float32(self.f)   # (H,)
        self.D = R[:, 0, None, None] * xn + R[:, 1, None, None] * yn[:, None] + R[:, 2, None, None]  # (3, H, W)
        self.DD = np.einsum("ihw,ihw->hw", self.D, self.D)    # (H, W) |D|^2
        self.t = None                                         # (H, W) z-depth of the nearest hit
        self.inst = None                                      # (H, W) its instance id
        self.n = None                                         # (3, H, W) its world normal
        self.albedo = np.empty((3, H, W), np.float32)
        self.part = np.zeros((H, W), np.uint8)
        self.inst_cls = []                                    # instance id -> class id

    def new_instance(self, cls):
        self.inst_cls.append(cls)
        return len(self.inst_cls) - 1

    def window(self, lo, hi):
        """Pixel rectangle (v0, v1, u0, u1) covering the world box [lo, hi], or None if off screen."""
        cam = (np.where(_CORNERS, hi, lo) - self.o64) @ self.R   # (8, 3) corners in OpenCV camera coordinates
        z = cam[:, 2]
        z_min, z_max = z.min(), z.max()
        if z_max <= 1e-3:
            return None                                       # entirely behind the camera
        if z_min <= 1e-3:
            return 0, self.H, 0, self.W                       # straddles the camera plane: no tight box
        uv = cam[:, :2] / z[:, None]                          # (8, 2) normalised image coordinates
        (x0, y0), (x1, y1) = uv.min(0).tolist(), uv.max(0).tolist()
        u0, u1 = max(math.floor(self.f * x0 + self.cx), 0), min(math.ceil(self.f * x1 + self.cx) + 1, self.W)
        v0, v1 = max(math.floor(self.f * y0 + self.cy), 0), min(math.ceil(self.f * y1 + self.cy) + 1, self.H)
        return None if u0 >= u1 or v0 >= v1 else (v0, v1, u0, u1)

    def draw(self, win, t, n, inst, albedo_of, part=None):
        """z-test hits t (h, w) with normals n (3, h, w) inside window `win`; where they are nearer,
        write every buffer. `albedo_of(P)` gives the albedo (3, h, w) at the hit points P (3, h, w)."""
        v0, v1, u0, u1 = win
        t_buf = self.t[v0:v1, u0:u1]
        nearer = t < t_buf                                   # (h, w)
        if not nearer.any():
            return
        np.copyto(t_buf, t, where=nearer)
        np.copyto(self.inst[v0:v1, u0:u1], inst, where=nearer)
        np.copyto(self.n[:, v0:v1, u0:u1], n, where=nearer)
        P = self.o[:, None, None] + np.where(nearer, t, 0) * self.D[:, v0:v1, u0:u1]
        np.copyto(self.albedo[:, v0:v1, u0:u1], albedo_of(P), where=nearer)
        if part is not None:
            np.copyto(self.part[v0:v1, u0:u1], part, where=nearer)


def _bbox(mask):
    """The smallest (row slice, column slice) holding every True of a 2-D mask (which has one)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _draw_room(cv, scene):
    """Floor, ceiling and walls for every pixel (the camera is inside the room, so every ray hits)."""
    room = scene["room"]
    D, o = cv.D, cv.o
    # exit distance per axis: the far plane along each axis, (c - o)/D + (L/2)/|D| with c the centre
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1 / D                                           # (3, H, W)
        ts = ((room / 2 - cv.o64).astype(np.float32)[:, None, None] * inv
              + (room / 2).astype(np.float32)[:, None, None] * np.abs(inv))
    t = np.fmin(np.fmin(ts[0], ts[1]), ts[2])               # fmin skips the NaN of a ray parallel to a plane
    on_z = ts[2] == t
    on_y = (ts[1] == t) & ~on_z
    on_x = ~on_z & ~on_y
    cv.t = t
    # instance ids: 0 floor, 1 ceiling, 2 wall x=0, 3 wall x=Lx, 4 wall y=0, 5 wall y=Ly
    for cls in (FLOOR, CEILING, WALL, WALL, WALL, WALL):
        cv.new_instance(cls)
    positive = D > 0                                          # (3, H, W) the ray heads to the far plane
    cv.inst = np.where(on_z, positive[2], np.where(on_x, 2 + positive[0], 4 + positive[1])).astype(np.int16)
    onehot = np.stack([on_x, on_y, on_z])                     # (3, H, W)
    cv.n = np.where(onehot, np.where(positive, np.float32(-1), np.float32(1)), np.float32(0))  # into the room
    P = o[:, None, None] + t * D
    P *= ~onehot                     # texture coordinates in the plane: drop the coordinate along the normal
    masks = {FLOOR: cv.inst == 0, CEILING: cv.inst == 1, WALL: cv.inst >= 2}
    for cls, mask in masks.items():
        if mask.any():
            rows, cols = _bbox(mask)
            albedo = _texture(scene["materials"][cls], P[:, rows, cols])
            np.copyto(cv.albedo[:, rows, cols], albedo, where=mask[rows, cols])


def _draw_decals(cv, scene):
    """Paint decals onto their host surface: new instance and albedo, same depth and normal."""
    for d in scene["decals"]:
        (sc, zc), (hw, hh) = d["centre"], d["half"]
        if d["cls"] == MAT:
            r = math.hypot(hw, hh)
            lo, hi = np.array([sc - r, zc - r, 0.0]), np.array([sc + r, zc + r, 0.0])
        else:
            other = 1 - d["s_axis"]                           # the wall's constant coordinate
            lo, hi = np.zeros(3), np.zeros(3)
            lo[d["s_axis"]], hi[d["s_axis"]] = sc - hw, sc + hw
            lo[other] = hi[other] = 0.0 if d["host"] in (2, 4) else scene["room"][other]
            lo[2], hi[2] = zc - hh, zc + hh
        win = cv.window(lo, hi)
        if win is None:
            continue
        v0, v1, u0, u1 = win
        host = cv.inst[v0:v1, u0:u1] == d["host"]
        if not host.any():
            continue
        P = cv.o[:, None, None] + np.where(host, cv.t[v0:v1, u0:u1], 0) * cv.D[:, v0:v1, u0:u1]
        if d["cls"] == MAT:
            cs, sn = math.cos(d["yaw"]), math.sin(d["yaw"])
            x, y = P[0] - np.float32(sc), P[1] - np.float32(zc)
            a, b = cs * x + sn * y, -sn * x + cs * y          # (h, w) in the mat's frame, metres
        else:
            a, b = P[d["s_axis"]] - np.float32(sc), P[2] - np.float32(zc)
        inside = host & (np.abs(a) <= hw) & (np.abs(b) <= hh)
        if not inside.any():
            continue
        np.copyto(cv.inst[v0:v1, u0:u1], cv.new_instance(d["cls"]), where=inside)
        albedo = _texture(d["mat"], np.stack([a, b, np.zeros_like(a)]))
        width, frame_colour = d["frame"]
        frame = (np.abs(a) > hw - width) | (np.abs(b) > hh - width)
        np.copyto(cv.albedo[:, v0:v1, u0:u1], np.where(frame, frame_colour[:, None, None], albedo), where=inside)


def _draw_object(cv, p):
    """One box, ball or cylinder; textures live in the object's own frame so they move with it."""
    if p["type"] == "sphere":
        lo, hi = p["c"] - p["r"], p["c"] + p["r"]
    elif p["type"] == "cyl":
        ends = np.stack([p["b"], p["b"] + p["h"] * p["a"]])
        lo, hi = ends.min(0) - p["r"], ends.max(0) + p["r"]
    else:
        r = math.hypot(p["half"][0], p["half"][1])
        lo, hi = p["c"] - np.array([r, r, p["half"][2]]), p["c"] + np.array([r, r, p["half"][2]])
    win = cv.window(lo, hi)
    if win is None:
        return
    v0, v1, u0, u1 = win
    D, DD = cv.D[:, v0:v1, u0:u1], cv.DD[v0:v1, u0:u1]
    mat = p["mat"]
    if p["type"] == "sphere":
        t, n = _hit_sphere(cv.o64, D, DD, p["c"], p["r"])
        centre = p["c"].astype(np.float32)[:, None, None]
        albedo_of = lambda P: _texture(mat, P - centre)
    elif p["type"] == "cyl":
        t, n, _ = _hit_cylinder(cv.o64, D, DD, p["b"], p["a"], p["r"], p["h"])
        base = p["b"].astype(np.float32)[:, None, None]
        albedo_of = lambda P: _texture(mat, P - base)
    else:
        t, n = _hit_box(cv.o64, D, p["c"], p["half"], p["yaw"])
        cs, sn = np.float32(math.cos(p["yaw"])), np.float32(math.sin(p["yaw"]))
        centre = p["c"].astype(np.float32)

        def albedo_of(P):
            x, y, z = P[0] - centre[0], P[1] - centre[1], P[2] - centre[2]
            local = np.stack([cs * x + sn * y, -sn * x + cs * y, z])
            face = np.abs(np.stack([cs * n[0] + sn * n[1], -sn * n[0] + cs * n[1], n[2]])) > 0.5
            return _texture(mat, np.where(face, 0, local))   # in-plane coordinates of each face
    cv.draw(win, t, n, cv.new_instance(p["cls"]), albedo_of)


def _draw_person(cv, person):
    """The person's six primitives, each cast in its own screen window (tight windows are far
    cheaper than one window around the whole figure); one instance, a part id per pixel."""
    inst = cv.new_instance(PERSON)
    c, r = person["head_c"], person["head_r"]
    win = cv.window(c - r, c + r)
    if win is not None:
        v0, v1, u0, u1 = win
        t, n = _hit_sphere(cv.o64, cv.D[:, v0:v1, u0:u1], cv.DD[v0:v1, u0:u1], c, r)
        hair_dir, skin, hair = person["hair_dir"].astype(np.float32), person["skin"], person["hair"]
        c32 = c.astype(np.float32)[:, None, None]

        def albedo_of(P):
            on_top = _dot(hair_dir, P - c32) > person["hair_offset"]      # (h, w)
            return np.where(on_top, hair[:, None, None], skin[:, None, None])
        cv.draw(win, t, n, inst, albedo_of, np.uint8(HEAD))
    for i in range(len(person["r"])):
        b, a, r, h = person["b"][i], person["a"][i], person["r"][i], person["h"][i]
        ends = np.stack([b, b + h * a])
        win = cv.window(ends.min(0) - r, ends.max(0) + r)
        if win is None:
            continue
        v0, v1, u0, u1 = win
        t, n, s = _hit_cylinder(cv.o64, cv.D[:, v0:v1, u0:u1], cv.DD[v0:v1, u0:u1], b, a, r, h)
        low = s < person["split"][i]                                      # (h, w) below the elbow/knee
        part = np.where(low, np.uint8(person["parts_lo"][i]), np.uint8(person["parts_hi"][i]))
        if i == person["torso"]:
            base = b.astype(np.float32)[:, None, None]
            albedo_of = lambda P: _texture(person["shirt"], P - base)
        else:
            c_lo, c_hi = person["colour_lo"][i][:, None, None], person["colour_hi"][i][:, None, None]
            albedo_of = lambda P: np.where(low, c_lo, c_hi)
        cv.draw(win, t, n, inst, albedo_of, part)
    return inst


def _from_bytes(image8):
    """uint8 (3, H, W) -> float32 in [0, 1]. The renderer and the cache both use it, so a cached
    sample equals a freshly rendered one bit for bit."""
    return image8.astype(np.float32) / np.float32(255)


@functools.lru_cache(maxsize=8)
def _radius2(H, W):
    """Squared distance of every pixel from the image centre in units of half the width: (H, W)."""
    u = (np.arange(W, dtype=np.float32) - (W - 1) / 2) / (W / 2)
    v = (np.arange(H, dtype=np.float32) - (H - 1) / 2) / (W / 2)
    r2 = u * u + (v * v)[:, None]
    r2.flags.writeable = False
    return r2


def _render(scene, H, W, rng):
    """Ray-cast `scene` at H x W into numpy arrays. `rng` supplies the sensor noise, the only draw
    that depends on the image size."""
    cv = _Canvas(scene, H, W)
    _draw_room(cv, scene)
    _draw_decals(cv, scene)
    person = _draw_person(cv, scene["person"]) if scene["person"] is not None else None   # its instance id
    for p in scene["objects"]:
        _draw_object(cv, p)

    inst, depth, n = cv.inst, cv.t, cv.n                      # (H, W), (H, W), (3, H, W)
    table = np.array(cv.inst_cls)
    semseg = table[inst].astype(np.int64)
    sal = np.isin(table, SALIENT)[inst]
    on_person = (inst == person) if person is not None else None
    if on_person is not None and on_person.any():
        parts = np.where(on_person, cv.part, 0).astype(np.int64)
    else:
        parts = np.full((H, W), IGNORE, np.int64)            # no person in view: ignore, as PASCAL does

    # --- edges: of each pair of 4-neighbours in different instances, the nearer pixel is an edge
    edge = np.zeros((H, W), bool)
    differ = inst[:, :-1] != inst[:, 1:]                      # (H, W-1) left/right pairs
    left_nearer = depth[:, :-1] <= depth[:, 1:]
    edge[:, :-1] |= differ & left_nearer
    edge[:, 1:] |= differ & ~left_nearer
    differ = inst[:-1] != inst[1:]                            # (H-1, W) top/bottom pairs
    top_nearer = depth[:-1] <= depth[1:]
    edge[:-1] |= differ & top_nearer
    edge[1:] |= differ & ~top_nearer

    # --- image: albedo x shading, fog, auto-exposure, white balance, vignetting, noise
    L = scene["light"].astype(np.float32)
    amb = np.float32(scene["ambient"])
    shade = amb * (3 + n[2]) / 4 + (1 - amb) * np.maximum(_dot(L, n), 0)          # (H, W)
    sigma, fog_colour = scene["fog"]
    transmit = np.exp(np.float32(-sigma) * depth)                                  # (H, W)
    image = cv.albedo * (shade * transmit) + fog_colour.astype(np.float32)[:, None, None] * (1 - transmit)
    gain = scene["exposure"] / max(float(image.mean()), 1e-3)   # auto-exposure to the drawn mean level
    image *= (gain * scene["white_balance"]).astype(np.float32)[:, None, None] * \
        (1 - np.float32(scene["vignette"] / 2) * _radius2(H, W))
    # zero-mean uniform noise with standard deviation `noise` (uniform: 4x cheaper than Gaussian)
    image += np.float32(scene["noise"] * math.sqrt(12)) * (rng.random((3, H, W), dtype=np.float32) - np.float32(0.5))
    np.clip(image, 0, 1, out=image)
    image = _from_bytes(np.round(image * 255).astype(np.uint8))   # 8 bits per channel, like a camera's output

    # --- invalid depth: elliptic holes and projector shadows
    hole = np.zeros((H, W), bool)
    for cu, cvv, ru, rv in scene["holes"]:
        du = (np.arange(W, dtype=np.float32) - cu * W) / (ru * W)
        dv = (np.arange(H, dtype=np.float32) - cvv * H) / (rv * W)
        hole |= (du * du + (dv * dv)[:, None]) < 1
    if scene["baseline"] > 0:
        # a far pixel (left) next to a near one (right): the projector, to the camera's right, cannot
        # light the next few far pixels to the left; their width in pixels is the disparity difference
        width = np.float32(cv.f * scene["baseline"]) * (1 / depth[:, 1:] - 1 / depth[:, :-1])   # (H, W-1)
        shadow = width > 0.5
        if shadow.any():
            for k in range(min(math.ceil(float(width.max())), 8)):
                hole[:, :W - 1 - k] |= (shadow & (width > k))[:, k:]
    depth = np.where(hole, np.float32(0), depth)
    normals = _to_output_frame(cv.R, n)
    # Silhouette pixels of curved surfaces are hit at grazing incidence, where rounding can leave
    # n . ray >= 0; tilt those normals by the smallest amount that makes them face the camera.
    ray = np.stack(np.broadcast_arrays((np.arange(W, dtype=np.float32) - cv.cx) / cv.f,
                                       ((np.arange(H, dtype=np.float32) - cv.cy) / cv.f)[:, None],
                                       np.float32(-1)))                                # (3, H, W)
    ray /= np.sqrt(np.einsum("ihw,ihw->hw", ray, ray))
    excess = np.maximum(np.einsum("ihw,ihw->hw", normals, ray) + np.float32(1e-3), 0)  # (H, W), 0 almost everywhere
    normals -= excess * ray                                                           # now n . ray = -1e-3 there
    # renormalise: curved surfaces' normals (P - c) / r inherit float32 rounding of the hit point
    normals *= ~hole / np.sqrt(np.einsum("ihw,ihw->hw", normals, normals))

    K = np.array([[cv.f, 0, cv.cx], [0, cv.f, cv.cy], [0, 0, 1]])
    return {"image": image, "semseg": semseg, "depth": depth[None], "normals": normals,
            "edge": edge[None].astype(np.float32), "sal": sal[None].astype(np.float32), "parts": parts,
            "instance": inst.astype(np.int64), "K": K, "R": cv.R.copy(), "cam_pos": cv.o64.copy()}


# ------------------------------------------------------------------------------------------------
# The dataset

class SyntheticRooms(torch.utils.data.Dataset):
    """Procedural rooms with labels for every task in TASKS (see the module docstring).

    Args:
        split: "train" or "val"; the two use independent seed streams and never share a scene.
        num_samples: the dataset's length (>= 1). Sample i depends only on (seed, split, i).
        size: (H, W) of every image, each >= 8. The scene does not depend on it.
        seed: a non-negative int selecting the whole family of scenes.
        tasks: the label keys to return (a list); None means every key of TASKS.
        transform: any callable applied to the sample dict (e.g. from datasets.py).
        cache: render every sample once, now, and keep it in memory (compact dtypes, bit-identical
            to rendering on demand). About 0.3 MB per sample at 96 x 128 with all tasks, and
            num_samples / (a few hundred per second) of start-up time. Worth it when the model is
            so fast that rendering shows up in the step time; DataLoader workers started by fork
            share the cache's pages.
        render_procs: with cache, render in this many processes started by fork (Linux; elsewhere
            one): the same arrays, in about 1 / render_procs of the time.
        edit_scene: None, or a picklable callable (scene, rng) -> scene applied to every scene before it is
            rendered; its rng is a stream of its own, so the scene's other draws and the noise stay as they are.

    dataset[i] (no transform): {"image": float32 (3, H, W) in [0, 1], "semseg": int64 (H, W),
    "depth": float32 (1, H, W) metres, 0 = invalid, "normals": float32 (3, H, W) unit or zero,
    "edge" / "sal": float32 (1, H, W) in {0, 1}, "parts": int64 (H, W) 0..6 or all 255,
    "meta": {"id": str, "size": (H, W)}}, restricted to the requested tasks. Negative indices
    count from the end; out of range is an IndexError.
    """

    def __init__(self, split, num_samples, size=(96, 128), seed=0, tasks=None, transform=None, *, cache=False,
                 render_procs=1, edit_scene=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        H, W = SyntheticRooms.check_options(num_samples, size, seed)
        if tasks is None:
            tasks = list(TASKS)
        elif isinstance(tasks, str):
            raise ValueError(f"tasks must be a list of task names, got the string {tasks!r} "
                             f"(did you mean [{tasks!r}]?)")
        else:
            tasks = list(dict.fromkeys(tasks))               # keep the order, drop repeats
            unknown = [t for t in tasks if t not in TASKS]
            if unknown or not tasks:
                raise ValueError(f"tasks must be a non-empty list of names from {list(TASKS)}, got {tasks!r}"
                                 + (f" (unknown: {unknown})" if unknown else ""))
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable or None, got {type(transform).__name__}")
        if not isinstance(cache, bool):
            raise ValueError(f"cache must be True or False, got {cache!r}")
        if isinstance(render_procs, bool) or not isinstance(render_procs, int) or render_procs < 1:
            raise ValueError(f"render_procs must be an int >= 1, got {render_procs!r}")
        if edit_scene is not None and not callable(edit_scene):
            raise ValueError(f"edit_scene must be callable or None, got {type(edit_scene).__name__}")
        self.split, self.num_samples, self.size = split, int(num_samples), (H, W)
        self.seed, self.tasks, self.transform, self.edit_scene = int(seed), tasks, transform, edit_scene
        self._cache = self._render_all(render_procs) if cache else None

    @staticmethod
    def check_options(num_samples, size, seed):
        """(H, W), or a ValueError naming the argument, for what the constructor's rules refuse."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        try:
            H, W = (operator.index(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be a pair of ints (H, W), got {size!r}") from None
        if H < _MIN_SIZE or W < _MIN_SIZE:
            raise ValueError(f"size must be at least {_MIN_SIZE}x{_MIN_SIZE} pixels, got {H}x{W}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        return H, W

    @staticmethod
    def cache_bytes(num_samples, size, tasks):
        """The memory cache=True holds: the image and the labels of `tasks` in _compact's dtypes."""
        channels = sum(np.dtype(_COMPACT.get(t, np.float32)).itemsize * (3 if t == "normals" else 1) for t in tasks)
        return num_samples * size[0] * size[1] * (3 + channels)

    def _render_all(self, procs):
        """Every sample in compact form, rendered here or by `procs` forked processes."""
        if procs == 1 or self.num_samples == 1 or "fork" not in multiprocessing.get_all_start_methods():
            return [self._compact_sample(i) for i in range(self.num_samples)]
        chunk = -(-self.num_samples // (4 * procs))                     # each sample depends on i alone
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            return pool.map(self._compact_sample, range(self.num_samples), chunksize=chunk)

    def _compact_sample(self, i):
        return self._compact(self.render(i))

    def __len__(self):
        return self.num_samples

    def _index(self, i):
        i = operator.index(i)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for SyntheticRooms of length {self.num_samples}")
        return i % self.num_samples

    def _rng(self, i):
        # (seed, split, i) -> an independent stream; the split is part of the spawn key, so train and
        # val draw from disjoint streams for every seed
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_SPLIT_KEY[self.split], i)))

    def scene(self, i):
        """The scene description of sample i (room, camera, light, objects, decals, person, holes):
        the dict sample_scene draws (and edit_scene changes), before any rendering."""
        return self._scene(self._index(i))[0]

    def _scene(self, i):
        """(scene, rng): the scene of sample i and its generator, left where the sensor noise starts."""
        rng = self._rng(i)
        scene = sample_scene(rng)
        if self.edit_scene is not None:     # a stream of its own: spawn key (split, i, 1), never a scene's
            own = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_SPLIT_KEY[self.split], i, 1)))
            scene = self.edit_scene(scene, own)
        return scene, rng

    def render(self, i):
        """Sample i as numpy arrays: every task plus the camera, whatever `tasks` says.

        Keys: "image" and the task labels with the shapes and dtypes of dataset[i]; "instance"
        (H, W) int64 instance ids; "K" (3, 3) pinhole intrinsics in pixels (fx = fy = f, principal
        point at the image centre, pixel centres at integer coordinates); "R" (3, 3) camera-to-world
        rotation whose columns are the OpenCV camera axes (x right, y down, z forward); "cam_pos"
        (3,) metres. Back-projection of pixel (u, v) with depth z: X_cv = z K^-1 (u, v, 1); the
        normals' frame is that of X_cv with z negated.
        """
        scene, rng = self._scene(self._index(i))
        return _render(scene, *self.size, rng)

    def _compact(self, arrays):
        """The requested arrays in the smallest lossless dtypes (for the cache)."""
        out = {"image": np.round(arrays["image"] * 255).astype(np.uint8)}
        for task in self.tasks:
            out[task] = arrays[task].astype(_COMPACT.get(task, np.float32))
        return out

    def _expand(self, compact):
        """Inverse of _compact: the arrays exactly as render() gives them."""
        out = {"image": _from_bytes(compact["image"])}
        for task in self.tasks:
            out[task] = compact[task].astype(np.int64 if task in ("semseg", "parts") else np.float32)   # a copy
        return out

    def __getitem__(self, i):
        i = self._index(i)
        arrays = self._expand(self._cache[i]) if self._cache is not None else self.render(i)
        sample = {"image": torch.from_numpy(arrays["image"])}
        for task in self.tasks:
            sample[task] = torch.from_numpy(arrays[task])
        sample["meta"] = {"id": f"synthetic-{self.split}-s{self.seed}-{i:06d}", "size": self.size}
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self):
        edit = f", edit_scene={self.edit_scene!r}" if self.edit_scene is not None else ""
        return (f"SyntheticRooms(split={self.split!r}, num_samples={self.num_samples}, size={self.size}, "
                f"seed={self.seed}, tasks={self.tasks}, cache={self._cache is not None}{edit})")


if __name__ == "__main__":           # a picture of a few samples, drawn by synthetic_picture.py
    from synthetic_picture import main
    main(sys.argv[1:])
