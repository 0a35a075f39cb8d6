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
[OURS] Reassociating the products (see KEM.forward) removes the 3 N D^2 term: no D x D projection
touches the N tokens, only the L slots, so KEM costs O(4 L N D + 6 L D^2) plus the top-k.

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
  ETF; "both" (see etf.py).
- The network: shared backbone -> one small encoder per task -> tokens -> exchange -> one
  decoder per task, with a skip connection from the backbone's stride-4 features (ours).

Letters used in shapes: B batch, T tasks, N tokens (all tasks), L slots, D width, k selected tokens,
H x W image, h x w token grid, C channels.

Notes:
- No positional embedding is added: KEM and cross-attention are permutation-equivariant, position
  reaches the tokens only through the convolutional features. Broadcast writes back in place, so the
  decoders still see a spatial map.
- New layers use GroupNorm, not BatchNorm, so a batch of 2 (the field's protocol) and several
  processes under DDP behave like one large batch.
"""
import math
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F

from etf import ETFProjection, simplex_etf

EXCHANGES = ("kem", "cross", "none")
ETF_MODES = ("none", "features", "slots", "both")
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
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise ValueError(f"topk must be an int >= 1 or a float in (0, 1], got {topk!r}")
    if isinstance(topk, int):
        if topk < 1:
            raise ValueError(f"topk must be >= 1 when given as a count, got {topk}")
        return min(topk, num_tokens)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk as a fraction of the tokens must be in (0, 1], got {topk}")
    return max(1, math.ceil(topk * num_tokens))


# ----------------------------------------------------------------------------------------------
# The exchange modules: KEM (the paper's) and full cross-attention (the baseline it criticises)

class KEM(nn.Module):
    """Knowledge Extraction Module: Retrieve (top-k), Write, Broadcast. (B, N, D) -> (B, N, D).

    dim: token width D. num_slots: L. topk: k as a count (int) or a fraction of N (float in (0, 1]).
    slots: "learned" (R is a parameter) or "etf" (R is a fixed simplex ETF, the sKEM "slots" reading;
    needs dim >= num_slots - 1). topk_mode: "mask" or "post", see topk_softmax.
    """

    def __init__(self, dim, num_slots=16, topk=0.25, *, slots="learned", topk_mode="mask"):
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if slots not in ("learned", "etf"):
            raise ValueError(f"slots must be 'learned' or 'etf', got {slots!r}")
        if topk_mode not in ("mask", "post"):
            raise ValueError(f"topk_mode must be 'mask' or 'post', got {topk_mode!r}")
        resolve_topk(topk, 1)  # validate now, resolve per input (N varies)
        if slots == "etf" and num_slots < 2:
            raise ValueError(f"slots='etf' needs num_slots >= 2 (an ETF has >= 2 vectors), got {num_slots}")
        self.dim, self.num_slots, self.topk, self.topk_mode = dim, num_slots, topk, topk_mode
        self.W_qr, self.W_kr, self.W_vr = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.W_qw, self.W_kw, self.W_vw = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        if slots == "learned":
            self.R = nn.Parameter(torch.randn(num_slots, dim) / math.sqrt(dim))   # (L, D), rows ~unit norm
        else:
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("R", simplex_etf(num_slots, dim, generator=generator).T)  # (L, D) unit rows

    def forward(self, F_, return_attention=False):
        B, N, D = F_.shape
        k = resolve_topk(self.topk, N)
        scale = 1.0 / math.sqrt(D)
        # nn.Linear computes x W^T, so the paper's "F W" is self.W(F) and its W is self.W.weight^T.
        # Both attentions are reassociated so that no D x D matrix ever multiplies the N tokens
        # (ours; the same function up to rounding, pinned by a test against the literal equations):
        #     (R W_qr)(F W_kr)^T = ((R W_qr) W_kr^T) F^T,     A (F W_vr) = (A F) W_vr,
        #     (F W_qw)(R^ W_kw)^T = F ((R^ W_kw) W_qw^T)^T.
        # That turns the paper's 3 N D^2 term into L D^2: what remains is linear in N with only
        # L D per token.
        # Retrieve (eq. R): each slot scores every token and keeps its k best.
        q_r = self.W_qr(self.R) @ self.W_kr.weight                      # (L, D): (R W_qr) W_kr^T
        scores = q_r @ F_.transpose(1, 2) * scale                       # (B, L, N)
        A_r = topk_softmax(scores, k, dim=-1, mode=self.topk_mode)      # (B, L, N), k non-zeros a row
        R_hat = self.W_vr(A_r @ F_)                                     # (B, L, D): (A F) W_vr
        # Write (eq. W): every token reads from the L filled slots, plain softmax over L.
        k_w = self.W_kw(R_hat) @ self.W_qw.weight                       # (B, L, D): (R^ W_kw) W_qw^T
        A_w = (F_ @ k_w.transpose(1, 2) * scale).softmax(dim=-1)        # (B, N, L)
        F_hat = A_w @ self.W_vw(R_hat)                                  # (B, N, D)
        out = F_ + F_hat                                                # Broadcast (eq. B), w_r = 1
        if return_attention:
            return out, {"retrieve": A_r, "write": A_w}
        return out

    def extra_repr(self):
        slots = "etf" if "R" in dict(self.named_buffers()) else "learned"
        return f"dim={self.dim}, num_slots={self.num_slots}, topk={self.topk}, slots={slots}, topk_mode={self.topk_mode}"


class CrossTaskAttention(nn.Module):
    """The baseline: every token attends to every token of every task. (B, N, D) -> (B, N, D).

    out = F + softmax((F W_q)(F W_k)^T / sqrt(D)) (F W_v), one head, same residual as KEM. Uses
    torch's scaled_dot_product_attention, which picks a memory-efficient kernel where it has one;
    the cost is still O(N^2 D).
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.W_q, self.W_k, self.W_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, F_, return_attention=False):
        q, k, v = self.W_q(F_), self.W_k(F_), self.W_v(F_)              # (B, N, D) each
        out = F_ + F.scaled_dot_product_attention(q, k, v)              # (B, N, D)
        if return_attention:  # spelled out, because the fused kernel does not return the weights
            A = (q @ k.transpose(1, 2) / math.sqrt(self.dim)).softmax(dim=-1)   # (B, N, N)
            return out, {"attention": A}
        return out


