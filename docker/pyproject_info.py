"""Read pyproject.toml for the image builds: the dependency list and the version.

    python3 docker/pyproject_info.py [--pyproject PATH] requirements train serve
    python3 docker/pyproject_info.py [--pyproject PATH] version

``requirements`` prints the build-system requirements, the core dependencies and the
dependencies of the named extras (deduplicated, in order). The shared dependency stage of
the images installs exactly these, so the torch layer is rebuilt only when this list changes,
not when the package code or other pyproject fields do. Runs on Python >= 3.10 with no
third-party imports (pip's vendored tomli stands in for tomllib on 3.10).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def load(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def requirements(data: dict, extras: list[str]) -> list[str]:
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {', '.join(unknown)}; pyproject has {', '.join(optional)}")
    reqs = [*data.get("build-system", {}).get("requires", []), *project.get("dependencies", [])]
    for extra in extras:
        reqs += optional[extra]
    return list(dict.fromkeys(r.strip() for r in reqs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("what", choices=("requirements", "version"))
    parser.add_argument("extras", nargs="*", help="extras whose dependencies to add (requirements)")
    args = parser.parse_args(argv)
    data = load(args.pyproject)
    if args.what == "version":
        print(data["project"]["version"])
    else:
        print("\n".join(requirements(data, args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
