"""kem_mtl.MultiTaskNet's glue: the round trip from each task's map to tokens, through the exchange,
and back to each task's decoder.

Pinned down, by watching the network with forward hooks on the model instance (its `encoders`,
`token_map`, `exchange` and `decoders`) rather than by reading its code:
- the token layout the exchange sees is the one the module docstring teaches: task i's map
  (B, D, h, w) becomes tokens with x.flatten(2).transpose(1, 2), plus task i's embedding, and the
  tasks are concatenated in the order of `tasks`, so token i*h*w + y*w + x is task i at (y, x);
- with the exchange replaced by identity, each decoder receives exactly its own task's map (plus its
  embedding), position for position; an exchange that moves one token shows it at the task and
  position it was moved to, and nowhere else;
- the task embedding lets KEM tell tasks apart: swapping two tasks' maps does not simply swap KEM's
  updates, while with the embedding zeroed it does (the control: KEM itself is
  permutation-equivariant);
- the token map (ETF projection, the normalise control) runs before the exchange, and the exchange
  receives its output; etf="normalize" normalises each token over the feature axis, etf="features"
  gives normalize(token) @ E;
- an image whose size is not a multiple of the backbone's stride gives the top-left H x W of the
  outputs of its zero-padded copy.

Token grids are 4 x 6 (h != w) and there are three tasks, so a transposed layout or a swapped task
order cannot pass by symmetry.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from kem_mtl import MultiTaskNet

TASKS = {"semseg": 3, "depth": 1, "normals": 3}   # three tasks: any mix-up of their order shows
H, W = 32, 48                                     # the tiny backbone (stride 8) gives h, w = 4, 6
h, w = 4, 6
DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def build(**kwargs):
    torch.manual_seed(0)
    return MultiTaskNet(TASKS, backbone="tiny", dim=DIM, num_slots=4, topk=0.5, **kwargs).eval()


def images(seed=0, B=2, size=(H, W)):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def trace(model, x):
    """Run the model on x; return what each encoder gave, what the token map and the exchange received
    and returned, what each decoder received (its token map), and in which order the parts ran."""
    seen = {"encoder": {}, "decoder": {}, "order": []}

    def keep(name):
        def hook(module, args, out):
            seen["order"].append(name)
            seen[name] = (args[0], out)
        return hook

    handles = [model.token_map.register_forward_hook(keep("token_map")),
               model.exchange.register_forward_hook(keep("exchange"))]
    for t in model.tasks:
        handles.append(model.encoders[t].register_forward_hook(
            lambda m, args, out, t=t: seen["encoder"].__setitem__(t, out)))
        handles.append(model.decoders[t].register_forward_pre_hook(
            lambda m, args, t=t: seen["decoder"].__setitem__(t, args[0])))
    try:
        with torch.no_grad():
            seen["outputs"] = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def expected_tokens(model, seen):
    """The tokens of all tasks as the docstring lays them out, built here position by position:
    token i*h*w + y*w + x is task i's map at (y, x) plus task i's embedding.  (B, T*h*w, D)"""
    rows = []
    for i, t in enumerate(model.tasks):
        m = seen["encoder"][t]                                          # (B, D, h, w)
        assert m.shape[-2:] == (h, w), m.shape
        for y in range(h):
            for x in range(w):
                rows.append(m[:, :, y, x] + model.task_embedding[i])
    return torch.stack(rows, dim=1).detach()


def assert_equal(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: differs by up to {(got - want).abs().max():.3g}"


class MoveOneToken(nn.Module):
    """An exchange that copies token `src` over token `dst` and leaves every other token alone."""

    def __init__(self, src, dst):
        super().__init__()
        self.src, self.dst = src, dst

    def forward(self, F):
        out = F.clone()
        out[:, self.dst] = F[:, self.src]
        return out


# ---------------------------------------------------------------------------------------------- layout

def test_the_exchange_sees_each_tasks_tokens_in_the_documented_layout():
    model = build()
    seen = trace(model, images())
    got = seen["exchange"][0]
    assert_equal(got, expected_tokens(model, seen), "the exchange's input")


def test_with_an_identity_exchange_each_decoder_receives_its_own_tasks_map():
    model = build()
    model.exchange = nn.Identity()
    seen = trace(model, images())
    for i, t in enumerate(model.tasks):
        want = seen["encoder"][t] + model.task_embedding[i].detach()[None, :, None, None]
        assert_equal(seen["decoder"][t], want, f"decoder {t!r}'s input")


@pytest.mark.parametrize("src, dst", [((0, 1, 4), (2, 3, 0)), ((2, 0, 5), (1, 2, 1))])
def test_a_moved_token_arrives_at_the_task_and_position_it_was_moved_to(src, dst):
    (ti, ty, tx), (di, dy, dx) = src, dst
    model = build()
    model.exchange = MoveOneToken(ti * h * w + ty * w + tx, di * h * w + dy * w + dx)
    seen = trace(model, images())
    names = list(model.tasks)
    emb = model.task_embedding.detach()
    for i, t in enumerate(names):
        want = (seen["encoder"][t] + emb[i][None, :, None, None]).clone()
        if i == di:
            want[:, :, dy, dx] = seen["encoder"][names[ti]][:, :, ty, tx] + emb[ti]
        assert_equal(seen["decoder"][t], want, f"decoder {t!r}'s input after moving {src} to {dst}")


# ---------------------------------------------------------------------------------------------- the task embedding

class Fixed(nn.Module):
    """An encoder that ignores its input and returns a given map."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def updates_with_maps(model, maps):
    """KEM's update (output - input) per task, (B, h*w, D) each, when the encoders give `maps`."""
    for t, m in zip(model.tasks, maps):
        model.encoders[t] = Fixed(m)
    seen = trace(model, images())
    F_in, F_out = seen["exchange"]
    return dict(zip(model.tasks, (F_out - F_in).split(h * w, dim=1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_task_embedding_lets_kem_tell_tasks_apart(seed):
    g = torch.Generator().manual_seed(seed)
    A, B, C = (torch.randn(2, DIM, h, w, generator=g) for _ in range(3))
    a, b, _ = TASKS
    model = build()
    before = updates_with_maps(model, [A, B, C])
    swapped = updates_with_maps(model, [B, A, C])
    gap = max((swapped[a] - before[b]).abs().max(), (swapped[b] - before[a]).abs().max())
    assert gap > 1e-4, (f"swapping the maps of {a} and {b} just swapped KEM's updates (largest difference "
                        f"{gap:.3g}): KEM cannot tell which task a token came from")
    # The control: without the embedding (zeroed), KEM is permutation-equivariant and the updates swap.
    with torch.no_grad():
        model.task_embedding.zero_()
    before = updates_with_maps(model, [A, B, C])
    swapped = updates_with_maps(model, [B, A, C])
    for x, y in ((swapped[a], before[b]), (swapped[b], before[a])):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the token map

@pytest.mark.parametrize("etf, exchange", [("normalize", "kem"), ("features", "kem"), ("normalize", "cross"),
                                           ("features", "none")])
def test_the_token_map_runs_before_the_exchange_and_feeds_it(etf, exchange):
    model = build(etf=etf, exchange=exchange)
    seen = trace(model, images())
    assert seen["order"] == ["token_map", "exchange"], seen["order"]
    map_in, map_out = seen["token_map"]
    assert_equal(map_in, expected_tokens(model, seen), "the token map's input")
    assert_equal(seen["exchange"][0], map_out, "the exchange's input (the token map's output)")
    F_out = seen["exchange"][1]
    for t, F_t in zip(model.tasks, F_out.split(h * w, dim=1)):
        assert_equal(seen["decoder"][t], F_t.transpose(1, 2).reshape(-1, DIM, h, w), f"decoder {t!r}'s input")


@pytest.mark.parametrize("exchange", ["kem", "none"])
def test_normalize_makes_every_token_a_unit_vector_in_its_own_direction(exchange):
    model = build(etf="normalize", exchange=exchange)
    seen = trace(model, images())
    tokens = expected_tokens(model, seen)                               # (B, N, D)
    got = seen["exchange"][0]
    want = tokens / torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)   # over D, token by token
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    norms = torch.linalg.vector_norm(got, dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-6)


def test_etf_features_are_normalised_tokens_in_frame_coordinates():
    model = build(etf="features")
    seen = trace(model, images())
    tokens = expected_tokens(model, seen)
    want = (tokens / torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)) @ model.token_map.E
    torch.testing.assert_close(seen["exchange"][0], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- image borders

@pytest.mark.parametrize("size", [(30, 44), (25, 41)])
def test_an_odd_sized_image_gives_the_top_left_of_its_padded_copys_outputs(size):
    model = build()
    x = images(size=size)
    pad_h, pad_w = (-size[0]) % 8, (-size[1]) % 8
    padded = nnf.pad(x, (0, pad_w, 0, pad_h))                           # zeros below and to the right
    with torch.no_grad():
        got, full = model(x), model(padded)
    for t in model.tasks:
        assert got[t].shape[-2:] == size, (t, got[t].shape)
        assert_equal(got[t], full[t][:, :, :size[0], :size[1]], f"{t} output")
