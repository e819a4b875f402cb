"""The files the project ships beside its code, found where the project is installed.

`configs/` (Serve config, Prometheus rules, Grafana dashboards, KubeRay manifests) is a
package of data: the same lookup works from a checkout, an editable install and a wheel
in any virtual environment, so nothing resolves paths relative to the source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(*parts: str) -> Path:
    """The path of a shipped file under `configs/`, e.g. `config_path("serve.yaml")`.

    Raises FileNotFoundError naming the file when the installed package lacks it (a
    wheel built without its package data).
    """
    path = Path(str(files("configs").joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"{'/'.join(parts)} is not in the installed project "
                                f"(looked in {path.parent}): reinstall Event-Pulse")
    return path
