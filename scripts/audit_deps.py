"""Dependency audit: pip-audit over the environment ``make install`` resolved, JSON on stdout.

    python scripts/audit_deps.py            # make audit

pip-audit needs a vulnerability database: PyPI's JSON API (``/pypi/<name>/json`` carries each
release's advisories) or OSV (api.osv.dev). Behind a package mirror that serves only the simple
index, pip-audit's PyPI service answers "not found on PyPI" for every package and prints "No
known vulnerabilities found" with exit 0 — a false all-clear. So the databases are probed
first, and an audit that could not run says so and exits 2.

Exit status: 0 audited, no advisory beyond the accepted ones; 1 advisories found (listed);
2 no vulnerability database reachable (or it does not cover every package), nothing audited;
3 pip-audit itself failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

# pip-audit asks PyPI per release (/pypi/<name>/<version>/json): probe exactly that, since a
# mirror may serve /pypi/<name>/json (measured here: 200) but no per-release page (404).
PYPI_PROBE_URL = os.environ.get("DOGBREED_AUDIT_PYPI_URL", "https://pypi.org/pypi/pip/24.0/json")
OSV_PROBE_URL = os.environ.get("DOGBREED_AUDIT_OSV_URL", "https://api.osv.dev/v1/query")
PROBE_TIMEOUT_S = 10

# Advisories accepted with a reason (pip-audit --ignore-vuln; IDs and their aliases).
ACCEPTED = {
    "GHSA-8qvm-5x2c-j2w7": "protobuf 3.20.3 (CVE-2025-4565, fixed in 4.25.8/5.29.5/6.31.1)",
    "CVE-2025-4565": "alias of GHSA-8qvm-5x2c-j2w7",
    "GHSA-7gcm-g887-7qv7": "protobuf 3.20.3 (CVE-2026-0994, fixed in 5.29.6/6.33.5)",
    "CVE-2026-0994": "alias of GHSA-7gcm-g887-7qv7",
}
ACCEPTED_REASON = (
    "smdebug 1.0.34 (its last release) and sagemaker-training 4.x declare protobuf<=3.20.3, so "
    "pip cannot resolve a fixed protobuf next to them (see pyproject.toml). Exposure: protobuf "
    "here only parses tensor files the training job itself wrote (smdebug); no request path "
    "parses protobuf and nothing calls json_format.ParseDict."
)


def probe_pypi() -> str | None:
    """None when PyPI's JSON API answers with advisory data, else why not."""
    try:
        with urllib.request.urlopen(PYPI_PROBE_URL, timeout=PROBE_TIMEOUT_S) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{PYPI_PROBE_URL}: {exc}"
    return None if "vulnerabilities" in body else f"{PYPI_PROBE_URL}: no advisory data in the answer"


def probe_osv() -> str | None:
    query = json.dumps({"package": {"name": "pip", "ecosystem": "PyPI"}, "version": "1.0"}).encode()
    request = urllib.request.Request(OSV_PROBE_URL, data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{OSV_PROBE_URL}: {exc}"
    return None


def run_pip_audit(service: str) -> tuple[int, dict[str, Any], str]:
    command = [sys.executable, "-m", "pip_audit", "--strict", "--skip-editable", "--progress-spinner",
               "off", "--vulnerability-service", service, "--format", "json"]
    for advisory in ACCEPTED:
        command += ["--ignore-vuln", advisory]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    try:
        report = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        report = {}
    return result.returncode, report, result.stderr[-2000:]


def main() -> int:
    failures = {}
    service = None
    for name, probe in (("pypi", probe_pypi), ("osv", probe_osv)):
        failures[name] = probe()
        if failures[name] is None:
            service = name
            break
    accepted = {"advisories": sorted(ACCEPTED), "reason": ACCEPTED_REASON}
    if service is None:
        print(json.dumps({"status": "unreachable", "audited": False, "probes": failures,
                          "message": "no vulnerability database is reachable from this machine "
                                     "(PyPI JSON API or OSV): nothing was audited",
                          "accepted": accepted}, indent=2))
        return 2
    code, report, stderr = run_pip_audit(service)
    found = [{"name": dep["name"], "version": dep["version"],
              "advisories": [v["id"] for v in dep.get("vulns", [])],
              "fix_versions": sorted({f for v in dep.get("vulns", []) for f in v.get("fix_versions", [])})}
             for dep in report.get("dependencies", []) if dep.get("vulns")]
    if "could not be audited" in stderr:  # --strict: a package the database does not know
        print(json.dumps({"status": "incomplete", "audited": False, "service": service,
                          "message": "the vulnerability database does not cover every installed "
                                     "package: nothing was audited", "stderr": stderr}, indent=2))
        return 2
    if code not in (0, 1) or not report:
        print(json.dumps({"status": "error", "audited": False, "service": service,
                          "pip_audit_exit": code, "stderr": stderr}, indent=2))
        return 3
    print(json.dumps({"status": "advisories" if found else "clean", "audited": True,
                      "service": service, "dependencies": len(report.get("dependencies", [])),
                      "found": found, "accepted": accepted}, indent=2))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
