"""``wsi-ad process`` as a Dask graph, on real clusters: a local dask.distributed cluster of 2 worker processes,
a scheduler and a worker started as separate processes on loopback, and a run killed with SIGKILL that
resumes. Slides are synthetic (plus the real broken/fluorescence files of ../shared/data when present)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.cli import main
from pipelines.process import BatchConfig, run_batch
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.store import SlideStore

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_SHARED = {  # real broken files and why they fail (or, for the NDPI, finish without tissue)
    "broken.svs": "not a slide format OpenSlide reads",
    "unopenable.tiff": "OpenSlide cannot open it",
    "unreadable.svs": "cannot read image data",
}


def _slide_folder(root: Path, scored_setting, shared: Path | None) -> Path:
    """A folder mixing the two synthetic slides with a corrupt file of our own and the real bad files."""
    folder = root / "slides"
    folder.mkdir(parents=True)
    for key in ("normal", "tumor"):
        os.symlink(scored_setting[key].path, folder / scored_setting[key].path.name)
    (folder / "garbage.svs").write_bytes(np.random.default_rng(0).bytes(50_000))
    if shared is not None:
        for name in [*BAD_SHARED, "fluorescence-tritc.ndpi"]:
            os.symlink(shared / "slides" / name, folder / name)
    return folder


def _labels(path: Path) -> Path:
    path.write_text("normal_102,Normal,,\ntumor_103,Tumor,,Micro\n")
    return path


def test_local_cluster_scores_good_slides_and_isolates_bad_ones(scored_setting, shared_data_if_present, tmp_path):
    shared = shared_data_if_present
    folder = _slide_folder(tmp_path, scored_setting, shared)
    out = tmp_path / "out"
    batch = BatchConfig(model=scored_setting["model"], annotations_dir=scored_setting["tumor_xml"].parent,
                        labels=_labels(tmp_path / "reference.csv"))
    lines: list[str] = []
    result = run_batch([folder], out, batch, workers=2, echo=lines.append)

    by_id = {r["slide_id"]: r for r in result.results}
    assert by_id["garbage"]["status"] == "failed" and "OpenSlide" in by_id["garbage"]["error"]
    failures = {f["slide_id"]: f for f in json.loads((out / "failures.json").read_text())}
    expected_failed = {"garbage", *(Path(n).stem for n in BAD_SHARED)} if shared else {"garbage"}
    assert set(failures) == expected_failed and result.n_failed == len(expected_failed)
    for name, reason in BAD_SHARED.items():
        if shared:
            assert reason in failures[Path(name).stem]["error"]
    if shared:   # no H&E tissue: finishes alone, with no tiles and a warning, and is not a failure
        fluorescence = by_id["fluorescence-tritc"]
        assert fluorescence["status"] == "ok" and fluorescence["n_tiles"] == 0
        assert any("fluorescence" in w for w in fluorescence["warnings"])

    normal, tumor = by_id["normal_102"], by_id["tumor_103"]
    assert normal["status"] == tumor["status"] == "ok"
    assert tumor["slide_score"] > normal["slide_score"]
    for r in (normal, tumor):
        assert Path(r["overlay_png"]).stat().st_size > 10_000
        store = SlideStore.open(r["store"])
        assert store.is_complete(f"scores/{r['model_id']}") and store.is_complete(f"heatmap/{r['model_id']}")

    report = json.loads((out / "report.json").read_text())
    assert [row["slide_id"] for row in report["slides"]] == [r["slide_id"] for r in result.results]
    assert report["metrics"]["auc"] == 1.0
    page = (out / "report.html").read_text()
    for slide_id, failure in failures.items():
        assert slide_id in page and failure["error"].split(":")[-1].strip()[:20] in page
    assert (out / "roc.png").exists() and "roc.png" in page and "overlays/tumor_103.png" in page
    assert any("slides]" in line and "score" in line for line in lines)
    assert (out / "wsi-ad.log").read_text().count("tumor_103") >= 3
    # each failure is said once, at the task where it happened; the colour scale counts the slides it comes from
    for slide_id, failure in failures.items():
        said = [line for line in lines if f"] {slide_id} " in line and "FAILED" in line]
        assert len(said) == 1 and f"FAILED at {failure['failed_task']}" in said[0], said
    scored = sum(1 for r in result.results if r["status"] == "ok" and r.get("model_id"))
    assert any(line.startswith("cohort colour scale") and f"({scored} scored slides)" in line for line in lines)


def test_scoring_runs_only_on_the_worker_that_advertises_a_gpu(scored_setting, tmp_path, monkeypatch):
    """The local cluster's GPU layout (one scoring worker per GPU with the resource GPU=1) on a machine
    without one: the layout is made as if one GPU were there; the model then scores on that worker's CPU."""
    import pipelines.cluster

    monkeypatch.setattr(pipelines.cluster, "_cuda_devices", lambda: 1)
    folder = tmp_path / "slides"
    folder.mkdir()
    for key in ("normal", "tumor"):
        os.symlink(scored_setting[key].path, folder / scored_setting[key].path.name)
    lines: list[str] = []
    result = run_batch([folder], tmp_path / "out", BatchConfig(model=scored_setting["model"]), workers=1,
                       echo=lines.append)
    assert "1 GPU worker(s) for scoring" in lines[0]
    assert result.n_failed == 0
    assert {r["score_worker"] for r in result.results} == {"gpu-0"}


