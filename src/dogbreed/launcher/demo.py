"""``dogbreed demo``: from the sample data to predictions from two models behind one endpoint.

Trains ResNet18 and MobileNetV2 with the local backend (small epochs and image size so a CPU
finishes in minutes), puts both in a fresh model store, starts the local multi-model endpoint
(MMS + the TargetModel router), invokes each model through boto3's own ``sagemaker-runtime``
client — the same call as against SageMaker, only ``endpoint_url`` differs — prints the
predictions and where the artifacts and plots are, and stops everything it started.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from dogbreed.launcher import events
from dogbreed.launcher.settings import Settings, SettingsError

MODELS = (("resnet18", "dog-breed-classifier"), ("mobilenet_v2", "dog-breed-mobilenet"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def pick_test_image(data: Path) -> tuple[Path, str]:
    for split in ("test", "valid", "train"):
        for class_dir in sorted(p for p in (data / split).glob("*") if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                return images[0], class_dir.name
    raise SettingsError(f"no images under {data}/test, valid or train")


def run_demo(settings: Settings, *, data: Path, epochs: int = 2, image_size: int = 64,
             batch_size: int | None = None, lr: float | None = None, weights: str = "none") -> dict[str, Any]:
    from dogbreed.launcher.invoke import (  # lazy: demo only
        format_predictions,
        invoke_runtime,
        runtime_client,
    )
    from dogbreed.launcher.local.backend import LocalBackend  # lazy: demo only

    started = time.monotonic()
    data = Path(data)
    image, true_class = pick_test_image(data)
    workdir = settings.workdir_path / "demo"
    # A fresh store: the demo's endpoint serves exactly the two models it trained.
    shutil.rmtree(workdir / "models", ignore_errors=True)
    local = LocalBackend(dataclasses.replace(settings, workdir=str(workdir),
                                             endpoint_name="dogbreed-demo"))
    trained = {}
    for arch, name in MODELS:
        hps = {"model": arch, "epochs": str(epochs), "image-size": str(image_size), "weights": weights,
               **({"batch-size": str(batch_size)} if batch_size is not None else {}),
               **({"lr": repr(lr)} if lr is not None else {})}
        job = local.train(name=f"demo-{arch.replace('_', '')}", hyperparameters=hps, data=data,
                          echo=False)
        added = local.add_model(name, training_job=job["training_job"])
        trained[name] = {**job, **added}

    results: dict[str, Any] = {"image": str(image), "true_class": true_class, "models": {}}
    with local.endpoint(port=0) as endpoint:
        client = runtime_client(endpoint.url, settings.region)
        print(f"\nlocal multi-model endpoint {endpoint.url} (MMS at {endpoint.model_server_url})")
        print(f"test image {image} (true class {true_class})\n")
        for _, name in MODELS:
            target = trained[name]["target_model"]
            answer = invoke_runtime(client, "dogbreed-demo", target, image, top_k=3)
            print(f"TargetModel={target}")
            print(format_predictions(answer))
            results["models"][name] = {"target_model": target, "prediction": answer,
                                       "valid_accuracy": trained[name]["final_metrics"]["best_epoch"].get("valid_accuracy"),
                                       "model_data": trained[name]["model_data"],
                                       "plots": trained[name]["output_data"]}
    print("\nartifacts and plots:")
    for name, info in trained.items():
        print(f"  {name}: model {info['model_data']}")
        print(f"  {' ' * len(name)}  plots {info['output_data']} "
              f"(training_curves.png, confusion_matrix.png, metrics.json)")
    results["seconds"] = round(time.monotonic() - started, 1)
    print(f"\ndemo finished in {results['seconds']:.0f}s; endpoint and model server stopped\n")
    events.event("demo_completed", seconds=results["seconds"], workdir=workdir)
    return results
