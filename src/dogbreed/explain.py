"""Grad-CAM heat maps: which pixels made the model say a breed.

    dogbreed explain MODEL IMAGE... [--top-k 3] [--out DIR]   # overlay PNGs with the top-k labels

Library: Captum's :class:`captum.attr.LayerGradCam` (PyTorch's own interpretability library,
maintained by Meta in the pytorch org). Chosen over pytorch-grad-cam (PyPI ``grad-cam``) because
Captum 0.9 installs with our pins and adds no dependency (torch, numpy, matplotlib are already
here), while ``grad-cam`` 1.5 pulls in opencv-python-headless, scikit-learn and ttach — ~100 MB
more in the serve image for the same Grad-CAM.

Pixels go through exactly what serving does: :func:`dogbreed.data.decode_image` (resize +
centre crop to ``resize_size``) and :func:`dogbreed.data.eval_transform` with the model's own
``model.json`` size, mean and std. :func:`explain` is what the server calls for
``CustomAttributes: explain=gradcam``; it needs nothing but a model and a normalised tensor.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from dogbreed import artifacts, contract, data
from dogbreed.output_data import _pyplot
from dogbreed.serve import MAX_IMAGE_PIXELS_ENV

ALPHA = 0.45  # heat map opacity over the photo


# Below this many cells across, the last stage's map is too coarse to point at anything (a
# 64 px input gives ResNet's layer4 2x2 cells, 32 px a single one): use the stride-16 stage.
MIN_CAM_CELLS = 4


def target_layer(model: nn.Module, arch: str | None = None, input_size: int = 224) -> nn.Module:
    """The layer Grad-CAM reads: the last convolutional stage (stride 32: ResNet ``layer4``,
    MobileNetV2 ``features[-1]``, 7x7 cells at 224 px), or the stride-16 stage (``layer3``,
    ``features[13]``) when the input is too small for the last one to have MIN_CAM_CELLS."""
    arch = arch or ("resnet" if hasattr(model, "layer4") else "mobilenet_v2")
    coarse = input_size // 32 < MIN_CAM_CELLS
    if arch.startswith("resnet"):
        return model.layer3 if coarse else model.layer4
    if arch == "mobilenet_v2":
        return model.features[13] if coarse else model.features[-1]
    raise ValueError(f"no Grad-CAM layer known for architecture {arch!r}")


def explain(model: nn.Module, image_tensor: torch.Tensor, target_classes: int | Sequence[int],
            arch: str | None = None) -> torch.Tensor:
    """Grad-CAM of one image for each class in ``target_classes``.

    ``image_tensor``: the normalised model input, ``[3, H, W]`` or ``[1, 3, H, W]`` (what
    :func:`dogbreed.data.eval_transform` returns). Returns ``float32[len(targets), H, W]`` in
    [0, 1] on the CPU, each map scaled by its own maximum (all zeros when no pixel argues for
    the class).
    """
    # Captum: the explain extra's; load() users (the launcher's in-process predictor) go without
    from captum.attr import LayerAttribution, LayerGradCam

    if image_tensor.dim() == 3:
        image_tensor = image_tensor.unsqueeze(0)
    if image_tensor.dim() != 4 or image_tensor.shape[0] != 1:
        raise ValueError(f"expected one image [3,H,W] or [1,3,H,W], got {tuple(image_tensor.shape)}")
    targets = [int(target_classes)] if isinstance(target_classes, int) else [int(t) for t in target_classes]
    if not targets:
        raise ValueError("no target classes")
    was_training = model.training
    model.eval()
    inputs = image_tensor.expand(len(targets), -1, -1, -1).contiguous()
    try:
        with torch.enable_grad():
            cam = LayerGradCam(model, target_layer(model, arch, int(inputs.shape[-1])))
            maps = cam.attribute(inputs, target=targets, relu_attributions=True)
            maps = LayerAttribution.interpolate(maps, tuple(inputs.shape[-2:]), "bilinear")
    finally:
        model.train(was_training)
    maps = maps.detach().float().squeeze(1).cpu()
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = ALPHA) -> Any:
    """The photo (``uint8[3,H,W]``) under the heat map (``[H,W]`` in [0,1], 'jet'): a PIL image."""
    import matplotlib  # optional; load() users go without

    colours = matplotlib.colormaps["jet"](heatmap.numpy())[..., :3]
    photo = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255
    blended = (1 - alpha) * photo + alpha * colours
    return Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8))


def overlay_png(image: torch.Tensor, heatmap: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    overlay(image, heatmap).save(buffer, format="PNG")
    return buffer.getvalue()


def served_explanation(model: nn.Module, batch: torch.Tensor, metadata: artifacts.ModelMetadata,
                       probabilities: torch.Tensor) -> dict[str, Any]:
    """What ``CustomAttributes: explain=gradcam`` adds to a served answer: the top class's
    Grad-CAM drawn over the pixels the model saw (``batch`` un-normalised), as a base64 PNG."""
    index = int(probabilities.argmax())
    heatmap = explain(model, batch, [index], metadata.arch)[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (metadata.mean, metadata.std))
    photo = ((batch[0].detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return {"method": "gradcam", "label": artifacts.breed_name(metadata.class_names[index]),
            "class_name": metadata.class_names[index], "index": index,
            "probability": round(float(probabilities[index]), 6),
            "png_base64": base64.b64encode(overlay_png(photo, heatmap)).decode("ascii")}


# --- files ----------------------------------------------------------------------------------------
def load(model_path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, artifacts.ModelMetadata]:
    """A model dir (with model.json) or a model.tar.gz (unpacked safely into a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="dogbreed-explain-") as tmp:
        return artifacts.load_model(artifacts.resolve_model_dir(Path(model_path), Path(tmp))[0], device)