def _worker_env(variable: str) -> str | None:
    return os.environ.get(variable)


def test_gpu_layout_hides_the_gpu_from_the_cpu_workers(monkeypatch):
    """With GPUs, each CPU worker gets ``CUDA_VISIBLE_DEVICES=""`` (its stain normalization runs on the CPU
    kernel instead of every worker opening a CUDA context on the scoring GPU); each GPU worker sees its own."""
    import pipelines.cluster

    monkeypatch.setattr(pipelines.cluster, "_cuda_devices", lambda: 1)
    with pipelines.cluster.connect(workers=1) as (client, info):
        workers = client.scheduler_info()["workers"]
        names = {address: w["name"] for address, w in workers.items()}
        resources = {w["name"]: w.get("resources", {}) for w in workers.values()}
        seen = client.run(_worker_env, "CUDA_VISIBLE_DEVICES")
    assert info.gpu_workers == 1
    assert {names[address]: value for address, value in seen.items()} == {"cpu-0": "", "gpu-0": "0"}
    # every task but scoring asks for the CPU workers' resource: nothing queues on the GPU worker ahead of scoring
    assert resources == {"cpu-0": {"CPU": 1}, "gpu-0": {"GPU": 1}} and info.cpu_resources == {"CPU": 1}
    # the n-th GPU a worker gets is the n-th this process sees, not the n-th of the machine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [pipelines.cluster.visible_gpu(i) for i in (0, 1)] == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pipelines.cluster.visible_gpu(1) == "1"


def test_fail_fast_stops_the_batch_at_the_first_failure(scored_setting, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "aaa_garbage.svs").write_bytes(b"not a slide")
    os.symlink(scored_setting["normal"].path, folder / "normal_102.tif")
    result = run_batch([folder], tmp_path / "out", BatchConfig(fail_fast=True), workers=1, echo=lambda line: None)
    assert result.n_failed >= 1
    assert json.loads((tmp_path / "out" / "failures.json").read_text())[0]["slide_id"] == "aaa_garbage"


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_process_runs_on_an_existing_cluster_started_as_separate_processes(scored_setting, tmp_path):
    """Issue 20: a cluster started the way users start one (``dask scheduler`` and two ``dask worker`` processes on
    loopback, one advertising ``--resources GPU=1``): every slide is done, scoring ran on the GPU worker only, and
    the scores equal the model's scores of the same tiles in this process."""
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = _start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for name, extra in (("cpu-worker", []), ("gpu-worker", ["--resources", "GPU=1"])):
            workers.append(_start([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                   "--host", "127.0.0.1", "--name", name, *extra], tmp_path / f"{name}.log"))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        folder = tmp_path / "slides"
        folder.mkdir()
        for key in ("normal", "tumor"):
            os.symlink(scored_setting[key].path, folder / scored_setting[key].path.name)
        status = main(["process", str(folder), "--out", str(tmp_path / "out"), "--model", str(scored_setting["model"]),
                       "--scheduler", address])
        assert status == 0
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert [row["status"] for row in report["slides"]] == ["ok", "ok"]
        assert all(row["slide_score"] is not None for row in report["slides"])
        assert {row["score_worker"] for row in report["slides"]} == {"gpu-worker"}
        assert (tmp_path / "out" / "overlays" / "tumor_103.png").exists()
        scorer = load_scorer(scored_setting["model"])
        for name, key in (("normal_102", "normal_store"), ("tumor_103", "tumor_store")):
            from wsi_ad.scoring import load_scores

            store = SlideStore.open(tmp_path / "out" / f"{name}.zarr")
            np.testing.assert_allclose(load_scores(store, scorer.model_id), score_store(scored_setting[key], scorer),
                                       rtol=1e-5)
    finally:
        for proc in (*workers, scheduler):
            _stop(proc)


