"""kem_mtl.py: top-k softmax, KEM, the cross-attention baseline and the multi-task network.

Pinned down: topk_softmax keeps exactly k weights (also with ties and in half precision), sums to
one in "mask" mode, equals softmax for k >= n and passes no gradient outside the top-k; KEM equals
the paper's three equations written out naively, is permutation-equivariant, keeps batch elements
apart, trains every parameter, and reduces to plain-softmax attention for k >= N; the baseline
equals softmax attention written out; MultiTaskNet gives the right shapes for the NYUD and PASCAL
task sets, every exchange x etf combination and odd image sizes, runs under autocast and
torch.compile, fits one batch, and raises every documented error; its option check accepts exactly
the token widths the network can build (the GroupNorms), num_tokens is the N the exchange sees, and
more slots than tokens is warned about.

For use in other code: wrong token shapes are refused by name (KEM and the baseline alike); topk
takes any integer type or a fraction, and k = 1 warns once (the slots then get exactly zero
gradient); device= / dtype= work as for torch.nn layers; the settings travel with the state_dict,
other settings are refused naming both values, and state_dicts saved without them still load
strictly; deepcopy and DDP keep all of it; fp16 inputs whose unscaled scores overflow stay finite;
torch.export with a dynamic N, torch.compile(dynamic=True) and torch.jit.trace match eager mode at
several N.
"""
import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kem_mtl import (BACKBONES, ETF_MODES, EXCHANGES, KEM, CrossTaskAttention, MultiTaskNet, resolve_topk,
                     topk_softmax)

NYUD = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
PASCAL = {"semseg": 21, "parts": 7, "sal": 1, "normals": 3, "edge": 1}


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- topk_softmax ------------------------------------------------------------------------------

@st.composite
def scores_and_k(draw):
    rows, n = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    k = draw(st.integers(1, n + 3))
    return torch.randn(rows, n, generator=gen(draw(st.integers(0, 2**31 - 1)))), k


@settings(deadline=None, max_examples=80)
@given(scores_and_k(), st.sampled_from(["mask", "post"]))
@example((torch.zeros(2, 5), 2), "mask")   # every score tied
@example((torch.zeros(1, 1), 1), "post")
def test_topk_softmax_keeps_exactly_the_k_largest(case, mode):
    scores, k = case
    n = scores.shape[-1]
    p = topk_softmax(scores, k, mode=mode)
    if k >= n:
        assert torch.equal(p, scores.softmax(-1)), "k >= n must be plain softmax, exactly"
        return
    nonzero = (p > 0).sum(-1)
    assert torch.equal(nonzero, torch.full_like(nonzero, k)), f"non-zeros per row {nonzero.tolist()} != {k}"
    # the kept entries are the k largest scores: nothing dropped beats anything kept
    kept_min = scores.masked_fill(p == 0, float("inf")).min(-1).values
    dropped_max = scores.masked_fill(p > 0, float("-inf")).max(-1).values
    assert (kept_min >= dropped_max).all()
    if mode == "mask":
        torch.testing.assert_close(p.sum(-1), torch.ones(scores.shape[0]))
        oracle = torch.where(p > 0, scores, torch.tensor(float("-inf"))).softmax(-1)
    else:
        oracle = scores.softmax(-1) * (p > 0)
        assert (p.sum(-1) <= 1 + 1e-6).all()
    torch.testing.assert_close(p, oracle)


def test_topk_softmax_along_other_dims():
    x = torch.randn(3, 7, 4, generator=gen(0))
    p = topk_softmax(x, 2, dim=1)
    assert torch.equal((p > 0).sum(1), torch.full((3, 4), 2))
    torch.testing.assert_close(p.sum(1), torch.ones(3, 4))


def test_topk_softmax_mask_passes_no_gradient_outside_topk():
    scores = torch.randn(4, 10, generator=gen(1), requires_grad=True)
    p = topk_softmax(scores, 3, mode="mask")
    (p * torch.randn(4, 10, generator=gen(2))).sum().backward()
    outside = p.detach() == 0
    assert torch.equal(scores.grad[outside], torch.zeros(int(outside.sum()))), scores.grad
    assert scores.grad[~outside].abs().sum() > 0


