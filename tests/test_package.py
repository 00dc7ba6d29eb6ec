"""Issue 22: the built wheel runs everything outside a source checkout: its configs by name, the viewer's assets,
and a small end-to-end run (synth → process → train with a packaged CPU config → score), from a temporary
directory, in a fresh virtual environment.

The dependencies: by default the fresh environment reaches the project's own locked environment (this
interpreter's site-packages, built by ``make`` from ``requirements.lock``) through a ``.pth`` path line, so the
5.5 GB torch build is not copied again; this environment's editable install of the checkout is *not* visible there
(a path line does not run the ``.pth`` files of the folder it names), so ``wsi_ad`` and ``pipelines`` come from the
wheel alone. ``WSI_AD_TEST_FULL_INSTALL=1`` installs the wheel with every locked dependency into the fresh
environment instead (several minutes, ~7 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh virtual environment outside the checkout with the wheel of this checkout installed: (its bin folder,
    the environment to run it with)."""
    root = tmp_path_factory.mktemp("package")
    wheels = root / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels),
          str(REPO_ROOT)], cwd=root, env=env)
    (wheel,) = wheels.glob("wsi_ad-*.whl")
    target = root / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    if os.environ.get("WSI_AD_TEST_FULL_INSTALL") == "1":
        _run([str(python), "-m", "pip", "install", "--quiet", "-c", str(REPO_ROOT / "requirements.lock"), str(wheel)],
             cwd=root, env=env, timeout=3600)
    else:
        _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], cwd=root, env=env)
        site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=root, env=env).strip())
        (site / "zz_locked_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target / "bin", env


def test_the_wheel_runs_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    wsi_ad = str(bin_dir / "wsi-ad")
    where = _run([str(bin_dir / "python"), "-c", "import wsi_ad, pipelines; print(wsi_ad.__file__, pipelines.__file__)"],
                 cwd=tmp_path, env=env)
    assert str(REPO_ROOT) not in where and "site-packages" in where
    assert _run([wsi_ad, "--version"], cwd=tmp_path, env=env).startswith("wsi-ad ")
    listing = _run([wsi_ad, "configs"], cwd=tmp_path, env=env)
    names = [line.split()[0] for line in listing.splitlines()]
    assert {"camelyon16_paper", "demo_cpu", "small_cpu", "knn_cpu", "tune_space_cpu", "ablations/dpa_pg_cpu"} <= set(names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in listing.splitlines())       # a summary each

    _run([wsi_ad, "synth", "data", "--normal", "1", "--tumor", "0", "--test", "1", "--size", "4096"], cwd=tmp_path, env=env)
    _run([wsi_ad, "process", "data/training/normal", "--out", "stores", "--workers", "1"], cwd=tmp_path, env=env)
    _run([wsi_ad, "process", "data/testing/images", "--out", "test_stores", "--workers", "1"], cwd=tmp_path, env=env)
    _run([wsi_ad, "--threads", "1", "train", "stores", "--out", "model.pt", "--config", "small_cpu",
          "--set", "dpa.flat_iterations=10", "--no-progress"], cwd=tmp_path, env=env)
    _run([wsi_ad, "score", "test_stores", "--model", "model.pt", "--out", "run", "--workers", "1"], cwd=tmp_path, env=env)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [row["status"] for row in report["slides"]] == ["ok"] and report["slides"][0]["slide_score"] is not None
    assert report["threads"]["workers"] and all(t["torch"] == 1 for t in report["threads"]["workers"].values())
    # the viewer's pages and vendored OpenSeadragon are in the wheel
    check = ("from pipelines.viewer import RunView, create_app; c = create_app(RunView('run')).test_client(); "
             "print(c.get('/').status_code, c.get('/static/openseadragon/openseadragon.min.js').status_code, "
             "c.get('/slide/test_001').status_code)")
    assert _run([str(bin_dir / "python"), "-c", check], cwd=tmp_path, env=env).split() == ["200", "200", "200"]
    assert not any(tmp_path.glob("**/wsi-ad-eval"))
