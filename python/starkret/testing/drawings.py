"""Flat shapes and simple charts drawn independently of `starkret.testing.synthetic`.

An evaluation set for starkret-mini that its training never draws from: other drawing
code (supersampled, outlined shapes, shaded paper, axes, grid lines, tick marks and titles
on charts, other colours and proportions), other canvas sizes and one plain-English
caption per image, half of them in words the generator never uses ("a big red circle",
"pie chart showing market share in three parts"). scripts/train_mini.py reports recall
on it, the demo prints it and tests/ingest/test_mini.py checks it; nothing trains on it.

>>> pairs = scenes()
>>> len(pairs), len({p.caption for p in pairs}) == len(pairs)
(24, True)
>>> pairs[0].caption
'a red circle on a white background'
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

__all__ = ["Drawing", "scenes"]

_INK = {
    "red": (200, 30, 45),
    "blue": (30, 80, 200),
    "green": (40, 150, 60),
    "yellow": (240, 200, 20),
    "orange": (240, 120, 30),
    "purple": (120, 50, 170),
    "black": (20, 20, 20),
}
_PAPER = {"white": (252, 252, 250), "grey": (150, 150, 150), "black": (10, 10, 10)}


@dataclass(frozen=True)
class Drawing:
    """One independently drawn picture (PNG bytes) and its caption."""

    data: bytes
    caption: str


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _canvas(paper: str, width: int, height: int, scale: int = 4):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width * scale, height * scale), _PAPER[paper])
    draw = ImageDraw.Draw(image)
    if paper in ("white", "grey"):
        # a soft vertical shade, as a scanned or exported picture has (the generator's
        # backgrounds are flat)
        w, h = image.size
        base = _PAPER[paper]
        for y in range(0, h, scale):
            f = 1.0 - 0.12 * y / h
            draw.rectangle([0, y, w, y + scale], fill=tuple(int(c * f) for c in base))
    return image, draw


def _label(draw, xy, text: str, scale: int = 4) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=11 * scale)
    draw.text(xy, text, fill=(70, 70, 70), font=font)


def _finish(image, width: int, height: int) -> bytes:
    from PIL import Image

    return _png(image.resize((width, height), Image.LANCZOS))


def _polygon(cx: float, cy: float, r: float, corners: int, turn: float, inner: float = 1.0):
    points = []
    steps = corners * (2 if inner != 1.0 else 1)
    for i in range(steps):
        radius = r if i % 2 == 0 or inner == 1.0 else r * inner
        angle = turn + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _shape(kind: str, colour: str, paper: str, count: int, width: int, height: int) -> bytes:
    image, draw = _canvas(paper, width, height)
    w, h = image.size
    r = min(w, h) * (0.28 if count == 1 else 0.14)
    spots = (
        [(w / 2, h / 2)]
        if count == 1
        else [
            (w * (i + 1) / (count + 1), h / 2 + (r * 0.6 if i % 2 else -r * 0.6))
            for i in range(count)
        ]
    )
    outline = tuple(max(0, c - 60) for c in _INK[colour])
    for cx, cy in spots:
        if kind == "circle":
            draw.ellipse(
                [cx - r, cy - r, cx + r, cy + r], fill=_INK[colour], outline=outline, width=6
            )
        elif kind == "square":
            draw.rectangle(
                [cx - r, cy - r, cx + r, cy + r], fill=_INK[colour], outline=outline, width=6
            )
        elif kind == "triangle":
            draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2), fill=_INK[colour], outline=outline)
        else:  # star
            draw.polygon(
                _polygon(cx, cy, r, 5, -math.pi / 2, 0.45), fill=_INK[colour], outline=outline
            )
    return _finish(image, width, height)


def _axes(draw, w: int, h: int, ink):
    left, bottom = w * 0.12, h * 0.88
    draw.line([(left, h * 0.08), (left, bottom), (w * 0.95, bottom)], fill=ink, width=6)
    for i in range(1, 5):
        y = bottom - (bottom - h * 0.1) * i / 4
        draw.line([(left - 14, y), (left, y)], fill=ink, width=4)
    return left, bottom


def _bar(colour: str, bars: int, horizontal: bool, width: int, height: int) -> bytes:
    image, draw = _canvas("white", width, height)
    w, h = image.size
    left, bottom = _axes(draw, w, h, (60, 60, 60))
    for i in range(1, 5):
        y = bottom - (bottom - h * 0.1) * i / 4
        draw.line([(left, y), (w * 0.95, y)], fill=(215, 215, 215), width=3)
    _label(draw, (w * 0.3, h * 0.01), "Sales 2024")
    heights = [0.35 + 0.6 * ((i * 37) % 11) / 10 for i in range(bars)]
    span = (w * 0.95 - left) if not horizontal else (bottom - h * 0.08)
    step = span / bars
    for i, v in enumerate(heights):
        if horizontal:
            y0 = h * 0.08 + i * step + step * 0.18
            draw.rectangle(
                [left + 3, y0, left + 3 + v * (w * 0.8), y0 + step * 0.64], fill=_INK[colour]
            )
        else:
            x0 = left + i * step + step * 0.18
            draw.rectangle(
                [x0, bottom - v * (bottom - h * 0.1), x0 + step * 0.64, bottom - 3],
                fill=_INK[colour],
            )
    return _finish(image, width, height)


def _pie(colours: list[str], slices: int, width: int, height: int) -> bytes:
    image, draw = _canvas("white", width, height)
    w, h = image.size
    r = min(w, h) * 0.4
    box = [w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r]
    shares = [3 + (i * 5) % 7 for i in range(slices)]
    _label(draw, (w * 0.02, h * 0.02), "Market share")
    start = -90.0
    for i, share in enumerate(shares):
        end = start + 360.0 * share / sum(shares)
        draw.pieslice(
            box, start, end, fill=_INK[colours[i % len(colours)]], outline=(255, 255, 255), width=8
        )
        start = end
    return _finish(image, width, height)


def _line(colour: str, up: bool, width: int, height: int) -> bytes:
    image, draw = _canvas("white", width, height)
    w, h = image.size
    left, bottom = _axes(draw, w, h, (60, 60, 60))
    _label(draw, (w * 0.3, h * 0.01), "Visitors per month")
    points = []
    for i in range(8):
        x = left + (w * 0.95 - left) * i / 7
        trend = i / 7 if up else 1 - i / 7
        wobble = 0.08 * math.sin(i * 2.1)
        points.append((x, bottom - (bottom - h * 0.1) * (0.1 + 0.8 * trend + wobble)))
    draw.line(points, fill=_INK[colour], width=12, joint="curve")
    for x, y in points:
        draw.ellipse([x - 12, y - 12, x + 12, y + 12], fill=_INK[colour])
    return _finish(image, width, height)


def scenes() -> list[Drawing]:
    """24 pictures: 12 flat shapes, 12 charts (bar, pie, line), one caption each."""
    out = []
    shapes = [
        ("circle", "red", "white", 1),
        ("square", "blue", "white", 1),
        ("triangle", "green", "white", 1),
        ("star", "yellow", "black", 1),
        ("circle", "orange", "grey", 1),
        ("star", "purple", "white", 1),
        ("square", "red", "black", 1),
        ("triangle", "yellow", "grey", 1),
        ("circle", "blue", "white", 3),
        ("star", "red", "white", 2),
        ("square", "green", "black", 4),
        ("triangle", "purple", "white", 2),
    ]
    words = {1: "a", 2: "two", 3: "three", 4: "four"}
    # half in the generator's phrasing, half as people write it
    natural = {
        0: "a big red circle",
        2: "a simple green triangle",
        4: "an orange ball on a grey background",
        5: "a purple star icon",
        9: "two red stars side by side",
        11: "a pair of small purple triangles",
    }
    for i, (kind, colour, paper, count) in enumerate(shapes):
        noun = kind if count == 1 else kind + "s"
        article = "an" if colour[0] in "aeiou" and count == 1 else words[count]
        caption = natural.get(i, f"{article} {colour} {noun} on a {paper} background")
        size = (160 + 16 * i, 140 + 12 * (i % 4))
        out.append(Drawing(_shape(kind, colour, paper, count, *size), caption))
    charts = [
        (lambda: _bar("blue", 5, False, 240, 180), "a bar chart with five blue bars"),
        (lambda: _bar("red", 3, False, 200, 200), "a simple bar graph with three red columns"),
        (lambda: _bar("green", 4, True, 260, 190), "a horizontal bar chart with four green bars"),
        (lambda: _bar("orange", 6, False, 300, 200), "bar chart of sales with six orange bars"),
        (
            lambda: _pie(["red", "blue", "yellow", "green"], 4, 200, 200),
            "a pie chart with four slices",
        ),
        (
            lambda: _pie(["purple", "orange", "blue"], 3, 220, 180),
            "pie chart showing market share in three parts",
        ),
        (lambda: _pie(["blue"], 5, 240, 200), "a blue pie chart with five slices"),
        (lambda: _pie(["green", "yellow"], 6, 200, 240), "a pie chart with six slices"),
        (lambda: _line("blue", True, 260, 180), "a blue line chart going up"),
        (lambda: _line("red", False, 240, 180), "a red line chart going down"),
        (lambda: _line("green", True, 200, 200), "a green line graph rising over time"),
        (lambda: _line("black", False, 280, 200), "a chart of visitors falling month by month"),
    ]
    out.extend(Drawing(draw(), caption) for draw, caption in charts)
    return out