def test_one_slide_is_scored_in_range_tasks_spread_over_the_workers(scored_setting, tmp_path):
    """Issue 20: one slide's tiles are scored in tasks over contiguous chunk ranges, on every worker; the stage is
    complete only with all of them, and its scores equal one in-process scoring of the same store (same batches and
    torch threads, so the same numbers)."""
    from wsi_ad.scoring import load_scores, run_score_stage

    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(scored_setting["tumor"].path, folder / "tumor_103.tif")
    lines: list[str] = []
    result = run_batch([folder], tmp_path / "out", BatchConfig(model=scored_setting["model"], batch_size=16,
                                                               score_chunk_tiles=32), workers=2, echo=lines.append)
    row = result.results[0]
    assert row["status"] == "ok" and row["n_tiles"] > 5 * 32
    assert row["score_tasks"] == -(-row["n_tiles"] // 32)
    assert sorted(row["score_worker"].split(", ")) == sorted(str(i) for i in range(2))   # both local workers
    store = SlideStore.open(row["store"])
    marker = store.stages[f"scores/{row['model_id']}"]
    assert marker["tasks"] == row["score_tasks"] and marker["n_tiles"] == row["n_tiles"]
    assert any(f"tiles/s on cpu, {row['score_tasks']} tasks on" in line for line in lines)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(row["store"], copy)
    scorer = load_scorer(scored_setting["model"], device="cpu")
    again = SlideStore.open(copy, mode="r+")
    again.invalidate(f"scores/{row['model_id']}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as each of the 2 workers on 2 cores: oneDNN's sums depend on the thread count
    try:
        alone, computed = run_score_stage(again, scorer, batch_size=16, chunk_tiles=64)
    finally:
        torch.set_num_threads(threads)
    assert computed                                    # another chunk size: scored afresh, in one task
    np.testing.assert_array_equal(load_scores(store, row["model_id"]), alone)


def _stage_done(store: Path, prefix: str) -> bool:
    try:
        stages = json.loads((store / "zarr.json").read_text())["attributes"].get("stages", {})
    except (OSError, ValueError, KeyError):
        return False
    return any(name.startswith(prefix) for name in stages)


def test_a_killed_run_resumes_without_redoing_finished_slides_and_scores_the_same(scored_setting, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    names = ["a_normal.tif", "b_tumor.tif", "c_normal.tif"]
    for name, key in zip(names, ("normal", "tumor", "normal"), strict=True):
        shutil.copy(scored_setting[key].path, folder / name)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("wsi-ad")), "process", str(folder), "--out", str(out),
           "--model", str(scored_setting["model"]), "--workers", "1"]
    proc = _start(cmd, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 240
        while not _stage_done(out / "a_normal.zarr", "heatmap/") and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.1)
        assert _stage_done(out / "a_normal.zarr", "heatmap/")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)           # the client, its scheduler and the worker processes
        proc.wait()
    assert not (out / "report.json").exists()

    lines: list[str] = []
    result = run_batch([folder], out, BatchConfig(model=scored_setting["model"]), workers=1, echo=lines.append)
    by_id = {r["slide_id"]: r for r in result.results}
    assert result.n_failed == 0
    assert by_id["a_normal"]["stages_run"] == [] and by_id["a_normal"]["scored"] is False
    assert any(s.startswith("scores/dpa-") for s in by_id["c_normal"]["stages_run"])
    scorer = load_scorer(scored_setting["model"])
    for name, key in (("a_normal", "normal_store"), ("b_tumor", "tumor_store"), ("c_normal", "normal_store")):
        from wsi_ad.scoring import load_scores

        resumed = load_scores(SlideStore.open(out / f"{name}.zarr"), scorer.model_id)
        np.testing.assert_allclose(resumed, score_store(scored_setting[key], scorer), rtol=1e-5)