# ----------------------------------------------------------------------------------------------
# Backbones: each returns (skip features at stride 4, deep features at `deep_stride`)

def _conv_gn(c_in, c_out, stride=1, kernel=3):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """A small conv net trained from scratch, fast on a CPU: skip at stride 4, deep at stride 8."""
    skip_channels, deep_channels, deep_stride, pad_multiple = 48, 128, 8, 8

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv_gn(3, 32, 2), _conv_gn(32, 48, 2), _conv_gn(48, 48))  # /4
        self.deep = nn.Sequential(_conv_gn(48, 96, 2), _conv_gn(96, 96),
                                  nn.Conv2d(96, 128, 3, 1, 2, dilation=2, bias=False),     # wider view
                                  nn.GroupNorm(8, 128), nn.ReLU(inplace=True), _conv_gn(128, 128))  # /8

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
        try:
            import torchvision
        except ImportError as error:
            raise ImportError(f"backbone {name!r} needs torchvision (pip install torchvision); "
                              f"backbone='tiny' works without it") from error
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        kwargs = {}
        if name.startswith("resnet") and pretrained:
            kwargs["norm_layer"] = torchvision.ops.misc.FrozenBatchNorm2d
        try:
            model = getattr(torchvision.models, name)(weights=weights, **kwargs)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise RuntimeError(
                f"could not load the ImageNet weights of {name} ({type(error).__name__}: {error}). "
                f"They are downloaded once from {weights.url} into "
                f"{torch.hub.get_dir()}/checkpoints/. Offline, copy that file there from a machine "
                f"with network access, or train from scratch with pretrained=False "
                f"(train.py --no-pretrained)") from error
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
        s32 = F.interpolate(s32, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        return s4, torch.cat([s16, s32], dim=1)                         # (B, C_skip, H/4, W/4), (B, C_deep, H/16, W/16)


def build_backbone(name, pretrained=False):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "tiny":
        if pretrained:
            raise ValueError("backbone 'tiny' is trained from scratch and has no pretrained weights; "
                             "use pretrained=False or a torchvision backbone such as 'swin_t'")
        return TinyBackbone()
    return TorchvisionBackbone(name, pretrained)


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
        x = F.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([x, skip], dim=1)))       # (B, C_t, H/4, W/4)


