"""research/cue.py: the cue control is a control. Pinned down, on tiny sizes:

- with no exchange the depth output is bit-identical when the cue changes (there is no path), and the cue
  reaches semseg's output (it does arrive); the oracle route reaches depth directly;
- with cross-attention and KEM the depth output depends on the cue: a non-zero gradient at initialisation
  (dense cue; sparse cue with cross-attention and with KEM keeping every token);
- the cue stream leaves the data seed's scenes and images alone; depth is scaled by s on valid pixels only;
  the sparse cue sits on exactly one token cell;
- distractors are appended before the cue is added, so they never carry it;
- the hooks pickle, name nothing of the reference, and the report's fraction carried is (floor − row) / (floor − oracle).
"""
import json
import math
import pickle

import pytest
import torch

import datasets
import train
from kem_mtl import MultiTaskNet
from research import cue, distractors, runner

TASKS = {"semseg": 7, "depth": 1}
H, W = 32, 48                                  # a 4 x 6 token grid at stride 8


def make_net(exchange, route="semseg", seed=0, **kw):
    torch.manual_seed(seed)
    net = MultiTaskNet(TASKS, exchange=exchange, dim=16, num_slots=4, **kw)
    return cue.CueNet(net, route).eval()


def images_with(cue_map, seed=1):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(2, 3, H, W, generator=g)
    return torch.cat([rgb, cue_map], 1)        # (2, 4, H, W)


def dense(value):
    return torch.full((2, 1, H, W), float(value))


def sparse(value, cell=(1, 2)):
    c = torch.zeros(2, 1, H, W)
    r, k = cell
    c[:, :, r * 8:(r + 1) * 8, k * 8:(k + 1) * 8] = value
    return c


@pytest.mark.parametrize("placement", [dense, sparse])
def test_without_an_exchange_depth_is_bit_identical_whatever_the_cue(placement):
    model = make_net("none")
    with torch.no_grad():
        a, b = model(images_with(placement(0.3))), model(images_with(placement(-0.3)))
    assert torch.equal(a["depth"], b["depth"])
    assert not torch.equal(a["semseg"], b["semseg"]), "the cue must reach the branch it is given to"


def test_the_oracle_route_gives_depth_the_cue():
    model = make_net("none", route="depth")
    with torch.no_grad():
        a, b = model(images_with(dense(0.3))), model(images_with(dense(-0.3)))
    assert not torch.equal(a["depth"], b["depth"]) and torch.equal(a["semseg"], b["semseg"])


@pytest.mark.parametrize("exchange,kw,placement", [("cross", {}, dense), ("kem", {}, dense),
                                                   ("cross", {}, sparse), ("kem", {"topk": 1.0}, sparse)])
def test_with_an_exchange_depth_depends_on_the_cue_at_initialisation(exchange, kw, placement):
    model = make_net(exchange, **kw)
    cue_map = placement(0.3).requires_grad_()
    out = model(images_with(cue_map))
    out["depth"].square().sum().backward()
    g_weight = model.cue.weight.grad.norm().item()
    g_input = cue_map.grad.norm().item()
    assert g_weight > 0 and g_input > 0, f"{exchange}: gradient to the cue weight {g_weight}, to the cue {g_input}"


def test_no_exchange_sends_no_gradient_from_depth_to_the_cue():
    model = make_net("none")
    out = model(images_with(dense(0.3)))
    out["depth"].sum().backward()
    assert model.cue.weight.grad is None or model.cue.weight.grad.abs().max() == 0


def build(split, seed):
    return datasets.build_dataset("synthetic", split, train=split == "train", size=(H, W), num_samples=3, seed=seed,
                                  tasks=list(TASKS))


