"""The ``wsi-ad`` command line: subcommands, exit codes, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.cli import main

SUBCOMMANDS = ("demo", "synth", "process", "train", "score", "evaluate", "tune")


def _wsi_ad() -> list[str]:
    """The installed console script when on PATH next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("wsi-ad")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]


def test_help_lists_every_subcommand():
    result = subprocess.run([*_wsi_ad(), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_console_script_is_installed():
    assert Path(sys.executable).with_name("wsi-ad").exists() or shutil.which("wsi-ad"), \
        "the wsi-ad console script is not installed (pip install -e .)"


def test_missing_slide_is_a_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"wsi-ad: error: {tmp_path / 'nope.svs'}: file not found"


def test_synth_writes_the_official_layout(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--normal", "1", "--tumor", "0", "--test", "0", "--size", "4096"]) == 0
    assert (tmp_path / "training" / "normal" / "normal_001.tif").exists()
    assert "1 normal + 0 tumour training slides" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "training" / "normal" / "normal_001.tif")]) == 0
    assert '"mpp_x": 0.243' in capsys.readouterr().out
