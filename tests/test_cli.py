"""The ``wsi-ad`` command line: subcommands, exit codes, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# -- issue 22: packaged configs by name, threads ------------------------------------------------------------

def test_configs_are_packaged_and_found_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    from wsi_ad.config import Config, ConfigError, config_path, packaged_config_dir, packaged_configs

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    assert repo_configs.resolve() == packaged_config_dir().resolve()         # the same folder, not a copy
    shipped = packaged_configs()
    assert {"camelyon16_paper", "knn_cpu", "tune_space", "ablations/dpa_pg_cpu"} <= set(shipped)
    monkeypatch.chdir(tmp_path)                                                # outside the checkout
    for spelling in ("camelyon16_paper", "camelyon16_paper.yaml", "configs/camelyon16_paper.yaml"):
        assert config_path(spelling) == shipped["camelyon16_paper"]
    assert Config.from_yaml("knn_cpu").to_dict() == Config.from_yaml(shipped["knn_cpu"]).to_dict()
    (tmp_path / "knn_cpu").write_text("detector: knn\n")                       # a file of that name wins
    assert config_path("knn_cpu") == Path("knn_cpu")
    with pytest.raises(ConfigError, match="no packaged config of that name.*camelyon16_paper"):
        config_path("camelyon17_paper")
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(shipped) and lines[0].split()[0] == next(iter(shipped))
    row = next(line for line in lines if line.startswith("deep_if_cpu "))
    assert "Deep IF (Ouardini et al. 2019" in row                               # a sentence, not cut at "al."
    assert main(["train", "x", "--out", str(tmp_path / "m.pt"), "--config", "nope"]) == 2
    assert "no packaged config" in capsys.readouterr().err
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x80\x81 binary")                    # found by a fresh user
    with pytest.raises(ConfigError, match="not a YAML config \\(not UTF-8 text"):
        Config.from_yaml(tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        config_path(tmp_path)


def test_output_into_a_closed_pipe_ends_quietly():
    """`wsi-ad configs | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{' '.join(_wsi_ad())} configs | head -1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("ae_cpu") and "BrokenPipe" not in proc.stderr, proc.stderr


def test_threads_are_sized_once_for_torch_numba_and_blas(monkeypatch):
    import numba
    import torch

    from wsi_ad.threads import available_cores, configure, current

    before = torch.get_num_threads()
    try:
        info = configure(1)
        assert info == {**info, "threads": 1, "torch": 1, "numba": 1, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1 and info["blas"] in (1, None)
        assert current()["threads"] == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure()["torch"] == available_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")                               # the user's setting is the default
        assert configure()["torch"] == 1
        with pytest.raises(ValueError):
            configure(0)
    finally:
        configure(before)
    with pytest.raises(SystemExit):
        main(["--threads", "0", "train", "x", "--out", "m.pt"])
