#!/usr/bin/env python3
"""Push the locally built images to Amazon ECR, or to any registry with ``--registry``.

    python scripts/push_images.py --tag 1a2b3c4 dogbreed-train dogbreed-serve
    python scripts/push_images.py --tag 1a2b3c4 --registry 127.0.0.1:5000 dogbreed-train dogbreed-serve
    python scripts/push_images.py --tag 1a2b3c4 --record .dogbreed/pushed-images.json \
        train=dogbreed-train serve=dogbreed-serve

Each local image ``<name>:<tag>`` is pushed as ``<registry>/<name>:<tag>`` and
``<registry>/<name>:latest`` (``--also-tag``). ECR (the default): the account comes from STS,
the region from the boto3 session (``AWS_REGION``/``AWS_DEFAULT_REGION``/profile, or
``--region``); missing repositories are created (scan on push, mutable tags so ``latest`` can
move); ``docker login`` gets the password from ``ecr.get_authorization_token`` on stdin, never
on the command line. With ``--registry`` no AWS call is made and no login is done.
Prints one pushed reference a line (stdout). ``--record FILE`` also writes what was pushed —
per image (``KIND=IMAGE`` names the kind, e.g. ``train=dogbreed-train``) the sha-tag reference
and the registry's digest — where the ``dogbreed`` launcher finds it (default
``.dogbreed/pushed-images.json``; format in ``dogbreed.launcher.sagemaker.images``); jobs then run exactly
the bytes pushed, and ``:latest`` only when asked.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse


class PushError(RuntimeError):
    pass


@dataclass(frozen=True)
class Docker:
    """The docker CLI (``DOCKER`` env or ``docker`` on PATH)."""

    executable: str = "docker"

    def __call__(self, *args: str, stdin: str | None = None) -> None:
        command = [self.executable, *args]
        print("+ " + " ".join(command), file=sys.stderr, flush=True)
        result = subprocess.run(command, input=stdin, text=True,
                                stdin=None if stdin is not None else subprocess.DEVNULL)
        if result.returncode != 0:
            raise PushError(f"{' '.join(command[:3])} ... failed with exit code {result.returncode}")

    def output(self, *args: str) -> str:
        command = [self.executable, *args]
        result = subprocess.run(command, text=True, capture_output=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise PushError(f"{' '.join(command[:3])} ... failed with exit code {result.returncode}: "
                            f"{result.stderr.strip()}")
        return result.stdout


def repository_name(image: str) -> str:
    """``dogbreed-train``, ``dogbreed-train:tag`` or ``some/registry/dogbreed-train`` -> ``dogbreed-train``."""
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def ensure_repositories(ecr, names: Sequence[str]) -> list[str]:
    """Create the ECR repositories that do not exist yet; return the names created."""
    created = []
    for name in names:
        try:
            ecr.describe_repositories(repositoryNames=[name])
        except ecr.exceptions.RepositoryNotFoundException:
            ecr.create_repository(
                repositoryName=name,
                imageTagMutability="MUTABLE",
                imageScanningConfiguration={"scanOnPush": True},
            )
            created.append(name)
            print(f"created ECR repository {name}", file=sys.stderr)
    return created


def ecr_login(session, docker: Docker, repositories: Sequence[str]) -> str:
    """Create missing repositories, ``docker login`` to the account's ECR registry; return its host."""
    account = session.client("sts").get_caller_identity()["Account"]
    region = session.region_name
    if not region:
        raise PushError("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, a profile region, --region)")
    ecr = session.client("ecr", region_name=region)
    ensure_repositories(ecr, repositories)
    data = ecr.get_authorization_token(registryIds=[account])["authorizationData"][0]
    username, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    registry = urlparse(data["proxyEndpoint"]).netloc or f"{account}.dkr.ecr.{region}.amazonaws.com"
    docker("login", "--username", username, "--password-stdin", registry, stdin=password)
    return registry


