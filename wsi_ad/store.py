"""The per-slide artifact: one zarr v3 group ``<out>/<slide_id>.zarr`` that every stage writes into.

Layout (see the project's DESIGN): root attributes describe the source slide (path, size, mtime, reader,
µm/px, levels) and list the completed stages; each stage owns one sub-group (``tissue``, ``tiles``,
``stain``, ``scores/<model_id>``, ...).

Atomicity and resume:

* the store itself is created in a temporary sibling directory and renamed into place, so a store either
  exists with its root attributes or not at all;
* a stage is written into a temporary sub-directory of the store, renamed over the stage's group when
  complete, and only then recorded as complete in the root attributes (``stages``), together with the
  hash of the configuration that produced it. A run killed at any point leaves either the previous
  complete stage or an unmarked one, which the next run recomputes;
* a long stage that must survive a kill part-way (scoring) is instead written in place, piece by piece,
  into its own group (:meth:`SlideStore.resumable_stage`): the group carries the key (configuration hash,
  chunk layout) its pieces were made with and the stage records which pieces are done; a re-run with the
  same key continues from the first unfinished piece, another key starts it afresh. It too is marked
  complete (:meth:`SlideStore.mark_complete`) only when every piece is there;
* a stage whose recorded configuration hash equals the requested one is skipped; a changed
  configuration recomputes it. A changed source file (size or mtime) invalidates every stage.

zarr itself writes each metadata document with a temporary file and a rename, so the root attributes are
never half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import zarr

from wsi_ad import __version__, codecs  # noqa: F401  (registers the wsi_ad.jpeg codec)
from wsi_ad.atomic import atomic_path
from wsi_ad.errors import WsiAdError
from wsi_ad.files import is_hidden

#: Bump when the layout changes incompatibly; a store of another format version is rebuilt.
STORE_FORMAT_VERSION = 1
STORE_SUFFIX = ".zarr"


class StoreError(WsiAdError):
    """A slide store is missing, not a wsi-ad store, or lacks a stage a reader needs."""


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-serializable configuration (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a source file's content cheaply: absolute path, size in bytes, mtime in ns."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def store_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    """``<out_dir>/<slide_id>.zarr``."""
    return Path(out_dir) / f"{slide_id}{STORE_SUFFIX}"


def qc_png_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    """The tissue-mask QC image written beside the stores: ``<out_dir>/qc/<slide_id>.tissue.png``."""
    return Path(out_dir) / "qc" / f"{slide_id}.tissue.png"


def is_store_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a store itself (a ``*.zarr`` folder, or any folder holding a zarr group)
    rather than a folder of stores. Cheap: looks at names only, opens nothing."""
    path = Path(path)
    return path.is_dir() and (path.suffix == STORE_SUFFIX or (path / "zarr.json").is_file())


