"""What an input file may point at: local files only, unless the user opts in.

A GDAL VRT (or OGR VRT, WMS, or any XML description GDAL opens) is a file that names
other data: a URL (``/vsicurl/http://...``) makes a cluster job send requests; a
``VRTRawRasterBand`` reads any local file's bytes (``/etc/passwd``) as pixels, which then
end up in training chips that are shared. Before GDAL or OGR open an input, its
description is read here as data: every source it names must be a local file (checked
in turn when it is a description itself), and raw bands, pixel functions in Python and
descriptions of web services are refused. ``ROADXFER_ALLOW_REMOTE_INPUTS=1`` in the
environment lifts the check for users who mean it.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import InputError

OPT_IN = "ROADXFER_ALLOW_REMOTE_INPUTS"
_REMOTE = re.compile(r"^(/vsi(curl|s3|gs|az|adls|oss|swift|hdfs|webhdfs)|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
_SERVICE = re.compile(r"WFS|WMS|WCS|WMTS|TMS|Tile|GDAL_|OGR.*DataSource|Capabilities", re.IGNORECASE)  # descriptions of sources GDAL/OGR fetch
_MAX_DEPTH = 8  # descriptions naming descriptions


def allowed_remote() -> bool:
    return os.environ.get(OPT_IN, "").strip().lower() in ("1", "yes", "true")


def _refuse(path: Path | str, problem: str) -> InputError:
    return InputError(path, problem, f"use local files (e.g. gdal_translate the data to a GeoTIFF), or set {OPT_IN}=1 if you mean the input to read it")


def _local_source(name: str, relative_to: Path | None, owner: Path) -> Path:
    inner = name.strip()
    if _REMOTE.match(inner):
        raise _refuse(owner, f"names a network source {inner[:80]!r}")
    if inner.startswith("/vsi"):  # archives, memory, subprocess output...: none is a plain local file we can check
        raise _refuse(owner, f"names a GDAL virtual file system source {inner[:80]!r}")
    path = Path(inner)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path


def check_local_input(path: str | Path, *, vector: bool = False, _depth: int = 0) -> None:
    """Raise :class:`InputError` when ``path`` describes data that is not a local file (see the module doc).

    ``vector``: XML vector formats that hold their own features (KML, GPX, GML) are data;
    only OGR VRTs are followed, and descriptions of web services refused.
    """
    if allowed_remote():
        return
    path = Path(path)
    if _REMOTE.match(str(path)):
        raise _refuse(path, "is a network address")
    if not path.is_file():
        return  # the caller says it does not exist
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"<"):
        return  # a binary format (GeoTIFF, GeoPackage, ...) names no other file
    if _depth > _MAX_DEPTH:
        raise _refuse(path, "is a description nested too deeply")
    if path.stat().st_size > 64 << 20:
        raise _refuse(path, "is an XML description of over 64 MB")
    try:
        root = ET.parse(path).getroot()  # the standard library's parser expands no external entities
    except ET.ParseError as exc:
        raise InputError(path, f"is neither a raster nor a readable XML description ({exc})", "check the file") from exc
    kind = root.tag.rsplit("}", 1)[-1]  # without an XML namespace
    if vector and kind not in ("VRTDataset", "OGRVRTDataSource") and not _SERVICE.search(kind):
        return
    if kind not in ("VRTDataset", "OGRVRTDataSource"):
        raise _refuse(path, f"is a {kind} description (a web service or other source GDAL would fetch)")
    for el in root.iter():
        if el.tag == "VRTRasterBand" and el.get("subClass") == "VRTRawRasterBand":
            raise _refuse(path, "holds a VRTRawRasterBand, which reads any file's bytes as pixels")
        if el.tag == "PixelFunctionLanguage" and (el.text or "").strip().lower() == "python":
            raise _refuse(path, "holds a pixel function in Python, which would run code")
        if el.tag in ("SourceFilename", "SrcDataSource", "SourceDataset"):
            relative = (el.get("relativeToVRT") or el.get("relativetovrt") or "0") == "1"
            source = _local_source(el.text or "", path.parent if relative else None, path)
            if not source.is_file():
                raise _refuse(path, f"names the source {el.text!r}, which is not a local file")
            check_local_input(source, vector=vector, _depth=_depth + 1)
