"""`make audit` says when it could not audit, never a false all-clear.

Behind a mirror without PyPI's per-release JSON pages (this machine), pip-audit alone prints
"No known vulnerabilities found" and exits 0; the audit script must exit 2 and say why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dogbreed.contract import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "audit_deps.py"


def test_unreachable_databases_exit_2_and_say_nothing_was_audited() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "DOGBREED_AUDIT_PYPI_URL": f"{closed}/pypi/pip/24.0/json",
           "DOGBREED_AUDIT_OSV_URL": f"{closed}/v1/query"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "unreachable" and report["audited"] is False
    assert set(report["probes"]) == {"pypi", "osv"} and "nothing was audited" in report["message"]
    assert "CVE-2026-0994" in report["accepted"]["advisories"]
