"""train.py's optimisation, one step at a time, against oracles written out here.

Pinned down:
- the learning rate each optimiser step uses, taken by train_step from build_optimizer's schedule,
  equals the formula written out by hand: linear warm-up lr * (it + 1) / warmup (so the first step
  uses lr / warmup, never 0), then lr * (1 - (it - warmup) / (max_iters - warmup)) ** power, at the
  warm-up's start and end, the decay's midpoint and the last step; lr_factor at the same points;
- gradient clipping: the gradient handed to the optimiser is the full gradient of the weighted loss
  scaled by min(1, clip / |g|), without and with an fp16-style GradScaler (unscaled first);
  grad_clip = 0 hands over the gradient unchanged;
- accumulation: `accum` n over micro-batches of b images hands the optimiser the gradient (and makes
  the update and the logged losses) of one step on the n*b images, up to rounding;
- each step starts from zero gradients;
- every loss ignores exactly what the task table says it ignores (label 255 for classes, edges and
  saliency; depth 0; zero normals): predictions at ignored pixels, and padding made of ignored
  pixels, leave the loss unchanged, a valid pixel changes it, and each loss equals a per-pixel
  formula averaged over each image's valid pixels, then over the batch.

The optimiser handed to train_step in the gradient tests is plain SGD with a step pre-hook that
records the gradients it receives: Adam's first steps hardly depend on the gradient's scale, so they
would hide a wrong scale. Everything runs on tiny 32 x 32 images with the tiny backbone.
"""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnf

import train
from kem_mtl import MultiTaskNet
from train_support import Processes

CHANNELS = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1, "sal": 1}
SIZE = (32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def make_model(tasks=CHANNELS):
    torch.manual_seed(0)
    return MultiTaskNet(tasks, backbone="tiny", dim=16, num_slots=4, topk=0.5)


def make_batch(seed, B, tasks=CHANNELS, size=SIZE):
    """Images and targets as the datasets give them, with ignored pixels in every task."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    hole = torch.rand(B, 1, H, W, generator=g) < 0.2                   # ignored pixels
    batch = {"image": torch.randn(B, 3, H, W, generator=g)}
    for t in tasks:
        if t in ("semseg", "parts"):
            y = torch.randint(0, tasks[t], (B, H, W), generator=g)
            y[hole[:, 0]] = 255
        elif t == "depth":
            y = (torch.rand(B, 1, H, W, generator=g) * 5 + 0.5).masked_fill(hole, 0.0)
        elif t == "normals":
            y = nnf.normalize(torch.randn(B, 3, H, W, generator=g), dim=1).masked_fill(hole, 0.0)
        else:                                                           # edge, sal: {0, 1, 255}
            y = (torch.rand(B, 1, H, W, generator=g) < 0.3).float().masked_fill(hole, 255.0)
        batch[t] = y
    return batch


def cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def cfg_for(accum=1, grad_clip=0.0, tasks=CHANNELS):
    return {"accum": accum, "grad_clip": grad_clip, "channels_last": False, "tasks": list(tasks)}


class Recorder:
    """Plain SGD (the update is -lr * the gradient it is handed) that keeps those gradients."""

    def __init__(self, model, lr=1e-3):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: 1.0)
        self.grads = []
        self.optimizer.register_step_pre_hook(self._keep)

    def _keep(self, optimizer, args, kwargs):
        self.grads.append([p.grad.detach().clone() if p.grad is not None else None
                           for p in optimizer.param_groups[0]["params"]])


def step(model, batches, cfg, recorder, scaler=None):
    """train.train_step on the CPU, one process, no autocast; returns its running losses."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    running = {t: torch.zeros(()) for t in cfg["tasks"]}
    train.train_step(model, iter(batches), cfg, Processes(), contextlib.nullcontext(), scaler,
                     recorder.optimizer, recorder.scheduler, running)
    return running


def oracle_gradient(model, batch, tasks=CHANNELS):
    """The gradient of sum_t weight_t * loss_t on `batch`, on a copy of the model."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    losses = train.compute_losses(model(batch["image"]), {t: batch[t] for t in tasks}, list(tasks))
    sum(train.TASKS[t].weight * losses[t] for t in tasks).backward()
    return [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]


def norm(grads):
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


def assert_grads_close(got, want, what, rtol=1e-4):
    """Gradients equal up to rounding, relative to the whole gradient's size."""
    assert len(got) == len(want)
    scale = norm(want)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, want) if a is not None)
    assert all((a is None) == (b is None) for a, b in zip(got, want)), f"{what}: different parameters have gradients"
    assert worst <= rtol * scale, f"{what}: gradients differ by up to {worst:.3g} (gradient norm {scale:.3g})"