def test_topk_softmax_post_passes_gradient_through_the_normaliser():
    """In "post" mode the dropped scores still sit in softmax's denominator, so they get gradient."""
    scores = torch.randn(4, 10, generator=gen(1), requires_grad=True)
    p = topk_softmax(scores, 3, mode="post")
    p.sum().backward()
    outside = p.detach() == 0
    assert (scores.grad[outside] < 0).all(), "raising a dropped score shrinks the kept weights"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_softmax_half_precision(dtype):
    base = torch.randn(8, 300, generator=gen(3))
    scores = (base * 3).to(dtype)                     # bf16 keeps 8 bits: many ties among 300 scores
    p = topk_softmax(scores, 17)
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert torch.equal((p > 0).sum(-1), torch.full((8,), 17))
    assert ((p.float().sum(-1) - 1).abs() < 1e-2).all()
    # Large scores: small kept weights may underflow to 0, but nothing outside the top-k may appear.
    big = (base * 100).to(dtype)
    p = topk_softmax(big, 17)
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(-1, big.topk(17).indices, False)
    assert torch.isfinite(p).all() and (p[outside] == 0).all() and ((p > 0).sum(-1) <= 17).all()


@pytest.mark.parametrize("k, mode, match", [(0, "mask", "k must be an integer >= 1, got 0"),
                                            (-2, "mask", "got -2"), (1.5, "mask", "got 1.5"),
                                            (2, "hard", "mode must be 'mask' or 'post'")])
def test_topk_softmax_errors(k, mode, match):
    with pytest.raises(ValueError, match=match):
        topk_softmax(torch.zeros(2, 4), k, mode=mode)


# --- KEM ---------------------------------------------------------------------------------------

def kem_oracle(kem, F_, k, mode="mask"):
    """The paper's equations, one batch element at a time, top-k by sorting (independent of
    topk_softmax and of both forward passes)."""
    D = F_.shape[-1]
    out = []
    for f in F_:                                                   # f: (N, D)
        s = (kem.R @ kem.W_qr) @ (f @ kem.W_kr).T / math.sqrt(D)  # (L, N)
        order = s.argsort(dim=-1, descending=True)
        keep = torch.zeros_like(s, dtype=torch.bool)
        for row in range(s.shape[0]):
            keep[row, order[row, :k]] = True
        if mode == "mask":
            A = torch.where(keep, s, torch.tensor(float("-inf"))).softmax(-1)
        else:
            A = s.softmax(-1) * keep
        R_hat = A @ (f @ kem.W_vr)                                 # (L, D)
        A_w = ((f @ kem.W_qw) @ (R_hat @ kem.W_kw).T / math.sqrt(D)).softmax(-1)
        out.append(f + A_w @ (R_hat @ kem.W_vw))
    return torch.stack(out)


@st.composite
def kem_cases(draw):
    B, N, D, L = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(2, 24)), draw(st.integers(1, 8))
    k = draw(st.one_of(st.integers(1, N + 5), st.floats(0.01, 1.0)))
    return B, N, D, L, k, draw(st.integers(0, 2**31 - 1))


@pytest.mark.filterwarnings("ignore:KEM keeps k = 1")   # small N and k = 1 are drawn on purpose
@settings(deadline=None, max_examples=60)
@given(kem_cases(), st.sampled_from(["mask", "post"]))
@example((1, 1, 2, 1, 1, 0), "mask")
@example((2, 5, 4, 3, 1.0, 0), "post")
def test_kem_matches_the_equations(case, mode):
    B, N, D, L, topk, seed = case
    torch.manual_seed(seed)
    kem = KEM(D, L, topk, topk_mode=mode)
    F_ = torch.randn(B, N, D, generator=gen(seed))
    out, attn = kem(F_, return_attention=True)
    k = min(topk, N) if isinstance(topk, int) else max(1, math.ceil(topk * N))
    assert out.shape == (B, N, D)
    assert attn["retrieve"].shape == (B, L, N) and attn["write"].shape == (B, N, L)
    assert torch.equal((attn["retrieve"] > 0).sum(-1), torch.full((B, L), k))
    torch.testing.assert_close(attn["write"].sum(-1), torch.ones(B, N))
    torch.testing.assert_close(out, kem_oracle(kem, F_, k, mode), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kem.forward_literal(F_), out, atol=1e-5, rtol=1e-4)