def overlay_names(images: Sequence[Path]) -> list[str]:
    """``<stem>.gradcam.png`` for each image, unique and deterministic: a stem already taken
    (two photos named ``x.jpg`` in different folders, or ``x.jpg`` and ``x.png``) gets the
    first free ``<stem>-2``, ``<stem>-3``, …, so no overlay overwrites another."""
    stems = [Path(p).stem for p in images]
    taken: set[str] = set()
    names = []
    for stem in stems:
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate)
        names.append(f"{candidate}.gradcam.png")
    return names


def max_image_pixels(env: Mapping[str, str] | None = None) -> int:
    """The largest image explain decodes: serving's ``DOGBREED_MAX_IMAGE_PIXELS`` (and default)."""
    return contract.env_int(os.environ if env is None else env, MAX_IMAGE_PIXELS_ENV, 1,
                            data.DEFAULT_MAX_IMAGE_PIXELS)


def check_images(images: Sequence[Path], resize_size: int, max_pixels: int) -> None:
    """Every image's header against serving's limits (:func:`dogbreed.data.check_image_header`),
    before any is decoded: ``ValueError`` naming the first one refused."""
    for path in images:
        try:
            data.check_image_header(Path(path).read_bytes(), max_pixels, resize_size)
        except data.ImageRejected as exc:
            raise ValueError(f"{path}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def explain_files(model_path: Path, images: Sequence[Path], out_dir: Path, top_k: int = 3,
                  device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """One ``<image stem>.gradcam.png`` per image: the photo, then a Grad-CAM overlay for each
    of the top-k classes titled with its label and probability. Images that share a stem
    (``ca/x.jpg cb/x.jpg``) get ``x.gradcam.png``, ``x-2.gradcam.png``, … in the order given
    (see :func:`overlay_names`). Returns what was written. ``ValueError`` (one line) for an image
    serving would refuse, one that does not decode, or an ``out_dir`` that cannot be written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from None
    model, metadata = load(model_path, device)
    check_images(images, metadata.resize_size, max_image_pixels())
    plt = _pyplot()
    results = []
    for path, name in zip(images, overlay_names(images)):
        try:
            pixels = data.check_decoded(data.decode_image(Path(path).read_bytes(), metadata.resize_size))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a readable image: {exc}") from None
        # The pixels the model sees, before normalisation: eval_transform's centre crop.
        photo = TF.center_crop(pixels, [metadata.image_size, metadata.image_size])
        inputs = data.eval_transform(pixels.to(device), metadata.image_size, metadata.mean,
                                     metadata.std)
        with torch.no_grad():
            probabilities = model(inputs).float().softmax(1)[0].cpu()
        k = max(1, min(top_k, len(metadata.class_names)))
        top = probabilities.topk(k)
        classes = top.indices.tolist()
        heatmaps = explain(model, inputs, classes, metadata.arch)
        fig, axes = plt.subplots(1, k + 1, figsize=(3 * (k + 1), 3.3))
        axes[0].imshow(photo.permute(1, 2, 0).numpy())
        axes[0].set_title(Path(path).name, fontsize=8)
        predictions = []
        for rank, (ax, index, probability, heatmap) in enumerate(
                zip(axes[1:], classes, top.values.tolist(), heatmaps), 1):
            label = artifacts.breed_name(metadata.class_names[index])
            ax.imshow(overlay(photo, heatmap))
            ax.set_title(f"{rank}. {label} {probability:.2f}", fontsize=8)
            predictions.append({"label": label, "class_name": metadata.class_names[index],
                                "index": index, "probability": round(probability, 6)})
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        target = out_dir / name
        try:
            fig.savefig(target, dpi=100)
        except OSError as exc:
            raise ValueError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            plt.close(fig)
        results.append({"image": str(path), "overlay": str(target), "predictions": predictions})
    try:
        (out_dir / "explanations.json").write_text(json.dumps(results, indent=2) + "\n")
    except OSError as exc:
        raise ValueError(f"cannot write {out_dir / 'explanations.json'}: {exc.strerror or exc}") from None
    return results
