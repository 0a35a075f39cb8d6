"""etf.simplex_etf's randomness: frames from different seeds are distributed as the construction
promises, E = sqrt(K/(K-1)) W V^T with W uniformly random (Haar) among matrices with orthonormal
columns.

A Haar-random W is as likely as -W, or as W with any column negated, so every entry of E is as
likely positive as negative; and its distribution is the same in every direction, so the average
of E E^T over seeds is K/d times the identity. Pinned down over 400 seeds (explicit generators)
for several K and d: every entry of E is positive for 50% +- 15% of the seeds (a QR factor whose
signs are left as LAPACK returns them has the first entry of each of its columns negative every
time: the fraction would then be 0 or 1 for some entries), and the average of E E^T is within 0.2
of K/d I (sampling error at 400 seeds is about 0.05).
"""
import functools

import pytest
import torch

from etf import simplex_etf

SEEDS = 400
SIZES = [(2, 1), (2, 3), (3, 2), (4, 6), (8, 8)]   # d = K - 1 (the tight case), d = K, d > K


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@functools.lru_cache(maxsize=None)
def frames(K, d):
    return torch.stack([simplex_etf(K, d, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in range(SEEDS)])                         # (seeds, d, K)


@pytest.mark.parametrize("K, d", SIZES)
def test_every_entry_is_as_likely_positive_as_negative(K, d):
    positive = (frames(K, d) > 0).double().mean(0)                      # (d, K): fraction of seeds
    worst = (positive - 0.5).abs().max()
    assert worst <= 0.15, f"K={K}, d={d}: fraction of seeds with a positive entry, per entry:\n{positive}"


@pytest.mark.parametrize("K, d", SIZES)
def test_the_frame_has_no_preferred_direction(K, d):
    E = frames(K, d)
    second_moment = (E @ E.transpose(1, 2)).mean(0)                     # (d, d)
    want = K / d * torch.eye(d, dtype=torch.float64)
    assert (second_moment - want).abs().max() <= 0.2, f"K={K}, d={d}: mean of E E^T\n{second_moment}"


def test_the_sign_of_each_columns_first_entry_changes_with_the_seed():
    E = frames(5, 7)
    signs = torch.sign(E[:, 0, :])                                      # (seeds, K)
    for k in range(5):
        assert len(set(signs[:, k].tolist())) == 2, f"column {k}: the first entry has the same sign for every seed"