def test_the_fast_forward_is_the_literal_equations_reassociated():
    """forward (no D x D matrix touches the tokens) and forward_literal (the paper's equations as
    written) are one function: equal in float64 to 1e-12, in both top-k modes and with ETF slots."""
    for mode, slots in (("mask", "learned"), ("post", "learned"), ("mask", "etf")):
        torch.manual_seed(1)
        kem = KEM(24, 6, 0.2, slots=slots, topk_mode=mode).double()
        F_ = torch.randn(3, 50, 24, generator=gen(2), dtype=torch.float64)
        torch.testing.assert_close(kem(F_), kem.forward_literal(F_), atol=1e-12, rtol=1e-12)


def test_the_projections_are_the_papers_dxd_matrices():
    """Six D x D parameters named as in the paper, nothing else learned but the slots R."""
    kem = KEM(8, 3)
    shapes = {name: tuple(p.shape) for name, p in kem.named_parameters()}
    assert shapes == {"W_qr": (8, 8), "W_kr": (8, 8), "W_vr": (8, 8), "W_qw": (8, 8), "W_kw": (8, 8),
                      "W_vw": (8, 8), "R": (3, 8)}


def test_kem_is_permutation_equivariant():
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.3)
    F_ = torch.randn(2, 33, 16, generator=gen(4))
    perm = torch.randperm(33, generator=gen(5))
    torch.testing.assert_close(kem(F_[:, perm]), kem(F_)[:, perm])


def test_kem_batch_elements_do_not_interact():
    torch.manual_seed(0)
    kem = KEM(16, 4, 5)
    F_ = torch.randn(3, 20, 16, generator=gen(6))
    changed = F_.clone()
    changed[1] = torch.randn(20, 16, generator=gen(7))
    a, b = kem(F_), kem(changed)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("slots", ["learned", "etf"])
def test_kem_gradients_are_finite_and_reach_every_parameter(slots):
    torch.manual_seed(0)
    kem = KEM(16, 6, 0.25, slots=slots)
    F_ = torch.randn(2, 40, 16, generator=gen(8), requires_grad=True)
    (kem(F_) ** 2).mean().backward()
    params = dict(kem.named_parameters())
    assert ("R" in params) == (slots == "learned")
    for name, p in [*params.items(), ("input", F_)]:
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: {p.grad}"


def test_kem_with_k_at_least_n_is_plain_softmax_attention():
    torch.manual_seed(0)
    kem = KEM(8, 3, 50)
    F_ = torch.randn(2, 12, 8, generator=gen(9))
    D = 8
    q = kem.R @ kem.W_qr
    A = (q @ (F_ @ kem.W_kr).transpose(1, 2) / math.sqrt(D)).softmax(-1)         # plain softmax
    R_hat = A @ (F_ @ kem.W_vr)
    A_w = ((F_ @ kem.W_qw) @ (R_hat @ kem.W_kw).transpose(1, 2) / math.sqrt(D)).softmax(-1)
    expected = F_ + A_w @ (R_hat @ kem.W_vw)
    torch.testing.assert_close(kem(F_), expected)
    torch.testing.assert_close(KEM(8, 3, 1.0)(F_).shape, F_.shape)


