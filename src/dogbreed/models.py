"""Architectures, classification heads and weight loading."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from dogbreed.contract import ARCHITECTURES

log = logging.getLogger(__name__)

WEIGHTS_NONE = "none"
WEIGHTS_IMAGENET = "imagenet"


class WeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


def _head_name(arch: str) -> str:
    return "fc" if arch.startswith("resnet") else "classifier.1"


def head(model: nn.Module, arch: str) -> nn.Linear:
    return model.get_submodule(_head_name(arch))


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    old = head(model, arch)
    new = nn.Linear(old.in_features, num_classes)
    if arch.startswith("resnet"):
        model.fc = new
    else:
        model.classifier[1] = new


def _load_pth(model: nn.Module, path: Path, arch: str) -> None:
    """Load a backbone state_dict from a local file, ignoring a head of another size."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an empty file is EOFError, a text file KeyError
        raise WeightsError(f"cannot read weights file {path} (not a torch.save state_dict): "
                           f"{type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state_dict")
    own = model.state_dict()
    head_prefix = _head_name(arch) + "."
    usable = {k: v for k, v in state.items()
              if not (k.startswith(head_prefix) and k in own and own[k].shape != v.shape)}
    try:
        missing, unexpected = model.load_state_dict(usable, strict=False)
    except RuntimeError as exc:  # a backbone tensor of another shape (another arch's file)
        raise WeightsError(f"weights file {path} does not fit {arch}: {' '.join(str(exc).split())[:500]}") from None
    missing = [k for k in missing if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_model(
    arch: str, num_classes: int, weights: str = WEIGHTS_NONE, freeze_backbone: bool = False
) -> nn.Module:
    """A torchvision ``arch`` with a fresh ``num_classes`` head.

    ``weights``: ``none`` (random init), ``imagenet`` (torchvision's weights API; downloads to
    ``$TORCH_HOME`` unless the image baked them in) or a path to a ``.pth`` state_dict.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if weights == WEIGHTS_IMAGENET:
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model = torchvision.models.get_model(arch, weights=enum)
        except Exception as exc:  # urllib/OS errors vary by platform; all mean "not available"
            raise WeightsError(
                f"cannot load ImageNet weights {enum} ({type(exc).__name__}: {exc}); the job has "
                "no network? bake them into the image (BAKE_IMAGENET_WEIGHTS=true), put them in "
                "$TORCH_HOME, pass weights=<path to .pth> or weights=none"
            ) from exc
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights != WEIGHTS_NONE:
            path = Path(weights)
            if not path.is_file():
                raise WeightsError(
                    f"weights={weights!r}: not 'imagenet', 'none' or an existing .pth file"
                )
            _load_pth(model, path, arch)
    _replace_head(model, arch, num_classes)
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad_(False)
        for param in head(model, arch).parameters():
            param.requires_grad_(True)
    return model


def build_for_inference(arch: str, num_classes: int, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Architecture + trained weights, in eval mode (no pretrained download).

    The module is built on the meta device and takes the state_dict's tensors as they are
    (``assign=True``): a random init that the weights overwrite anyway costs more than the
    rest of a model load (~0.1-0.3 s for ResNet18 on a small CPU), which a server pays per load.
    """
    with torch.device("meta"):
        model = build_model(arch, num_classes, WEIGHTS_NONE)
    model.load_state_dict(state_dict, assign=True)  # strict: every parameter and buffer is given
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"state_dict leaves {left[:5]} uninitialised")
    return model.eval()
