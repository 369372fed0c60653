"""Training-recipe primitives: batch-wise augmentation on the device, mixup/cutmix, EMA, warmup.

torchvision's "new training recipe" (TrivialAugmentWide, random erasing, mixup / cutmix, label
smoothing, EMA of the weights, warmup + cosine, FixRes evaluation) is what lifted its ResNet50
from 76.1% to 80.9% top-1. Here each primitive is a hyperparameter and runs on whole batches of
the GPU-resident uint8 cache: no per-image CPU transform and no per-image Python loop.

* ``augment``: ``none`` (centre crop, as evaluation), ``flip`` (random resized crop + horizontal
  flip: the default before this module existed) or ``trivialaugment`` (``flip`` + TrivialAugment
  Wide). TrivialAugment draws one op per *sample*; the samples that drew the same op share one
  magnitude per batch, so a batch costs at most 14 batched torchvision calls whatever its size.
* ``random-erasing``: probability that a sample gets one random box set to 0 (after
  normalisation), boxes drawn per sample and applied with one mask for the batch.
* ``mixup-alpha`` / ``cutmix-alpha``: torchvision's ``v2.MixUp`` / ``v2.CutMix`` (one of them
  per batch when both are on), on the normalised batch, giving soft targets.
* ``ema-decay``: an :class:`torch.optim.swa_utils.AveragedModel` of the weights and BatchNorm
  buffers (``get_ema_multi_avg_fn``, as torchvision's reference); the EMA model is what is
  evaluated, checkpointed and saved.

All randomness comes from the run's augmentation generator, so a run is a function of ``seed``
and a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dogbreed import data
from dogbreed.contract import Hyperparameters

AUGMENTS = ("none", "flip", "trivialaugment")

# TrivialAugmentWide's op set and magnitude ranges (torchvision.transforms.v2.TrivialAugmentWide,
# 31 bins). (name, magnitudes, signed). Translation is 32 px at 224 px in torchvision; it is
# scaled with the crop here so a 64 px run is not shifted by half an image.
TA_BINS = 31
_BINS = torch.arange(TA_BINS, dtype=torch.float64)
TA_OPS: tuple[tuple[str, torch.Tensor | None, bool], ...] = (
    ("Identity", None, False),
    ("ShearX", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("ShearY", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("TranslateX", torch.linspace(0.0, 32.0, TA_BINS), True),
    ("TranslateY", torch.linspace(0.0, 32.0, TA_BINS), True),
    ("Rotate", torch.linspace(0.0, 135.0, TA_BINS), True),
    ("Brightness", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("Color", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("Contrast", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("Sharpness", torch.linspace(0.0, 0.99, TA_BINS), True),
    ("Posterize", (8 - (_BINS / ((TA_BINS - 1) / 6))).round().int(), False),
    ("Solarize", torch.linspace(1.0, 0.0, TA_BINS), False),
    ("AutoContrast", None, False),
    ("Equalize", None, False),
)
TA_REFERENCE_SIZE = 224
# torchvision's RandomErasing defaults (reference recipe: --random-erase 0.1 with these).
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)

# torchvision's reference recipe passes bilinear to its auto-augment policies (default: nearest).
_BILINEAR = TF.InterpolationMode.BILINEAR


def apply_ta_op(images: torch.Tensor, name: str, magnitude: float, image_size: int) -> torch.Tensor:
    """One TrivialAugment op with one magnitude on a uint8 ``[N,3,H,W]`` batch (torchvision's
    own functional ops, as ``TrivialAugmentWide._apply_image_or_video_transform`` calls them)."""
    if name == "Identity":
        return images
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                         interpolation=_BILINEAR, fill=None, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        pixels = int(magnitude * image_size / TA_REFERENCE_SIZE)
        translate = [pixels, 0] if name == "TranslateX" else [0, pixels]
        return TF.affine(images, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                         interpolation=_BILINEAR, fill=None)
    if name == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=_BILINEAR, fill=None)
    if name == "Brightness":
        return TF.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if name == "Solarize":
        return TF.solarize(images, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(images)
    if name == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"unknown TrivialAugment op {name!r}")


def trivial_augment(images: torch.Tensor, generator: torch.Generator, image_size: int) -> torch.Tensor:
    """TrivialAugmentWide on a uint8 batch: each sample draws one op uniformly; the samples
    sharing an op share a magnitude bin and sign, so the batch takes one call per op drawn."""
    n = images.shape[0]
    op_of_sample = torch.randint(len(TA_OPS), (n,), generator=generator)
    bins = torch.randint(TA_BINS, (len(TA_OPS),), generator=generator)
    negate = torch.rand(len(TA_OPS), generator=generator) < 0.5
    out = images.clone()
    for op_index, (name, magnitudes, signed) in enumerate(TA_OPS):
        members = (op_of_sample == op_index).nonzero().flatten()
        if members.numel() == 0 or name == "Identity":
            continue
        magnitude = 0.0 if magnitudes is None else float(magnitudes[bins[op_index]])
        if signed and negate[op_index]:
            magnitude = -magnitude
        members = members.to(images.device)
        out[members] = apply_ta_op(images[members], name, magnitude, image_size)
    return out


def random_erase(batch: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample RandomErasing (torchvision's scale/ratio, value 0) with one mask for the batch.

    Boxes too large for the image are shrunk to fit instead of redrawn (torchvision retries up
    to 10 times); with scale ≤ 0.33 that only trims extreme aspect ratios.
    """
    n, _, height, width = batch.shape
    rand = torch.rand(n, 5, generator=generator)
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * rand[:, 0])
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand[:, 1])
    box_h = torch.sqrt(area * aspect).round().clamp(1, height)
    box_w = torch.sqrt(area / aspect).round().clamp(1, width)
    top = ((height - box_h + 1) * rand[:, 2]).floor()
    left = ((width - box_w + 1) * rand[:, 3]).floor()
    erase = rand[:, 4] < probability
    device = batch.device
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    top, left, box_h, box_w = (t.to(device).view(n, 1, 1) for t in (top, left, box_h, box_w))
    mask = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
            & erase.to(device).view(n, 1, 1))
    return batch.masked_fill(mask.unsqueeze(1), 0.0)


