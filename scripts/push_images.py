#!/usr/bin/env python3
"""Push the locally built images to Amazon ECR, or to any registry with ``--registry``.

    python scripts/push_images.py --tag 1a2b3c4 dogbreed-train dogbreed-serve
    python scripts/push_images.py --tag 1a2b3c4 --registry 127.0.0.1:5000 dogbreed-train dogbreed-serve

Each local image ``<name>:<tag>`` is pushed as ``<registry>/<name>:<tag>`` and
``<registry>/<name>:latest`` (``--also-tag``). ECR (the default): the account comes from STS,
the region from the boto3 session (``AWS_REGION``/``AWS_DEFAULT_REGION``/profile, or
``--region``); missing repositories are created (scan on push, mutable tags so ``latest`` can
move); ``docker login`` gets the password from ``ecr.get_authorization_token`` on stdin, never
on the command line. With ``--registry`` no AWS call is made and no login is done.
Prints one pushed reference a line (stdout).
"""

from __future__ import annotations

import argparse
import base64
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="local image names (without tag)")
    parser.add_argument("--tag", required=True, help="the local tag to push (make: git short sha)")
    parser.add_argument("--also-tag", action="append", default=None,
                        help="more tags for the same image (default: latest)")
    parser.add_argument("--registry", default=os.environ.get("REGISTRY") or None,
                        help="push here (host[:port][/prefix]) instead of ECR; no AWS calls")
    parser.add_argument("--region", help="AWS region (default: the boto3 session's)")
    parser.add_argument("--profile", help="AWS profile")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker CLI")
    args = parser.parse_args(argv)

    docker = Docker(args.docker)
    also_tag = ["latest"] if args.also_tag is None else args.also_tag
    try:
        registry = args.registry
        if not registry:
            import boto3

            session = boto3.session.Session(profile_name=args.profile, region_name=args.region)
            registry = ecr_login(session, docker, [repository_name(i) for i in args.images])
        for ref in push(docker, args.images, args.tag, registry, also_tag):
            print(ref)
    except PushError as exc:
        print(f"push_images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