def split_kind(argument: str) -> tuple[str | None, str]:
    """``train=dogbreed-train`` -> ("train", "dogbreed-train"); a plain image has no kind."""
    kind, sep, image = argument.partition("=")
    return (kind, image) if sep else (None, argument)


def push(docker: Docker, images: Sequence[str], tag: str, registry: str,
         also_tag: Sequence[str] = ("latest",)) -> list[str]:
    """Tag ``<image>:<tag>`` as ``<registry>/<repo>:<t>`` for the tag and each ``also_tag``; push."""
    pushed = []
    for image in images:
        local = f"{image}:{tag}"
        for t in dict.fromkeys([tag, *also_tag]):
            remote = f"{registry.rstrip('/')}/{repository_name(image)}:{t}"
            docker("tag", local, remote)
            docker("push", remote)
            pushed.append(remote)
    return pushed


def pushed_digest(docker: Docker, remote: str) -> str | None:
    """The registry digest of a pushed reference (``sha256:…``), from the engine's RepoDigests."""
    name = remote.rsplit(":", 1)[0]
    digests = json.loads(docker.output("image", "inspect", "--format", "{{json .RepoDigests}}",
                                       remote) or "null") or []
    for item in digests:
        repo, _, digest = item.partition("@")
        if repo == name and digest:
            return digest
    return None


def cuda_labels(docker: Docker, local: str) -> dict[str, str]:
    """The image's ``dogbreed.cuda.*`` labels (CUDA version, minimum driver, compat libraries;
    docker/images.mk): the launcher checks them against the instance's documented driver."""
    labels = json.loads(docker.output("image", "inspect", "--format", "{{json .Config.Labels}}",
                                      local) or "null")
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if k.startswith("dogbreed.cuda.")}


def record_entry(docker: Docker, image: str, tag: str, registry: str) -> dict:
    repository = repository_name(image)
    reference = f"{registry.rstrip('/')}/{repository}:{tag}"
    digest = pushed_digest(docker, reference)
    return {"repository": repository, "reference": reference, "digest": digest,
            "pinned": f"{reference.rsplit(':', 1)[0]}@{digest}" if digest else None,
            "labels": cuda_labels(docker, f"{image}:{tag}")}


def write_record(path: str, registry: str, tag: str, entries: dict[str, dict]) -> None:
    """Write the pushed-images record atomically (the launcher may read it concurrently)."""
    record = {"version": 1, "registry": registry, "tag": tag,
              "pushed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "images": entries}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+",
                        help="local image names (without tag), optionally KIND=IMAGE")
    parser.add_argument("--tag", required=True, help="the local tag to push (make: git short sha)")
    parser.add_argument("--also-tag", action="append", default=None,
                        help="more tags for the same image (default: latest)")
    parser.add_argument("--registry", default=os.environ.get("REGISTRY") or None,
                        help="push here (host[:port][/prefix]) instead of ECR; no AWS calls")
    parser.add_argument("--region", help="AWS region (default: the boto3 session's)")
    parser.add_argument("--profile", help="AWS profile")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker CLI")
    parser.add_argument("--record", metavar="FILE",
                        help="write the pushed references and digests here (JSON)")
    args = parser.parse_args(argv)
    kinds = [split_kind(a) for a in args.images]
    images = [image for _, image in kinds]

    docker = Docker(args.docker)
    also_tag = ["latest"] if args.also_tag is None else args.also_tag
    try:
        registry = args.registry
        if not registry:
            import boto3

            session = boto3.session.Session(profile_name=args.profile, region_name=args.region)
            registry = ecr_login(session, docker, [repository_name(i) for i in images])
        for ref in push(docker, images, args.tag, registry, also_tag):
            print(ref)
        if args.record:
            entries = {kind or repository_name(image): record_entry(docker, image, args.tag, registry)
                       for kind, image in kinds}
            write_record(args.record, registry, args.tag, entries)
            print(f"recorded {', '.join(entries)} in {args.record}", file=sys.stderr)
    except PushError as exc:
        print(f"push_images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
