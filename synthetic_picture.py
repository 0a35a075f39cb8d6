"""Pictures of SyntheticRooms samples with all their labels, for eyeballing the scenes.

    python synthetic_picture.py out.png [num] [H W]     # or: python synthetic.py out.png ...
    from synthetic_picture import colourise             # RGB pictures of a render() dict's labels

Needs matplotlib (and synthetic.py beside it).
"""
import sys

import numpy as np

from synthetic import IGNORE, SyntheticRooms


def colourise(arrays):
    """RGB (H, W, 3) pictures of every label of a render() dict, for eyeballing."""
    import matplotlib.cm as cm

    cls = cm.tab10(arrays["semseg"] % 10)[..., :3]
    d, p = arrays["depth"][0], arrays["parts"]
    depth = cm.viridis(d / max(d.max(), 1e-6))[..., :3] * (d > 0)[..., None]
    normals = (arrays["normals"].transpose(1, 2, 0) + 1) / 2 * (d > 0)[..., None]
    parts = np.where((p == IGNORE)[..., None], 0.5, cm.Set1(p % 9)[..., :3] * (p > 0)[..., None])
    grey = lambda m: np.repeat(m[0][..., None], 3, axis=2)
    return {"image": arrays["image"].transpose(1, 2, 0), "semseg": cls, "depth": depth, "normals": normals,
            "edge": grey(arrays["edge"]), "sal": grey(arrays["sal"]), "parts": parts}


def main(argv):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, num = argv[0] if argv else "synthetic.png", int(argv[1]) if len(argv) > 1 else 4
    size = (int(argv[2]), int(argv[3])) if len(argv) > 3 else (96, 128)
    ds = SyntheticRooms("train", num, size=size)
    fig, axes = plt.subplots(num, 7, figsize=(14, 1.6 * num * size[0] / size[1] + 0.3))
    for i in range(num):
        for j, (name, pic) in enumerate(colourise(ds.render(i)).items()):
            ax = axes[i, j] if num > 1 else axes[j]
            ax.imshow(np.clip(pic, 0, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
