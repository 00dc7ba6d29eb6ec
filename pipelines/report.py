"""The run report of ``wsi-ad process``: ``OUT/report.json`` and ``OUT/report.html``.

One row per slide: thumbnail (the tissue QC image), overlay, slide score, tissue area, tile count, links to
its exports (GeoJSON, OME-NGFF, h5), the time of each stage (from the store's stage markers, so reused
stages show the time they took when they ran), and the error of a failed slide. With labels (a Camelyon16
``reference.csv``), the slide-level ROC curve (``OUT/roc.png``) and AUC with its bootstrap 95 % interval
head the report. Images are linked by relative paths, so the folder can be moved or served as it is.
"""

from __future__ import annotations

import datetime
import html
import json
import os
from pathlib import Path

from wsi_ad import __version__
from wsi_ad.atomic import atomic_path, write_text_atomic
from wsi_ad.store import SlideStore, StoreError

#: Stage markers shown as report columns: (column, stage name in the store; {model} is the model id).
STAGE_COLUMNS = (("tissue", "tissue"), ("stain", "stain"), ("tiles", "tiles"), ("score", "scores/{model}"),
                 ("heatmap", "heatmap/{model}"))


def stage_seconds(result: dict) -> dict[str, float | None]:
    """Seconds each stage took when it ran, from the slide store's completion markers."""
    if not result.get("store") or not Path(result["store"]).is_dir():
        return {}
    try:
        stages = SlideStore.open(result["store"]).stages
    except StoreError:
        return {}
    model = result.get("model_id") or ""
    return {column: stages.get(name.format(model=model), {}).get("seconds") for column, name in STAGE_COLUMNS}


def report_rows(results: list[dict], labels: dict[str, str] | None = None) -> list[dict]:
    """The JSON rows of the report, one per slide, in the order given."""
    rows = []
    for result in results:
        rows.append({
            "slide_id": result["slide_id"],
            "slide": result["slide"],
            "status": result["status"],
            "label": (labels or {}).get(result["slide_id"].lower()),
            "slide_score": result.get("slide_score"),
            "reducer": result.get("reducer"),
            "tissue_area_mm2": result.get("tissue_area_mm2"),
            "n_tiles": result.get("n_tiles"),
            "width": result.get("width"),
            "height": result.get("height"),
            "mpp": result.get("mpp"),
            "stain_method": result.get("stain_method"),
            "model_id": result.get("model_id"),
            "score_worker": result.get("score_worker"),
            "score_tasks": result.get("score_tasks"),
            "score_device": result.get("score_device"),
            "tiles_per_s": result.get("tiles_per_s"),
            "stage_seconds": stage_seconds(result),
            "task_seconds": result.get("timings", {}),
            "stages_run": result.get("stages_run", []),
            "thumbnail": result.get("qc_png"),
            "overlay": result.get("overlay_png"),
            "exports": result.get("exports") or {},
            "store": result.get("store"),
            "warnings": result.get("warnings", []),
            "failed_task": result.get("failed_task"),
            "error": result.get("error"),
        })
    return rows


def write_report(out: str | Path, results: list[dict], *, labels: str | Path | None = None,
                 model: str | Path | None = None, seconds: float | None = None, scale=None,
                 annotations_dir: str | Path | None = None, threads: dict | None = None) -> dict | None:
    """Write ``report.json`` and ``report.html`` (and ``roc.png`` with ``labels``) into ``out``.

    ``scale`` (the run's cohort :class:`~wsi_ad.overlay.ScoreScale`) and ``annotations_dir`` (the lesion outlines'
    folder) are recorded for ``wsi-ad view``; ``threads``, the thread pools of this process and of each Dask worker
    (:mod:`wsi_ad.threads`). Returns the slide-level metrics when labels were given (else None).
    """
    out = Path(out)
    metrics, label_map = None, None
    if labels is not None:
        metrics, label_map = slide_metrics(labels, results)
        if metrics["overall"]["auc"] is not None:
            metrics["roc_png"] = str(_plot_roc(out / "roc.png", metrics))
    rows = report_rows(results, label_map)
    report = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wsi_ad_version": __version__,
        "out": str(out),
        "model": str(model) if model else None,
        "seconds": round(seconds, 1) if seconds is not None else None,
        "n_slides": len(rows),
        "n_failed": sum(r["status"] == "failed" for r in rows),
        "metrics": metrics,
        "scale": scale.to_dict() if scale is not None else None,
        "annotations_dir": str(Path(annotations_dir).resolve()) if annotations_dir else None,
        "threads": threads,
        "slides": rows,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=float))
    write_text_atomic(out / "report.html", render_html(report, out))
    return metrics


def slide_metrics(labels: str | Path, results: list[dict]) -> tuple[dict, dict[str, str]]:
    """Slide-level ROC AUC (bootstrap 95 % CI; overall, Macro and Micro splits) of the scored slides against a
    Camelyon16-style reference CSV (:func:`wsi_ad.metrics.slide_auc_report`); returns (metrics, {slide id
    (lower case): "Tumor"/"Normal"}). Reference rows of slides not in this run are left out, not counted
    as missing; a slide of the run that failed or has no score is listed in ``missing``."""
    from wsi_ad.metrics import normalize_slide_id, read_reference_csv, slide_auc_report

    reference = read_reference_csv(labels)
    run_ids = {normalize_slide_id(r["slide_id"]) for r in results}
    scores = {r["slide_id"]: r["slide_score"] for r in results
              if r["status"] == "ok" and r.get("slide_score") is not None}
    metrics = slide_auc_report([row for row in reference if row.key in run_ids], scores)
    metrics["auc"] = metrics["overall"]["auc"]
    metrics["labels"] = str(labels)
    return metrics, {row.key: row.label for row in reference}


