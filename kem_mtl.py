"""KEM: the Knowledge Extraction Module, its ETF variant sKEM, the cross-attention baseline, and
the multi-task network around them.

Implements *SGW-based Multi-Task Learning in Vision Tasks* (Zhang et al., ACCV 2024,
arXiv:2410.03778). Imports torch and etf.py; torchvision only when a pretrained backbone is asked for.

The argument
------------
[PAPER] Multi-task methods that exchange information by cross-attention (every task's tokens
attend to every other task's tokens) let noise through: softmax never gives an exact zero, so
every irrelevant token leaks a little into every output, and the leak grows with the number of
tokens (resolution x tasks). The fix is an information bottleneck: a few memory slots that each
*select* only their top-k tokens, then broadcast what they took back to every token. It also makes
the cost linear in the number of tokens instead of quadratic.
[OURS] A bound that makes the leak concrete (our reconstruction of the argument): for a query with
scores <= s_max on |S| relevant tokens and >= s_min on |N| irrelevant ones, softmax puts at least
|N| e^s_min / (|S| e^s_max + |N| e^s_min) of its mass on the irrelevant ones, which tends to 1 as
|N| grows. A top-k mask puts exactly 0 there whenever the k best scores are the relevant ones.

KEM, the paper's equations (F: N tokens of width D; R: L memory slots, L << N; six D x D matrices)
--------------------------------------------------------------------------------------------------
    Retrieve:   R^ = topk-softmax( (R W_qr)(F W_kr)^T / sqrt(D) ) (F W_vr)      (L, D)   eq. R
    Write:      F^ = softmax( (F W_qw)(R^ W_kw)^T / sqrt(D) ) (R^ W_vw)         (N, D)   eq. W
    Broadcast:  F <- F + w_r F^,   w_r = 1                                               eq. B
Cost [PAPER]: O(4 L N D + 3 N D^2) + O(L N), linear in N; cross-attention is O(N^2 D).
[OURS] Reassociating the products (KEM.forward) removes the 3 N D^2 term: no D x D projection
touches the N tokens, only the L slots, so KEM costs O(4 L N D + 6 L D^2) plus the top-k.
KEM.forward_literal is the same function written exactly as the three equations above; the two sit
side by side in the class, and a test checks that they agree.
In code the six matrices are D x D parameters named as in the paper and oriented as in the paper
(tokens are rows: the paper's F W is `F @ W`), and F is the token matrix, which is why
torch.nn.functional is imported here as `nnf`.

What the paper leaves open and how we read it [OURS]
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
  ETF; "both" (see etf.py); "normalize" = tokens L2-normalised only, the control that separates
  the frame from the normalisation it includes.
- The network: shared backbone -> one small encoder per task -> tokens -> exchange -> one
  decoder per task, with a skip connection from the backbone's stride-4 features (ours).

Letters used in shapes: B batch, T tasks, N tokens (all tasks), L slots, D width, top_k selected tokens,
H x W image, h x w token grid, C channels.

Notes:
- No positional embedding is added: KEM and cross-attention are permutation-equivariant, position
  reaches the tokens only through the convolutional features. Broadcast writes back in place, so the
  decoders still see a spatial map.
- New layers use GroupNorm, not BatchNorm, so a batch of 2 (the field's protocol) and several
  processes under DDP behave like one large batch.
"""
import math
import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as nnf   # `F` is the paper's token matrix below

from etf import ETFProjection, check_frame_size, simplex_etf

EXCHANGES = ("kem", "cross", "none")
ETF_MODES = ("none", "features", "slots", "both", "normalize")
BACKBONES = ("tiny", "swin_t", "swin_s", "swin_b", "resnet18", "resnet50")


# ----------------------------------------------------------------------------------------------
# top-k softmax: the selection that makes KEM a bottleneck

