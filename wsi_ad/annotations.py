"""Lesion annotations in ASAP XML, the format of the Camelyon16 ``lesion_annotations`` files.

Schema (as in the official files)::

    <ASAP_Annotations>
      <Annotations>
        <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
          <Coordinates>
            <Coordinate Order="0" X="32841.3" Y="14389.6" />
            ...
      <AnnotationGroups>
        <Group Name="_0" PartOfGroup="None" Color="#00aa00"><Attributes /></Group>

Coordinates are level-0 pixels (x to the right, y down), floats. Group ``_0``/``_1`` annotations are
tumour, group ``_2`` annotations are exclusion regions (normal tissue drawn inside a tumour), as in the
official Camelyon16 evaluation code. Files are parsed with ``defusedxml`` so entity-expansion bombs and
external entities are refused rather than expanded.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as StdET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np
import skimage.draw

from wsi_ad.atomic import atomic_path
from wsi_ad.errors import AnnotationError

TUMOR = "tumor"
EXCLUSION = "exclusion"

log = logging.getLogger(__name__)

#: Group names (compared case-insensitively) and the kind they mean. ``_0`` and ``_1`` are the two
#: Camelyon16 tumour groups, ``_2`` the exclusion group; the named variants occur in Camelyon17 and
#: in hand-made ASAP files. ``None`` is what ASAP writes for an annotation outside any group; the
#: Camelyon16 evaluation code never counts those as tumour, so they are treated as exclusion.
DEFAULT_GROUP_KINDS: Mapping[str, str] = {
    "_0": TUMOR,
    "_1": TUMOR,
    "tumor": TUMOR,
    "metastases": TUMOR,
    "_2": EXCLUSION,
    "exclusion": EXCLUSION,
    "none": EXCLUSION,
}

#: The annotation groups (name, colour) that the Camelyon16 files declare; written by ``write_asap_xml``.
CAMELYON_GROUPS: tuple[tuple[str, str], ...] = (("_0", "#00aa00"), ("_1", "#00aa00"), ("_2", "#aa0000"))

#: Annotation colour the Camelyon16 files use for every polygon.
ANNOTATION_COLOR = "#F4FA58"


@dataclass(frozen=True, eq=False)
class Annotation:
    """One annotated region.

    ``vertices`` is an (N, 2) float64 array of level-0 pixel coordinates (x, y), in the file's
    ``Order``. ``kind`` is ``"tumor"`` or ``"exclusion"``. ``shape_type`` is the ASAP ``Type``
    (``Polygon``, ``Spline``, ...); a spline's control points are used as polygon vertices, as the
    official Camelyon16 evaluation code does.
    """

    name: str
    group: str
    kind: str
    shape_type: str
    vertices: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (
            (self.name, self.group, self.kind, self.shape_type)
            == (other.name, other.group, other.kind, other.shape_type)
            and self.vertices.shape == other.vertices.shape
            and bool(np.array_equal(self.vertices, other.vertices))
        )

    __hash__ = None  # type: ignore[assignment]  # holds an array: not hashable

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the vertices, level-0 pixels."""
        x_min, y_min = self.vertices.min(axis=0)
        x_max, y_max = self.vertices.max(axis=0)
        return float(x_min), float(y_min), float(x_max), float(y_max)

    def area_px(self) -> float:
        """Area enclosed by the vertices (shoelace formula), squared level-0 pixels."""
        x, y = self.vertices[:, 0], self.vertices[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    def major_axis_px(self) -> float:
        """Largest distance between two vertices (the Feret diameter), level-0 pixels."""
        v = self.vertices
        d = np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1))
        return float(d.max())


def group_kind(group: str, group_kinds: Mapping[str, str] | None = None) -> str | None:
    """The kind (``"tumor"``/``"exclusion"``) of an annotation group name, or None when unknown.

    ``group_kinds`` adds to or overrides ``DEFAULT_GROUP_KINDS``; names compare case-insensitively.
    """
    table = {k.lower(): v for k, v in DEFAULT_GROUP_KINDS.items()}
    if group_kinds:
        table.update({k.lower(): v for k, v in group_kinds.items()})
    return table.get(group.strip().lower())


