"""kem_mtl.py: top-k softmax, KEM, the cross-attention baseline and the multi-task network.

Pinned down: topk_softmax keeps exactly k weights (also with ties and in half precision), sums to
one in "mask" mode, equals softmax for k >= n and passes no gradient outside the top-k; KEM equals
the paper's three equations written out naively, is permutation-equivariant, keeps batch elements
apart, trains every parameter, and reduces to plain-softmax attention for k >= N; the baseline
equals softmax attention written out; MultiTaskNet gives the right shapes for the NYUD and PASCAL
task sets, every exchange x etf combination and odd image sizes, runs under autocast and
torch.compile, fits one batch, and raises every documented error.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kem_mtl import BACKBONES, ETF_MODES, EXCHANGES, KEM, CrossTaskAttention, MultiTaskNet, topk_softmax

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
    (dict(num_slots=1, slots="etf"), "slots='etf' with num_slots=1: num_vectors must be >= 2"),
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

    first = [l.item() for l in losses()]
    for _ in range(60):
        opt.zero_grad()
        sum(losses()).backward()
        opt.step()
    last = [l.item() for l in losses()]
    assert last[0] < 0.5 * first[0] and last[1] < 0.5 * first[1], (first, last)


@pytest.mark.parametrize("name", ["swin_t", "resnet18"])
def test_torchvision_backbones_shapes(name):
    torch.manual_seed(0)
    net = MultiTaskNet({"semseg": 4, "normals": 3}, backbone=name, dim=16, num_slots=4)
    out = net(torch.randn(1, 3, 40, 50))
    assert out["semseg"].shape == (1, 4, 40, 50) and out["normals"].shape == (1, 3, 40, 50)


def test_pretrained_weights_unreachable_gives_a_clear_error(monkeypatch, tmp_path):
    import urllib.error

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="could not load the ImageNet weights of resnet18") as error:
        MultiTaskNet({"semseg": 4}, backbone="resnet18", pretrained=True)
    message = str(error.value)
    assert str(tmp_path) in message and "pretrained=False" in message and "--no-pretrained" in message


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
])
def test_multitasknet_errors(kwargs, match):
    kwargs = {"tasks": NYUD, "dim": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiTaskNet(**kwargs)
