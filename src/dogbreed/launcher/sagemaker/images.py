"""Which train/serve image a SageMaker request names: what ``make push`` pushed, by digest.

``make push`` (scripts/push_images.py ``--record``) writes ``<workdir>/pushed-images.json``::

    {"version": 1, "registry": "<account>.dkr.ecr.<region>.amazonaws.com", "tag": "<sha>",
     "pushed_at": "...", "images": {"train": {"repository": "dogbreed-train",
       "reference": "<registry>/dogbreed-train:<sha>", "digest": "sha256:…",
       "pinned": "<registry>/dogbreed-train@sha256:…"}, "serve": {…}}}

The launcher names the ``pinned`` reference (the exact bytes pushed; a later push or a moved tag
cannot change what a job runs), else the sha tag. ``:latest`` only when asked (``--latest-images``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dogbreed.launcher import events
from dogbreed.launcher.settings import SERVE_REPOSITORY, TRAIN_REPOSITORY, Settings, SettingsError

RECORD_NAME = "pushed-images.json"
REPOSITORIES = {"train": TRAIN_REPOSITORY, "serve": SERVE_REPOSITORY}
_ECR_HOST = re.compile(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?")


def record_path(settings: Settings) -> Path:
    return Path(settings.pushed_images).expanduser() if settings.pushed_images \
        else settings.workdir_path / RECORD_NAME


def load_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("images"), dict):
            raise ValueError("no images table")
    except ValueError as exc:
        raise SettingsError(f"{path}: not a pushed-images record ({exc}); rerun `make push`") from None
    return record


def ecr_region(reference: str) -> str | None:
    """The region of an ECR image reference (None for another registry)."""
    match = _ECR_HOST.match(reference)
    return match.group(2) if match else None


def pushed_reference(record: dict[str, Any], kind: str, region: str, path: Path) -> str:
    """The pushed ``kind`` image for a job in ``region`` (pinned by digest when known); an image
    pushed without ``KIND=`` is found by its default repository name."""
    entry = record["images"].get(kind) or record["images"].get(REPOSITORIES[kind])
    if not entry:
        raise SettingsError(f"{path} records no {kind} image; rerun `make push` or pass --{kind}-image")
    reference = entry.get("pinned") or entry["reference"]
    pushed_region = ecr_region(reference)
    if pushed_region is None:
        events.warning("pushed_image_not_in_ecr", kind=kind, image=reference,
                       note="SageMaker pulls training and serving images from ECR only")
    elif pushed_region != region:
        raise SettingsError(
            f"the {kind} image was pushed to {pushed_region} ({reference}) but the session's region "
            f"is {region}: SageMaker pulls from its own region; `make push` with AWS_REGION={region}, "
            f"or pass --{kind}-image")
    return reference
