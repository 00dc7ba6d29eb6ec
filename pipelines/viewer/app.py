"""The web application of ``wsi-ad view`` (Flask) and the server that runs it (werkzeug's threaded WSGI server).

Pages: ``/`` (the run's slides, sortable, with the ROC curve and metrics when the run had labels) and
``/slide/<slide_id>`` (OpenSeadragon over the slide's deep-zoom pyramid, with heatmap, tissue-mask and
lesion-outline layers, the colour bar and the hotspots). Data: ``/slide/<id>/slide.dzi`` and
``/slide/<id>/slide_files/<level>/<col>_<row>.jpeg`` (the slide's pixels), ``/slide/<id>/layers/<layer>.dzi`` and
``/slide/<id>/layers/<layer>_files/<level>/<col>_<row>.png`` (layers), ``/slide/<id>/thumbnail.png``,
``/slide/<id>/info.json``, ``/api/slides`` and ``/run/roc.png``.

OpenSeadragon (BSD-3-Clause) is vendored under ``static/openseadragon/`` from its npm package (see the README
there); the pages load nothing from the network.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import sys
from pathlib import Path

from flask import Flask, Response, abort, jsonify, render_template, send_file, url_for

from pipelines.viewer.run import RunView, ViewerError

#: Addresses that only this machine reaches.
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the server to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _score_text(value) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"


def create_app(run: RunView) -> Flask:
    """The Flask application serving ``run`` (see the module docstring for its routes)."""
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.jinja_env.filters["score"] = _score_text

    @app.errorhandler(ViewerError)         # an unknown slide, layer or tile: every RunView method raises it
    def _not_found(exc):
        return Response(str(exc), status=404, mimetype="text/plain")

    @app.get("/")
    def index():
        metrics = run.report.get("metrics")
        return render_template("index.html", report=run.report, rows=list(run.rows.values()),
                               metrics=metrics, roc=(run.run_dir / "roc.png").is_file() and bool(metrics),
                               run_dir=run.run_dir)

    @app.get("/favicon.ico")
    def favicon():
        return Response(status=204)

    @app.get("/api/slides")
    def api_slides():
        keys = ("slide_id", "status", "label", "slide_score", "n_tiles", "tissue_area_mm2", "failed_task", "error")
        return jsonify([{k: row.get(k) for k in keys} for row in run.rows.values()])

    @app.get("/run/roc.png")
    def roc_png():
        path = run.run_dir / "roc.png"
        if not path.is_file():
            abort(404)
        return send_file(path.resolve(), mimetype="image/png", max_age=0)

    @app.get("/slide/<slide_id>")
    def slide_page(slide_id: str):
        view = run.slide(slide_id)
        info = slide_info(slide_id)
        from wsi_ad.overlay import colormap_lut

        lut = colormap_lut()
        stops = ", ".join(f"rgb({r},{g},{b}) {i / 10:.0%}" for i, (r, g, b) in enumerate(lut[::255 // 10][:11]))
        ids = run.slide_ids()
        here = ids.index(slide_id)
        neighbours = {"previous": ids[here - 1] if here > 0 else None,
                      "next": ids[here + 1] if here + 1 < len(ids) else None}
        return render_template("slide.html", view=view, info=info, run_dir=run.run_dir, gradient=stops,
                               neighbours=neighbours)

    def slide_info(slide_id: str) -> dict:
        view = run.slide(slide_id)
        scale = run.scale if view.heatmap is not None else None
        thumb = None
        if view.thumbnail is not None and view.thumbnail_level0_per_px is not None:
            thumb = {"url": url_for("thumbnail", slide_id=slide_id),
                     "level0_per_px": list(view.thumbnail_level0_per_px),
                     "level0_width": view.thumbnail_size[0] * view.thumbnail_level0_per_px[0]}
        return {
            "slide_id": slide_id, "width": view.width, "height": view.height,
            "mpp": list(view.mpp) if view.mpp else None,
            "slide_dzi": url_for("slide_dzi", slide_id=slide_id) if view.slide_path is not None else None,
            "thumbnail": thumb,
            "layers": {layer: url_for("layer_dzi", slide_id=slide_id, layer=layer) for layer in run.layers_of(slide_id)},
            "scale": scale.to_dict() if scale is not None else None,
            "hotspots": view.hotspots, "notices": view.notices,
            "annotation_file": str(view.annotation_file) if view.annotation_file else None,
        }

    @app.get("/slide/<slide_id>/info.json")
    def slide_info_json(slide_id: str):
        return jsonify(slide_info(slide_id))

    @app.get("/slide/<slide_id>/slide.dzi")
    def slide_dzi(slide_id: str):
        return Response(run.slide_dzi(slide_id), mimetype="application/xml")

    @app.get("/slide/<slide_id>/slide_files/<int:level>/<int:col>_<int:row>.jpeg")
    def slide_tile(slide_id: str, level: int, col: int, row: int):
        return Response(run.slide_tile(slide_id, level, col, row), mimetype="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/slide/<slide_id>/layers/<layer>.dzi")
    def layer_dzi(slide_id: str, layer: str):
        return Response(run.layer_dzi(slide_id, layer), mimetype="application/xml")

    @app.get("/slide/<slide_id>/layers/<layer>_files/<int:level>/<int:col>_<int:row>.png")
    def layer_tile(slide_id: str, layer: str, level: int, col: int, row: int):
        return Response(run.layer_tile(slide_id, layer, level, col, row), mimetype="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/slide/<slide_id>/overlay.png")
    def overlay_png(slide_id: str):
        row = run.rows.get(slide_id) or abort(404)
        for path in (row.get("overlay"), run.run_dir / "overlays" / f"{slide_id}.png"):   # the run folder may move
            if path and Path(path).is_file():
                return send_file(Path(path).resolve(), mimetype="image/png", max_age=0)
        abort(404)

    @app.get("/slide/<slide_id>/thumbnail.png")
    def thumbnail(slide_id: str):
        view = run.slide(slide_id)
        if view.thumbnail is None:
            abort(404)
        return send_file(view.thumbnail.resolve(), mimetype="image/png", max_age=0)

    return app


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, n_hotspots: int = 10,
          annotations_dir: str | Path | None = None, slides_dir: str | Path | None = None, tile_cache: int = 4096,
          echo=print) -> None:
    """Serve ``run_dir`` on ``host:port`` until interrupted (Ctrl-C). ``port`` 0 picks a free port; the first line
    printed is ``wsi-ad view: http://HOST:PORT/ ...``; a ``host`` that is not loopback gets a warning on stderr
    (no authentication). Requests are handled in threads.

    Raises:
        ViewerError: ``run_dir`` is not a run folder, ``host`` does not resolve, or the address cannot be bound
            (port in use, not an address of this machine).
    """
    from werkzeug.serving import make_server

    run = RunView(run_dir, annotations_dir=annotations_dir, slides_dir=slides_dir, n_hotspots=n_hotspots,
                  tile_cache=tile_cache)
    app = create_app(run)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)     # no line per tile request
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise ViewerError(f"--host {host}: not an address or a host name this machine can resolve ({exc})") from exc
    try:
        server = make_server(host, port, app, threaded=True)
    except (OSError, SystemExit) as exc:          # werkzeug prints its reason and exits on a busy port
        raise ViewerError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); pick another "
                          "--port (0: any free one) or --host") from exc
    shown = f"[{host}]" if ":" in host else host
    echo(f"wsi-ad view: http://{shown}:{server.server_port}/  ({len(run.rows)} slides of {Path(run.run_dir).resolve()}; "
         "Ctrl-C to stop)")
    sys.stdout.flush()
    if not is_loopback(host):
        print(f"wsi-ad view: warning: listening on {host}, not only on this machine: anyone who reaches it on port "
              f"{server.server_port} sees these slides and scores; there is no authentication", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