def _parse_number(text: str | None, what: str) -> float:
    """A coordinate value; accepts a comma as decimal separator (``"123,5"``), as some files have."""
    if text is None:
        raise ValueError(f"{what} is missing")
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        raise ValueError(f"{what} is not a number: {text!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{what} is not finite: {text!r}")
    return value


#: ASAP annotation types that outline a region (a lesion or an exclusion); the others (Dot, PointSet,
#: Measurement, ...) mark points or lines, which have no area.
REGION_TYPES = ("Polygon", "Spline", "Rectangle")


def _parse_annotation(elem: StdET.Element, index: int, group_kinds: Mapping[str, str] | None) -> Annotation | None:
    """The region of ``elem``, or None for a point or line annotation (no area: never lesion tissue)."""
    name = elem.get("Name") or f"Annotation {index}"
    group = elem.get("PartOfGroup") or "None"
    shape_type = elem.get("Type") or "Polygon"
    if shape_type not in REGION_TYPES:
        return None
    kind = group_kind(group, group_kinds)
    if kind is None:
        raise ValueError(
            f"annotation {name!r} is in unknown group {group!r}; known groups are "
            f"{sorted(DEFAULT_GROUP_KINDS)} (pass group_kinds={{{group!r}: 'tumor' or 'exclusion'}} "
            "to read it)"
        )
    points = []
    for pos, coord in enumerate(elem.iter("Coordinate")):
        order_text = coord.get("Order")
        order = pos if order_text is None else _parse_number(order_text, f"{name} Coordinate Order")
        x = _parse_number(coord.get("X"), f"{name} Coordinate {order_text} X")
        y = _parse_number(coord.get("Y"), f"{name} Coordinate {order_text} Y")
        points.append((order, pos, x, y))
    if len(points) < 3:
        raise ValueError(f"annotation {name!r} ({shape_type}) has {len(points)} vertices; a region needs >= 3")
    points.sort(key=lambda p: (p[0], p[1]))
    vertices = np.array([(p[2], p[3]) for p in points], dtype=np.float64)
    vertices.setflags(write=False)
    return Annotation(name=name, group=group, kind=kind, shape_type=shape_type, vertices=vertices)


def read_asap_xml(path: str | os.PathLike, *, group_kinds: Mapping[str, str] | None = None) -> list[Annotation]:
    """Read every annotation of an ASAP XML file, in file order.

    Group names map to kinds through ``DEFAULT_GROUP_KINDS`` (plus ``group_kinds``). An annotation in
    any other group raises ``AnnotationError``: guessing "tumour" would silently corrupt labels and
    FROC, guessing "exclusion" would silently drop lesions, so the caller must say what the group means.

    Only regions (:data:`REGION_TYPES`: Polygon, Spline, Rectangle) are returned; points and lines (ASAP
    ``Dot``, ``PointSet``, ``Measurement``, ...) have no area, so they are skipped with a logged warning.

    Raises ``AnnotationError(path, cause)`` for a missing or unreadable file, malformed XML, forbidden
    XML constructs (DTD entities, external references), non-numeric coordinates or a region with fewer
    than 3 vertices.
    """
    path = Path(path)
    try:
        tree = SafeET.parse(path)
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(path, f"unsafe XML refused ({type(exc).__name__}: {exc})") from None
    except StdET.ParseError as exc:
        raise AnnotationError(path, f"malformed XML: {exc}") from None
    except OSError as exc:
        raise AnnotationError(path, f"cannot read: {exc}") from None
    root = tree.getroot()
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(path, f"not an ASAP annotation file (root element <{root.tag}>)")
    annotations, skipped = [], []
    for index, elem in enumerate(root.iter("Annotation")):
        try:
            annotation = _parse_annotation(elem, index, group_kinds)
        except ValueError as exc:
            raise AnnotationError(path, str(exc)) from None
        if annotation is None:
            skipped.append(f"{elem.get('Name') or f'Annotation {index}'} ({elem.get('Type')})")
        else:
            annotations.append(annotation)
    if skipped:
        log.warning("%s: skipped %d point/line annotation(s) without area: %s", path, len(skipped), ", ".join(skipped))
    return annotations