def test_kem_etf_slots_are_a_fixed_simplex():
    kem = KEM(16, 5, slots="etf")
    assert "R" in kem.state_dict() and "R" not in dict(kem.named_parameters())
    G = kem.R @ kem.R.T
    assert (G.diagonal() - 1).abs().max() < 1e-5
    assert (G[~torch.eye(5, dtype=torch.bool)] + 1 / 4).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_slots=0), "num_slots must be >= 1, got 0"),
    (dict(topk=0), r"topk must be a count >= 1 or a fraction in \(0, 1\], got 0"),
    (dict(topk=1.5), r"must be a count >= 1 or a fraction in \(0, 1\], got 1.5"),
    (dict(topk=0.0), r"fraction in \(0, 1\], got 0.0"),
    (dict(topk="all"), "topk must be a count >= 1 or a fraction"),
    (dict(slots="fixed"), "slots must be 'learned' or 'etf'"),
    (dict(topk_mode="hard"), "topk_mode must be 'mask' or 'post'"),
    (dict(num_slots=40, slots="etf"), "needs dim >= 39, got dim=16"),
    (dict(num_slots=1, slots="etf"), "slots='etf' with num_slots=1: num_slots must be >= 2"),
    (dict(num_slots=40, slots="etf"), r"num_slots <= 17"),                 # in KEM's words, not the frame's
])
def test_kem_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KEM(16, **kwargs)


# --- the cross-attention baseline ---------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_cross_attention_equals_softmax_attention_written_out(B, N, D, seed):
    torch.manual_seed(seed)
    attn = CrossTaskAttention(D)
    F_ = torch.randn(B, N, D, generator=gen(seed))
    q, k, v = F_ @ attn.W_q, F_ @ attn.W_k, F_ @ attn.W_v
    expected = torch.empty(B, N, D)
    for b in range(B):
        for i in range(N):
            w = torch.exp(q[b, i] @ k[b].T / math.sqrt(D))
            expected[b, i] = F_[b, i] + (w / w.sum()) @ v[b]
    out, weights = attn(F_, return_attention=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn(F_), out)
    assert weights["attention"].shape == (B, N, N)
    assert (weights["attention"] > 0).all(), "softmax leaks: no weight is exactly zero"


# --- MultiTaskNet --------------------------------------------------------------------------------

COMBINATIONS = [(x, e) for x in EXCHANGES for e in ETF_MODES]


@pytest.mark.parametrize("exchange, etf", COMBINATIONS)
@pytest.mark.parametrize("tasks", [NYUD, PASCAL], ids=["nyud", "pascal"])
def test_multitasknet_shapes_for_every_combination(tasks, exchange, etf):
    torch.manual_seed(0)
    if etf in ("slots", "both") and exchange != "kem":
        with pytest.raises(ValueError, match="needs exchange='kem'"):
            MultiTaskNet(tasks, exchange=exchange, etf=etf, dim=16)
        return
    net = MultiTaskNet(tasks, exchange=exchange, etf=etf, dim=16, num_slots=4)
    out = net(torch.randn(2, 3, 24, 32))
    assert set(out) == set(tasks)
    for t, c in tasks.items():
        assert out[t].shape == (2, c, 24, 32), (t, out[t].shape)
        assert torch.isfinite(out[t]).all()


@pytest.mark.filterwarnings("ignore:KEM keeps k = 1")   # 8 x 8 pixels: one token
@pytest.mark.parametrize("H, W", [(17, 23), (8, 8), (33, 65)])
def test_multitasknet_any_image_size(H, W):
    net = MultiTaskNet({"semseg": 5}, dim=16, num_slots=2)        # one task: the single-task baseline
    assert net(torch.randn(1, 3, H, W))["semseg"].shape == (1, 5, H, W)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exchange", ["kem", "cross"])
