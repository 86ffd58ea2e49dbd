"""The example plugin package (examples/plugins), installed with pip into a folder of its own, and
put on ``sys.path`` for a while (in this process) or on ``PYTHONPATH`` (for ``icsd`` subprocesses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins"


def pip_install(project: Path, target: Path) -> Path:
    """``pip install --target`` of a local project, offline (no index, no build isolation); the
    project is copied first, so the build leaves nothing in the repository."""
    source = target.parent / f"{project.name}-source"
    shutil.copytree(project, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([*cmd, "--target", str(target), str(source)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


@contextmanager
def on_sys_path(folder: Path) -> Iterator[None]:
    """The packages installed in ``folder`` are importable and their entry points registered."""
    from icsd.registry import rescan_plugins

    sys.path.insert(0, str(folder))
    rescan_plugins()
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        rescan_plugins()
        for name in [m for m in sys.modules if m.split(".")[0] == "icsd_example_plugins"]:
            del sys.modules[name]


def env_with(folder: Path) -> dict[str, str]:
    """The environment of an ``icsd`` subprocess that sees the packages installed in ``folder``."""
    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1"}
