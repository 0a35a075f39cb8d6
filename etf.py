"""The simplex equiangular tight frame (ETF) and the projection of features into ETF space.

This file is the "stable" half of sKEM in *SGW-based Multi-Task Learning in Vision Tasks*
(Zhang et al., ACCV 2024, arXiv:2410.03778). It imports only torch and can be copied on its own.

Neural collapse in one page
---------------------------
Papyan, Han and Donoho (PNAS 2020) observed that when a classifier is trained far past zero
training error, the last-layer features of each class collapse onto their class mean, and the K
class means (centred on the global mean, normalised) arrange themselves as a *simplex equiangular
tight frame*: K unit vectors e_1..e_K with

    <e_i, e_i> = 1,        <e_i, e_j> = -1/(K-1)   for i != j.

That is the most separated K unit vectors can be. For any unit vectors, 0 <= |sum_i e_i|^2 =
K + sum_{i!=j} <e_i, e_j>, so the average pairwise cosine is at least -1/(K-1); the simplex ETF
reaches that bound with *every* pair equal, so no two directions are closer than any other. (K = 3:
three arrows at 120 degrees in a plane; K = 4: the vertices of a regular tetrahedron.)

Construction. Let P = I_K - (1/K) 1 1^T, the projector that removes the mean of K numbers. Then

    E = sqrt(K/(K-1)) * U P,     U in R^{d x K} with orthonormal columns,

has exactly the Gram matrix E^T E = K/(K-1) * P: ones on the diagonal, -1/(K-1) off it. Its columns
sum to zero (P 1 = 0) and it has rank K-1: a simplex of K points spans only K-1 dimensions. That is
why d >= K-1 suffices. We use the equivalent form

    E = sqrt(K/(K-1)) * W V^T,   V in R^{K x (K-1)}: orthonormal basis of the vectors orthogonal to 1,
                                 W in R^{d x (K-1)}: orthonormal columns, drawn at random,

(because P = V V^T, so U P = (U V) V^T and U V is just another d x (K-1) orthonormal matrix). It
works for every d >= K-1, including the tight case d = K-1 that the d >= K recipe cannot handle.
W is the Q factor of a QR decomposition of a Gaussian matrix drawn from an explicit torch.Generator,
so a seed fixes the frame.

Why the paper uses it
---------------------
[paper] "Before input to KEM, we projected the features into ETF space"; the ETF variant is
called sKEM (stable KEM) and is meant to stabilise the top-k token selection when the data are
imbalanced. [ours] How we read that, and what this file provides for it:
- features: tokens are L2-normalised and expressed in ETF coordinates, x -> normalize(x) @ E
  (ETFProjection below). Each output coordinate is the cosine between the token and one of K
  maximally separated directions, so no direction of feature space is favoured by the frame itself.
- slots: the L memory slots of KEM are fixed ETF vectors (the rows of simplex_etf(L, D).T), so the
  slots themselves are maximally and equally separated. The intent is that they select different
  tokens instead of all chasing the dominant ones; whether they do is a thing to measure (for
  instance, how much the slots' top-k sets overlap), not to assume.
In the neural-collapse literature the frame is fixed, not learned; so here it is a buffer.

Notes:
- The projection is onto K-1 dimensions (rank of E), so normalize(x) @ E discards the token's
  norm and one direction of its d components. Whether the paper keeps the norm is not stated.
- Letters: K frame vectors, d their dimension.
"""
import math

import torch
import torch.nn as nn


def l2_normalize(x, dim=-1, eps=1e-12):
    """x divided by its L2 norm along `dim` (norms below eps count as eps): the one normalisation of the
    project, used by ETFProjection, by kem_mtl's `normalize` control and by train.py's normals loss.
    Written as x / sqrt(sum x^2) rather than torch's normalize, whose norm over dim 1 of an image batch
    was about 90x slower on a CPU (measured when the normals loss was written)."""
    return x / x.square().sum(dim, keepdim=True).sqrt().clamp_min(eps)


def check_frame_size(num_vectors, dim):
    """Raise ValueError unless a simplex ETF of `num_vectors` vectors fits in R^`dim` (K >= 2, d >= K-1)."""
    K, d = num_vectors, dim
    if K < 2:
        raise ValueError(f"num_vectors must be >= 2 (a frame of one vector has no angles), got {K}")
    if d < K - 1:
        raise ValueError(
            f"a simplex of num_vectors={K} vectors needs dim >= {K - 1}, got dim={d}; "
            f"use dim >= {K - 1} or num_vectors <= {d + 1}")


def simplex_etf(num_vectors, dim, *, generator=None, dtype=torch.float32):
    """K = `num_vectors` unit vectors in R^`dim` with every pairwise cosine exactly -1/(K-1).

    Returns a tensor of shape (dim, num_vectors), one frame vector per column; the columns sum to
    zero and the Gram matrix is K/(K-1) * (I - 11^T/K). Any dim >= num_vectors - 1 works. The
    random rotation comes from `generator` (the global RNG when None): same seed, same frame.
    Computed in float64 and cast to `dtype` at the end.
    """
    K, d = num_vectors, dim
    check_frame_size(K, d)
    P = torch.eye(K, dtype=torch.float64) - 1.0 / K                     # (K, K) centring projector
    V, _ = torch.linalg.qr(P[:, : K - 1])                               # (K, K-1) basis of 1-perp
    gaussian = torch.randn(d, K - 1, generator=generator, dtype=torch.float64)
    W, R = torch.linalg.qr(gaussian)                                    # (d, K-1) orthonormal columns
    W = W * torch.sign(torch.diagonal(R))       # fix QR's sign ambiguity: W is uniformly random
    E = math.sqrt(K / (K - 1)) * W @ V.T                                # (d, K)
    return E.to(dtype)


class ETFProjection(nn.Module):
    """Express tokens in simplex-ETF coordinates: x -> normalize(x) @ E.

    (..., dim) -> (..., num_vectors), default num_vectors = dim. The frame E (dim, num_vectors) is a
    registered buffer: it is saved in the state_dict, moves with .to(), and is never trained. It is
    drawn from a generator seeded with `seed`, so two modules built alike hold the same frame.
    device, dtype: where and in which float type E is made, as for torch.nn layers (the frame is
    always computed on the CPU in float64, then moved and cast).
    """

    def __init__(self, dim, num_vectors=None, *, seed=0, device=None, dtype=None):
        super().__init__()
        num_vectors = dim if num_vectors is None else num_vectors
        generator = torch.Generator().manual_seed(seed)
        E = simplex_etf(num_vectors, dim, generator=generator,
                        dtype=dtype if dtype is not None else torch.get_default_dtype())
        self.register_buffer("E", E.to(device))                        # (d, K)

    def forward(self, x):
        # Normalising first makes every output coordinate a cosine: <x/|x|, e_k> in [-1, 1].
        return l2_normalize(x) @ self.E.to(x.dtype)                       # (..., K)

    def extra_repr(self):
        d, K = self.E.shape
        return f"dim={d}, num_vectors={K}"