def test_a_slide_id_is_the_name_the_user_gave_and_clashes_are_refused_up_front(scored_setting, tmp_path, capsys):
    """Symlinks named unlike their targets: the link's name is the id of the store, the report row, the label
    and the annotation look-up. Ids that compare equal (case-insensitively) are refused before any work."""
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(scored_setting["normal"].path, links / "case_A.tif")
    os.symlink(scored_setting["tumor"].path, links / "case_B.tif")
    annotations = tmp_path / "ann"
    annotations.mkdir()
    shutil.copy(scored_setting["tumor_xml"], annotations / "case_B.xml")
    (annotations / "case_A.xml").write_text("<ASAP_Annotations><Annotations>")    # broken: a drawing problem only
    labels = tmp_path / "reference.csv"
    labels.write_text("case_A,Normal,,\ncase_B,Tumor,,Micro\n")
    out = tmp_path / "o"
    assert main(["process", str(links), "--out", str(out), "--model", str(scored_setting["model"]), "--labels", str(labels),
                 "--annotations", str(annotations), "--workers", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.zarr")) == ["case_A.zarr", "case_B.zarr"]
    assert SlideStore.open(out / "case_B.zarr").root.attrs["slide_id"] == "case_B"
    report = json.loads((out / "report.json").read_text())
    assert {row["slide_id"]: row["label"] for row in report["slides"]} == {"case_A": "Normal", "case_B": "Tumor"}
    assert report["metrics"]["auc"] == 1.0 and (out / "overlays" / "case_B.png").is_file()
    case_a = next(row for row in report["slides"] if row["slide_id"] == "case_A")
    assert case_a["status"] == "ok" and (out / "overlays" / "case_A.png").is_file()
    assert any("without lesion outlines" in w and "malformed XML" in w for w in case_a["warnings"])
    capsys.readouterr()

    # links to two different slides whose targets share a name: two ids, two stores
    sites = tmp_path / "sites"
    for site, key in (("siteA", "normal"), ("siteB", "tumor")):
        (sites / site).mkdir(parents=True)
        os.symlink(scored_setting[key].path, sites / site / "slide1.tif")
        os.symlink(sites / site / "slide1.tif", links.parent / f"{site[-1]}_slide1.tif")
    assert main(["process", str(tmp_path / "A_slide1.tif"), str(tmp_path / "B_slide1.tif"), "--out", str(tmp_path / "ab"),
                 "--workers", "1"]) == 0
    report = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert sorted(row["slide_id"] for row in report["slides"]) == ["A_slide1", "B_slide1"]
    assert sorted(p.name for p in (tmp_path / "ab").glob("*.zarr")) == ["A_slide1.zarr", "B_slide1.zarr"]
    capsys.readouterr()
    # the same id twice (the targets' folders given), or twice up to case: refused before any work, both named
    os.rename(sites / "siteB" / "slide1.tif", sites / "siteB" / "SLIDE1.tif")
    for args in ([sites / "siteA", sites / "siteB"], [sites]):
        assert main(["process", *map(str, args), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert "share an id" in err and "siteA/slide1.tif" in err and "siteB/SLIDE1.tif" in err
        assert err.strip().count("\n") == 0 and not (tmp_path / "never").exists()
