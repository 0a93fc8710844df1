"""Outputs that describe themselves: colour tables, attribute tables, tags and QGIS styles.

A classified raster opens in QGIS, ArcGIS or with GDAL with its classes named and
coloured: ``classes.tif`` carries a colour table, a band description and tags (model,
weights sha256, roadxfer version, threshold, TTA, time, input scene); a GDAL PAM sidecar
``classes.tif.aux.xml`` holds its raster attribute table (value, class name, colour),
which GDAL, QGIS and ArcGIS read; ``classes.qml`` and ``probability.qml`` beside the
rasters are the QGIS styles QGIS loads by itself; the centreline GeoPackage stores its
style in the ``layer_styles`` table as QGIS's default style for the layer.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from . import IGNORE_VALUE, __version__

log = logging.getLogger(__name__)

# Colours for classes the config leaves without one (distinct, readable on imagery).
DEFAULT_COLOURS = [(255, 0, 0), (255, 170, 0), (0, 200, 255), (255, 0, 255), (0, 255, 0), (255, 255, 0), (120, 80, 255), (255, 120, 120)]


def complete_classes(classes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{value, name, color}`` for every class, a default name or colour filled in with a warning.

    Reads our config's keys, a ``.emd``'s (``Value``, ``Name``, ``Color``) and the
    ``ClassValue``/``ClassName`` spelling the reference tool also writes.
    """
    out = []
    for i, c in enumerate(classes):
        value = int(c.get("value", c.get("Value", c.get("ClassValue"))))
        name = c.get("name", c.get("Name", c.get("ClassName")))
        color = c.get("color", c.get("Color"))
        if name in (None, ""):
            name = f"class {value}"
            log.warning("class value %d has no name: it is called %r in the outputs (set `name` under `classes:`)", value, name)
        if not color or len(color) != 3:
            color = DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
            log.warning("class %r has no colour: %s is used (set `color` under `classes:`)", name, list(color))
        out.append({"value": value, "name": str(name), "color": [int(v) for v in color]})
    return out


