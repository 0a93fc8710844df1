"""Draw a classified scene as it opens in a GIS, headless: prints what it used, writes a PNG.

  python tools/render_outputs.py results/classified/transfer/demo_test_01 out.png

Uses only what the outputs carry: the input scene named in the tags, the colour table of
``classes.tif`` (background transparent as in its QGIS style), and the line colour of each
class from the centreline layer's stored QGIS style. Prints the tags and the attribute
table rows.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import rasterio

os.environ.setdefault("MPLBACKEND", "Agg")
import geopandas as gpd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def main(folder: Path, png: Path) -> None:
    with rasterio.open(folder / "classes.tif") as src:
        cls, cmap, tags, extent = src.read(1), src.colormap(1), src.tags(), src.bounds
    print("tags of classes.tif:")
    for k, v in tags.items():
        print(f"  {k} = {v}")
    rat = ET.parse(folder / "classes.tif.aux.xml").getroot().find("PAMRasterBand/GDALRasterAttributeTable")
    print("raster attribute table:", [f.findtext("Name") for f in rat.findall("FieldDefn")])
    for row in rat.findall("Row"):
        print("  ", [v.text for v in row.findall("F")])
    with rasterio.open(tags["ROADXFER_INPUT_SCENE"]) as src:
        rgb = np.moveaxis(src.read([1, 2, 3]), 0, -1)
    rgba = np.zeros((*cls.shape, 4), np.uint8)
    for value, colour in cmap.items():
        if value not in (0, 255):  # transparent in the QGIS style
            rgba[cls == value] = (*colour[:3], 170)
    with sqlite3.connect(folder / "centrelines.gpkg") as con:
        (qml,) = con.execute("SELECT styleQML FROM layer_styles WHERE useAsDefault = 1").fetchone()
    colours = {int(v): tuple(int(c) / 255 for c in rgb_s.split(",")[:3])
               for v, rgb_s in zip(re.findall(r'category value="(\d+)"', qml), re.findall(r'name="line_color" value="([\d,]+)"', qml))}
    lines = gpd.read_file(folder / "centrelines.gpkg", layer="centrelines")
    fig, ax = plt.subplots(figsize=(8, 8))
    ext = (extent.left, extent.right, extent.bottom, extent.top)
    ax.imshow(rgb, extent=ext)
    ax.imshow(rgba, extent=ext)
    for value, sub in lines.groupby("class_value"):
        sub.plot(ax=ax, color=colours.get(int(value), (1, 1, 0)), linewidth=1.2)
    ax.set_title(f"{tags['ROADXFER_MODEL']}: {Path(tags['ROADXFER_INPUT_SCENE']).name}, {len(lines)} centreline(s)")
    ax.set_axis_off()
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"wrote {png}: {len(lines)} centrelines, {lines['length_m'].sum():.0f} m")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
