"""No known vulnerability in the project's direct dependencies (pip-audit, PyPI's data)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def direct_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project.get("optional-dependencies", {}).values()
                                       for d in group]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_direct_dependencies_have_no_known_vulnerabilities(tmp_path):
    audit = shutil.which("pip-audit", path=str(Path(sys.executable).parent)) or shutil.which("pip-audit")
    assert audit, "pip-audit is part of the test extras: pip install -e '.[test]'"
    out = tmp_path / "audit.json"
    run = subprocess.run([audit, "--local", "--skip-editable", "--format", "json",
                          "--progress-spinner", "off", "--output", str(out),
                          "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300)
    if not out.exists():
        pytest.fail(f"pip-audit could not run (PyPI unreachable?): {run.stderr[-2000:]}")
    report = json.loads(out.read_text())
    direct = direct_dependencies()
    vulnerable = {d["name"].lower(): [v["id"] for v in d.get("vulns", [])]
                  for d in report["dependencies"] if d.get("vulns")}
    ours = {name: ids for name, ids in vulnerable.items() if name in direct}
    assert not ours, f"known vulnerabilities in direct dependencies: {ours}"
    assert len(report["dependencies"]) > len(direct) / 2  # it really audited the environment