def stores_in(folder: str | os.PathLike) -> list[Path]:
    """The ``*.zarr`` stores directly in ``folder`` (e.g. the ``--out`` of ``wsi-ad process``), sorted; hidden
    ones (names starting with ``.``, such as a store being created) skipped."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix == STORE_SUFFIX and not is_hidden(p) and p.is_dir())


class SlideStore:
    """A slide's zarr v3 store. Create or reopen with :meth:`for_slide`; read with :meth:`open`."""

    def __init__(self, path: str | os.PathLike, mode: str = "r+"):
        self.path = Path(path)
        try:
            self.root = zarr.open_group(self.path, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"{self.path}: not a slide store (no zarr group there)") from exc
        if self.root.attrs.get("format_version") is None:
            raise StoreError(f"{self.path}: not a wsi-ad slide store (no format_version attribute)")

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> SlideStore:
        """Open an existing store (read-only by default)."""
        return cls(path, mode=mode)

    @classmethod
    def for_slide(cls, out_dir: str | os.PathLike, slide) -> SlideStore:
        """Reopen ``<out_dir>/<slide_id>.zarr`` if it was made from this very source file, else (re)create it.

        ``slide`` is an open :class:`wsi_ad.slide.Slide`. A store whose recorded source size/mtime or
        format version differ is replaced as a whole (atomically) by a fresh, empty one.
        """
        path = store_path(out_dir, slide.slide_id)
        attrs = slide_attributes(slide)
        if path.exists():
            with contextlib.suppress(StoreError):
                existing = cls(path, mode="r+")
                same_source = existing.root.attrs.get("source") == attrs["source"]
                same_format = existing.root.attrs.get("format_version") == STORE_FORMAT_VERSION
                if same_source and same_format:
                    existing.remove_stale_temporaries()
                    return existing
        with atomic_path(path) as temp:
            root = zarr.open_group(temp, mode="w")
            root.attrs.update(attrs)
        return cls(path, mode="r+")

    # -- stages ---------------------------------------------------------------------------------

    @property
    def stages(self) -> dict[str, dict]:
        """Completed stages: name -> {config_hash, completed_at, seconds, ...}."""
        return dict(self.root.attrs.get("stages", {}))

    def is_complete(self, stage: str, config_hash_: str | None = None) -> bool:
        """Whether ``stage`` is complete (and, if given, was made with configuration ``config_hash_``)."""
        info = self.stages.get(stage)
        if info is None or not (self.path / stage).is_dir():
            return False
        return config_hash_ is None or info.get("config_hash") == config_hash_

    def require(self, stage: str) -> zarr.Group:
        """The group of a completed stage, or a :class:`StoreError` saying which stage is missing."""
        if not self.is_complete(stage):
            raise StoreError(f"{self.path}: stage '{stage}' has not been run (completed: "
                             f"{', '.join(sorted(self.stages)) or 'none'})")
        return self.root[stage]

    @contextlib.contextmanager
    def write_stage(self, stage: str, config_hash_: str, *, started: float | None = None,
                    **marker: Any) -> Iterator[zarr.Group]:
        """Write a stage atomically: yields an empty group in a temporary directory of the store.

        On success the directory replaces the stage's group and the stage is recorded as complete with
        ``config_hash_``, ``marker`` (extra JSON-serializable facts, e.g. counts) and the seconds since
        ``started`` (a ``time.perf_counter()`` value taken when the stage's work began; default: when the
        writing began, which leaves out work done before it). On an exception the
        temporary directory is removed and the previous state stays as it was, minus the completion mark
        (which is withdrawn before anything is written).
        """
        self._set_stage_marker(stage, None)
        final = self.path / stage
        temp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._ensure_parent_groups(stage)
        started = time.perf_counter() if started is None else started
        try:
            group = zarr.open_group(temp, mode="w")
            yield group
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
        self._set_stage_marker(stage, {
            "config_hash": config_hash_,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 3),
            **marker,
        })

    def resumable_stage(self, stage: str, resume_key: Mapping[str, Any]) -> tuple[zarr.Group, bool]:
        """Open a stage's group for resumable, piece-by-piece writing in place (unlike :meth:`write_stage`).

        The stage's completion mark is withdrawn first. When the stage's group already exists and its
        ``resume_key`` attribute equals ``resume_key`` (a JSON-serializable mapping: the configuration
        hash and whatever else must match to continue, e.g. the chunk layout), it is returned as it is,
        with what a previous, interrupted run wrote into it; zarr's temporary ``*.partial`` chunk files
        a killed writer left behind are removed. Otherwise the group is replaced by an empty one carrying
        ``resume_key``. Returns ``(group, resumed)``. The caller records its own progress inside the
        group (e.g. a per-chunk done flag written after each chunk) and calls :meth:`mark_complete` at
        the end.
        """
        self._set_stage_marker(stage, None)
        key = json.loads(json.dumps(dict(resume_key), sort_keys=True, default=str))
        final = self.path / stage
        if final.is_dir():
            try:
                existing = zarr.open_group(final, mode="r+")
                same = dict(existing.attrs).get("resume_key") == key
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
                same = False
            if same:
                for leftover in final.rglob("*.partial"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                return existing, True
            shutil.rmtree(final)
        self._ensure_parent_groups(stage)
        group = self.root.create_group(stage, overwrite=True)
        group.attrs["resume_key"] = key
        return group, False

    def mark_complete(self, stage: str, config_hash_: str, *, started: float | None = None, **marker: Any) -> None:
        """Record ``stage`` (whose group must exist) as complete with ``config_hash_`` and ``marker`` (extra
        JSON-serializable facts), plus ``completed_at`` and, when ``started`` (a ``time.perf_counter()``
        value) is given, the ``seconds`` since then. For stages written with :meth:`resumable_stage`;
        :meth:`write_stage` marks its stages itself."""
        if not (self.path / stage).is_dir():
            raise StoreError(f"{self.path}: cannot mark stage '{stage}' complete: its group does not exist")
        info: dict[str, Any] = {"config_hash": config_hash_, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if started is not None:
            info["seconds"] = round(time.perf_counter() - started, 3)
        info.update(marker)
        self._set_stage_marker(stage, info)

    def invalidate(self, stage: str) -> None:
        """Withdraw a stage's completion mark, so that the next run recomputes it."""
        self._set_stage_marker(stage, None)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary stage directories a killed run left behind; returns what was removed."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_dir()]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def _ensure_parent_groups(self, stage: str) -> None:
        parts = stage.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            name = "/".join(parts[:depth])
            if name not in self.root:
                self.root.create_group(name)

    def _set_stage_marker(self, stage: str, info: dict | None) -> None:
        stages = self.stages
        if info is None:
            if stage not in stages:
                return
            stages.pop(stage)
        else:
            stages[stage] = info
        self.root.attrs["stages"] = stages

    def __repr__(self) -> str:
        return f"SlideStore({str(self.path)!r}, stages={sorted(self.stages)})"


def slide_attributes(slide) -> dict[str, Any]:
    """Root attributes describing the source slide (JSON-ready); µm/px are level-0."""
    import openslide

    return {
        "format_version": STORE_FORMAT_VERSION,
        "wsi_ad_version": __version__,
        "slide_id": slide.slide_id,
        "source": source_fingerprint(slide.path),
        "reader": {"library": "openslide", "version": openslide.__library_version__, "vendor": slide.vendor},
        "mpp_x": slide.mpp_x,
        "mpp_y": slide.mpp_y,
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [list(d) for d in slide.level_downsamples],
        "stages": {},
    }