def plot_roc(path: Path, fpr, tpr, *, label: str, title: str, xlabel: str, ylabel: str) -> Path:
    """Write a ROC curve (with the chance diagonal) as a PNG, atomically; returns ``path``."""
    return plot_roc_curves(path, [(label, fpr, tpr)], title=title, xlabel=xlabel, ylabel=ylabel, size=4)


def plot_roc_curves(path: Path, curves, *, title: str, xlabel: str, ylabel: str, size: float = 6) -> Path:
    """Write ROC curves ``[(label, fpr, tpr), ...]`` (with the chance diagonal) as one PNG, atomically; returns
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, drawstyle="steps-post", label=label)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png")
    plt.close(fig)
    return path


def _plot_roc(path: Path, metrics: dict) -> Path:
    overall = metrics["overall"]
    return plot_roc(path, overall["roc"]["fpr"], overall["roc"]["tpr"],
                    label=f"AUC {overall['auc']:.3f} (95% CI {overall['ci_low']:.3f}–{overall['ci_high']:.3f})",
                    title="Slide-level ROC", xlabel="false positive rate (normal slides)",
                    ylabel="true positive rate (tumour slides)")


def _rel(path: str | None, out: Path) -> str | None:
    if not path or not Path(path).exists():
        return None
    return os.path.relpath(path, out)


def render_html(report: dict, out: Path) -> str:
    """A self-contained HTML page (images linked relative to ``out``)."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>wsi-ad report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px} th{background:#f3f3f3}",
        "img.t{max-width:220px;max-height:220px} .failed{background:#fde8e8} .num{text-align:right}",
        "</style></head><body>",
        f"<h1>wsi-ad report</h1><p>{esc(report['created'])} · wsi-ad {esc(report['wsi_ad_version'])} · "
        f"{report['n_slides']} slides, {report['n_failed']} failed"
        + (f" · {report['seconds']:.0f} s" if report.get("seconds") is not None else "")
        + (f" · model <code>{esc(report['model'])}</code>" if report.get("model") else "") + "</p>",
    ]
    metrics = report.get("metrics")
    if metrics:
        parts.append("<h2>Slide-level evaluation</h2><ul>")
        for name, title in (("overall", "Tumour vs normal slides"), ("macro", "Macro-metastases vs normal"),
                            ("micro", "Micro-metastases vs normal")):
            block = metrics[name]
            if block["auc"] is not None:
                parts.append(f"<li>{title}: ROC AUC <b>{block['auc']:.3f}</b> (bootstrap 95% CI "
                             f"{block['ci_low']:.3f}–{block['ci_high']:.3f}), {block['n_tumor']} tumour vs "
                             f"{block['n_normal']} normal slides</li>")
            elif name == "overall":
                parts.append(f"<li>{title}: ROC AUC not defined ({esc(str(block.get('note')))})</li>")
        if metrics.get("missing"):
            parts.append(f"<li>Not scored: {esc(', '.join(metrics['missing']))}</li>")
        parts.append("</ul>")
        roc = _rel(metrics.get("roc_png"), out)
        if roc:
            parts.append(f"<img src='{esc(roc)}' alt='ROC curve'>")
    parts.append("<h2>Slides</h2><table><tr><th>slide</th><th>thumbnail</th><th>overlay</th><th>slide score</th>"
                 "<th>label</th><th>tissue mm²</th><th>tiles</th><th>stage seconds</th><th>exports</th><th>notes</th></tr>")
    for row in report["slides"]:
        failed = row["status"] == "failed"
        thumb, overlay = _rel(row.get("thumbnail"), out), _rel(row.get("overlay"), out)
        timings = ", ".join(f"{k} {v:.1f}" for k, v in (row.get("stage_seconds") or {}).items() if v is not None)
        notes = (f"<b>failed at {esc(str(row.get('failed_task')))}</b>: {esc(str(row.get('error')))}" if failed
                 else esc("; ".join(row.get("warnings") or [])))
        score = f"{row['slide_score']:.4g}" if row.get("slide_score") is not None else "–"
        area = f"{row['tissue_area_mm2']:.2f}" if row.get("tissue_area_mm2") is not None else ""
        exports = " ".join(f"<a href={esc(rel)!r}>{esc(fmt)}</a>" for fmt, path in (row.get("exports") or {}).items()
                           if (rel := _rel(path, out)))
        parts.append(
            f"<tr class='{'failed' if failed else ''}'><td>{esc(row['slide_id'])}</td>"
            f"<td>{f'<a href={esc(thumb)!r}><img class=t src={esc(thumb)!r}></a>' if thumb else ''}</td>"
            f"<td>{f'<a href={esc(overlay)!r}><img class=t src={esc(overlay)!r}></a>' if overlay else ''}</td>"
            f"<td class=num>{score}</td><td>{esc(row.get('label') or '')}</td>"
            f"<td class=num>{area}</td>"
            f"<td class=num>{'' if row.get('n_tiles') is None else row['n_tiles']}</td>"
            f"<td>{esc(timings)}</td><td>{exports}</td><td>{notes}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)
