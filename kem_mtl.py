"""KEM: the Knowledge Extraction Module, its ETF variant sKEM, the cross-attention baseline, and
the multi-task network around them.

Implements *SGW-based Multi-Task Learning in Vision Tasks* (Zhang et al., ACCV 2024,
arXiv:2410.03778). Imports only torch; etf.py (the simplex ETF) only for ETF slots or ETF features,
torchvision only when a torchvision backbone is asked for.

Using it in your own code: copy kem_mtl.py (and etf.py beside it if you want ETF slots or
features) into your project, as top-level modules (`from kem_mtl import KEM`) or inside a package
of yours (`from .kem_mtl import KEM`). KEM and CrossTaskAttention take tokens (B, N, D) and return
tokens (B, N, D); a (B, D, h, w) map becomes tokens with x.flatten(2).transpose(1, 2) and comes back
with x.transpose(1, 2).reshape(B, D, h, w). MultiTaskNet.forward shows the whole round trip: a
per-task embedding added to each task's tokens (KEM is permutation-equivariant, so without it the
tasks cannot be told apart), all tasks concatenated, one KEM, the result split back per task.

The argument
------------
[paper] Multi-task methods that exchange information by cross-attention (every task's tokens
attend to every other task's tokens) let noise through: softmax never gives an exact zero, so
every irrelevant token leaks a little into every output, and the leak grows with the number of
tokens (resolution x tasks). The fix is an information bottleneck: a few memory slots that each
*select* only their top-k tokens, then broadcast what they took back to every token. It also makes
the cost linear in the number of tokens instead of quadratic.
[ours] A bound that makes the leak concrete (our reconstruction of the argument): for a query with
scores <= s_max on |S| relevant tokens and >= s_min on |N| irrelevant ones, softmax puts at least
|N| e^s_min / (|S| e^s_max + |N| e^s_min) of its mass on the irrelevant ones, which tends to 1 as
|N| grows. A top-k mask puts exactly 0 there whenever the k best scores are the relevant ones.

KEM, the paper's equations (F: N tokens of width D; R: L memory slots, L << N; six D x D matrices)
--------------------------------------------------------------------------------------------------
    Retrieve:   R^ = topk-softmax( (R W_qr)(F W_kr)^T / sqrt(D) ) (F W_vr)      (L, D)   eq. R
    Write:      F^ = softmax( (F W_qw)(R^ W_kw)^T / sqrt(D) ) (R^ W_vw)         (N, D)   eq. W
    Broadcast:  F <- F + w_r F^,   w_r = 1                                               eq. B
Cost [paper]: O(4 L N D + 3 N D^2) + O(L N), linear in N; cross-attention is O(N^2 D).
[ours] Reassociating the products (KEM.forward) removes the 3 N D^2 term: no D x D projection
touches the N tokens, only the L slots, so KEM costs O(4 L N D + 6 L D^2) plus the top-k.
KEM.forward_literal is the same function written exactly as the three equations above; the two sit
side by side in the class and agree to float rounding (to 1e-12 in float64).
In code the six matrices are D x D parameters named as in the paper and oriented as in the paper
(tokens are rows: the paper's F W is `F @ W`), and F is the token matrix, which is why
torch.nn.functional is imported as `nnf` (in every module of the project).

Reading order: topk_softmax and resolve_topk, KEM, CrossTaskAttention, their shared helpers, the
token maps, the backbones, MultiTaskNet; what exists only for torch.export and torch.jit.trace sits
in one marked section at the end.

What the paper leaves open and how we read it [ours]
----------------------------------------------------
- topk-softmax: default "mask" (scores outside a row's top-k set to -inf, then softmax: each slot's
  weights sum to 1 over exactly k tokens); "post" (softmax, then zero all but the top-k, no
  renormalisation, as in Goyal et al.'s Shared Global Workspace, ICLR 2022, which is what we take
  "SGW" to stand for). k >= N reduces exactly to plain softmax.
- k and L are not given: k is a count or a fraction of N (default 0.25 N); L defaults to 16.
- How tasks meet: the tokens of all T tasks are concatenated (N = T h w), each with a learned
  per-task embedding, one shared KEM runs over them, and the result is split back per task.
- R is a learned (L, D) parameter shared over the batch; "re-parameterisation" in Retrieve is read
  as the learned projections (no sampling, no KL term).
- sKEM: "features" = tokens projected into ETF space before KEM; "slots" = R fixed to a simplex
  ETF; "both" (the frame itself is in etf.py); "normalize" = tokens L2-normalised only, the control
  that separates the frame from the normalisation it includes.
- The network: shared backbone -> one small encoder per task -> tokens -> exchange -> one
  decoder per task, with a skip connection from the backbone's stride-4 features [ours].

Letters used in shapes: B batch, T tasks, N tokens (all tasks), L slots, D width, top_k selected tokens,
H x W image, h x w token grid, C channels.

Notes:
- No positional embedding is added: KEM and cross-attention are permutation-equivariant, position
  reaches the tokens only through the convolutional features. Broadcast writes back in place, so the
  decoders still see a spatial map.
- New layers use GroupNorm, not BatchNorm, so a batch of 2 (the field's protocol) and several
  processes under DDP behave like one large batch.
- Half precision: KEM.forward applies 1/sqrt(D) to the L x D slot tensors before they meet the N
  tokens, so in fp16 the scores overflow only if the scaled scores themselves would.
- Deployment: KEM works under torch.compile (also dynamic=True), torch.export with a dynamic
  token count and torch.jit.trace; k is computed so that the tracers record it as a formula in N.
"""
import math
import numbers
import operator
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as nnf   # `F` is the paper's token matrix below