# ---------------------------------------------------------------------------------------------- the schedule

LR, WARMUP, MAX_ITERS, POWER = 0.1, 4, 10, 0.9


def hand_lr(step):
    """The lr of optimiser step `step` (1, 2, ...), written out: it = step - 1 steps done before it."""
    it = step - 1
    if it < WARMUP:
        return LR * (it + 1) / WARMUP
    return LR * (1 - (it - WARMUP) / (MAX_ITERS - WARMUP)) ** POWER


class PixelNet(nn.Module):
    """A 1 x 1 convolution predicting depth: the cheapest model train_step can take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return {"depth": self.conv(x)}


def test_the_learning_rate_of_each_step_follows_warm_up_then_polynomial_decay():
    torch.manual_seed(0)
    model = PixelNet()
    cfg = {**cfg_for(accum=2, tasks={"depth": 1}), "optimizer": "adamw", "lr": LR, "weight_decay": 0.0,
           "warmup_iters": WARMUP, "max_iters": MAX_ITERS, "poly_power": POWER}
    optimizer, scheduler = train.build_optimizer(model, cfg)
    used = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    batches = iter([make_batch(s, 1, {"depth": 1}, (8, 8)) for s in range(2 * MAX_ITERS)])
    running = {"depth": torch.zeros(())}
    for _ in range(MAX_ITERS):
        train.train_step(model, batches, cfg, Processes(), contextlib.nullcontext(),
                         torch.amp.GradScaler("cpu", enabled=False), optimizer, scheduler, running)
    assert len(used) == MAX_ITERS, used                      # one optimiser step per train_step, accum 2
    checks = {1: ("warm-up start: lr / warmup", LR / WARMUP),
              WARMUP: ("warm-up end", LR),
              WARMUP + 1: ("decay start", LR),
              WARMUP + 1 + (MAX_ITERS - WARMUP) // 2: ("decay midpoint", LR * 0.5 ** POWER),
              MAX_ITERS: ("last step", LR * (1 / (MAX_ITERS - WARMUP)) ** POWER)}
    for s, (what, want) in checks.items():
        assert math.isclose(used[s - 1], want, rel_tol=1e-12), f"step {s} ({what}): lr {used[s - 1]}, expected {want}"
    for s in range(1, MAX_ITERS + 1):
        assert math.isclose(used[s - 1], hand_lr(s), rel_tol=1e-12), f"step {s}: lr {used[s - 1]}, expected {hand_lr(s)}"
    assert all(lr > 0 for lr in used), used


@pytest.mark.parametrize("it, want", [(0, 1 / WARMUP), (WARMUP - 1, 1.0), (WARMUP, 1.0),
                                      (WARMUP + (MAX_ITERS - WARMUP) // 2, 0.5 ** POWER),
                                      (MAX_ITERS - 1, (1 / (MAX_ITERS - WARMUP)) ** POWER), (MAX_ITERS, 0.0)])
def test_lr_factor_at_the_schedules_landmarks(it, want):
    got = train.lr_factor(it, WARMUP, MAX_ITERS, POWER)
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15), f"lr_factor({it}) = {got}, expected {want}"


def test_without_warm_up_the_first_step_uses_the_full_rate():
    assert train.lr_factor(0, 0, MAX_ITERS, POWER) == 1.0
    assert math.isclose(train.lr_factor(MAX_ITERS // 2, 0, MAX_ITERS, POWER), 0.5 ** POWER, rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "fp16-scaler"])
def test_clipping_hands_the_optimiser_the_gradient_scaled_to_the_clip_norm(scaled):
    model, batch = make_model(), make_batch(0, 2)
    g = oracle_gradient(model, batch)
    clip = norm(g) / 4                                                  # the clip is active
    recorder = Recorder(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
    step(model, [batch], cfg_for(grad_clip=clip), recorder, scaler)
    (got,) = recorder.grads
    assert norm(got) <= clip * (1 + 1e-5), f"the optimiser got a gradient of norm {norm(got):.6g} > clip {clip:.6g}"
    want = [x * (clip / norm(g)) if x is not None else None for x in g]
    assert_grads_close(got, want, "the clipped gradient")


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "fp16-scaler"])
def test_a_clip_above_the_gradient_norm_or_zero_changes_nothing(scaled):
    model, batch = make_model(), make_batch(1, 2)
    g = oracle_gradient(model, batch)
    for clip in (4 * norm(g), 0.0):
        copied = copy.deepcopy(model)
        recorder = Recorder(copied)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        step(copied, [batch], cfg_for(grad_clip=clip), recorder, scaler)
        assert_grads_close(recorder.grads[0], g, f"clip {clip:.3g}")


# ---------------------------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("n, b", [(2, 2), (3, 1)])
def test_accumulating_n_micro_batches_equals_one_step_on_all_of_them(n, b):
    micro = [make_batch(10 + i, b) for i in range(n)]
    model = make_model()
    one = copy.deepcopy(model)
    rec_n, rec_1 = Recorder(model), Recorder(one)
    running_n = step(model, micro, cfg_for(accum=n), rec_n)
    running_1 = step(one, [cat(micro)], cfg_for(accum=1), rec_1)
    assert_grads_close(rec_n.grads[0], rec_1.grads[0], f"accum {n} x batch {b} against one batch of {n * b}")
    assert_grads_close(rec_n.grads[0], oracle_gradient(make_model(), cat(micro)), "accumulated against the oracle")
    for p, q in zip(model.parameters(), one.parameters()):           # the same update, up to rounding
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for t in CHANNELS:                                                  # and the same logged losses
        torch.testing.assert_close(running_n[t], running_1[t], rtol=1e-5, atol=1e-7)


def test_each_step_starts_from_zero_gradients():
    model = make_model()
    recorder = Recorder(model, lr=1e-2)
    first, second = make_batch(20, 2), make_batch(21, 2)
    step(model, [first], cfg_for(), recorder)
    want = oracle_gradient(model, second)                               # at the weights after step 1
    step(model, [second], cfg_for(), recorder)
    assert_grads_close(recorder.grads[1], want, "the second step's gradient")


# ---------------------------------------------------------------------------------------------- the losses

IGNORED = {                       # what each task's loss must ignore: target -> bool (B, 1 or none, H, W)
    "semseg": lambda y: y == 255,
    "parts": lambda y: y == 255,
    "depth": lambda y: y == 0,
    "normals": lambda y: (y == 0).all(1, keepdim=True),
    "edge": lambda y: y == 255,
    "sal": lambda y: y == 255,
}
IGNORED_VALUE = {"semseg": 255, "parts": 255, "depth": 0.0, "normals": 0.0, "edge": 255.0, "sal": 255.0}
LOSS_CHANNELS = {"semseg": 5, "parts": 4, "depth": 1, "normals": 3, "edge": 1, "sal": 1}


def test_the_table_of_ignored_pixels_covers_every_task():
    assert set(IGNORED) == set(train.TASKS), sorted(train.TASKS)


def pixel_loss(task, p, y):
    """The per-pixel loss written out (p: (B, C, H, W) prediction, y: target) -> (B, H, W)."""
    if task in ("semseg", "parts"):
        logp = p.log_softmax(1)
        return -logp.gather(1, y.clamp(max=p.shape[1] - 1)[:, None])[:, 0]
    if task == "depth":
        return (p - y).abs()[:, 0]
    if task == "normals":
        unit = p / p.norm(dim=1, keepdim=True)
        return (unit - y).abs().sum(1)
    pos, sig = (y == 1).double(), p.sigmoid()
    weight_pos, weight_neg = (0.95, 0.05) if task == "edge" else (1.0, 1.0)   # edges: class-balanced
    return -(weight_pos * pos * sig.log() + weight_neg * (1 - pos) * (1 - sig).log())[:, 0]


def loss_oracle(task, p, y):
    """Per image: the mean over its valid pixels (0 if none); then the mean over the images."""
    per_pixel, ignored = pixel_loss(task, p.double(), y), IGNORED[task](y)
    ignored = ignored[:, 0] if ignored.dim() == 4 else ignored
    per_image = []
    for loss_i, ign_i in zip(per_pixel, ignored):
        valid = ~ign_i
        per_image.append(loss_i[valid].mean() if valid.any() else torch.zeros((), dtype=torch.float64))
    return torch.stack(per_image).mean()


def loss_case(task, seed, B=3, size=(6, 7)):
    C = LOSS_CHANNELS[task]
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, C, *size, generator=g)
    target = make_batch(seed, B, {task: C}, size)[task]
    ignored = IGNORED[task](target)
    ignored = ignored if ignored.dim() == 4 else ignored[:, None]
    assert ignored.any() and (~ignored).any()
    return pred, target, ignored


def loss(task, pred, target):
    return train.compute_losses({task: pred}, {task: target}, [task])[task]


@pytest.mark.parametrize("task", list(LOSS_CHANNELS))
def test_each_loss_equals_its_per_pixel_formula_over_valid_pixels(task):
    pred, target, _ = loss_case(task, 0)
    target[0] = IGNORED_VALUE[task]                                     # an image with no valid pixel counts 0
    got, want = loss(task, pred, target), loss_oracle(task, pred, target)
    assert math.isclose(float(got), float(want), rel_tol=1e-5), f"{task}: loss {float(got)}, expected {float(want)}"


@pytest.mark.parametrize("task", list(LOSS_CHANNELS))
def test_predictions_at_ignored_pixels_do_not_change_the_loss(task):
    pred, target, ignored = loss_case(task, 1)
    other = torch.where(ignored, 100 * torch.randn(pred.shape, generator=torch.Generator().manual_seed(9)), pred)
    base, changed = loss(task, pred, target), loss(task, other, target)
    assert torch.equal(base, changed), f"{task}: {float(base)} became {float(changed)} when ignored pixels changed"
    valid = (~ignored).nonzero()[0]
    poked = pred.clone()
    poked[valid[0], 0, valid[2], valid[3]] += 3.0                       # one channel: softmax is shift-invariant
    assert loss(task, poked, target) != base, f"{task}: a valid pixel's prediction does not change the loss"


@pytest.mark.parametrize("task", list(LOSS_CHANNELS))
def test_padding_made_of_ignored_pixels_does_not_change_the_loss(task):
    pred, target, _ = loss_case(task, 2)
    pad = (0, 5, 2, 0)                                                  # 5 columns right, 2 rows on top
    big_pred = nnf.pad(pred, pad, value=7.0)
    big_target = nnf.pad(target[:, None] if target.dim() == 3 else target, pad,
                         value=IGNORED_VALUE[task]).to(target.dtype)
    big_target = big_target[:, 0] if target.dim() == 3 else big_target
    base, padded = loss(task, pred, target), loss(task, big_pred, big_target)
    assert math.isclose(float(base), float(padded), rel_tol=1e-6), f"{task}: {float(base)} became {float(padded)}"
