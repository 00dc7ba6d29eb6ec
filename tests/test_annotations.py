"""ASAP XML annotations: the real Camelyon16 files, round trips, unsafe and broken input, rasterizing."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ad.annotations import (
    Annotation,
    exclusion_annotations,
    rasterize_annotations,
    read_asap_xml,
    tumor_annotations,
    write_asap_xml,
)
from wsi_ad.errors import AnnotationError, WsiAdError


def _square(x0: float, y0: float, side: float, group: str = "_0", kind: str = "tumor", name: str = "sq") -> Annotation:
    v = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], dtype=np.float64)
    return Annotation(name=name, group=group, kind=kind, shape_type="Polygon", vertices=v)


@pytest.mark.shared_data
def test_tumor_110_has_21_tumor_and_18_exclusion_polygons(shared_data):
    anns = read_asap_xml(shared_data / "camelyon16" / "annotations" / "tumor_110.xml")
    assert len(anns) == 39
    tumors, exclusions = tumor_annotations(anns), exclusion_annotations(anns)
    assert len(tumors) == 21 and {a.group for a in tumors} == {"_0"}
    assert len(exclusions) == 18 and {a.group for a in exclusions} == {"_2"}
    first = anns[0]
    assert first.name == "Annotation 0" and first.shape_type == "Polygon"
    assert first.vertices.dtype == np.float64 and first.vertices.shape[1] == 2
    np.testing.assert_array_equal(first.vertices[0], [32841.3, 14389.6])
    np.testing.assert_array_equal(first.vertices[6], [33006.0, 14071.6])


@pytest.mark.shared_data
def test_test_046_splines_parse_as_polygons(shared_data):
    anns = read_asap_xml(shared_data / "camelyon16" / "annotations" / "test_046.xml")
    assert len(anns) == 4
    assert all(a.shape_type == "Spline" and a.kind == "tumor" for a in anns)
    assert all(len(a.vertices) >= 3 for a in anns)
    np.testing.assert_array_equal(anns[0].vertices[0], [54665.4, 22319.6])
    # a micro-metastasis slide: every lesion is under 2 mm at 0.243 um/px
    assert max(a.major_axis_px() for a in anns) * 0.243 < 2000


def test_write_read_round_trip_keeps_exact_vertices(tmp_path):
    rng = np.random.default_rng(3)
    anns = [
        Annotation("Annotation 0", "_0", "tumor", "Polygon", rng.uniform(0, 1e5, size=(57, 2))),
        Annotation("Annotation 1", "_2", "exclusion", "Polygon", rng.uniform(0, 1e5, size=(4, 2))),
        Annotation("Lesion <&>", "_1", "tumor", "Spline", np.array([[0.1, 0.2], [1e-7, 3.0], [12345.678901234, 9.0]])),
    ]
    path = write_asap_xml(tmp_path / "sub" / "a.xml", anns)
    back = read_asap_xml(path)
    assert back == anns
    text = path.read_text()
    for group in ('Name="_0"', 'Name="_1"', 'Name="_2"'):
        assert group in text
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_comma_decimal_separator_and_order_attribute(tmp_path):
    path = tmp_path / "comma.xml"
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        '<Annotation Name="A" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58"><Coordinates>'
        '<Coordinate Order="2" X="30,5" Y="40,25" /><Coordinate Order="0" X="10,5" Y="20" />'
        '<Coordinate Order="1" X="20" Y="20.75" />'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    (ann,) = read_asap_xml(path)
    assert ann.kind == "tumor"
    np.testing.assert_array_equal(ann.vertices, [[10.5, 20.0], [20.0, 20.75], [30.5, 40.25]])


def _xml_with(coords: str, group: str = "_0") -> str:
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        f'<Annotation Name="A" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58"><Coordinates>'
        f"{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )


TRIANGLE = '<Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="5" Y="0" /><Coordinate Order="2" X="0" Y="5" />'


def test_billion_laughs_is_refused_without_expanding(tmp_path):
    path = tmp_path / "bomb.xml"
    entities = ['<!ENTITY lol "lol">'] + [
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    ]
    path.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE ASAP_Annotations [\n' + "\n".join(entities) + "\n]>\n"
        '<ASAP_Annotations><Annotations><Annotation Name="&lol9;" Type="Polygon" PartOfGroup="_0">'
        f"<Coordinates>{TRIANGLE}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(AnnotationError, match="unsafe XML") as info:
        read_asap_xml(path)
    assert str(path) in str(info.value)
    # 10**9 "lol"s would be gigabytes; refusing must not grow the process noticeably (ru_maxrss in KiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


def test_external_entity_is_refused(tmp_path):
    path = tmp_path / "xxe.xml"
    path.write_text(
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f'<ASAP_Annotations><Annotations><Annotation Name="&x;" PartOfGroup="_0"><Coordinates>{TRIANGLE}'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    with pytest.raises(AnnotationError, match="unsafe XML"):
        read_asap_xml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<ASAP_Annotations><Annotations>", "malformed XML"),
        ("", "malformed XML"),
        ("<Other/>", "not an ASAP annotation file"),
        (_xml_with('<Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="5" Y="0" />'), "needs >= 3"),
        (_xml_with(TRIANGLE.replace('X="5"', 'X="five"')), "not a number"),
        (_xml_with(TRIANGLE.replace('X="5"', 'X="nan"')), "not finite"),
        (_xml_with(TRIANGLE.replace(' Y="5"', "")), "missing"),
        (_xml_with(TRIANGLE, group="Lymphocytes"), "unknown group 'Lymphocytes'"),
    ],
)
def test_bad_files_raise_annotation_error_naming_the_path(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message) as info:
        read_asap_xml(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, WsiAdError)


def test_missing_file_raises_annotation_error(tmp_path):
    path = tmp_path / "nope.xml"
    with pytest.raises(AnnotationError, match="file not found") as info:
        read_asap_xml(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_unknown_group_can_be_mapped_explicitly(tmp_path):
    path = tmp_path / "g.xml"
    path.write_text(_xml_with(TRIANGLE, group="Lymphocytes"))
    (ann,) = read_asap_xml(path, group_kinds={"lymphocytes": "exclusion"})
    assert ann.kind == "exclusion"


def test_rasterize_square_pixel_count_and_exclusion():
    # a 100 x 100 level-0 px square at (200, 300): 10 x 10 pixels at downsample 10, 100 x 100 at 1
    square = _square(200, 300, 100)
    assert rasterize_annotations([square], (100, 100), downsample=10).sum() == 100
    full = rasterize_annotations([square], (1000, 1000), downsample=1)
    assert full.sum() == 100 * 100
    assert full[300:400, 200:300].all()
    # an exclusion square of 40 x 40 inside it is removed; a tumour elsewhere is added
    hole = _square(220, 320, 40, group="_2", kind="exclusion")
    other = _square(0, 0, 20, group="_1")
    mask = rasterize_annotations([square, hole, other], (1000, 1000), downsample=1)
    assert mask.sum() == 100 * 100 - 40 * 40 + 20 * 20
    assert not mask[320:360, 220:260].any()
    assert mask.dtype == bool and mask.shape == (1000, 1000)


def test_scanline_fill_matches_skimage_polygon():
    from wsi_ad.annotations import fill_polygon, polygon_mask

    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(3, 60))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(20, 120, n)
        verts = np.c_[150 + radius * np.cos(theta), 140 + radius * np.sin(theta)]
        if trial % 3 == 0:  # also self-intersecting polygons (even-odd rule)
            verts = rng.uniform(-20, 300, size=(n, 2))
        for ds, origin in [(1.0, (0.0, 0.0)), (4.0, (0.0, 0.0)), (1.0, (64.0, 32.0))]:
            shape = (int(300 / ds), int(280 / ds))
            a = polygon_mask(verts, shape, ds, origin)
            b = fill_polygon(verts, shape, ds, origin)
            assert (a != b).sum() <= 2, (trial, ds)  # pixel centres exactly on an edge may differ


def test_area_and_major_axis_of_a_square():
    square = _square(200, 300, 100)
    assert square.area_px() == pytest.approx(10_000.0)
    assert square.major_axis_px() == pytest.approx(100 * 2 ** 0.5)


def test_points_and_lines_have_no_area_and_are_skipped_with_a_warning(tmp_path, caplog):
    """ASAP's Dot (one coordinate), Measurement (a 2-point line) and PointSet beside a lesion polygon: the
    polygon is read, the others are left out with a warning (never counted as lesion area)."""
    path = tmp_path / "mixed.xml"
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        f'<Annotation Name="lesion" Type="Polygon" PartOfGroup="_0"><Coordinates>{TRIANGLE}</Coordinates></Annotation>'
        '<Annotation Name="dot" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="1" Y="1" />'
        '</Coordinates></Annotation>'
        '<Annotation Name="ruler" Type="Measurement" PartOfGroup="None"><Coordinates><Coordinate Order="0" X="0" Y="0" />'
        '<Coordinate Order="1" X="9" Y="0" /></Coordinates></Annotation>'
        '<Annotation Name="cells" Type="PointSet" PartOfGroup="Lymphocytes"><Coordinates>'
        '<Coordinate Order="0" X="1" Y="1" /><Coordinate Order="1" X="2" Y="2" /><Coordinate Order="2" X="3" Y="1" />'
        '</Coordinates></Annotation></Annotations></ASAP_Annotations>')
    with caplog.at_level("WARNING"):
        annotations = read_asap_xml(path)
    assert [a.name for a in annotations] == ["lesion"]
    assert "skipped 3 point/line annotation(s)" in caplog.text and "dot (Dot)" in caplog.text


def test_annotation_file_is_found_as_slide_ids_are_compared(tmp_path):
    from wsi_ad.annotations import annotation_file
    from wsi_ad.errors import AnnotationError

    (tmp_path / "test_001.xml").write_text("<ASAP_Annotations/>")
    (tmp_path / "._Test_002.xml").write_text("AppleDouble")          # hidden: never an annotation
    assert annotation_file(tmp_path, "Test_001") == tmp_path / "test_001.xml"   # reference.csv spelling
    assert annotation_file(tmp_path, "test_001") == tmp_path / "test_001.xml"
    assert annotation_file(tmp_path, "Test_002") is None
    assert annotation_file(tmp_path / "absent", "Test_001") is None
    (tmp_path / "TEST_001.xml").write_text("<ASAP_Annotations/>")
    if len({p.name.lower() for p in tmp_path.iterdir()}) == len(list(tmp_path.iterdir())):  # case-sensitive disk
        with pytest.raises(AnnotationError, match="2 annotation files for slide Test_001"):
            annotation_file(tmp_path, "Test_001")