def _format_number(value: float) -> str:
    """Shortest decimal text that reads back as exactly ``value`` (``repr`` of a float)."""
    return repr(float(value))


def asap_xml_string(annotations: Iterable[Annotation]) -> str:
    """The ASAP XML document (tab-indented, as the Camelyon16 files are) for ``annotations``."""
    annotations = list(annotations)
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for ann in annotations:
        attrs = {
            "Name": ann.name,
            "Type": ann.shape_type,
            "PartOfGroup": ann.group,
            "Color": ANNOTATION_COLOR,
        }
        attr_text = " ".join(f'{k}="{_escape(v)}"' for k, v in attrs.items())
        lines.append(f"\t\t<Annotation {attr_text}>")
        lines.append("\t\t\t<Coordinates>")
        for order, (x, y) in enumerate(np.asarray(ann.vertices, dtype=np.float64)):
            lines.append(
                f'\t\t\t\t<Coordinate Order="{order}" X="{_format_number(x)}" Y="{_format_number(y)}" />'
            )
        lines.append("\t\t\t</Coordinates>")
        lines.append("\t\t</Annotation>")
    lines.append("\t</Annotations>")
    lines.append("\t<AnnotationGroups>")
    groups = list(CAMELYON_GROUPS)
    known = {name for name, _ in groups}
    for ann in annotations:
        if ann.group not in known:
            known.add(ann.group)
            groups.append((ann.group, "#aa0000" if ann.kind == EXCLUSION else "#00aa00"))
    for name, color in groups:
        lines.append(f'\t\t<Group Name="{_escape(name)}" PartOfGroup="None" Color="{color}">')
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return (
        str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def write_asap_xml(path: str | os.PathLike, annotations: Iterable[Annotation]) -> Path:
    """Write ``annotations`` as an ASAP XML file (the Camelyon16 schema), atomically; returns the path.

    The file declares the Camelyon16 groups ``_0``, ``_1`` (tumour) and ``_2`` (exclusion) plus any
    other group an annotation uses. Coordinates are written with full float precision, so reading the
    file back gives exactly the same vertices.
    """
    text = asap_xml_string(annotations)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def annotation_file(folder: str | os.PathLike, slide_id: str) -> Path | None:
    """The ASAP XML file of slide ``slide_id`` in ``folder``: ``<slide_id>.xml``, matched the way slide ids are
    compared everywhere (:func:`wsi_ad.metrics.normalize_slide_id`: case-insensitively, so ``Test_001`` of a
    reference CSV finds ``test_001.xml``); hidden files are not annotations. None when there is none.

    Raises ``AnnotationError`` when two files in ``folder`` match (``Test_001.xml`` and ``test_001.xml``)."""
    from wsi_ad.metrics import normalize_slide_id

    folder = Path(folder)
    exact = folder / f"{slide_id}.xml"
    if exact.is_file() and not exact.name.startswith("."):
        matches = [exact]
    else:
        key = normalize_slide_id(slide_id)
        matches = [p for p in (folder.iterdir() if folder.is_dir() else ())
                   if p.suffix.lower() == ".xml" and not p.name.startswith(".") and p.is_file()
                   and normalize_slide_id(p.name) == key]
    if len(matches) > 1:
        raise AnnotationError(folder, f"{len(matches)} annotation files for slide {slide_id} "
                                      f"({', '.join(sorted(p.name for p in matches))}); keep one")
    return matches[0] if matches else None


def tumor_annotations(annotations: Iterable[Annotation]) -> list[Annotation]:
    """The tumour annotations (kind ``"tumor"``)."""
    return [a for a in annotations if a.kind == TUMOR]


def exclusion_annotations(annotations: Iterable[Annotation]) -> list[Annotation]:
    """The exclusion annotations (kind ``"exclusion"``)."""
    return [a for a in annotations if a.kind == EXCLUSION]


def polygon_mask(
    vertices: np.ndarray, shape: tuple[int, int], downsample: float = 1.0, origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Boolean (rows, cols) mask of one polygon on a pixel grid of ``downsample`` level-0 px per pixel.

    Pixel (r, c) covers level-0 x in ``[origin_x + c*downsample, origin_x + (c+1)*downsample)`` (same
    for y) and is inside when its centre is inside the polygon (``skimage.draw.polygon``).
    ``vertices`` are level-0 (x, y); ``origin`` is the level-0 (x, y) of the grid's top-left corner.
    """
    v = np.asarray(vertices, dtype=np.float64)
    cols = (v[:, 0] - origin[0]) / downsample - 0.5
    rows = (v[:, 1] - origin[1]) / downsample - 0.5
    mask = np.zeros(shape, dtype=bool)
    rr, cc = skimage.draw.polygon(rows, cols, shape=shape)
    mask[rr, cc] = True
    return mask


def rasterize_annotations(
    annotations: Iterable[Annotation], shape: tuple[int, int], downsample: float = 1.0
) -> np.ndarray:
    """Boolean tumour mask (tumour minus exclusion) of shape ``(rows, cols)`` at level-0 / ``downsample``.

    ``shape`` is the mask size in pixels of ``downsample`` level-0 px each (e.g. the level-0 size
    divided by 32 for a level-5 mask). A pixel is tumour when its centre lies inside a tumour polygon
    and not inside an exclusion polygon.
    """
    annotations = list(annotations)
    mask = np.zeros(shape, dtype=bool)
    for ann in tumor_annotations(annotations):
        mask |= polygon_mask(ann.vertices, shape, downsample)
    for ann in exclusion_annotations(annotations):
        mask &= ~polygon_mask(ann.vertices, shape, downsample)
    return mask


def fill_polygon(
    vertices: np.ndarray, shape: tuple[int, int], downsample: float = 1.0, origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Same mask as ``polygon_mask`` (pixel centres inside, even-odd rule) by a vectorized scanline fill.

    Costs O(rows x vertices + rows x cols) instead of ``skimage.draw.polygon``'s O(rows x cols x
    vertices), which matters for tiles of large polygons (a 512 x 512 tile of a 160-vertex lesion:
    about 1 ms instead of 200 ms). ``vertices`` are level-0 (x, y); ``origin`` is the level-0 (x, y) of
    the grid's top-left corner; one pixel is ``downsample`` level-0 px.
    """
    rows, cols = shape
    v = np.asarray(vertices, dtype=np.float64)
    x = (v[:, 0] - origin[0]) / downsample
    y = (v[:, 1] - origin[1]) / downsample
    x1, y1, x2, y2 = x, y, np.roll(x, -1), np.roll(y, -1)
    yc = np.arange(rows, dtype=np.float64)[:, None] + 0.5  # row centres
    crosses = (y1[None, :] <= yc) != (y2[None, :] <= yc)
    r_idx, e_idx = np.nonzero(crosses)
    mask = np.zeros(shape, dtype=bool)
    if r_idx.size == 0:
        return mask
    t = (yc[r_idx, 0] - y1[e_idx]) / (y2[e_idx] - y1[e_idx])
    x_int = x1[e_idx] + t * (x2[e_idx] - x1[e_idx])
    # pixel c is right of the crossing when its centre c + 0.5 > x_int
    first = np.clip(np.floor(x_int - 0.5).astype(np.int64) + 1, 0, cols)
    toggles = np.zeros((rows, cols + 1), dtype=np.int32)
    np.add.at(toggles, (r_idx, first), 1)
    np.cumsum(toggles, axis=1, out=toggles)
    return (toggles[:, :cols] & 1).astype(bool)