@pytest.mark.parametrize("placement", cue.PLACEMENTS)
def test_the_cue_stream_leaves_the_scenes_alone_and_scales_valid_depth(placement):
    plain = build("val", 5)
    wrapped = cue.CueData(build("val", 5), "val", 5, placement)
    for i in range(3):
        x, y = plain[i], wrapped[i]
        s = y["meta"]["cue"]["s"]
        assert torch.equal(x["image"], y["image"][:3]), "the cue changed the image"
        assert cue.S_MIN <= s <= cue.S_MAX
        valid = x["depth"] > 0
        assert torch.equal(y["depth"] > 0, valid)
        assert torch.allclose(y["depth"][valid], x["depth"][valid] * s)
        c = y["image"][3]
        if placement == "dense":
            assert torch.all(c == math.log(s))
        else:
            cells = torch.nn.functional.avg_pool2d(c[None, None], 8).flatten()
            assert (cells != 0).sum() == 1 and cells.flatten().abs().max() == pytest.approx(abs(math.log(s)), rel=1e-5)
            assert int((cells != 0).nonzero()) == y["meta"]["cue"]["cell"]
    # the training split's augmentation is seeded by the global RNG, which the cue does not draw from
    torch.manual_seed(0)
    plain = build("train", 5)
    a = [plain[i]["image"] for i in range(3)]
    torch.manual_seed(0)
    wrapped = cue.CueData(build("train", 5), "train", 5, placement)
    b = [wrapped[i]["image"][:3] for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "the cue drew from the augmentation's random stream"


def test_the_cue_is_the_data_seeds_own_and_spreads_over_its_range():
    draws = [cue.draw(0, "train", i, (4, 6)) for i in range(400)]
    assert draws == [cue.draw(0, "train", i, (4, 6)) for i in range(400)]
    assert draws != [cue.draw(1, "train", i, (4, 6)) for i in range(400)]
    logs = torch.tensor([math.log(s) for s, _ in draws])
    assert logs.min() > math.log(cue.S_MIN) and logs.max() < math.log(cue.S_MAX)
    assert abs(logs.mean().item() - (math.log(cue.S_MIN) + math.log(cue.S_MAX)) / 2) < 0.05
    assert len({c for _, c in draws}) == 24


def test_distractors_come_before_the_cue_and_never_carry_it():
    torch.manual_seed(0)
    net = MultiTaskNet(TASKS, exchange="kem", dim=16, num_slots=4)
    model = cue.CueModel("semseg", ratio=1.0)(net, {})
    seen = []
    net.exchange.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    d = next(h for h in net.exchange._forward_pre_hooks.values() if getattr(h, "__self__", None).__class__
             is distractors.Distractors).__self__
    with torch.no_grad():
        state = d.generator.get_state()
        model(images_with(dense(0.3)))
        d.generator.set_state(state)
        model(images_with(dense(-0.3)))
    N = 2 * (H // 8) * (W // 8)
    a, b = seen
    assert a.shape[1] == 2 * N
    assert not torch.equal(a[:, :N // 2], b[:, :N // 2]), "semseg's real tokens carry the cue"
    assert torch.equal(a[:, N:], b[:, N:]), "a distractor carried the cue"


def test_the_hooks_pickle_and_patch_nothing():
    from tests.test_experiments import patched_names

    hooks = train.Hooks(model=cue.CueModel("semseg", 2.0), dataset=cue.CueDataset("sparse"), evaluated=cue.RouteLog())
    assert pickle.loads(pickle.dumps(hooks)).model.ratio == 2.0
    assert patched_names(open(cue.__file__).read(), cue.__file__) == []


def test_route_diagnostics_of_a_tiny_run(tmp_path):
    flags = ["--tasks", "semseg,depth", "--exchange", "kem", "--max-iters", "2", "--eval-interval", "2", "--image-size",
             f"{H}x{W}", "--dim", "16", "--num-slots", "4", "--train-samples", "4", "--val-samples", "4",
             "--batch-size", "2", "--workers", "0", "--procs", "1", "--out-dir", str(tmp_path)]
    assert cue.train_with_cue(["--placement", "sparse", "--ratio", "1", "--", *flags]) == 0
    (point,) = cue.read_route_log(tmp_path / cue.ROUTE_LOG)
    assert point["images"] == 4 and point["cue_images"] == 4
    assert 0 <= point["route_share"] <= 1 and 0 < point["distractor_share"] < 1 and 0 <= point["cue_recall"] <= 1
    run = runner.Run("cue", "sparse kem other x1", 0, flags, prefix=cue.cue_script("sparse", "semseg", 1.0))
    probe = cue.route_after(run, tmp_path, None)["probe"]
    for when in ("init", "trained"):
        assert 0 <= probe[when]["cue_in_topk"] <= 1 and probe[when]["grad_values"] > 0, probe[when]


def test_fraction_carried_is_floor_minus_row_over_floor_minus_oracle(tmp_path):
    rmse = {"floor": [1.0, 1.2], "oracle": [0.6, 0.8], "kem": [0.8, 0.9], "cross": [0.7, 1.1]}
    for row, values in rmse.items():
        for seed, v in enumerate(values):
            path = tmp_path / "runs" / "cue" / runner.slug(f"dense {row}") / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"config": f"dense {row}", "seed": seed, "metrics": {"depth": {"rmse": v}},
                                        "route": None}))
    out = cue.report(tmp_path)
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["dense kem"]["fraction_by_seed"] == pytest.approx({0: 0.5, 1: 0.75})
    assert rows["dense cross"]["fraction_by_seed"] == pytest.approx({0: 0.75, 1: 0.25})
    (a,) = out["tests"]["A"]
    assert a["differences"] == pytest.approx([20.0, 25.0])                 # 100 (floor − kem) / floor
    assert (tmp_path / "cue.md").exists() and (tmp_path / "cue.png").exists()
