"""etf.py: the simplex ETF has exactly the properties the neural-collapse literature defines.

Pinned down: unit columns, pairwise cosine -1/(K-1), centred columns, the closed-form Gram matrix,
rank K-1, for K in 2..64 and every dim from K-1 up; determinism from a seeded generator; the
errors for impossible sizes; ETFProjection keeps its frame as a (saved, untrained) buffer and
computes normalize(x) @ E, and takes device= / dtype= as torch.nn layers do (the same frame).
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etf import ETFProjection, simplex_etf


@st.composite
def frame_sizes(draw):
    K = draw(st.integers(2, 64))
    dim = draw(st.integers(K - 1, K + 70))
    return K, dim


@settings(deadline=None, max_examples=60)
@given(frame_sizes(), st.integers(0, 2**31 - 1))
@example((2, 1), 0)
@example((2, 2), 0)
@example((64, 63), 1)
@example((3, 2), 7)
def test_simplex_etf_properties(sizes, seed):
    K, dim = sizes
    E = simplex_etf(K, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert E.shape == (dim, K)
    norms = E.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(K, dtype=torch.float64), atol=1e-10, rtol=0)
    G = E.T @ E
    expected = K / (K - 1) * (torch.eye(K, dtype=torch.float64) - 1.0 / K)
    torch.testing.assert_close(G, expected, atol=1e-10, rtol=0)
    off_diagonal = G[~torch.eye(K, dtype=torch.bool)]
    assert (off_diagonal + 1.0 / (K - 1)).abs().max() < 1e-10, f"cosines {off_diagonal[:5]} != {-1/(K-1)}"
    assert E.sum(dim=1).abs().max() < 1e-10, "columns must sum to zero"
    assert torch.linalg.matrix_rank(E).item() == K - 1


def test_default_dtype_is_float32_and_accurate():
    E = simplex_etf(10, 16, generator=torch.Generator().manual_seed(0))
    assert E.dtype == torch.float32
    G = E.T @ E
    assert (G.diagonal() - 1).abs().max() < 1e-6
    assert (G[~torch.eye(10, dtype=torch.bool)] + 1 / 9).abs().max() < 1e-6


def test_same_seed_same_frame_other_seed_other_frame():
    a = simplex_etf(8, 12, generator=torch.Generator().manual_seed(3))
    b = simplex_etf(8, 12, generator=torch.Generator().manual_seed(3))
    c = simplex_etf(8, 12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_k_equals_3_in_the_plane_is_120_degrees():
    E = simplex_etf(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = torch.rad2deg(torch.acos((E.T @ E).clamp(-1, 1)))
    torch.testing.assert_close(angles[0, 1], torch.tensor(120.0, dtype=torch.float64))
    torch.testing.assert_close(angles[1, 2], torch.tensor(120.0, dtype=torch.float64))


@pytest.mark.parametrize("K, dim, match", [
    (1, 4, "num_vectors must be >= 2"),
    (0, 4, "num_vectors must be >= 2"),
    (5, 3, "needs dim >= 4, got dim=3"),
    (64, 10, "num_vectors <= 11"),
])
def test_impossible_sizes_raise_with_what_would_work(K, dim, match):
    with pytest.raises(ValueError, match=match):
        simplex_etf(K, dim)


def test_projection_is_a_saved_untrained_buffer():
    proj = ETFProjection(16, 8)
    assert "E" in proj.state_dict() and proj.state_dict()["E"].shape == (16, 8)
    assert list(proj.parameters()) == []
    other = ETFProjection(16, 8)
    assert torch.equal(proj.E, other.E), "two modules built alike must hold the same frame"
    loaded = ETFProjection(16, 8, seed=1)
    assert not torch.equal(loaded.E, proj.E)
    loaded.load_state_dict(proj.state_dict())
    assert torch.equal(loaded.E, proj.E)


def test_projection_computes_normalized_x_times_frame():
    proj = ETFProjection(12)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0)) * 7
    y = proj(x)
    assert y.shape == (2, 5, 12)
    expected = (x / x.norm(dim=-1, keepdim=True)) @ proj.E
    torch.testing.assert_close(y, expected)
    assert y.abs().max() <= 1 + 1e-6, "each coordinate is a cosine"
    torch.testing.assert_close(proj(3 * x), y, msg="the token's norm must not matter")


def test_projection_device_and_dtype_factory_arguments():
    proj = ETFProjection(12, 6, dtype=torch.float64)
    assert proj.E.dtype == torch.float64
    torch.testing.assert_close(proj.E.float(), ETFProjection(12, 6).E, msg="the same frame, cast")
    assert ETFProjection(12, 6).E.dtype == torch.get_default_dtype()
    assert ETFProjection(12, device="meta").E.device.type == "meta"
    x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert proj(x).dtype == torch.float64
