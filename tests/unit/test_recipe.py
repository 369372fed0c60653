"""Recipe primitives: validation, per-knob on/off behaviour, determinism, batch-wise execution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
from torch import nn

from dogbreed import artifacts, contract, data, models, recipe, train
from dogbreed.contract import ContractError

N, SIZE, CACHE, CLASSES = 12, 32, 37, 5


def _batch(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, CACHE, CACHE), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % CLASSES


def _augment(seed: int = 0, **knobs: object) -> tuple[torch.Tensor, torch.Tensor]:
    hp = contract.parse_hyperparameters({"image-size": SIZE, "weights": "imagenet", **knobs})
    images, labels = _batch()
    return recipe.TrainAugment(hp, CLASSES)(images, labels, torch.Generator().manual_seed(seed))


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,fragment", [
    ("augment", "autoaugment", "none, flip, trivialaugment"),
    ("random-erasing", "1.5", "[0.0, 1.0]"),
    ("mixup-alpha", "-0.1", "[0.0, 10.0]"),
    ("cutmix-alpha", "11", "[0.0, 10.0]"),
    ("ema-decay", "1.0", "[0.0, 0.99999]"),
    ("warmup-epochs", "-1", "[0, 100]"),
    ("warmup-epochs", "0.5", "whole number"),
    ("eval-image-size", "16", "[32, 1024]"),
    ("eval-image-size", "2048", "[0, 1024]"),
])
def test_recipe_knobs_are_validated_with_their_valid_range(key: str, value: str, fragment: str):
    with pytest.raises(ContractError, match=key) as info:
        contract.parse_hyperparameters({key: value})
    assert fragment in str(info.value)


def test_bad_recipe_knob_fails_the_job_with_a_failure_file(tmp_path: Path, sample_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    paths = contract.prepare_local_job(tmp_path, {"augment": "randaugment", "weights": "none"},
                                       {"training": sample_data})
    monkeypatch.setenv(contract.BASE_DIR_ENV, str(tmp_path))
    assert train.main([]) == train.EXIT_FAILURE
    assert "augment='randaugment': choose one of none, flip, trivialaugment" in paths.failure_file.read_text()


def test_defaults_depend_on_the_starting_point(monkeypatch: pytest.MonkeyPatch):
    finetune = contract.parse_hyperparameters({"weights": "imagenet"})
    assert finetune == contract.Hyperparameters(weights="imagenet")  # today's behaviour
    assert (finetune.augment, finetune.ema_decay, finetune.mixup_alpha) == ("flip", 0.0, 0.0)
    # Scratch runs take SCRATCH_DEFAULTS over those defaults; explicit values win.
    scratch = contract.parse_hyperparameters({"weights": "none"})
    assert (scratch.optimizer, scratch.lr, scratch.batch_size, scratch.lr_schedule) == ("adamw", 1e-3, 16, "cosine")
    assert contract.parse_hyperparameters({"weights": "/x/w.pth"}).optimizer == "sgd"
    # An lr given alone was chosen for SGD (AdamW at 0.01 diverges from scratch): it keeps SGD.
    lr_only = contract.parse_hyperparameters({"weights": "none", "lr": "0.05"})
    assert (lr_only.optimizer, lr_only.lr, lr_only.batch_size) == ("sgd", 0.05, 16)
    # Without an lr, each optimizer starts from its own (torch.optim's AdamW default for adamw).
    assert contract.parse_hyperparameters({"weights": "none", "optimizer": "sgd"}).lr == 0.01
    assert contract.parse_hyperparameters({"weights": "imagenet", "optimizer": "adamw"}).lr == 1e-3
    assert contract.parse_hyperparameters({"optimizer": "adamw", "lr": "0.02"}).lr == 0.02
    assert contract.recipe_defaults("none")["optimizer"] == "adamw"
    assert contract.recipe_defaults("imagenet") == contract.Hyperparameters().to_dict()
    help_text = " ".join(contract.build_arg_parser_help().format_help().split())
    assert "(adamw with weights=none)" in help_text and "0.01 with sgd, 0.001 with adamw" in help_text
    monkeypatch.setattr(contract, "SCRATCH_DEFAULTS", {"augment": "trivialaugment", "ema_decay": 0.99})
    assert contract.parse_hyperparameters({"weights": "/x/w.pth"}).augment == "flip"
    scratch = contract.parse_hyperparameters({"weights": "none"})
    assert (scratch.augment, scratch.ema_decay) == ("trivialaugment", 0.99)
    explicit = contract.parse_hyperparameters({"weights": "none", "augment": "flip", "ema-decay": "0"})
    assert (explicit.augment, explicit.ema_decay) == ("flip", 0.0)
    assert contract.recipe_defaults("none")["augment"] == "trivialaugment"
    assert contract.recipe_defaults("imagenet")["augment"] == "flip"
    contract.parse_hyperparameters({**contract.RECIPE_CANDIDATE, "weights": "none"})  # valid


# --- augmentation: shape, determinism, effect ---------------------------------------------------
def test_augment_none_is_the_evaluation_crop_and_flip_is_the_previous_pipeline():
    images, labels = _batch()
    x, y = _augment(augment="none")
    assert torch.allclose(x, data.eval_transform(images, SIZE)) and torch.equal(y, labels)
    x, _ = _augment(augment="flip", seed=3)
    assert torch.allclose(x, data.normalize(data.random_resized_crop_flip(images, SIZE, torch.Generator().manual_seed(3)), data.IMAGENET_MEAN, data.IMAGENET_STD))


@pytest.mark.parametrize("knobs", [
    {"augment": "trivialaugment"},
    {"random-erasing": "1.0"},
    {"mixup-alpha": "0.4"},
    {"cutmix-alpha": "1.0"},
    {"augment": "trivialaugment", "random-erasing": "0.5", "mixup-alpha": "0.2", "cutmix-alpha": "1.0"},
])
def test_each_augmentation_keeps_shape_is_seeded_and_changes_the_batch(knobs: dict[str, str]):
    base, _ = _augment(seed=1)
    a, ya = _augment(seed=1, **knobs)
    b, yb = _augment(seed=1, **knobs)
    c, _ = _augment(seed=2, **knobs)
    assert a.shape == (N, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(ya, yb)  # same seed, same batch
    assert not torch.equal(a, c)  # another seed, another batch
    assert not torch.allclose(a, base)  # the knob does something
    mixing = "mixup-alpha" in knobs or "cutmix-alpha" in knobs
    if mixing:
        assert ya.shape == (N, CLASSES) and torch.allclose(ya.sum(1), torch.ones(N))
    else:
        assert ya.dtype == torch.int64 and ya.shape == (N,)


def test_random_erasing_zeroes_one_box_per_sample_at_probability_one():
    x, _ = _augment(seed=0, **{"random-erasing": "1.0"})
    base, _ = _augment(seed=0)
    erased = (x != base).any(1)  # [N,H,W]
    assert erased.flatten(1).any(1).all()  # every sample got a box
    assert (x.permute(1, 0, 2, 3)[:, erased] == 0).all()  # set to 0 (the normalised mean)
    fraction = erased.float().mean(dim=(1, 2))
    assert (fraction <= recipe.ERASE_SCALE[1] + 0.05).all()


def test_mixup_targets_mix_two_labels_with_the_image_weights():
    _, labels = _batch()
    x, y = _augment(seed=5, **{"mixup-alpha": "0.4"})
    lam = y[0, labels[0]].item()  # torchvision mixes each sample with the previous one (roll 1)
    flipped, _ = _augment(seed=5)
    assert torch.allclose(x, lam * flipped + (1 - lam) * flipped.roll(1, 0), atol=1e-4)


def test_trivial_augment_uses_torchvisions_op_set_and_magnitudes():
    reference = T.TrivialAugmentWide._AUGMENTATION_SPACE
    assert [name for name, _, _ in recipe.TA_OPS] == list(reference)
    for name, magnitudes, signed in recipe.TA_OPS:
        make, ref_signed = reference[name]
        ref = make(recipe.TA_BINS, 224, 224)
        assert signed == ref_signed
        assert (magnitudes is None) == (ref is None)
        if ref is not None:
            assert torch.allclose(magnitudes.float(), ref.float()), name


def test_trivial_augment_ops_are_torchvisions_own():
    images, _ = _batch(n=2)
    crop = images[:, :, :SIZE, :SIZE].contiguous()
    import torchvision.transforms.v2.functional as TF

    assert torch.equal(recipe.apply_ta_op(crop, "Brightness", 0.5, SIZE), TF.adjust_brightness(crop, 1.5))
    assert torch.equal(recipe.apply_ta_op(crop, "Posterize", 4, SIZE), TF.posterize(crop, 4))
    rotated = recipe.apply_ta_op(crop, "Rotate", 30.0, SIZE)
    assert torch.equal(rotated, TF.rotate(crop, 30.0, interpolation=TF.InterpolationMode.BILINEAR))


def test_no_per_image_python_loop_in_the_augmentation(monkeypatch: pytest.MonkeyPatch):
    """The batch pipeline issues a bounded number of batched ops, whatever the batch size."""
    calls: list[int] = []
    real = recipe.apply_ta_op

    def counting(images: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(images.shape[0])
        return real(images, *args)

    monkeypatch.setattr(recipe, "apply_ta_op", counting)
    erase_calls, mix_calls = [], []
    real_erase, real_mix = recipe.random_erase, recipe.BatchMix.__call__
    monkeypatch.setattr(recipe, "random_erase", lambda *a: erase_calls.append(1) or real_erase(*a))
    monkeypatch.setattr(recipe.BatchMix, "__call__",
                        lambda self, *a: mix_calls.append(1) or real_mix(self, *a))
    hp = contract.parse_hyperparameters({"image-size": SIZE, "augment": "trivialaugment",
                                         "random-erasing": "0.5", "mixup-alpha": "0.2",
                                         "cutmix-alpha": "1.0", "weights": "none"})
    pipeline = recipe.TrainAugment(hp, CLASSES)
    for n in (8, 256):
        calls.clear(), erase_calls.clear(), mix_calls.clear()
        images = torch.randint(0, 256, (n, 3, CACHE, CACHE), dtype=torch.uint8)
        x, _ = pipeline(images, torch.arange(n) % CLASSES, torch.Generator().manual_seed(0))
        assert x.shape[0] == n
        assert len(calls) <= len(recipe.TA_OPS) - 1  # one call per op drawn (Identity needs none)
        assert sum(calls) <= n and (n < 64 or max(calls) > 1)  # ops run on groups of samples
        assert len(erase_calls) == 1 and len(mix_calls) == 1


def test_mixing_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _augment(seed=0, **{"mixup-alpha": "0.2", "cutmix-alpha": "1.0"})
    assert torch.equal(torch.rand(3), expected)


# --- EMA and schedule ---------------------------------------------------------------------------
def test_ema_warms_up_then_lags_the_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = recipe.WeightEma(model, decay=0.9)
    ema.update(model)  # first update copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = ema.module[0].weight.clone()
    decay = ema.current_decay()
    assert decay == pytest.approx(2 / 11)  # warm-up: min(0.9, (1 + 1) / (10 + 1))
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, decay * before + (1 - decay) * model[0].weight)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    state = ema.state_dict()
    other = recipe.WeightEma(model, decay=0.9)
    other.load_state_dict(state)
    assert other.updates == ema.updates and torch.equal(other.module[0].weight, ema.module[0].weight)


def test_warmup_then_cosine_schedule():
    hp = contract.parse_hyperparameters({"lr": "0.1", "epochs": "6", "warmup-epochs": "2", "weights": "imagenet"})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=hp.lr)
    sched = recipe.make_scheduler(hp, opt)
    lrs = []
    for _ in range(hp.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[0] < lrs[1] < lrs[2] == pytest.approx(0.1)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine over the 4 epochs left
    no_warmup = contract.parse_hyperparameters({"lr": "0.1", "epochs": "6", "weights": "imagenet"})
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert type(recipe.make_scheduler(no_warmup, opt2)) is torch.optim.lr_scheduler.CosineAnnealingLR
    # warmup-epochs ≥ epochs (an HPO trial with few epochs) leaves one epoch at the full schedule.
    clamped = contract.parse_hyperparameters({"epochs": "2", "warmup-epochs": "5", "weights": "imagenet"})
    opt3 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    messages: list[str] = []
    sched3 = recipe.make_scheduler(clamped, opt3, log=messages.append)
    first = opt3.param_groups[0]["lr"]
    opt3.step()
    sched3.step()
    assert first == pytest.approx(0.001) and opt3.param_groups[0]["lr"] == pytest.approx(0.1)
    assert messages == ["event=warmup_clamped warmup_epochs=5 epochs=2 used=1"]


# --- through the real training loop ---------------------------------------------------------------
def test_training_with_every_knob_saves_ema_weights_and_fixres_size(
        tmp_path: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch):
    op_calls: list[int] = []
    real = recipe.apply_ta_op
    monkeypatch.setattr(recipe, "apply_ta_op", lambda images, *a: op_calls.append(len(images)) or real(images, *a))
    hps = {"model": "resnet18", "epochs": "1", "batch-size": "16", "image-size": "32",
           "eval-image-size": "40", "weights": "none", "augment": "trivialaugment",
           "random-erasing": "0.25", "mixup-alpha": "0.2", "cutmix-alpha": "1.0",
           "ema-decay": "0.9", "warmup-epochs": "1", "num-workers": "1"}
    paths = contract.prepare_local_job(tmp_path, hps, {"training": sample_data})
    hp = contract.parse_hyperparameters(hps)
    result = train.run(hp, paths, device=torch.device("cpu"))
    assert result.history and 0.0 <= result.metrics["test_accuracy"] <= 1.0
    # The training step augments batches: ≤ 13 batched op calls per batch of 16, not one per image.
    batches = 80 // 16
    assert 0 < len(op_calls) <= batches * (len(recipe.TA_OPS) - 1) and sum(op_calls) <= 80
    assert max(op_calls) > 1  # 16 samples over 14 ops: some op ran on a group
    meta = json.loads((paths.model_dir / artifacts.METADATA_FILE).read_text())
    # Serving centre-crops model.json's image_size from resize_size: the FixRes eval geometry.
    assert (meta["image_size"], meta["resize_size"]) == data.eval_geometry(32, 40) == (40, 46)
    assert meta["hyperparameters"]["image_size"] == 32
    checkpoint = torch.load(paths.checkpoints_dir / train.CHECKPOINT_FILE, weights_only=True)
    ema = checkpoint["recipe"]["ema"]
    assert ema["updates"] == 5  # 80 images / 16 per batch
    saved = torch.load(paths.model_dir / artifacts.WEIGHTS_FILE, weights_only=True)
    ema_weights = {k.removeprefix("module."): v for k, v in ema["averaged"].items() if k.startswith("module.")}
    assert torch.equal(saved["fc.weight"], ema_weights["fc.weight"])
    assert not torch.equal(saved["fc.weight"], checkpoint["model"]["fc.weight"])  # not the raw weights
    # A resumed run restores the EMA (what train.run does with checkpoint["recipe"]).
    resumed = recipe.Recipe(hp, models.build_model("resnet18", CLASSES, "none"), CLASSES)
    resumed.load_state_dict(checkpoint["recipe"])
    assert resumed.ema is not None and resumed.ema.updates == 5
    assert torch.equal(resumed.eval_model(nn.Identity()).state_dict()["fc.weight"], saved["fc.weight"])