def topk_softmax(scores, k, dim=-1, mode="mask"):
    """Softmax that gives non-zero weight to at most the k largest scores along `dim`.

    mode="mask": scores outside the top-k are set to -inf, then softmax; the kept weights sum to 1.
    mode="post": softmax over everything, then all but the top-k weights set to 0 (they sum to < 1).
    k >= scores.size(dim) returns plain softmax, exactly. Ties are broken by torch.topk, so exactly
    k entries survive even when scores tie (in bfloat16 they often do). Gradients: "mask" passes none
    to the dropped scores; "post" does, through softmax's denominator.
    """
    if mode not in ("mask", "post"):
        raise ValueError(f"mode must be 'mask' or 'post', got {mode!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k >= scores.size(dim):
        return scores.softmax(dim)
    index = scores.topk(k, dim=dim, sorted=False).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, index, True)
    if mode == "mask":
        # -inf is exact in every float format, so the masked weights are exactly 0, also in fp16.
        return scores.masked_fill(~keep, float("-inf")).softmax(dim)
    return scores.softmax(dim) * keep


def resolve_topk(topk, num_tokens):
    """k as a count: an int is used as is (capped at N); a float in (0, 1] is a fraction of N."""
    count = isinstance(topk, int) and not isinstance(topk, bool)
    if not (count and topk >= 1 or isinstance(topk, float) and 0.0 < topk <= 1.0):
        raise ValueError(f"topk must be a count >= 1 or a fraction in (0, 1], got {topk!r}; try 0.25 or 64")
    return min(topk, num_tokens) if count else max(1, math.ceil(topk * num_tokens))


# ----------------------------------------------------------------------------------------------
# The exchange modules: KEM (the paper's) and full cross-attention (the baseline it criticises)