def colour_table(classes: Sequence[Mapping[str, Any]]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table: background and nodata transparent, each class its colour."""
    table = {0: (0, 0, 0, 0), IGNORE_VALUE: (0, 0, 0, 0)}
    for c in complete_classes(classes):
        table[c["value"]] = (*c["color"], 255)
    return table


def raster_tags(*, model: str, weights_sha256: str, image: str | Path, threshold: float | None, tta: bool, classes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Dataset tags of a classified scene: which model made it, how, when, from what."""
    return {
        "ROADXFER_VERSION": __version__,
        "ROADXFER_MODEL": str(model),
        "ROADXFER_MODEL_WEIGHTS_SHA256": weights_sha256,
        "ROADXFER_THRESHOLD": "argmax" if threshold is None else f"{threshold:g}",
        "ROADXFER_TTA": str(bool(tta)).lower(),
        "ROADXFER_CREATED": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ROADXFER_INPUT_SCENE": str(image),
        "ROADXFER_CLASSES": "; ".join(f"{c['value']}={c['name']}" for c in complete_classes(classes)),
    }


def rat_rows(classes: Sequence[Mapping[str, Any]]) -> list[tuple[int, str, int, int, int]]:
    return [(0, "background", 0, 0, 0)] + [(c["value"], c["name"], *c["color"]) for c in complete_classes(classes)]


def rat_aux_xml(classes: Sequence[Mapping[str, Any]]) -> str:
    """A GDAL PAM ``.aux.xml`` with a thematic raster attribute table (Value, Class_Name, Red, Green, Blue).

    Field types and usages are GDAL's codes (GFT_Integer 0, GFT_String 2; GFU_MinMax 5,
    GFU_Name 2, GFU_Red/Green/Blue 6/7/8): ``Value`` as ArcGIS expects it.
    """
    fields = [("Value", 0, 5), ("Class_Name", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]
    lines = ["<PAMDataset>", '  <PAMRasterBand band="1">', '    <GDALRasterAttributeTable tableType="thematic">']
    for i, (name, ftype, usage) in enumerate(fields):
        lines.append(f'      <FieldDefn index="{i}"><Name>{name}</Name><Type>{ftype}</Type><Usage>{usage}</Usage></FieldDefn>')
    for i, row in enumerate(rat_rows(classes)):
        lines.append(f'      <Row index="{i}">' + "".join(f"<F>{escape(str(v))}</F>" for v in row) + "</Row>")
    lines += ["    </GDALRasterAttributeTable>", "  </PAMRasterBand>", "</PAMDataset>", ""]
    return "\n".join(lines)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


QML_HEAD = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n<qgis version=\"3.28.0\" styleCategories=\"AllStyleCategories\">\n"


def classes_qml(classes: Sequence[Mapping[str, Any]]) -> str:
    """QGIS paletted style for ``classes.tif``: background transparent, each class its colour and name."""
    entries = ['        <paletteEntry value="0" color="#000000" alpha="0" label="background"/>']
    entries += [f'        <paletteEntry value="{c["value"]}" color="{_hex(c["color"])}" alpha="255" label={quoteattr(c["name"])}/>' for c in complete_classes(classes)]
    return (QML_HEAD + "  <pipe>\n    <rasterrenderer type=\"paletted\" band=\"1\" opacity=\"1\" alphaBand=\"-1\" nodataColor=\"\">\n"
            "      <rasterTransparency/>\n      <colorPalette>\n" + "\n".join(entries) + "\n      </colorPalette>\n    </rasterrenderer>\n  </pipe>\n</qgis>\n")


def probability_qml(dtype: str) -> str:
    """QGIS pseudocolour style for ``probability.tif`` (uint8: 0-250 is 0-1)."""
    top = 250 if dtype == "uint8" else 1
    items = [(0, "#000000", 0, "0"), (top / 2, "#fdae61", 170, "0.5"), (top, "#d7191c", 255, "1")]
    stops = "\n".join(f'          <item value="{v:g}" color="{c}" alpha="{a}" label="{label}"/>' for v, c, a, label in items)
    return (QML_HEAD + "  <pipe>\n"
            f'    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1" classificationMin="0" classificationMax="{top:g}">\n'
            "      <rasterTransparency/>\n      <rastershader>\n"
            f'        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="0" maximumValue="{top:g}">\n'
            f"{stops}\n        </colorrampshader>\n      </rastershader>\n    </rasterrenderer>\n  </pipe>\n</qgis>\n")


def centreline_qml(classes: Sequence[Mapping[str, Any]]) -> str:
    """QGIS categorised line style for the centrelines, by ``class_value``."""
    cats, symbols = [], []
    for i, c in enumerate(complete_classes(classes)):
        cats.append(f'        <category value="{c["value"]}" symbol="{i}" label={quoteattr(c["name"])} render="true"/>')
        r, g, b = c["color"]
        symbols.append(f'        <symbol type="line" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
                       '          <layer class="SimpleLine" enabled="1" locked="0" pass="0">\n'
                       f'            <Option type="Map"><Option type="QString" name="line_color" value="{r},{g},{b},255"/>'
                       '<Option type="QString" name="line_width" value="0.8"/><Option type="QString" name="line_width_unit" value="MM"/></Option>\n'
                       "          </layer>\n        </symbol>")
    return (QML_HEAD + '  <renderer-v2 type="categorizedSymbol" attr="class_value" symbollevels="0" enableorderby="0" forceraster="0">\n'
            "      <categories>\n" + "\n".join(cats) + "\n      </categories>\n      <symbols>\n" + "\n".join(symbols) +
            "\n      </symbols>\n  </renderer-v2>\n  <layerGeometryType>1</layerGeometryType>\n</qgis>\n")


def add_gpkg_style(gpkg: str | Path, layer: str, qml: str, *, name: str = "roadxfer") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles`` table (QGIS's layout)."""
    con = sqlite3.connect(str(gpkg))
    try:
        with con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256), "
                "f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, useAsDefault BOOLEAN, "
                "description TEXT, owner TEXT(30), ui TEXT(30), update_time DATETIME DEFAULT CURRENT_TIMESTAMP)"
            )
            con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description) VALUES ('layer_styles', 'attributes', 'layer_styles', 'QGIS layer styles')")
            geom = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
            con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,))
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '')",
                (layer, geom[0] if geom else "geom", name, qml, f"written by roadxfer {__version__}"),
            )
    finally:
        con.close()
