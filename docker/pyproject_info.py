"""Read pyproject.toml for the image builds: the dependency list and the version.

    python3 docker/pyproject_info.py [--pyproject PATH] requirements train serve
    python3 docker/pyproject_info.py [--pyproject PATH] requirements --pin torch==2.10.0 train serve
    python3 docker/pyproject_info.py [--pyproject PATH] version

``requirements`` prints the build-system requirements, the core dependencies and the
dependencies of the named extras (deduplicated, in order). ``--pin NAME==VERSION`` replaces
that project's requirement with the exact pin, after checking the pin lies inside the range
pyproject.toml allows (the images pin the torch build their CUDA needs; the package's own
metadata must still accept it, or `pip check` in the image fails). The shared dependency stage of
the images installs exactly these, so the torch layer is rebuilt only when this list changes,
not when the package code or other pyproject fields do. Runs on Python >= 3.10 with no
third-party imports (pip's vendored tomli stands in for tomllib on 3.10).
"""

from __future__ import annotations

import argparse
import re
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


def _name(requirement: str) -> str:
    return re.split(r"[\s\[;<>=!~(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pin(reqs: list[str], pins: list[str]) -> list[str]:
    """``reqs`` with each pinned project's requirement replaced by its ``name==version`` pin."""
    from pip._vendor.packaging.requirements import Requirement

    by_name = {}
    for spec in pins:
        wanted = Requirement(spec)
        versions = [s.version for s in wanted.specifier if s.operator == "=="]
        if len(versions) != 1 or len(wanted.specifier) != 1:
            raise SystemExit(f"--pin {spec}: expected NAME==VERSION")
        by_name[_name(wanted.name)] = (spec, versions[0])
    out, seen = [], set()
    for req in reqs:
        name = _name(req)
        if name in by_name:
            spec, version = by_name[name]
            allowed = Requirement(req).specifier
            if not allowed.contains(version, prereleases=True):
                raise SystemExit(f"--pin {spec}: pyproject.toml requires {req!r}; widen it first")
            out.append(spec)
            seen.add(name)
        else:
            out.append(req)
    missing = sorted(set(by_name) - seen)
    if missing:
        raise SystemExit(f"--pin: {', '.join(missing)} not among the requirements")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("what", choices=("requirements", "version"))
    parser.add_argument("extras", nargs="*", help="extras whose dependencies to add (requirements)")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                        help="replace that requirement with this exact version (requirements)")
    args = parser.parse_args(argv)
    data = load(args.pyproject)
    if args.what == "version":
        print(data["project"]["version"])
    else:
        print("\n".join(pin(requirements(data, args.extras), args.pin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