def _projection(dim):
    """A D x D matrix W in the paper's orientation (a token row x maps to x W), initialised like
    nn.Linear: U(-1/sqrt(D), 1/sqrt(D))."""
    W = torch.empty(dim, dim)
    nn.init.uniform_(W, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
    return nn.Parameter(W)


class KEM(nn.Module):
    """Knowledge Extraction Module: Retrieve (top-k), Write, Broadcast. (B, N, D) -> (B, N, D).

    dim: token width D. num_slots: L. topk: k as a count (int) or a fraction of N (float in (0, 1]).
    slots: "learned" (R is a parameter) or "etf" (R is a fixed simplex ETF, the sKEM "slots" reading;
    needs dim >= num_slots - 1). topk_mode: "mask" or "post", see topk_softmax.

    The six projections are D x D matrices named and oriented as in the paper (tokens are rows, so
    the paper's F W is `F @ W`). Two forward passes compute the same function:
    - `forward_literal` is the paper's three equations exactly as written: read it next to the paper;
    - `forward` reassociates the products so that no D x D matrix multiplies the N tokens (ours):
          (R W_qr)(F W_kr)^T = ((R W_qr) W_kr^T) F^T          A_r (F W_vr) = (A_r F) W_vr
          (F W_qw)(R^ W_kw)^T = F ((R^ W_kw) W_qw^T)^T
      which turns the paper's 3 N D^2 term into 6 L D^2. The two agree up to float rounding (a test
      pins it down); `forward` is the one the network uses.
    """

    def __init__(self, dim, num_slots=16, topk=0.25, *, slots="learned", topk_mode="mask"):
        super().__init__()
        KEM.check_options(dim, num_slots, topk, slots=slots, topk_mode=topk_mode)
        self.dim, self.num_slots, self.topk, self.topk_mode = dim, num_slots, topk, topk_mode
        self.W_qr, self.W_kr, self.W_vr = _projection(dim), _projection(dim), _projection(dim)   # Retrieve
        self.W_qw, self.W_kw, self.W_vw = _projection(dim), _projection(dim), _projection(dim)   # Write
        if slots == "learned":
            self.R = nn.Parameter(torch.randn(num_slots, dim) / math.sqrt(dim))   # (L, D), rows ~unit norm
        else:
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("R", simplex_etf(num_slots, dim, generator=generator).T)  # (L, D) unit rows

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
                check_frame_size(num_slots, dim)      # the ETF's own rule lives in etf.py
            except ValueError as error:
                raise ValueError(f"slots='etf' with num_slots={num_slots}: {error}") from None

    def forward(self, F, return_attention=False):
        """The fast form (reassociated, see the class docstring). F: (B, N, D) tokens of all tasks."""
        B, N, D = F.shape
        top_k = resolve_topk(self.topk, N)
        scale = 1.0 / math.sqrt(D)
        R, W_qr, W_kr, W_vr, W_qw, W_kw, W_vw = (self.R, self.W_qr, self.W_kr, self.W_vr,
                                                 self.W_qw, self.W_kw, self.W_vw)
        # Retrieve (eq. R): each slot scores every token and keeps its top_k best.
        Q_r = (R @ W_qr) @ W_kr.T                                        # (L, D): slot queries, in token space
        A_r = topk_softmax(Q_r @ F.transpose(1, 2) * scale, top_k, mode=self.topk_mode)  # (B, L, N), top_k non-zeros a row
        R_hat = (A_r @ F) @ W_vr                                         # (B, L, D) = A_r (F W_vr)
        # Write (eq. W): every token reads from the L filled slots, plain softmax over L.
        K_w = (R_hat @ W_kw) @ W_qw.T                                    # (B, L, D): slot keys, in token space
        A_w = (F @ K_w.transpose(1, 2) * scale).softmax(dim=-1)          # (B, N, L)
        F_hat = A_w @ (R_hat @ W_vw)                                     # (B, N, D)
        out = F + F_hat                                                  # Broadcast (eq. B), w_r = 1
        if return_attention:
            return out, {"retrieve": A_r, "write": A_w}
        return out

    def forward_literal(self, F):
        """The paper's equations exactly as written (slow: every D x D matrix meets all N tokens)."""
        N, D = F.shape[-2:]
        top_k = resolve_topk(self.topk, N)
        R = self.R
        R_hat = topk_softmax((R @ self.W_qr) @ (F @ self.W_kr).transpose(-2, -1) / math.sqrt(D),
                             top_k, mode=self.topk_mode) @ (F @ self.W_vr)                       # eq. R
        F_hat = ((F @ self.W_qw) @ (R_hat @ self.W_kw).transpose(-2, -1) / math.sqrt(D)).softmax(-1) \
            @ (R_hat @ self.W_vw)                                                                 # eq. W
        return F + F_hat                                                                          # eq. B

    def extra_repr(self):
        slots = "etf" if "R" in dict(self.named_buffers()) else "learned"
        return f"dim={self.dim}, num_slots={self.num_slots}, topk={self.topk}, slots={slots}, topk_mode={self.topk_mode}"


class CrossTaskAttention(nn.Module):
    """The baseline: every token attends to every token of every task. (B, N, D) -> (B, N, D).

    out = F + softmax((F W_q)(F W_k)^T / sqrt(D)) (F W_v), one head, same residual as KEM and the
    same D x D matrices. Uses torch's scaled_dot_product_attention, which picks a memory-efficient
    kernel where it has one; the cost is still O(N^2 D).
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.W_q, self.W_k, self.W_v = _projection(dim), _projection(dim), _projection(dim)

    def forward(self, F, return_attention=False):
        Q, K, V = F @ self.W_q, F @ self.W_k, F @ self.W_v               # (B, N, D) each
        out = F + nnf.scaled_dot_product_attention(Q, K, V)             # (B, N, D)
        if return_attention:  # spelled out, because the fused kernel does not return the weights
            A = (Q @ K.transpose(1, 2) / math.sqrt(self.dim)).softmax(dim=-1)   # (B, N, N)
            return out, {"attention": A}
        return out


class Normalize(nn.Module):
    """Tokens L2-normalised, nothing else: the control for ETFProjection (same normalisation, no
    frame), so that an effect of sKEM's "features" can be told apart from normalisation [OURS]."""

    def forward(self, x):
        return x / x.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# Backbones: each returns (skip features at stride 4, deep features at `deep_stride`)

def _conv_gn(c_in, c_out, stride=1, kernel=3, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True))


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
    the paper says only "Swin-Transformer backbone"). Pretrained ResNets keep their BatchNorm frozen.
    """
    deep_stride, pad_multiple = 16, 32

    def __init__(self, name, pretrained):
        super().__init__()
        torchvision = _torchvision(name)
        weights = fetch_pretrained_weights(name) if pretrained else None
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


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights of a torchvision backbone are not on disk and could not be fetched."""