class MultiTaskNet(nn.Module):
    """Shared backbone -> per-task encoders -> tokens of all tasks -> exchange -> per-task decoders.

    tasks: task name -> output channels, e.g. {"semseg": 40, "depth": 1, "normals": 3, "edge": 1};
    a single task is the single-task baseline. exchange: "kem" | "cross" | "none". etf: "none" |
    "features" (tokens into ETF space before the exchange) | "slots" (KEM's slots are a fixed ETF) |
    "both"; "slots" and "both" need exchange="kem". forward(images (B, 3, H, W)) -> {task: (B, C_t, H, W)}
    of raw outputs: logits for classes, edges and saliency, metres for depth, unnormalised normals.
    """

    def __init__(self, tasks, *, backbone="tiny", pretrained=False, exchange="kem", etf="none",
                 dim=128, num_slots=16, topk=0.25):
        super().__init__()
        if not tasks:
            raise ValueError("tasks must name at least one task, e.g. {'semseg': 40}")
        for name, channels in tasks.items():
            if not isinstance(channels, int) or channels < 1:
                raise ValueError(f"task {name!r} needs an integer number of output channels >= 1, got {channels!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {exchange!r}; choose one of {', '.join(EXCHANGES)}")
        if etf not in ETF_MODES:
            raise ValueError(f"unknown etf mode {etf!r}; choose one of {', '.join(ETF_MODES)}")
        if etf in ("slots", "both") and exchange != "kem":
            raise ValueError(f"etf={etf!r} fixes KEM's memory slots, so it needs exchange='kem' "
                             f"(got exchange={exchange!r}); use etf='features' or 'none' with it")
        self.tasks = dict(tasks)
        self.backbone = build_backbone(backbone, pretrained)
        skip_dim = 32
        self.skip_proj = _conv_gn(self.backbone.skip_channels, skip_dim, kernel=1)
        self.encoders = nn.ModuleDict({t: nn.Sequential(_conv_gn(self.backbone.deep_channels, dim, kernel=1),
                                                        _conv_gn(dim, dim)) for t in tasks})
        self.task_embedding = nn.Parameter(torch.randn(len(tasks), dim) * 0.02)  # (T, D)
        self.etf_features = ETFProjection(dim) if etf in ("features", "both") else nn.Identity()
        if exchange == "kem":
            self.exchange = KEM(dim, num_slots, topk, slots="etf" if etf in ("slots", "both") else "learned")
        elif exchange == "cross":
            self.exchange = CrossTaskAttention(dim)
        else:
            self.exchange = nn.Identity()
        self.decoders = nn.ModuleDict({t: TaskDecoder(dim, skip_dim, c) for t, c in tasks.items()})

    def forward(self, images):
        B, _, H, W = images.shape
        m = self.backbone.pad_multiple
        pad_h, pad_w = (-H) % m, (-W) % m                               # pad so every stride divides
        x = F.pad(images, (0, pad_w, 0, pad_h))                         # (B, 3, H', W')
        skip, deep = self.backbone(x)                                   # (B, C_s, H'/4, W'/4), (B, C_d, h, w)
        skip = self.skip_proj(skip)                                     # (B, 32, H'/4, W'/4)
        h, w = deep.shape[-2:]
        tokens = [self.encoders[t](deep).flatten(2).transpose(1, 2) + self.task_embedding[i]
                  for i, t in enumerate(self.tasks)]                    # T x (B, h*w, D)
        F_ = torch.cat(tokens, dim=1)                                   # (B, N = T*h*w, D)
        F_ = self.exchange(self.etf_features(F_))                       # (B, N, D)
        outputs = {}
        for t, F_t in zip(self.tasks, F_.split(h * w, dim=1)):          # split back per task
            x_t = F_t.transpose(1, 2).reshape(B, -1, h, w)              # (B, D, h, w)
            y = self.decoders[t](x_t, skip)                             # (B, C_t, H'/4, W'/4)
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            outputs[t] = y[:, :, :H, :W]                                # (B, C_t, H, W)
        return outputs
