"""A small dependency-free line-chart writer (PNG via zlib + struct), for training curves.

    write_training_curves(path, history)   # loss and accuracy panels from `lwkernels train` metrics

Enough for a readable chart — axes, ticks with numbers, a title, a legend, one line per series — not
a plotting library. Text uses a built-in 5x7 pixel font (upper case; lower case is drawn as upper).
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

Color = Tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
#: Series colours, in order (blue, orange, green, red, purple).
PALETTE: Tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))

_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "%": "11000 11001 00010 00100 01000 10011 00011", "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000", ":": "00000 01100 01100 00000 01100 01100 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000", "_": "00000 00000 00000 00000 00000 00000 11111",
    "=": "00000 00000 11111 00000 11111 00000 00000", ",": "00000 00000 00000 00000 01100 00100 01000",
    "+": "00000 00100 00100 11111 00100 00100 00000", " ": "00000 00000 00000 00000 00000 00000 00000",
}
FONT: Dict[str, List[str]] = {ch: rows.split() for ch, rows in _FONT_ROWS.items()}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB raster with just the drawing operations a line chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def get(self, x: int, y: int) -> Color:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i:i + 3])  # type: ignore[return-value]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle [x0, x1] x [y0, y1]."""
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        lo, hi = -(width // 2), (width - 1) // 2
        while True:
            for ox in range(lo, hi + 1):
                for oy in range(lo, hi + 1):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 1, anchor: str = "left") -> None:
        """Draw `s` with its top at y; anchor "left", "center" or "right" at x."""
        w = text_width(s, scale)
        if anchor == "center":
            x -= w // 2
        elif anchor == "right":
            x -= w
        for ch in s.upper():
            rows = FONT.get(ch, FONT[" "])
            for r, bits in enumerate(rows):
                for c, bit in enumerate(bits):
                    if bit == "1":
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale - 1, y + (r + 1) * scale - 1, color)
            x += (GLYPH_W + 1) * scale

    def to_png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width: 3 * (y + 1) * self.width])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def text_width(s: str, scale: int = 1) -> int:
    return max(0, len(s) * (GLYPH_W + 1) - 1) * scale


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: Optional[Color] = None


@dataclass
class Panel:
    title: str
    series: List[Series] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    legend: str = "upper"  # "upper" or "lower" right corner


def _nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """About `count` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def draw_panel(canvas: Canvas, panel: Panel, x0: int, y0: int, width: int, height: int) -> None:
    """One chart in the box (x0, y0, width, height): title, axes, ticks, grid, series, legend."""
    canvas.text(x0 + width // 2, y0 + 4, panel.title, scale=2, anchor="center")
    left, right, top, bottom = x0 + 56, x0 + width - 12, y0 + 28, y0 + height - 36
    points = [(x, y) for s in panel.series for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xticks = _nice_ticks(min(xs), max(xs), 6)
    yticks = _nice_ticks(min(ys), max(ys), 5)
    xlo, xhi, ylo, yhi = xticks[0], xticks[-1], yticks[0], yticks[-1]
    xhi = xhi if xhi > xlo else xlo + 1
    yhi = yhi if yhi > ylo else ylo + 1

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    for t in yticks:
        canvas.line(left, py(t), right, py(t), GRID)
        canvas.line(left - 4, py(t), left, py(t), BLACK)
        canvas.text(left - 7, int(py(t)) - 3, _fmt(t), anchor="right")
    for t in xticks:
        canvas.line(px(t), bottom, px(t), bottom + 4, BLACK)
        canvas.text(int(px(t)), bottom + 8, _fmt(t), anchor="center")
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    if panel.xlabel:
        canvas.text((left + right) // 2, bottom + 20, panel.xlabel, anchor="center")
    if panel.ylabel:
        canvas.text(x0 + 2, top - 12, panel.ylabel)

    legend_y = top + 6 if panel.legend == "upper" else bottom - 6 - 12 * len(panel.series)
    for i, s in enumerate(panel.series):
        color = s.color or PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            canvas.line(ax, ay, bx, by, color, width=2)
        for ax, ay in pts:
            canvas.rect(int(ax) - 2, int(ay) - 2, int(ax) + 2, int(ay) + 2, color)
        lx = right - text_width(s.label) - 30
        canvas.line(lx, legend_y + 3, lx + 20, legend_y + 3, color, width=3)
        canvas.text(lx + 26, legend_y, s.label, color=BLACK)
        legend_y += 12


def line_chart_png(panels: Sequence[Panel], panel_width: int = 420, height: int = 320) -> bytes:
    """PNG bytes with the panels side by side."""
    canvas = Canvas(panel_width * max(1, len(panels)), height)
    for i, panel in enumerate(panels):
        draw_panel(canvas, panel, i * panel_width, 0, panel_width, height)
    return canvas.to_png()


def write_training_curves(path, history: Sequence[Dict[str, float]], title: str = "") -> None:
    """Loss and accuracy per epoch (train and test) from `lwkernels train`'s metrics history."""
    epochs = [h["epoch"] for h in history]

    def series(key: str, label: str, scale: float = 1.0) -> Series:
        return Series(label, epochs, [h.get(key, float("nan")) * scale for h in history])

    panels = [
        Panel(f"{title} loss".strip(), [series("train_loss", "train"), series("test_loss", "test")], xlabel="epoch"),
        Panel(f"{title} accuracy (%)".strip(), [series("train_acc", "train", 100), series("test_acc", "test", 100)],
              xlabel="epoch", legend="lower"),
    ]
    data = line_chart_png(panels)
    with open(path, "wb") as f:
        f.write(data)


def read_png_rgb(data: bytes) -> Tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a PNG written by this module (8-bit RGB, filter 0): for tests."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            if (depth, ctype) != (8, 2):
                raise ValueError("only 8-bit RGB PNGs are supported")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 3 * width + 1
    return width, height, b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height))
