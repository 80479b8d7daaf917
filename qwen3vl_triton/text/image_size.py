"""The size an encoded image declares in its header, read before any decoder sees the file.

Pillow's `Image.open` refuses an image above twice `Image.MAX_IMAGE_PIXELS` (~179 MP) with
DecompressionBombError before its pixels are read; a caller that treats every failure of `open` as
"not an image" then tells a person with a large scan the wrong thing. Reading the declared width and
height here first lets the pixel limit speak for every size, with the size and the limit. Formats:
PNG (IHDR), GIF (logical screen and the first frame, which Pillow lets grow the canvas), JPEG (the
first SOF segment), TIFF and BigTIFF (the first IFD), WebP (VP8, VP8L, VP8X), BMP. Others fall to
Pillow's own guard (see `preprocess.decode_image`).
"""

from __future__ import annotations

import struct

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: no length field


def declared_size(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, format) from the header of an encoded image; None when the format is not one
    read here or the header is cut short (the decoder will say what is wrong)."""
    head = bytes(data[:16])
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(data)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff(data)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(data)
        if head[:2] == b"BM":
            return _bmp(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _png(data) -> tuple[int, int, str] | None:
    if bytes(data[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, "PNG"


def _gif(data) -> tuple[int, int, str] | None:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    at = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # after the global color table
    while at < len(data):
        kind = data[at]
        if kind == 0x21:  # an extension: label, then sub-blocks until an empty one
            at += 2
            while data[at]:
                at += data[at] + 1
            at += 1
        elif kind == 0x2C:  # the first frame: Pillow's canvas covers it
            x, y, w, h = struct.unpack("<HHHH", data[at + 1:at + 9])
            return max(width, x + w), max(height, y + h), "GIF"
        else:
            break
    return width, height, "GIF"


def _jpeg(data) -> tuple[int, int, str] | None:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return (width, height, "JPEG") if height else None  # height 0: set later by a DNL segment
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + length
    return None


def _tiff(data) -> tuple[int, int, str] | None:
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    if big:
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        (count,) = struct.unpack(order + "Q", data[ifd:ifd + 8])
        entry, first, size = 20, ifd + 8, 8
    else:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
        entry, first, size = 12, ifd + 2, 4
    found = {}
    for i in range(min(count, 4096)):
        at = first + i * entry
        tag, kind = struct.unpack(order + "HH", data[at:at + 4])
        if tag in (256, 257):
            value = data[at + 4 + size:at + 4 + 2 * size]
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            found[tag] = struct.unpack(order + fmt, value[:struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257], "TIFF"
    return None


def _webp(data) -> tuple[int, int, str] | None:
    chunk = bytes(data[12:16])
    if chunk == b"VP8 ":
        if bytes(data[23:26]) != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF, "WebP"
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "WebP"
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height, "WebP"
    return None


def _bmp(data) -> tuple[int, int, str] | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header not in (12, 16, 40, 52, 56, 64, 108, 124):  # not a BMP (base64 text may start with "BM")
        return None
    if header == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height), "BMP"