def fetch_pretrained_weights(name, download=True):
    """The torchvision weights enum of backbone `name`, with its file in torch's hub cache.

    A file already in <torch hub dir>/checkpoints/ is used as is; otherwise it is downloaded once
    (download=False: not even tried). Raises WeightsUnavailable saying where the file must go.
    """
    weights = _torchvision(name).models.get_model_weights(name).DEFAULT
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.isfile(os.path.join(folder, os.path.basename(weights.url))):
        return weights
    where = (f"They are downloaded once from {weights.url} into {folder}/. Offline, copy that file there "
             f"from a machine with network access, or train from scratch with pretrained=False "
             f"(train.py --no-pretrained)")
    if not download:
        raise WeightsUnavailable(f"the ImageNet weights of {name} are not on this machine and downloading "
                                 f"is switched off. {where}")
    try:
        weights.get_state_dict(progress=False)            # downloads into the cache (and checks the hash)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise WeightsUnavailable(f"could not load the ImageNet weights of {name} ({type(error).__name__}: "
                                 f"{error}). {where}") from None
    return weights


def build_backbone(name, pretrained=False):
    """The backbone `name` (one of BACKBONES); check_network_options has checked the combination."""
    return TinyBackbone() if name == "tiny" else TorchvisionBackbone(name, pretrained)


# ----------------------------------------------------------------------------------------------
# The multi-task network

class TaskDecoder(nn.Module):
    """Tokens of one task (as a map) + the shared skip features -> C_t channels at stride 4."""

    def __init__(self, dim, skip_dim, out_channels):
        super().__init__()
        width = max(32, dim // 2)
        self.reduce = _conv_gn(dim, width, kernel=1)
        self.fuse = _conv_gn(width + skip_dim, width)
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x, skip):
        x = nnf.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([x, skip], dim=1)))       # (B, C_t, H/4, W/4)


def check_network_options(tasks, *, backbone="tiny", pretrained=False, exchange="kem", etf="none",
                          dim=128, num_slots=16, topk=0.25, topk_mode="mask"):
    """Raise ValueError for options MultiTaskNet cannot take, before anything is built or downloaded.

    The rules of the parts live with the parts (KEM.check_options, etf.check_frame_size); this adds
    the rules of the whole network. Messages name arguments as `name` or `name=value`.
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
    if exchange == "kem":
        KEM.check_options(dim, num_slots, topk, slots="etf" if etf in ("slots", "both") else "learned",
                          topk_mode=topk_mode)


class MultiTaskNet(nn.Module):
    """Shared backbone -> per-task encoders -> tokens of all tasks -> exchange -> per-task decoders.

    tasks: task name -> output channels, e.g. {"semseg": 40, "depth": 1, "normals": 3, "edge": 1};
    a single task is the single-task baseline. exchange: "kem" | "cross" | "none". etf: "none" |
    "features" (tokens into ETF space before the exchange) | "slots" (KEM's slots are a fixed ETF) |
    "both" | "normalize" (tokens L2-normalised only: the control for "features"); "slots" and "both"
    need exchange="kem". topk, num_slots, topk_mode: KEM's. freeze_backbone: the backbone is not
    trained (one reading of the paper's "fixed" encoder [OURS]; off by default).
    forward(images (B, 3, H, W)) -> {task: (B, C_t, H, W)} of raw outputs: logits for classes, edges
    and saliency, metres for depth, unnormalised normals.
    """

    def __init__(self, tasks, *, backbone="tiny", pretrained=False, exchange="kem", etf="none",
                 dim=128, num_slots=16, topk=0.25, topk_mode="mask", freeze_backbone=False):
        super().__init__()
        check_network_options(tasks, backbone=backbone, pretrained=pretrained, exchange=exchange, etf=etf,
                              dim=dim, num_slots=num_slots, topk=topk, topk_mode=topk_mode)
        self.tasks = dict(tasks)
        self.backbone = build_backbone(backbone, pretrained)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        # [OURS] sized for CPUs: a 16-channel skip and depthwise 3x3 encoders made the default synthetic
        # run 23% faster per step than 32 channels and full 3x3 convolutions, with equal or better
        # final metrics on all six tasks in one run each (README, "Results: the default synthetic run").
        skip_dim = 16
        self.skip_proj = _conv_gn(self.backbone.skip_channels, skip_dim, kernel=1)
        self.encoders = nn.ModuleDict({t: nn.Sequential(_conv_gn(self.backbone.deep_channels, dim, kernel=1),
                                                        _conv_gn(dim, dim, groups=dim)) for t in tasks})
        self.task_embedding = nn.Parameter(torch.randn(len(tasks), dim) * 0.02)  # (T, D)
        if etf in ("features", "both"):
            self.token_map = ETFProjection(dim)                         # x -> normalize(x) E
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