def test_multitasknet_under_cpu_autocast(dtype, exchange):
    torch.manual_seed(0)
    net = MultiTaskNet(NYUD, exchange=exchange, etf="features", dim=16, num_slots=4)
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(2, 3, 24, 32))
        loss = sum(o.float().pow(2).mean() for o in out.values())
    loss.backward()
    assert all(torch.isfinite(o).all() for o in out.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def test_multitasknet_runs_on_the_device_of_its_inputs():
    """On the meta device nothing is computed, but any tensor made on the CPU would fail the op."""
    net = MultiTaskNet(NYUD, etf="both", dim=16, num_slots=4).to("meta")
    out = net(torch.empty(2, 3, 24, 32, device="meta"))
    assert all(o.device.type == "meta" for o in out.values())


def test_kem_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.25, slots="etf")
    F_ = torch.randn(2, 48, 16, generator=gen(10))
    compiled = torch.compile(kem, fullgraph=True)   # fullgraph: fail on any graph break
    torch.testing.assert_close(compiled(F_), kem(F_), atol=1e-5, rtol=1e-4)


def test_multitasknet_fits_one_batch():
    """Smoke test: a few dozen steps on one batch cut every task's loss by more than half."""
    torch.manual_seed(0)
    net = MultiTaskNet({"semseg": 3, "depth": 1}, dim=16, num_slots=4)
    # 4 x 4 blocks of one colour: the decoders predict at stride 4, so the targets are learnable
    # from the pixels themselves at the resolution the network outputs.
    images = F.interpolate(torch.randn(2, 3, 4, 4, generator=gen(11)), scale_factor=4, mode="nearest")
    seg = (images[:, 0] > 0).long()
    depth = images[:, 1:2].abs()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def losses():
        out = net(images)
        return F.cross_entropy(out["semseg"], seg), F.l1_loss(out["depth"], depth)

    first = [loss.item() for loss in losses()]
    for _ in range(60):
        opt.zero_grad()
        sum(losses()).backward()
        opt.step()
    last = [loss.item() for loss in losses()]
    assert last[0] < 0.5 * first[0] and last[1] < 0.5 * first[1], (first, last)


