from pathlib import Path

import pytest
import torch
import torchvision

from dogbreed import models


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnet50"])
def test_new_head_for_the_classes(arch: str):
    model = models.build_model(arch, 7).eval()
    assert models.head(model, arch).out_features == 7
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_freeze_backbone_trains_only_the_head(arch: str):
    model = models.build_model(arch, 5, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head_prefix = "fc." if arch == "resnet18" else "classifier.1."
    assert trainable == {head_prefix + "weight", head_prefix + "bias"}


def test_local_pth_weights_load_except_a_differently_sized_head(tmp_path: Path):
    source = torchvision.models.resnet18(weights=None)  # 1000-class ImageNet head
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = models.build_model("resnet18", 5, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5


def test_pth_of_another_architecture_is_refused(tmp_path: Path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(models.WeightsError, match="does not fit resnet18"):
        models.build_model("resnet18", 5, weights=str(path))


@pytest.mark.parametrize("content", [b"", b"these are not weights\n", b"PK\x03\x04 not a zip"],
                         ids=["empty", "text", "broken-zip"])
def test_unreadable_pth_is_refused_naming_the_file(tmp_path: Path, content: bytes):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(models.WeightsError, match=f"cannot read weights file {path}"):
        models.build_model("resnet18", 5, weights=str(path))


def test_pth_with_a_backbone_tensor_of_another_shape_is_refused(tmp_path: Path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "resnet18-narrow.pth"
    torch.save(state, path)
    with pytest.raises(models.WeightsError, match="does not fit resnet18.*conv1.weight"):
        models.build_model("resnet18", 5, weights=str(path))


def test_unknown_weights_value_is_refused():
    with pytest.raises(models.WeightsError, match="not 'imagenet', 'none' or an existing"):
        models.build_model("resnet18", 5, weights="/no/such/file.pth")


def test_imagenet_weights_without_network_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # No model hub is reachable here: the real weights API must fail with advice, not a traceback.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_args, **_kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(models.WeightsError, match="BAKE_IMAGENET_WEIGHTS"):
        models.build_model("resnet18", 5, weights="imagenet")


def test_imagenet_weights_load_from_torch_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What a baked image does: the weights file sits in $TORCH_HOME and no download happens."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), cache / Path(weights.url).name)
    model = models.build_model("resnet18", 3, weights="imagenet")
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
