"""``wsi-ad view`` (issue 21): the run it reads, the deep-zoom tiles it serves, and the page driven in a real
headless Chromium (the system's, never a downloaded one)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.viewer import RunView, ViewerError, create_app, is_loopback
from pipelines.viewer.run import LAYER_TILE_PX, dzi_level_size, dzi_max_level

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("WSI_AD_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def viewer_run(scored_setting, tmp_path_factory):
    """A run of ``wsi-ad process --model`` with labels and lesion outlines over the normal and tumour slides of
    ``scored_setting`` and a corrupt slide file (which fails at preprocessing)."""
    root = tmp_path_factory.mktemp("viewer_run")
    slides, annotations = root / "slides", root / "annotations"
    slides.mkdir()
    annotations.mkdir()
    for key in ("normal", "tumor"):
        os.symlink(scored_setting[key].path, slides / scored_setting[key].path.name)
    (slides / "broken_105.tif").write_bytes(b"II*\x00 this is not a slide")
    shutil.copy(scored_setting["tumor_xml"], annotations / "tumor_103.xml")
    (root / "reference.csv").write_text("normal_102,Normal,None,None\ntumor_103,Tumor,IDC,Micro\nbroken_105,Normal,None,None\n")
    status = main(["process", str(slides), "--out", str(root / "run"), "--model", str(scored_setting["model"]),
                   "--annotations", str(annotations), "--labels", str(root / "reference.csv"), "--workers", "1"])
    assert status == 1                  # one slide failed
    return root / "run"


@pytest.fixture(scope="module")
def client(viewer_run):
    return create_app(RunView(viewer_run)).test_client()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# -- what the viewer reads ---------------------------------------------------------------------------

def test_the_run_records_what_the_viewer_needs(viewer_run):
    report = json.loads((viewer_run / "report.json").read_text())
    assert report["scale"]["vmin"] < report["scale"]["vmax"]
    assert Path(report["annotations_dir"]).name == "annotations"
    run = RunView(viewer_run)
    assert run.slide_ids() == ["broken_105", "normal_102", "tumor_103"]
    assert (run.scale.vmin, run.scale.vmax) == (report["scale"]["vmin"], report["scale"]["vmax"])
    tumor = run.slide("tumor_103")
    assert (tumor.width, tumor.height) == (8192, 8192)
    assert tumor.annotations and tumor.heatmap is not None and tumor.tissue_mask is not None
    assert run.layers_of("tumor_103") == ["heatmap", "tissue", "outlines"]
    assert run.layers_of("normal_102") == ["heatmap", "tissue"]          # no outlines for a normal slide
    assert run.slide("broken_105").notices[0].startswith("this slide failed at preprocess")
    with pytest.raises(ViewerError, match="no slide"):
        run.slide("nope")


def test_hotspots_are_the_heatmap_peaks_highest_first_and_apart(viewer_run):
    run = RunView(viewer_run, n_hotspots=5)
    view = run.slide("tumor_103")
    spots = view.hotspots
    assert 1 <= len(spots) <= 5
    assert spots[0]["score"] == pytest.approx(float(np.nanmax(view.heatmap.values)))
    assert [s["score"] for s in spots] == sorted((s["score"] for s in spots), reverse=True)
    centres = np.array([(s["centre_x"], s["centre_y"]) for s in spots]) * view.heatmap.mpp_x
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(spots), 1)]
    assert (gaps >= 250.0 - view.heatmap.um_per_cell[0]).all()
    # the hottest peak of the tumour slide lies in or at a lesion (the model's job, checked on the outlines)
    from shapely.geometry import Point, Polygon

    lesions = [Polygon(a.vertices) for a in view.annotations]
    best = Point(spots[0]["centre_x"], spots[0]["centre_y"])
    assert min(lesion.distance(best) for lesion in lesions) * view.heatmap.mpp_x < 100.0


def test_layer_tiles_stitch_into_the_layer_drawn_whole(viewer_run):
    """The tiles of one deep-zoom level, put side by side, are the layer drawn at that level in one piece: the tile
    origins, sizes and the level's level-0 px per pixel are right."""
    from wsi_ad.overlay import heatmap_layer

    run = RunView(viewer_run)
    view = run.slide("tumor_103")
    level = dzi_max_level(view.width, view.height) - 4          # 1/16: 512 x 512 px, 2 x 2 tiles
    width, height = dzi_level_size(view.width, view.height, level)
    whole = heatmap_layer(view.heatmap, run.scale, (0.0, 0.0), (width, height), (16.0, 16.0),
                          tissue_mask=view.tissue_mask)
    mosaic = np.zeros_like(whole)
    for row in range(-(-height // LAYER_TILE_PX)):
        for col in range(-(-width // LAYER_TILE_PX)):
            tile = _png(run.layer_tile("tumor_103", "heatmap", level, col, row))
            y, x = row * LAYER_TILE_PX, col * LAYER_TILE_PX
            mosaic[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    np.testing.assert_array_equal(mosaic, whole)
    assert 0 < (whole[..., 3] == 255).mean() < 1                  # heat on tissue, transparent elsewhere
    # a pixel at the centre of the hottest cell has that cell's colour on the cohort scale
    from wsi_ad.overlay import colormap_lut

    spot = view.hotspots[0]
    px, py = int(spot["centre_x"] // 16), int(spot["centre_y"] // 16)
    expected = colormap_lut()[int(round(float(run.scale.normalize(np.float32(spot["score"]))) * 255))]
    np.testing.assert_array_equal(whole[py, px, :3], expected)
    with pytest.raises(ViewerError, match="no tile"):
        run.layer_tile("tumor_103", "heatmap", level, 5, 0)
    with pytest.raises(ViewerError, match="no outlines layer"):
        run.layer_tile("normal_102", "outlines", level, 0, 0)


# -- the HTTP API ------------------------------------------------------------------------------------

def test_pages_and_tiles_over_http(client):
    index = client.get("/")
    assert index.status_code == 200
    page = index.get_data(as_text=True)
    for sid in ("normal_102", "tumor_103", "broken_105"):
        assert f'data-slide="{sid}"' in page
    assert "failed at preprocess" in page and "ROC AUC" in page
    assert client.get("/run/roc.png").status_code == 200
    assert {row["slide_id"]: row["status"] for row in client.get("/api/slides").get_json()} == {
        "broken_105": "failed", "normal_102": "ok", "tumor_103": "ok"}

    slide = client.get("/slide/tumor_103")
    assert slide.status_code == 200 and "Hotspots" in slide.get_data(as_text=True)
    info = client.get("/slide/tumor_103/info.json").get_json()
    assert info["slide_dzi"] and set(info["layers"]) == {"heatmap", "tissue", "outlines"} and info["hotspots"]
    dzi = client.get(info["slide_dzi"]).get_data(as_text=True)
    assert 'Width="8192"' in dzi and 'TileSize="254"' in dzi
    tile = client.get("/slide/tumor_103/slide_files/13/10_12.jpeg")
    assert tile.status_code == 200 and tile.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(tile.data)).size == (256, 256)       # 254 + 1 px overlap on both sides
    heat = client.get("/slide/tumor_103/layers/heatmap_files/9/1_1.png")
    assert heat.status_code == 200 and _png(heat.data).shape == (256, 256, 4)
    assert client.get("/slide/tumor_103/slide_files/13/999_0.jpeg").status_code == 404
    assert client.get("/slide/nope").status_code == 404
    assert client.get("/slide/tumor_103/layers/bogus.dzi").status_code == 404


def test_a_missing_slide_file_shows_the_stored_thumbnail_with_a_notice(viewer_run, tmp_path):
    moved = tmp_path / "run"
    moved.mkdir()
    report = json.loads((viewer_run / "report.json").read_text())
    for row in report["slides"]:
        row["slide"] = str(tmp_path / "gone" / Path(row["slide"]).name)
    (moved / "report.json").write_text(json.dumps(report))
    client = create_app(RunView(moved)).test_client()
    page = client.get("/slide/tumor_103")
    assert page.status_code == 200
    assert "the slide file is missing" in page.get_data(as_text=True)
    info = client.get("/slide/tumor_103/info.json").get_json()
    assert info["slide_dzi"] is None and info["thumbnail"] and info["layers"]["heatmap"]
    assert info["thumbnail"]["level0_width"] == pytest.approx(8192, rel=0.02)
    assert client.get(info["thumbnail"]["url"]).mimetype == "image/png"
    assert client.get("/slide/tumor_103/slide.dzi").status_code == 404
    assert client.get("/slide/tumor_103/layers/heatmap_files/9/1_1.png").status_code == 200


def _copy_run(viewer_run: Path, to: Path, edit=None) -> Path:
    """A copy of the run (its stores included) whose report.json ``edit(report)`` may change."""
    shutil.copytree(viewer_run, to, symlinks=True)
    report = json.loads((to / "report.json").read_text())
    if edit is not None:
        edit(report)
    (to / "report.json").write_text(json.dumps(report))
    return to


def test_damaged_inputs_give_notices_not_errors(viewer_run, tmp_path):
    """Found by a fresh user: a damaged store, an unreadable slide file, a missing annotation folder."""
    def edit(report):
        report["annotations_dir"] = str(tmp_path / "moved_away")
    run_dir = _copy_run(viewer_run, tmp_path / "run", edit)
    store = run_dir / "tumor_103.zarr"
    (chunk,) = [p for p in store.glob("heatmap/*/heatmap/c/*/*") if p.is_file()]
    chunk.write_bytes(b"\x00not zstd")                                     # damaged heatmap
    (store / "tissue" / "mask" / "zarr.json").write_text("{bad")           # damaged tissue mask
    (run_dir / "normal_102.zarr" / "zarr.json").write_text("garbage{")      # damaged store
    client = create_app(RunView(run_dir)).test_client()
    page = client.get("/slide/tumor_103")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "the heatmap cannot be read from the store" in text and "the tissue mask cannot be read" in text
    assert "the annotation folder" in text and "is missing" in text
    assert client.get("/slide/tumor_103/slide_files/13/10_12.jpeg").status_code == 200     # the slide still shows
    info = client.get("/slide/normal_102/info.json").get_json()
    assert any("the slide store" in n and "cannot be read" in n for n in info["notices"])
    assert info["slide_dzi"] and not info["layers"]
    broken = client.get("/slide/broken_105/info.json").get_json()          # the corrupt file still exists
    assert broken["slide_dzi"] is None and broken["notices"][0].startswith("this slide failed at preprocess")
    assert any("OpenSlide cannot read the slide file" in n for n in broken["notices"])


def test_a_copied_run_reads_its_own_stores(viewer_run, tmp_path):
    run_dir = _copy_run(viewer_run, tmp_path / "copy")
    shutil.rmtree(run_dir / "tumor_103.zarr")
    run = RunView(run_dir)
    assert run.slide("normal_102").store == run_dir / "normal_102.zarr"
    tumor = run.slide("tumor_103")        # gone from the copy: read where the run wrote it, and said so
    assert tumor.store == viewer_run / "tumor_103.zarr"
    assert any(f"read from {viewer_run / 'tumor_103.zarr'}, in the folder the run was written to" in n
               for n in tumor.notices)
    assert not any("store" in n for n in run.slide("normal_102").notices)


def test_malformed_reports_and_bad_arguments_are_refused(viewer_run, tmp_path, capsys):
    assert main(["view", str(tmp_path), "--port", "0"]) == 2
    assert "no report.json" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such folder" in capsys.readouterr().err
    for slides in (None, [{"status": "ok"}], "x"):
        (tmp_path / "report.json").write_text(json.dumps({"slides": slides}))
        with pytest.raises(ViewerError, match="not a wsi-ad run report"):
            RunView(tmp_path)
    with pytest.raises(ViewerError, match="--annotations .*no such folder"):
        RunView(viewer_run, annotations_dir=tmp_path / "nope")
    assert RunView(viewer_run / "report.json").run_dir == viewer_run          # the report itself named
    for argv in (["--port", "99999"], ["--hotspots", "0"], ["--port", "-1"]):
        with pytest.raises(SystemExit):
            main(["view", str(viewer_run), *argv])
    assert main(["view", str(viewer_run), "--port", "0", "--host", "no.such.host.invalid"]) == 2
    assert "--host no.such.host.invalid" in capsys.readouterr().err


def test_loopback_addresses():
    assert all(map(is_loopback, ("127.0.0.1", "127.1.2.3", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.10", "example.org")))


# -- the page in a real browser ------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")


def _start_view(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``wsi-ad view RUN_DIR --port 0`` in its own process; returns it and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "view", str(run_dir), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    line = proc.stdout.readline()
    match = re.search(r"http://\S+/", line)
    if not match:
        proc.kill()
        raise AssertionError(f"wsi-ad view printed {line!r}; stderr: {proc.stderr.read()}")
    return proc, match.group(0)


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _viewer_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("RGB"), dtype=np.int16)


def _settle(page) -> None:
    """Wait until OpenSeadragon has every tile it wants and has drawn them."""
    page.wait_for_function("""() => {
        const view = window.wsiView, world = view && view.viewer && view.viewer.world;
        if (!view || !view.ready || !world.getItemCount()) return false;
        const shown = Array.from({length: world.getItemCount()}, (_, i) => world.getItemAt(i))
            .filter((item) => item.getOpacity() > 0);      // OpenSeadragon loads no tile of a hidden layer
        return shown.every((item) => item.getFullyLoaded()) && !world.needsDraw();
    }""", timeout=30_000)
    page.wait_for_timeout(300)


def test_the_viewer_in_a_real_browser(viewer_run):
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    proc, url = _start_view(viewer_run)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            tiles = []
            page.on("response", lambda r: tiles.append(r) if "/slide_files/" in r.url else None)

            # the slide list: every slide, the failure with its reason, sortable by score
            page.goto(url)
            rows = page.locator("#slides tbody tr")
            assert rows.count() == 3
            assert "failed at preprocess" in page.locator("tr[data-slide='broken_105']").inner_text()
            page.locator("#slides th", has_text="slide score").click()
            order = page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)")
            assert order == ["tumor_103", "normal_102", "broken_105"]      # highest first, unscored last

            # a slide: deep-zoom tiles of the real pixels arrive as images
            page.locator("a", has_text="tumor_103").click()
            page.wait_for_url("**/slide/tumor_103")
            _settle(page)
            ok = [r for r in tiles if r.status == 200 and r.headers.get("content-type") == "image/jpeg"]
            assert ok, [(r.url, r.status) for r in tiles]
            assert Image.open(io.BytesIO(ok[0].body())).size[0] > 1

            # the heatmap toggle changes what the canvas shows
            with_heat = _viewer_pixels(page)
            page.locator("#show-heatmap").uncheck()
            _settle(page)
            without_heat = _viewer_pixels(page)
            changed = np.abs(with_heat - without_heat).max(axis=-1) > 30
            assert changed.mean() > 0.002, changed.mean()
            page.locator("#show-heatmap").check()
            _settle(page)

            # a hotspot click zooms the viewport onto it
            before = page.evaluate("() => window.wsiView.viewer.viewport.getBounds(true)")
            page.locator("button.hotspot").first.click()
            page.wait_for_timeout(1500)
            _settle(page)
            after = page.evaluate("() => window.wsiView.viewer.viewport.getBounds(true)")
            spot = page.evaluate("() => window.wsiView.info.hotspots[0]")
            k = page.evaluate("() => window.wsiView.k")
            assert after["width"] < before["width"] / 3          # 8 tiles wide: 0.5 mm of a 2 mm slide
            assert after["x"] <= spot["centre_x"] * k <= after["x"] + after["width"]
            assert after["y"] <= spot["centre_y"] * k <= after["y"] + after["height"]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "viewer.png"))
            assert not errors, errors
            browser.close()
    finally:
        err = _stop(proc)
    assert "Traceback" not in err, err


def test_a_non_loopback_host_is_served_with_a_warning(viewer_run):
    proc, url = _start_view(viewer_run, "--host", "0.0.0.0")
    err = _stop(proc)
    assert url.startswith("http://0.0.0.0:")
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert "warning: listening on 0.0.0.0" in err and f"on port {port} " in err and "no authentication" in err