EXCHANGES = ("kem", "cross", "none")
ETF_MODES = ("none", "features", "slots", "both", "normalize")
BACKBONES = ("tiny", "swin_t", "swin_s", "swin_b", "resnet18", "resnet50")


def _etf():
    """etf.py, imported when first needed. The simplex ETF is needed only for ETF slots
    (KEM(slots="etf")) or ETF features (MultiTaskNet(etf="features" or "both")): kem_mtl.py alone
    does everything else. etf.py is looked for beside this file in its package first (from . import
    etf), then as a top-level module (import etf), so both files work as a package's modules and as
    top-level ones."""
    try:
        from . import etf                        # kem_mtl.py in a package, etf.py beside it
    except ImportError:
        try:
            import etf                           # kem_mtl.py as a top-level module
        except ImportError as error:
            raise ImportError("ETF slots, ETF features and their normalize control need etf.py next to kem_mtl.py; "
                              "copy it there, or use slots='learned' / etf='none'") from error
    return etf


# ----------------------------------------------------------------------------------------------
# top-k softmax: the selection that makes KEM a bottleneck

def topk_softmax(scores, k, dim=-1, mode="mask"):
    """Softmax that gives non-zero weight to at most the k largest scores along `dim`.

    mode="mask": scores outside the top-k are set to -inf, then softmax; the kept weights sum to 1.
    mode="post": softmax over everything, then all but the top-k weights set to 0 (they sum to < 1).
    k >= scores.size(dim) returns plain softmax, exactly. Ties are broken by torch.topk, so exactly
    k entries survive even when scores tie (in bfloat16 they often do). Gradients: "mask" passes none
    to the dropped scores; "post" does, through softmax's denominator. k may also be a symbolic size
    (torch.export with dynamic shapes) or a traced 0-d tensor (torch.jit.trace), as resolve_topk
    gives it; it must then lie in [1, N] (see the export section at the end of this file).
    """
    if mode not in ("mask", "post"):
        raise ValueError(f"mode must be 'mask' or 'post', got {mode!r}")
    if _is_symbolic(k):
        keep = _top_k_by_rank(scores, k, dim)                             # torch.export / jit.trace
    else:
        count = k if isinstance(k, int) and not isinstance(k, bool) else _integer(k)   # torch.compile's k is an int
        if count is None or count < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if count >= scores.size(dim):
            return scores.softmax(dim)
        index = scores.topk(count, dim=dim, sorted=False).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(dim, index, True)   # out of place: jit.trace-able
    if mode == "mask":
        # -inf is exact in every float format, so the masked weights are exactly 0, also in fp16.
        return scores.masked_fill(~keep, float("-inf")).softmax(dim)
    return scores.softmax(dim) * keep


def resolve_topk(topk, num_tokens):
    """k, the number of tokens each slot keeps, for N = num_tokens tokens.

    topk is a count, an integer of any type (Python, NumPy, a 0-d integer tensor), used as is and
    capped at N; or a fraction of N, a float in (0, 1], rounded up and at least 1. So topk=1 keeps
    one token and topk=1.0 keeps all of them. num_tokens may be a symbolic size (torch.export,
    torch.compile with dynamic shapes): sym_min / sym_max then record k as a formula in N instead
    of fixing it for the N being traced; with Python ints they are min and max. Under
    torch.jit.trace N is a traced 0-d tensor and k comes back as one, computed by the same formula.
    """
    value = _as_topk(topk)
    is_count = isinstance(value, int) and not isinstance(value, bool)
    if not (is_count and value >= 1 or isinstance(value, float) and 0.0 < value <= 1.0):
        raise ValueError(f"topk must be a count >= 1 or a fraction in (0, 1], got {topk!r}; try 0.25 or 64")
    if torch.jit.is_tracing() and isinstance(num_tokens, torch.Tensor):
        return _traced_top_k(value, is_count, num_tokens)                # torch.jit.trace
    k = value if is_count else torch.sym_max(1, math.ceil(value * num_tokens))
    return torch.sym_min(k, num_tokens)