class BatchMix:
    """torchvision's MixUp / CutMix (one of them per batch when both are on), drawing from the
    run's generator: the transforms sample from torch's global RNG, so they run inside a
    ``fork_rng`` seeded from ``generator`` (the global RNG is left as it was)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> None:
        mixes: list[nn.Module] = []
        if mixup_alpha > 0:
            mixes.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.transform: nn.Module | None = (None if not mixes else mixes[0] if len(mixes) == 1
                                            else T.RandomChoice(mixes))

    def __bool__(self) -> bool:
        return self.transform is not None

    def __call__(self, batch: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is None:
            return batch, labels
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(batch, labels)


class TrainAugment:
    """The training-side input pipeline for one batch of cached uint8 images:
    crop/flip → TrivialAugment → normalise → random erasing → mixup/cutmix."""

    def __init__(self, hp: Hyperparameters, num_classes: int,
                 mean: Any = data.IMAGENET_MEAN, std: Any = data.IMAGENET_STD) -> None:
        self.augment = hp.augment
        self.image_size = hp.image_size
        self.random_erasing = hp.random_erasing
        self.mix = BatchMix(hp.mixup_alpha, hp.cutmix_alpha, num_classes)
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8[N,3,S,S]`` cache rows and int labels → (normalised float inputs, targets):
        targets are the labels, or ``float[N, classes]`` soft targets under mixup/cutmix."""
        if self.augment == "none":
            pixels = TF.center_crop(images, [self.image_size, self.image_size]).float()
        else:
            # Same draws as before this module, so `augment=flip` reproduces earlier runs.
            pixels = data.random_resized_crop_flip(images, self.image_size, generator)
        if self.augment == "trivialaugment":
            uint8 = pixels.round_().clamp_(0, 255).to(torch.uint8)
            pixels = trivial_augment(uint8, generator, self.image_size).float()
        inputs = data.normalize(pixels, self.mean, self.std)
        if self.random_erasing > 0:
            inputs = random_erase(inputs, self.random_erasing, generator)
        return self.mix(inputs, labels, generator)


# --- EMA of the weights ---------------------------------------------------------------------
class WeightEma:
    """EMA of parameters and buffers through ``AveragedModel`` + ``get_ema_multi_avg_fn``.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates: a small
    set gives few steps (the sample: 5 per epoch), and a fixed 0.999 would keep the EMA near
    the random initial weights for the whole run.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, model: nn.Module) -> None:
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.current_decay())
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])


class Recipe:
    """What a training step needs beyond model and optimizer: the batch pipeline and the EMA."""

    def __init__(self, hp: Hyperparameters, model: nn.Module, num_classes: int) -> None:
        self.augment = TrainAugment(hp, num_classes)
        self.ema = WeightEma(model, hp.ema_decay) if hp.ema_decay > 0 else None

    def inputs(self, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(images, labels, generator)

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The weights to evaluate and save: the EMA's when it is on."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])


# --- learning-rate schedule -----------------------------------------------------------------
WARMUP_START_FACTOR = 0.01  # torchvision reference: --lr-warmup-decay 0.01, linear


def make_scheduler(hp: Hyperparameters, optimizer: torch.optim.Optimizer,
                   log: Callable[[str], None] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``warmup-epochs`` of linear warmup from 1% of ``lr``, then cosine
    (or constant with ``lr-schedule=none``) over the remaining epochs."""
    warmup = min(hp.warmup_epochs, hp.epochs - 1)
    if warmup != hp.warmup_epochs and log:
        log(f"event=warmup_clamped warmup_epochs={hp.warmup_epochs} epochs={hp.epochs} used={warmup}")
    lr_sched = torch.optim.lr_scheduler
    if hp.lr_schedule == "cosine":
        main: lr_sched.LRScheduler = lr_sched.CosineAnnealingLR(optimizer, T_max=hp.epochs - warmup)
    else:
        main = lr_sched.LambdaLR(optimizer, lambda _epoch: 1.0)
    if warmup <= 0:
        return main
    ramp = lr_sched.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return lr_sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def scheduler_after(hp: Hyperparameters, optimizer: torch.optim.Optimizer,
                    completed_epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule for ``hp.epochs``, stepped past ``completed_epochs``: where an uninterrupted
    run would be. For a resume whose epoch count changed: the saved scheduler state holds the
    old count's cosine length and warmup milestone."""
    # The schedulers chain from the group's current lr: start from the initial one, as a fresh run.
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", hp.lr)
    scheduler = make_scheduler(hp, optimizer)
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": deliberate here, these epochs are done.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        for _ in range(completed_epochs):
            scheduler.step()
    return scheduler