@pytest.mark.parametrize("name", ["swin_t", "resnet18"])
def test_torchvision_backbones_shapes(name):
    torch.manual_seed(0)
    net = MultiTaskNet({"semseg": 4, "normals": 3}, backbone=name, dim=16, num_slots=4)
    out = net(torch.randn(1, 3, 40, 50))
    assert out["semseg"].shape == (1, 4, 40, 50) and out["normals"].shape == (1, 3, 40, 50)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks={}), "at least one task"),
    (dict(tasks={"semseg": 0}), "task 'semseg' needs an integer number of output channels >= 1, got 0"),
    (dict(backbone="vit"), "unknown backbone 'vit'; choose one of " + ", ".join(BACKBONES)),
    (dict(backbone="tiny", pretrained=True), "no pretrained weights"),
    (dict(exchange="attention"), "unknown exchange 'attention'; choose one of kem, cross, none"),
    (dict(etf="all"), "unknown etf mode 'all'"),
    (dict(etf="slots", exchange="none"), "needs exchange='kem'"),
    (dict(topk=0), "topk must be a count >= 1"),
    (dict(num_slots=0), "num_slots must be >= 1"),
    (dict(dim=12), r"dim=12 does not fit the network's GroupNorm layers .*try dim=8 or dim=16"),
    (dict(dim=72), r"try dim=64 or dim=80"),
    (dict(etf="both", num_slots=40), r"etf='both' with num_slots=40: .* use dim >= 39 or num_slots <= 17"),
    (dict(etf="features", dim=1), r"etf='features' maps the tokens onto a frame of dim vectors: dim must be >= 2"),
])
def test_multitasknet_errors(kwargs, match):
    kwargs = {"tasks": NYUD, "dim": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiTaskNet.check_options(**kwargs)                       # the same rules, nothing built
    with pytest.raises(ValueError, match=match):
        MultiTaskNet(**kwargs)


@pytest.mark.parametrize("etf", ["none", "features"])
def test_check_options_accepts_exactly_the_widths_the_network_can_build(etf):
    """The oracle is the network itself: for every D up to 150, building it works iff the check passes."""
    for dim in range(1, 151):
        try:
            MultiTaskNet.check_options({"semseg": 3}, dim=dim, num_slots=4, etf=etf)
            checked = None
        except ValueError as error:
            checked = error
        try:
            MultiTaskNet({"semseg": 3}, dim=dim, num_slots=4, etf=etf)
            built = None
        except ValueError as error:
            built = error
        assert (checked is None) == (built is None), (dim, checked, built)


@pytest.mark.filterwarnings("ignore:KEM keeps k = 1")   # 8 x 8 pixels: one token per task
@pytest.mark.parametrize("backbone, size", [("tiny", (32, 32)), ("tiny", (33, 50)), ("tiny", (8, 8)),
                                            ("resnet18", (40, 50)), ("swin_t", (64, 96))])
def test_num_tokens_is_what_the_exchange_sees(backbone, size):
    net = MultiTaskNet({"semseg": 3, "depth": 1}, backbone=backbone, dim=16, num_slots=4)
    seen = []
    net.exchange.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    net(torch.zeros(1, 3, *size))
    assert seen == [MultiTaskNet.num_tokens(2, backbone, size)]


def test_more_slots_than_tokens_warns_once_in_words_of_the_arguments():
    with pytest.warns(UserWarning, match=r"num_slots=200 is more than the 32 tokens KEM sees in a 32x32 image "
                                         r"with 2 task\(s\)"):
        MultiTaskNet.check_options({"semseg": 3, "depth": 1}, dim=16, num_slots=200, image_size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no warning: as many slots as tokens, no size
        MultiTaskNet.check_options({"semseg": 3, "depth": 1}, dim=16, num_slots=32, image_size=(32, 32))
        MultiTaskNet.check_options({"semseg": 3, "depth": 1}, dim=16, num_slots=200)


# --- using the modules in other code: inputs, k, factory arguments, settings, precision, tracers ----

@pytest.mark.parametrize("module", [KEM(16, 4), CrossTaskAttention(16)], ids=["kem", "cross"])
@pytest.mark.parametrize("shape, hint", [
    ((10, 16), r"got a tensor of shape \(10, 16\); tokens of one sample need a batch dimension"),
    ((2, 16, 4, 5), r"got a tensor of shape \(2, 16, 4, 5\); a \(B, C, h, w\) map becomes tokens with "
                    r"x.flatten\(2\).transpose\(1, 2\)"),
    ((2, 10, 32), r"got a tensor of shape \(2, 10, 32\); the tokens are 32 wide: project them to 16"),
])
def test_wrong_token_shapes_are_refused_by_name(module, shape, hint):
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name} expects tokens of shape \(B, N, D\) with D = dim = 16, {hint}"):
        module(torch.zeros(shape))
    if isinstance(module, KEM):
        with pytest.raises(ValueError, match=hint):
            module.forward_literal(torch.zeros(shape))


def test_topk_is_a_count_of_any_integer_type_or_a_fraction():
    import numpy as np

    for count in (8, np.int64(8), np.int32(8), torch.tensor(8)):
        kem = KEM(16, 4, count)
        assert type(kem.topk) is int and kem.topk == 8, count
        assert resolve_topk(count, 20) == 8 and resolve_topk(count, 5) == 5
    assert resolve_topk(np.float32(0.5), 10) == 5 and resolve_topk(torch.tensor(0.5), 10) == 5
    assert (resolve_topk(1, 10), resolve_topk(1.0, 10)) == (1, 10), "topk=1 is one token, 1.0 all of them"
    p = topk_softmax(torch.randn(3, 9, generator=gen(0)), np.int64(2))
    assert torch.equal((p > 0).sum(-1), torch.full((3,), 2))
    for wrong in (True, torch.tensor([8]), torch.tensor(True), "8"):
        with pytest.raises(ValueError, match="topk must be a count >= 1 or a fraction"):
            KEM(16, 4, wrong)


def test_k_of_one_warns_once_that_the_slots_get_no_gradient():
    """With one token per slot the retrieve softmax is the constant 1: R, W_qr, W_kr get exactly zero."""
    torch.manual_seed(0)
    kem = KEM(16, 4, 1)
    F_ = torch.randn(2, 12, 16, generator=gen(12))
    with pytest.warns(UserWarning, match=r"k = 1 token per slot.*\(R, W_qr, W_kr\) receive no gradient"):
        kem(F_).pow(2).sum().backward()
    for name in ("R", "W_qr", "W_kr"):
        assert torch.equal(getattr(kem, name).grad, torch.zeros_like(getattr(kem, name))), name
    assert kem.W_vr.grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # a second warning would raise here
        kem(F_)
        KEM(16, 4, 2)(F_)                                         # k = 2: no warning at all
    with pytest.warns(UserWarning, match=r"topk=0.25, N=4 tokens"):
        KEM(16, 4)(F_[:, :4])                                     # the default fraction, a small N


@pytest.mark.parametrize("slots", ["learned", "etf"])
def test_device_and_dtype_factory_arguments(slots):
    kem = KEM(8, 3, slots=slots, dtype=torch.float64)
    assert {t.dtype for t in kem.state_dict().values() if torch.is_tensor(t)} == {torch.float64}
    assert kem(torch.randn(2, 5, 8, dtype=torch.float64)).dtype == torch.float64
    meta = KEM(8, 3, slots=slots, device="meta")
    assert {t.device.type for t in meta.state_dict().values() if torch.is_tensor(t)} == {"meta"}
    cross = CrossTaskAttention(8, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in cross.parameters())
    torch.manual_seed(3)
    a = KEM(8, 3, slots=slots)
    torch.manual_seed(3)
    b = KEM(8, 3, slots=slots, device="cpu", dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if torch.is_tensor(x)), "the defaults draw the same weights"


def test_the_settings_travel_with_the_state_dict():
    saved = KEM(16, 4, 0.25).state_dict()
    assert saved["_extra_state"] == {"dim": 16, "num_slots": 4, "topk": 0.25, "topk_mode": "mask", "slots": "learned"}
    KEM(16, 4, 0.25).load_state_dict(saved)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["_extra_state"] == saved["_extra_state"], "plain Python values"


@pytest.mark.parametrize("saved_with, loaded_into, names", [
    (dict(slots="etf"), dict(), "saved slots='etf', this module has slots='learned'"),
    (dict(), dict(slots="etf"), "saved slots='learned', this module has slots='etf'"),
    (dict(topk=0.5), dict(), "saved topk=0.5, this module has topk=0.25"),
    (dict(topk=1), dict(topk=1.0), "saved topk=1, this module has topk=1.0"),
    (dict(topk_mode="post"), dict(), "saved topk_mode='post', this module has topk_mode='mask'"),
    (dict(num_slots=5), dict(), "saved num_slots=5, this module has num_slots=4"),
])
def test_a_state_dict_of_other_settings_is_refused_naming_both(saved_with, loaded_into, names):
    saved = KEM(**{"dim": 16, "num_slots": 4, **saved_with}).state_dict()
    kem = KEM(**{"dim": 16, "num_slots": 4, **loaded_into})
    with pytest.raises(RuntimeError, match=re.escape(names)):
        kem.load_state_dict(saved)
    net = MultiTaskNet({"semseg": 3, "depth": 1}, dim=16, num_slots=4, topk=0.5)
    other = MultiTaskNet({"semseg": 3, "depth": 1}, dim=16, num_slots=4)
    with pytest.raises(RuntimeError, match=r"weights for exchange. were saved with other settings: saved topk=0.5"):
        other.load_state_dict(net.state_dict())


def test_state_dicts_saved_before_the_settings_still_load_strictly():
    torch.manual_seed(0)
    net = MultiTaskNet({"semseg": 3, "depth": 1}, etf="both", dim=16, num_slots=4)
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    assert "exchange._extra_state" in net.state_dict() and "exchange._extra_state" not in old
    fresh = MultiTaskNet({"semseg": 3, "depth": 1}, etf="both", dim=16, num_slots=4)
    result = fresh.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in old.items())
    KEM(16, 4).load_state_dict({k: v for k, v in KEM(16, 4).state_dict().items() if k != "_extra_state"})