# ----------------------------------------------------------------------------------------------
# The exchange modules: KEM (the paper's) and full cross-attention (the baseline it criticises)

class KEM(nn.Module):
    """Knowledge Extraction Module: Retrieve (top-k), Write, Broadcast. (B, N, D) -> (B, N, D).

    dim: token width D. num_slots: L. topk: k, how many tokens each slot keeps: a count (an integer
    of any type, capped at N) or a fraction of N (a float in (0, 1], rounded up); topk=1 is one
    token, topk=1.0 is all of them. slots: "learned" (R is a parameter) or "etf" (R is a fixed
    simplex ETF, the sKEM "slots" reading; needs dim >= num_slots - 1 and etf.py). topk_mode:
    "mask" or "post", see topk_softmax. device, dtype: where and in which float type the weights are
    made, as for torch.nn layers.

    The six projections are D x D matrices named and oriented as in the paper (tokens are rows, so
    the paper's F W is `F @ W`). Two forward passes compute the same function:
    - `forward_literal` is the paper's three equations exactly as written: read it next to the paper;
    - `forward` reassociates the products so that no D x D matrix multiplies the N tokens [ours]:
          (R W_qr)(F W_kr)^T = ((R W_qr) W_kr^T) F^T          A_r (F W_vr) = (A_r F) W_vr
          (F W_qw)(R^ W_kw)^T = F ((R^ W_kw) W_qw^T)^T
      which turns the paper's 3 N D^2 term into 6 L D^2, and applies 1/sqrt(D) to those L x D
      tensors before they meet the tokens (in fp16 the unscaled N-long scores overflow first). The
      two agree up to float rounding; `forward` is the one the network uses.

    Notes:
    - k = 1 (topk=1, or a fraction of a small N) stops the selection from learning: a softmax over
      one token is the constant 1, so R, W_qr and W_kr receive no gradient. KEM warns once when k
      resolves to 1.
    - The settings that define the function (dim, num_slots, topk, topk_mode, slots) are saved in
      the state_dict (its `_extra_state` entry, a dict) and load_state_dict refuses weights saved
      with other settings, naming both. State_dicts without the entry (saved before it existed, or
      with it filtered out, e.g. for a tensors-only format such as safetensors) load unchecked.
    - torch.export with a dynamic token count, torch.compile(dynamic=True) and torch.jit.trace all
      record k as a formula in N (resolve_topk), so the traced module is right at every N. Under
      torch.export and jit.trace the top-k set is taken by rank (topk_softmax), which can break exact
      ties differently from eager mode.
    """

    def __init__(self, dim, num_slots=16, topk=0.25, *, slots="learned", topk_mode="mask", device=None,
                 dtype=None):
        super().__init__()
        KEM.check_options(dim, num_slots, topk, slots=slots, topk_mode=topk_mode)
        self.dim, self.num_slots, self.topk, self.topk_mode, self.slots = dim, num_slots, _as_topk(topk), topk_mode, slots
        factory = {"device": device, "dtype": dtype}
        self.W_qr, self.W_kr, self.W_vr = (_projection(dim, **factory) for _ in range(3))   # Retrieve
        self.W_qw, self.W_kw, self.W_vw = (_projection(dim, **factory) for _ in range(3))   # Write
        if slots == "learned":
            self.R = nn.Parameter(torch.randn(num_slots, dim, **factory) / math.sqrt(dim))   # (L, D), rows ~unit norm
        else:
            generator = torch.Generator().manual_seed(0)
            frame = _etf().simplex_etf(num_slots, dim, generator=generator,
                                       dtype=dtype if dtype is not None else torch.get_default_dtype())
            self.register_buffer("R", frame.T.to(device))                  # (L, D) unit rows, fixed
        self._warned_k1 = False
        self.register_load_state_dict_pre_hook(KEM._check_saved_settings)

    @staticmethod
    def check_options(dim, num_slots, topk, *, slots="learned", topk_mode="mask"):
        """Raise ValueError (naming the argument, the value, what works) for options KEM cannot take."""
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots!r}; try 16")
        if slots not in ("learned", "etf"):
            raise ValueError(f"slots must be 'learned' or 'etf', got {slots!r}")
        if topk_mode not in ("mask", "post"):
            raise ValueError(f"topk_mode must be 'mask' or 'post', got {topk_mode!r}")
        resolve_topk(topk, 1)                         # the rule for k lives there; resolved per input (N varies)
        if slots == "etf":
            try:
                _etf().check_frame_size(num_slots, dim)   # the ETF's own rule lives with the ETF
            except ValueError as error:                   # in KEM's words: the frame's vectors are its slots
                raise ValueError(f"slots='etf' with num_slots={num_slots}: "
                                 + str(error).replace("num_vectors", "num_slots")) from None

    def _top_k(self, N):
        """k for N tokens, with the one-time warning when it is 1 (Python ints only: a symbolic k
        under tracing is left alone, so no branch on N enters the graph)."""
        top_k = resolve_topk(self.topk, N)
        if isinstance(top_k, int) and top_k == 1 and not self._warned_k1:
            self._warned_k1 = True
            warnings.warn(f"KEM keeps k = 1 token per slot here (topk={self.topk!r}, N={N} tokens): a softmax over "
                          f"one token is constant, so the slot queries (R, W_qr, W_kr) receive no gradient and the "
                          f"selection does not learn. Keep k >= 2: a larger count or fraction, or more tokens "
                          f"(warned once per module)")
        return top_k

    def forward(self, F, return_attention=False):
        """The fast form (reassociated, see the class docstring). F: (B, N, D) tokens of all tasks.

        Returns the updated tokens (B, N, D); with return_attention=True, (tokens, {"retrieve": A_r
        (B, L, N), each slot's weights over the tokens, k non-zeros a row in "mask" mode; "write": A_w
        (B, N, L), each token's weights over the slots, rows summing to 1}).
        """
        _check_tokens(self, F)
        B, N, D = F.shape
        top_k = self._top_k(N)
        scale = 1.0 / math.sqrt(self.dim)                                # = 1/sqrt(D), also when D is traced
        R, W_qr, W_kr, W_vr, W_qw, W_kw, W_vw = (self.R, self.W_qr, self.W_kr, self.W_vr,
                                                 self.W_qw, self.W_kw, self.W_vw)
        # Retrieve (eq. R): each slot scores every token and keeps its top_k best.
        Q_r = (R @ W_qr) @ W_kr.T * scale                                # (L, D): slot queries in token space, scaled
        A_r = topk_softmax(Q_r @ F.transpose(1, 2), top_k, mode=self.topk_mode)   # (B, L, N), top_k non-zeros a row
        R_hat = (A_r @ F) @ W_vr                                         # (B, L, D) = A_r (F W_vr)
        # Write (eq. W): every token reads from the L filled slots, plain softmax over L.
        K_w = (R_hat @ W_kw) @ W_qw.T * scale                            # (B, L, D): slot keys in token space, scaled
        A_w = (F @ K_w.transpose(1, 2)).softmax(dim=-1)                  # (B, N, L)
        F_hat = A_w @ (R_hat @ W_vw)                                     # (B, N, D)
        out = F + F_hat                                                  # Broadcast (eq. B), w_r = 1
        if return_attention:
            return out, {"retrieve": A_r, "write": A_w}
        return out

    def forward_literal(self, F):
        """The paper's equations exactly as written (slow: every D x D matrix meets all N tokens).
        F: (B, N, D) -> (B, N, D)."""
        _check_tokens(self, F)
        N, D = F.shape[-2:]
        top_k = self._top_k(N)
        R = self.R
        R_hat = topk_softmax((R @ self.W_qr) @ (F @ self.W_kr).transpose(-2, -1) / math.sqrt(D),
                             top_k, mode=self.topk_mode) @ (F @ self.W_vr)                       # eq. R
        F_hat = ((F @ self.W_qw) @ (R_hat @ self.W_kw).transpose(-2, -1) / math.sqrt(D)).softmax(-1) \
            @ (R_hat @ self.W_vw)                                                                 # eq. W
        return F + F_hat                                                                          # eq. B

    # --- the settings travel with the weights ---

    def get_extra_state(self):
        return {"dim": self.dim, "num_slots": self.num_slots, "topk": self.topk, "topk_mode": self.topk_mode,
                "slots": self.slots}

    def set_extra_state(self, state):
        """Nothing to set: the settings are fixed when the module is built; loading only compares them
        (in _check_saved_settings, which runs first)."""

    def _check_saved_settings(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """load_state_dict's pre-hook: weights saved with other settings are refused, naming both values.
        A state_dict without settings (saved before they were saved) is taken as it is."""
        key = prefix + "_extra_state"
        saved, own = state_dict.get(key), self.get_extra_state()
        if saved is None:
            state_dict[key] = own                 # load_state_dict works on its own copy of the dict
            return
        # 1 and 1.0 are different settings (one token, all tokens), so the types are compared too.
        differ = [name for name in own if (type(saved.get(name)), saved.get(name)) != (type(own[name]), own[name])]
        if differ:
            error_msgs.append(f"the weights for {prefix or 'KEM'} were saved with other settings: "
                              + ", ".join(f"saved {n}={saved.get(n)!r}, this module has {n}={own[n]!r}" for n in differ)
                              + ". Build the module with the saved settings to load them")

    def extra_repr(self):
        return (f"dim={self.dim}, num_slots={self.num_slots}, topk={self.topk}, slots={self.slots}, "
                f"topk_mode={self.topk_mode}")


class CrossTaskAttention(nn.Module):
    """The baseline: every token attends to every token of every task. (B, N, D) -> (B, N, D).

    out = F + softmax((F W_q)(F W_k)^T / sqrt(D)) (F W_v), one head, same residual as KEM and the
    same D x D matrices. Uses torch's scaled_dot_product_attention, which picks a memory-efficient
    kernel where it has one; the cost is still O(N^2 D). device, dtype: as for torch.nn layers.
    """

    def __init__(self, dim, *, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.W_q, self.W_k, self.W_v = (_projection(dim, device=device, dtype=dtype) for _ in range(3))

    def forward(self, F, return_attention=False):
        """F: (B, N, D) tokens of all tasks. Returns the updated tokens (B, N, D); with
        return_attention=True, (tokens, {"attention": A (B, N, N), each token's weights over all
        tokens, rows summing to 1, no entry exactly 0}).
        """
        _check_tokens(self, F)
        Q, K, V = F @ self.W_q, F @ self.W_k, F @ self.W_v               # (B, N, D) each
        out = F + nnf.scaled_dot_product_attention(Q, K, V)             # (B, N, D)
        if return_attention:  # spelled out, because the fused kernel does not return the weights
            A = ((Q / math.sqrt(self.dim)) @ K.transpose(1, 2)).softmax(dim=-1)   # (B, N, N), scaled before the N x N product
            return out, {"attention": A}
        return out


# ----------------------------------------------------------------------------------------------
# What the exchange modules share: number types for k, the D x D projections, the shape check

def _integer(value):
    """value as a Python int if it is an integer of any kind (int, a NumPy integer, a 0-d integer
    tensor; not a bool), else None."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None



def _as_topk(topk):
    """topk as a Python int (a count) or float (a fraction), whatever number type it came as; a
    value of no number type comes back as it is, for resolve_topk to refuse."""
    count = _integer(topk)
    if count is not None:
        return count
    if isinstance(topk, numbers.Real) and not isinstance(topk, bool) or \
            isinstance(topk, torch.Tensor) and topk.dim() == 0 and topk.is_floating_point():
        return float(topk)
    return topk


def _projection(dim, device=None, dtype=None):
    """A D x D matrix W in the paper's orientation (a token row x maps to x W), initialised like
    nn.Linear: U(-1/sqrt(D), 1/sqrt(D))."""
    W = torch.empty(dim, dim, device=device, dtype=dtype)
    nn.init.uniform_(W, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
    return nn.Parameter(W)


def _check_tokens(module, F):
    """ValueError unless F is (B, N, D) with the module's D, saying what came and how to get there."""
    D = module.dim
    if F.dim() == 3 and (torch.jit.is_tracing() or F.shape[-1] == D):   # traced sizes are tensors: not checked
        return
    name, shape = type(module).__name__, tuple(F.shape)
    if F.dim() == 3:
        hint = (f"the tokens are {shape[-1]} wide: project them to {D} (e.g. nn.Linear({shape[-1]}, {D})) "
                f"or build {name}(dim={shape[-1]})")
    elif F.dim() == 4:
        hint = ("a (B, C, h, w) map becomes tokens with x.flatten(2).transpose(1, 2), "
                "a channels-last (B, h, w, C) map with x.flatten(1, 2)")
    elif F.dim() == 2:
        hint = "tokens of one sample need a batch dimension: F.unsqueeze(0)"
    else:
        hint = "tokens are a batch of sequences of D-wide vectors"
    raise ValueError(f"{name} expects tokens of shape (B, N, D) with D = dim = {D}, got a tensor of shape {shape}; {hint}")


# ----------------------------------------------------------------------------------------------
# Token maps applied before the exchange (MultiTaskNet's etf option)

class Normalize(nn.Module):
    """Tokens L2-normalised, nothing else: the control for etf.ETFProjection, which applies this same
    function and then the frame, so that an effect of sKEM's "features" can be told apart from the
    normalisation it includes [ours]. Needs etf.py, like the mode it controls."""

    def __init__(self):
        super().__init__()
        self.l2_normalize = _etf().l2_normalize

    def forward(self, x):
        return self.l2_normalize(x)                                     # (B, N, D), each token of unit length


# ----------------------------------------------------------------------------------------------
# Backbones: each returns (skip features at stride 4, deep features at `deep_stride`)

def _norm_groups(channels):
    """The GroupNorm groups of the layers _conv_gn builds: 8, or one per channel below 8 channels."""
    return min(8, channels)


def _conv_gn(c_in, c_out, stride=1, kernel=3, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.GroupNorm(_norm_groups(c_out), c_out), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """A small conv net trained from scratch, fast on a CPU: skip at stride 4, deep at stride 8."""
    skip_channels, deep_channels, deep_stride, pad_multiple = 48, 128, 8, 8

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv_gn(3, 32, 2), _conv_gn(32, 48, 2), _conv_gn(48, 48))  # /4
        self.deep = nn.Sequential(_conv_gn(48, 96, 2), _conv_gn(96, 96),
                                  nn.Conv2d(96, 128, 3, 1, 2, dilation=2, bias=False),     # wider view
                                  nn.GroupNorm(8, 128), nn.ReLU(inplace=True))             # /8

    def forward(self, x):
        skip = self.stem(x)                                             # (B, 48, H/4, W/4)
        return skip, self.deep(skip)                                    # (B, 128, H/8, W/8)


class TorchvisionBackbone(nn.Module):
    """Swin-T/S/B or ResNet-18/50 from torchvision: skip at stride 4, deep at stride 16.

    The deep feature is the stride-16 stage concatenated with the stride-32 stage upsampled (ours:
    the paper says only "Swin-Transformer backbone"). pretrained=True asks torchvision for its
    default ImageNet weights, which it reads from its cache (<torch hub dir>/checkpoints) or
    downloads there first. Pretrained ResNets keep their BatchNorm frozen.
    """
    deep_stride, pad_multiple = 16, 32

    def __init__(self, name, pretrained):
        super().__init__()
        torchvision = _torchvision(name)
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        kwargs = {}
        if name.startswith("resnet") and pretrained:
            kwargs["norm_layer"] = torchvision.ops.misc.FrozenBatchNorm2d
        model = getattr(torchvision.models, name)(weights=weights, **kwargs)
        self.is_swin = name.startswith("swin")
        if self.is_swin:
            f = model.features  # [embed /4, stage1, merge /8, stage2, merge /16, stage3, merge /32, stage4]
            self.stages = nn.ModuleList([f[:2], f[2:4], f[4:6], f[6:]])
            c = f[0][0].out_channels
            widths = [c, 2 * c, 4 * c, 8 * c]
        else:
            stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            self.stages = nn.ModuleList([nn.Sequential(stem, model.layer1), model.layer2, model.layer3, model.layer4])
            expansion = model.layer1[0].expansion
            widths = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.skip_channels, self.deep_channels = widths[0], widths[2] + widths[3]

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x.permute(0, 3, 1, 2) if self.is_swin else x)  # Swin works channels-last
        s4, _, s16, s32 = feats
        s32 = nnf.interpolate(s32, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        return s4, torch.cat([s16, s32], dim=1)                         # (B, C_skip, H/4, W/4), (B, C_deep, H/16, W/16)


def _torchvision(name):
    """torchvision, imported only when backbone `name` needs it, with a clear message when missing."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"backbone {name!r} needs torchvision (pip install torchvision); "
                          f"backbone='tiny' works without it") from error
    return torchvision


def build_backbone(name, pretrained=False):
    """The backbone `name` (one of BACKBONES); MultiTaskNet.check_options has checked the combination."""
    return TinyBackbone() if name == "tiny" else TorchvisionBackbone(name, pretrained)


# ----------------------------------------------------------------------------------------------
# The multi-task network

def _fits_norm_groups(dim):
    """Every GroupNorm MultiTaskNet builds for token width D splits its channels evenly."""
    return all(c % _norm_groups(c) == 0 for c in (dim, TaskDecoder.width(dim)))


class TaskDecoder(nn.Module):
    """Tokens of one task (as a map) + the shared skip features -> C_t channels at stride 4."""

    def __init__(self, dim, skip_dim, out_channels):
        super().__init__()
        width = TaskDecoder.width(dim)
        self.reduce = _conv_gn(dim, width, kernel=1)
        self.fuse = _conv_gn(width + skip_dim, width)
        self.head = nn.Conv2d(width, out_channels, 1)

    @staticmethod
    def width(dim):
        """The decoder's channels for tokens of width D."""
        return max(32, dim // 2)

    def forward(self, x, skip):
        x = nnf.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([x, skip], dim=1)))       # (B, C_t, H/4, W/4)


class MultiTaskNet(nn.Module):
    """Shared backbone -> per-task encoders -> tokens of all tasks -> exchange -> per-task decoders.

    tasks: task name -> output channels, e.g. {"semseg": 40, "depth": 1, "normals": 3, "edge": 1};
    a single task is the single-task baseline. exchange: "kem" | "cross" | "none". etf: "none" |
    "features" (tokens into ETF space before the exchange) | "slots" (KEM's slots are a fixed ETF) |
    "both" | "normalize" (tokens L2-normalised only: the control for "features"); "slots" and "both"
    need exchange="kem"; every mode but "none" needs etf.py. topk, num_slots, topk_mode: KEM's.
    freeze_backbone: the backbone is not trained (one reading of the paper's "fixed" encoder [ours];
    off by default). dim: the token width D; the GroupNorms need D < 8, a multiple of 8 below 64, or a
    multiple of 16 (check_options says which widths are nearest). check_options checks all of these
    without building anything, and num_tokens says how many tokens meet in the exchange for an image size.
    forward(images (B, 3, H, W)) -> {task: (B, C_t, H, W)} of raw outputs: logits for classes, edges
    and saliency, metres for depth, unnormalised normals.
    """

    def __init__(self, tasks, *, backbone="tiny", pretrained=False, exchange="kem", etf="none",
                 dim=128, num_slots=16, topk=0.25, topk_mode="mask", freeze_backbone=False):
        super().__init__()
        MultiTaskNet.check_options(tasks, backbone=backbone, pretrained=pretrained, exchange=exchange, etf=etf,
                                   dim=dim, num_slots=num_slots, topk=topk, topk_mode=topk_mode)
        self.tasks = dict(tasks)
        self.backbone = build_backbone(backbone, pretrained)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        # [ours] sized for CPUs: a 16-channel skip and depthwise 3x3 encoders made the default synthetic
        # run 23% faster per step than 32 channels and full 3x3 convolutions. In one run each (too few to
        # tell small differences apart) semseg's mIoU came out lower, depth about the same, the other
        # four tasks better.
        skip_dim = 16
        self.skip_proj = _conv_gn(self.backbone.skip_channels, skip_dim, kernel=1)
        self.encoders = nn.ModuleDict({t: nn.Sequential(_conv_gn(self.backbone.deep_channels, dim, kernel=1),
                                                        _conv_gn(dim, dim, groups=dim)) for t in tasks})
        self.task_embedding = nn.Parameter(torch.randn(len(tasks), dim) * 0.02)  # (T, D)
        if etf in ("features", "both"):
            self.token_map = _etf().ETFProjection(dim)                  # x -> normalize(x) E
        elif etf == "normalize":
            self.token_map = Normalize()                                # x -> normalize(x): the control
        else:
            self.token_map = nn.Identity()
        if exchange == "kem":
            self.exchange = KEM(dim, num_slots, topk, slots="etf" if etf in ("slots", "both") else "learned",
                                topk_mode=topk_mode)
        elif exchange == "cross":
            self.exchange = CrossTaskAttention(dim)
        else:
            self.exchange = nn.Identity()
        self.decoders = nn.ModuleDict({t: TaskDecoder(dim, skip_dim, c) for t, c in tasks.items()})

    @staticmethod
    def check_options(tasks, *, backbone="tiny", pretrained=False, exchange="kem", etf="none", dim=128,
                      num_slots=16, topk=0.25, topk_mode="mask", image_size=None):
        """Raise ValueError (naming the argument, the value, what works) for options MultiTaskNet
        cannot take, ImportError when a module they need is missing (torchvision, etf.py); it builds
        nothing and downloads nothing, so it can run before anything slow starts. image_size: (H, W)
        of the images it will see, if known: options that work but are almost certainly a mistake
        for it (more KEM slots than tokens) get a warning.

        The rules of the parts live with the parts (KEM.check_options, the ETF's check_frame_size); this
        adds the rules of the whole network. Messages name arguments as `name` or `name=value`.
        """
        if not tasks:
            raise ValueError("tasks must name at least one task, e.g. {'semseg': 40}")
        for name, channels in tasks.items():
            if not isinstance(channels, int) or channels < 1:
                raise ValueError(f"task {name!r} needs an integer number of output channels >= 1, got {channels!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if backbone == "tiny" and pretrained:
            raise ValueError("the tiny backbone has no pretrained weights (it is trained from scratch); use "
                             "pretrained=False, or a torchvision backbone such as backbone='swin_t'")
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {exchange!r}; choose one of {', '.join(EXCHANGES)}")
        if etf not in ETF_MODES:
            raise ValueError(f"unknown etf mode {etf!r}; choose one of {', '.join(ETF_MODES)}")
        if etf in ("slots", "both") and exchange != "kem":
            raise ValueError(f"etf={etf!r} fixes KEM's memory slots, so it needs exchange='kem' "
                             f"(got exchange={exchange!r}); use etf='features' or 'none' with it")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not _fits_norm_groups(dim):
            below = next(d for d in range(dim - 1, 0, -1) if _fits_norm_groups(d))
            above = next(d for d in range(dim + 1, dim + 17) if _fits_norm_groups(d))
            raise ValueError(f"dim={dim} does not fit the network's GroupNorm layers (each splits its C channels "
                             f"into min(8, C) groups: the tokens' D channels and the decoders' max(32, D/2)); "
                             f"try dim={below} or dim={above}")
        if backbone != "tiny":
            _torchvision(backbone)                          # ImportError saying what to install
        if etf in ("features", "both"):
            try:
                _etf().check_frame_size(dim, dim)           # ETFProjection: a frame of D vectors in R^D
            except ValueError as error:
                raise ValueError(f"etf={etf!r} maps the tokens onto a frame of dim vectors: "
                                 + str(error).replace("num_vectors", "dim")) from None
        elif etf != "none":
            _etf()
        if exchange == "kem":
            try:
                KEM.check_options(dim, num_slots, topk, slots="etf" if etf in ("slots", "both") else "learned",
                                  topk_mode=topk_mode)
            except ValueError as error:                     # KEM's slots='etf' is this network's etf option
                raise ValueError(str(error).replace("slots='etf'", f"etf={etf!r}")) from None
            N = None if image_size is None else MultiTaskNet.num_tokens(len(tasks), backbone, image_size)
            if N is not None and num_slots > N:
                warnings.warn(f"num_slots={num_slots} is more than the {N} tokens KEM sees in a "
                              f"{image_size[0]}x{image_size[1]} image with {len(tasks)} task(s): the slots are no "
                              f"longer a bottleneck (the paper's L << N); try 8-32")

    @staticmethod
    def num_tokens(num_tasks, backbone, size):
        """N, the tokens of all tasks that meet in the exchange for images of size (H, W) (see forward)."""
        parts = TinyBackbone if backbone == "tiny" else TorchvisionBackbone
        h, w = (-(-x // parts.pad_multiple) * parts.pad_multiple // parts.deep_stride for x in size)
        return num_tasks * h * w

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()          # a frozen backbone keeps its normalisation statistics too
        return self

    def forward(self, images):
        B, _, H, W = images.shape
        m = self.backbone.pad_multiple
        pad_h, pad_w = (-H) % m, (-W) % m                               # pad so every stride divides
        x = nnf.pad(images, (0, pad_w, 0, pad_h))                       # (B, 3, H', W')
        skip, deep = self.backbone(x)                                   # (B, C_s, H'/4, W'/4), (B, C_d, h, w)
        skip = self.skip_proj(skip)                                     # (B, 16, H'/4, W'/4)
        h, w = deep.shape[-2:]
        tokens = [self.encoders[t](deep).flatten(2).transpose(1, 2) + self.task_embedding[i]
                  for i, t in enumerate(self.tasks)]                    # T x (B, h*w, D)
        F = torch.cat(tokens, dim=1)                                    # (B, N = T*h*w, D): the paper's F
        F = self.exchange(self.token_map(F))                            # (B, N, D)
        outputs = {}
        for t, F_t in zip(self.tasks, F.split(h * w, dim=1)):           # split back per task
            x_t = F_t.transpose(1, 2).reshape(B, -1, h, w)              # (B, D, h, w)
            y = self.decoders[t](x_t, skip)                             # (B, C_t, H'/4, W'/4)
            y = nnf.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            outputs[t] = y[:, :, :H, :W]                                # (B, C_t, H, W)
        return outputs


# ----------------------------------------------------------------------------------------------
# Only for torch.export and torch.jit.trace: k as a formula in N
#
# Under torch.export (dynamic shapes) N, and so k, is a symbol; under torch.jit.trace both are 0-d
# tensors. torch.topk would make torch.export prove k <= N and k != 1 for every N, which it cannot,
# and would fix a traced k, so the top-k set is taken by rank instead: no shape depends on k. Ties
# are then broken by position (the earlier score wins), where torch.topk breaks them its own way.

def _is_symbolic(k):
    """k is a symbolic size (torch.export) or a traced tensor (torch.jit.trace)."""
    return isinstance(k, torch.SymInt) or torch.jit.is_tracing() and isinstance(k, torch.Tensor)


def _top_k_by_rank(scores, k, dim):
    """The boolean mask of each row's k largest scores, found by rank."""
    rank = scores.argsort(dim=dim, descending=True, stable=True).argsort(dim=dim)   # 0: the row's largest
    return rank < k


def _traced_top_k(value, is_count, num_tokens):
    """resolve_topk's formula with N a traced 0-d tensor."""
    k = num_tokens.clamp(max=value) if is_count else torch.ceil(num_tokens.double() * value).long().clamp(1)
    return k.clamp(max=num_tokens)