def test_deepcopy_keeps_weights_settings_and_the_check():
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.5, slots="etf")
    twin = copy.deepcopy(kem)
    F_ = torch.randn(2, 20, 16, generator=gen(13))
    assert torch.equal(twin(F_), kem(F_)) and twin.get_extra_state() == kem.get_extra_state()
    twin.load_state_dict(kem.state_dict())
    with pytest.raises(RuntimeError, match="saved topk=0.25, this module has topk=0.5"):
        twin.load_state_dict(KEM(16, 4, slots="etf").state_dict())


def test_ddp_wraps_kem_and_its_state_dict_loads_back(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        kem = KEM(16, 4, 0.25)
        ddp = DDP(kem)
        ddp(torch.randn(2, 20, 16, generator=gen(14))).pow(2).sum().backward()
        assert all(p.grad is not None for p in kem.parameters())
        loaded = KEM(16, 4, 0.25)
        loaded.load_state_dict(ddp.module.state_dict())
        assert torch.equal(loaded.W_qr, kem.W_qr)
    finally:
        dist.destroy_process_group()


def test_fp16_scores_that_overflow_unscaled_stay_finite():
    """Large activations: the literal form (1/sqrt(D) after the N-long products) overflows fp16 to
    inf and NaN; forward (1/sqrt(D) on the L x D tensors first) stays finite and close to float64."""
    D, L = 64, 4
    kem = KEM(D, L, 8)
    with torch.no_grad():
        for W in (kem.W_qr, kem.W_kr, kem.W_vr, kem.W_qw, kem.W_kw, kem.W_vw):
            W.copy_(torch.eye(D))
        kem.W_kw.mul_(0.05)
        kem.R.copy_(torch.eye(L, D) * 300)
    F_ = torch.randn(2, 50, D, generator=gen(0)) * 100
    expected = copy.deepcopy(kem).double()(F_.double())
    half, F16 = kem.half(), F_.half()
    unscaled = ((half.R @ half.W_qr) @ half.W_kr.T) @ F16.transpose(1, 2)
    assert torch.isinf(unscaled).any(), "the test needs scores that overflow fp16 unscaled"
    assert not torch.isfinite(half.forward_literal(F16)).all()
    out = half(F16)
    assert torch.isfinite(out).all()
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert error < 5e-3, f"fp16 against float64: relative error {error:.2e}"


def test_torch_export_with_a_dynamic_token_count():
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.25)
    N = torch.export.Dim("N", min=2, max=4096)
    exported = torch.export.export(kem, (torch.randn(2, 40, 16),), dynamic_shapes={"F": {1: N}}).module()
    for n in (40, 97, 3):                                          # k = 10, 25 and 1
        F_ = torch.randn(2, n, 16, generator=gen(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                        # k = 1 at n = 3: the eager module warns
            expected = kem(F_)
        torch.testing.assert_close(exported(F_), expected, msg=f"N = {n}")


def test_torch_compile_dynamic_traces_once_over_changing_n():
    """dynamic=True with a backend that only counts graphs (Dynamo's capture, no code generation)."""
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.25, slots="etf")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(kem, backend=counting_backend, dynamic=True, fullgraph=True)
    for n in (40, 97, 13):
        F_ = torch.randn(2, n, 16, generator=gen(n))
        torch.testing.assert_close(compiled(F_), kem(F_), msg=f"N = {n}")
    assert len(graphs) == 1, f"{len(graphs)} graphs for three token counts"


def test_torch_jit_trace_follows_the_token_count():
    torch.manual_seed(0)
    kem = KEM(16, 4, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("error", category=torch.jit.TracerWarning)   # nothing fixed by the trace
        traced = torch.jit.trace(kem, (torch.randn(2, 40, 16),))
    for n in (40, 97):
        F_ = torch.randn(2, n, 16, generator=gen(n))
        torch.testing.assert_close(traced(F_), kem(F_), msg=f"N = {n}")
