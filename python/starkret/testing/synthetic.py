"""Seeded image-caption pairs that mirror the Stark sources, for training and checking CLIP chains.

Two kinds of image, as in Stark's image pools:

* ``"photo"`` (CC12M / RedCaps12M-like): one to four objects (circle, square, triangle,
  star, cross) of one colour and size on a plain, striped or dotted background; a single
  object has a position. "three small red circles on a striped blue background".
* ``"chart"`` (ChartQA-like): bar charts (vertical or horizontal, 3-6 bars), line charts
  (1-3 lines going up or down), pie charts (3-6 slices) and box-and-arrow diagrams
  (2-5 boxes in a row or a column), in one colour on a white, grey or dark background,
  with or without grid lines.

Every sample is encoded as real JPEG or PNG bytes of a random size and aspect ratio
(the scene is drawn in the central square, so the CLIP centre crop keeps all of it).
``sample.caption`` is the canonical caption (one per attribute combination, used as
the ground truth by tests); ``sample.captions`` adds paraphrases for training.

>>> s = sample(7)
>>> s.kind in ("photo", "chart"), s.data[:2] in (b"\\xff\\xd8", b"\\x89P")
(True, True)
>>> sample(7).caption == s.caption
True
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "Sample",
    "captions",
    "gallery",
    "make",
    "render",
    "sample",
    "samples",
]

#: Object colours (name -> RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 185),
    "pink": (245, 130, 190),
    "black": (15, 15, 15),
}
#: Photo background colours (name -> RGB).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "blue": (70, 120, 220),
    "green": (60, 150, 70),
    "yellow": (235, 215, 90),
    "brown": (120, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PATTERNS = ("plain", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
CHART_KINDS = ("bar", "line", "pie", "diagram")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
TOPICS = (
    "monthly rainfall",
    "sales by region",
    "population growth",
    "exam scores",
    "energy use",
    "website visits",
    "temperatures",
    "votes per party",
)


@dataclass
class Sample:
    """One generated image with its captions and the attributes that produced it."""

    data: bytes
    caption: str
    captions: list[str]
    kind: str
    attributes: dict = field(default_factory=dict)
    format: str = "JPEG"
    size: tuple[int, int] = (0, 0)


# ==== Attributes and captions ====


def _photo_attributes(rng: np.random.Generator) -> dict:
    count = int(rng.integers(1, 5))
    colour = str(rng.choice(list(COLOURS)))
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    return {
        "count": count,
        "colour": colour,
        "shape": str(rng.choice(SHAPES)),
        "size": str(rng.choice(("small", "large"))),
        "background": background,
        "pattern": str(rng.choice(PATTERNS)),
        "position": str(rng.choice(POSITIONS)) if count == 1 else None,
    }


def _chart_attributes(rng: np.random.Generator) -> dict:
    chart = str(rng.choice(CHART_KINDS))
    attrs = {
        "chart": chart,
        "colour": str(rng.choice(list(COLOURS))),
        "background": str(rng.choice(("white", "white", "dark", "grey"))),
        "grid": bool(rng.random() < 0.5),
        "topic": str(rng.choice(TOPICS)),
    }
    if chart == "bar":
        attrs["count"] = int(rng.integers(3, 7))
        attrs["orientation"] = str(rng.choice(("vertical", "horizontal")))
    elif chart == "line":
        attrs["count"] = int(rng.integers(1, 4))
        attrs["trend"] = str(rng.choice(("up", "down")))
    elif chart == "pie":
        attrs["count"] = int(rng.integers(3, 7))
    else:
        attrs["count"] = int(rng.integers(2, 6))
        attrs["orientation"] = str(rng.choice(("row", "column")))
    if attrs["background"] in ("dark", "grey") and attrs["colour"] == "black":
        attrs["colour"] = "yellow"
    return attrs


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape == "cross" else "s")


def _photo_captions(a: dict) -> list[str]:
    n = a["count"]
    thing = f"{a['size']} {a['colour']} {_plural(a['shape'], n)}"
    counted = f"a {thing}" if n == 1 else f"{NUMBERS[n]} {thing}"
    pattern = "" if a["pattern"] == "plain" else a["pattern"] + " "
    ground = f"on a {pattern}{a['background']} background"
    where = ""
    if a["position"] is not None:
        where = " in the centre" if a["position"] == "centre" else f" on the {a['position']}"
        if a["position"] in ("top", "bottom"):
            where = f" at the {a['position']}"
    canonical = f"{counted}{where} {ground}"
    short_ground = f"{a['background']} {a['pattern']} background".replace(" plain", "")
    variants = [
        canonical,
        f"a photo of {counted}{where} {ground}",
        f"{counted}{where}, {short_ground}",
        f"a picture showing {counted}{where} {ground}",
    ]
    return variants


def _chart_captions(a: dict) -> list[str]:
    colour, n = a["colour"], a["count"]
    grid = " with grid lines" if a["grid"] else ""
    dark = grid + ("" if a["background"] == "white" else f" on a {a['background']} background")
    topic = a["topic"]
    if a["chart"] == "bar":
        canonical = f"a {a['orientation']} bar chart with {NUMBERS[n]} {colour} bars{dark}"
        extra = [
            f"a {a['orientation']} bar chart of {topic} with {NUMBERS[n]} {colour} bars{dark}",
            f"bar chart, {a['orientation']}, {NUMBERS[n]} {colour} bars{dark}",
        ]
    elif a["chart"] == "line":
        lines = "a {c} line" if n == 1 else f"{NUMBERS[n]} {{c}} lines"
        lines = lines.format(c=colour)
        canonical = f"a line chart with {lines} going {a['trend']}{dark}"
        extra = [
            f"a line chart of {topic} with {lines} going {a['trend']}{dark}",
            f"line graph: {lines} trending {a['trend']}{dark}",
        ]
    elif a["chart"] == "pie":
        canonical = f"a {colour} pie chart with {NUMBERS[n]} slices{dark}"
        extra = [
            f"a {colour} pie chart of {topic} with {NUMBERS[n]} slices{dark}",
            f"pie chart in shades of {colour}, {NUMBERS[n]} slices{dark}",
        ]
    else:
        canonical = (
            f"a diagram of {NUMBERS[n]} {colour} boxes connected by arrows in a "
            f"{a['orientation']}{dark}"
        )
        extra = [
            f"a flow diagram with {NUMBERS[n]} {colour} boxes in a {a['orientation']}{dark}",
            f"diagram: {NUMBERS[n]} {colour} boxes and arrows in a {a['orientation']}{dark}",
        ]
    return [canonical, *extra]


# ==== Drawing ====


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in rgb)


def _shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + i * math.pi / 5
            points.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(points, fill=fill)
    else:  # cross
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _background(draw, side: int, a: dict, rng: np.random.Generator, x0: int, y0: int, w, h):
    base = BACKGROUNDS[a["background"]]
    draw.rectangle([0, 0, w, h], fill=base)
    other = _shade(base, 0.7) if sum(base) > 250 else _shade(base, 1.45)
    if a["pattern"] == "striped":
        step = side / rng.integers(5, 9)
        t = 0.0
        while t < max(w, h) * 2:
            draw.polygon([(t, 0), (t + step / 2, 0), (t + step / 2 - h, h), (t - h, h)], fill=other)
            t += step
    elif a["pattern"] == "dotted":
        step = side / rng.integers(6, 10)
        rr = step * 0.18
        for yy in np.arange(step / 2, h, step):
            for xx in np.arange(step / 2, w, step):
                draw.ellipse([xx - rr, yy - rr, xx + rr, yy + rr], fill=other)


def _draw_photo(image, a: dict, rng: np.random.Generator, x0: int, y0: int, side: int) -> None:
    import PIL.ImageDraw

    draw = PIL.ImageDraw.Draw(image)
    _background(draw, side, a, rng, x0, y0, image.width, image.height)
    fill = COLOURS[a["colour"]]
    n = a["count"]
    big = a["size"] == "large"
    if n == 1:
        r = side * (rng.uniform(0.2, 0.26) if big else rng.uniform(0.08, 0.11))
        centres = {
            "left": (0.25, 0.5),
            "right": (0.75, 0.5),
            "top": (0.5, 0.25),
            "bottom": (0.5, 0.75),
            "centre": (0.5, 0.5),
        }
        fx, fy = centres[a["position"]]
        jitter = side * 0.04
        cx = x0 + fx * side + rng.uniform(-jitter, jitter)
        cy = y0 + fy * side + rng.uniform(-jitter, jitter)
        _shape(draw, a["shape"], cx, cy, r, fill)
        return
    # Several objects: one per cell of a shuffled 2x2 grid, jittered inside it.
    cells = rng.permutation(4)[:n]
    r = side * (rng.uniform(0.14, 0.17) if big else rng.uniform(0.07, 0.09))
    for cell in cells:
        gx, gy = (cell % 2) * 0.5 + 0.25, (cell // 2) * 0.5 + 0.25
        slack = max(0.0, 0.25 * side - r - 2)
        cx = x0 + gx * side + rng.uniform(-slack, slack) * 0.6
        cy = y0 + gy * side + rng.uniform(-slack, slack) * 0.6
        _shape(draw, a["shape"], cx, cy, r, fill)


def _draw_chart(image, a: dict, rng: np.random.Generator, x0: int, y0: int, side: int) -> None:
    import PIL.ImageDraw

    draw = PIL.ImageDraw.Draw(image)
    bg = {"white": (250, 250, 250), "dark": (30, 30, 38), "grey": (150, 150, 150)}[a["background"]]
    ink = (60, 60, 60) if a["background"] == "white" else (225, 225, 225)
    draw.rectangle([0, 0, image.width, image.height], fill=bg)
    fill = COLOURS[a["colour"]]
    n = a["count"]
    m = side * 0.12
    left, top, right, bottom = x0 + m, y0 + m, x0 + side - m * 0.6, y0 + side - m
    lw = max(1, side // 90)
    if a["chart"] in ("bar", "line"):
        draw.line([left, top, left, bottom, right, bottom], fill=ink, width=lw)
        for t in range(1, 5):  # tick marks, and grid lines across the plot when asked
            yy = bottom - (bottom - top) * t / 5
            end = right if a["grid"] else left
            draw.line([left - m * 0.15, yy, end, yy], fill=ink, width=lw)
    if a["chart"] == "bar":
        values = rng.uniform(0.25, 1.0, n)
        span = (right - left) if a["orientation"] == "vertical" else (bottom - top)
        slot = span / n
        for i, v in enumerate(values):
            if a["orientation"] == "vertical":
                bx = left + slot * i + slot * 0.18
                draw.rectangle(
                    [bx, bottom - (bottom - top) * v, bx + slot * 0.64, bottom - lw], fill=fill
                )
            else:
                by = top + slot * i + slot * 0.18
                draw.rectangle(
                    [left + lw, by, left + (right - left) * v, by + slot * 0.64], fill=fill
                )
    elif a["chart"] == "line":
        steps = int(rng.integers(5, 9))
        for line in range(n):
            shade = _shade(fill, 1.0 - 0.28 * line)
            start = rng.uniform(0.05, 0.35)
            end = rng.uniform(0.65, 0.95)
            if a["trend"] == "down":
                start, end = end, start
            ys = np.linspace(start, end, steps) + rng.normal(0, 0.06, steps)
            ys = np.clip(ys, 0.02, 0.98)
            pts = [
                (left + (right - left) * i / (steps - 1), bottom - (bottom - top) * y)
                for i, y in enumerate(ys)
            ]
            draw.line(pts, fill=shade, width=max(2, side // 45))
    elif a["chart"] == "pie":
        cx, cy, r = x0 + side / 2, y0 + side / 2, side * 0.38
        weights = rng.uniform(0.5, 1.5, n)
        angles = np.concatenate([[0], np.cumsum(weights) / weights.sum() * 360]) - 90
        for i in range(n):
            shade = _shade(fill, 0.55 + 0.9 * i / max(n - 1, 1))
            draw.pieslice(
                [cx - r, cy - r, cx + r, cy + r],
                angles[i],
                angles[i + 1],
                fill=shade,
                outline=bg,
                width=max(1, side // 120),
            )
    else:  # diagram: boxes joined by arrows, on squared paper when "grid"
        if a["grid"]:
            for t in range(1, 8):
                g = side * t / 8
                draw.line([x0 + g, y0, x0 + g, y0 + side], fill=_shade(bg, 0.85), width=lw)
                draw.line([x0, y0 + g, x0 + side, y0 + g], fill=_shade(bg, 0.85), width=lw)
        row = a["orientation"] == "row"
        span = side * 0.84
        slot = span / n
        box = min(slot * 0.62, side * 0.3)
        for i in range(n):
            c = y0 + side * 0.08 + slot * (i + 0.5)
            cx, cy = (
                (x0 + side * 0.08 + slot * (i + 0.5), y0 + side / 2) if row else (x0 + side / 2, c)
            )
            draw.rectangle(
                [cx - box / 2, cy - box / 2.6, cx + box / 2, cy + box / 2.6],
                fill=fill,
                outline=ink,
                width=lw,
            )
            if i + 1 < n:
                if row:
                    a0, a1 = (cx + box / 2, cy), (cx + slot - box / 2, cy)
                    head = [
                        (a1[0], a1[1]),
                        (a1[0] - box / 5, a1[1] - box / 7),
                        (a1[0] - box / 5, a1[1] + box / 7),
                    ]
                else:
                    a0, a1 = (cx, cy + box / 2.6), (cx, cy + slot - box / 2.6)
                    head = [
                        (a1[0], a1[1]),
                        (a1[0] - box / 7, a1[1] - box / 5),
                        (a1[0] + box / 7, a1[1] - box / 5),
                    ]
                draw.line([a0, a1], fill=ink, width=max(1, side // 60))
                draw.polygon(head, fill=ink)


def render(kind: str, attributes: dict, *, width: int = 128, height: int = 128, seed: int = 0):
    """Draw one scene as a PIL image (the scene fills the central ``min(width, height)`` square)."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    image = PIL.Image.new("RGB", (width, height))
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    if kind == "photo":
        _draw_photo(image, attributes, rng, x0, y0, side)
    else:
        _draw_chart(image, attributes, rng, x0, y0, side)
    return image


# ==== Samples ====


def captions(kind: str, attributes: dict) -> list[str]:
    """The canonical caption of a scene, then its paraphrases (``kind``: photo or chart)."""
    if kind == "photo":
        return _photo_captions(attributes)
    if kind == "chart":
        return _chart_captions(attributes)
    raise ValueError(f"kind must be 'photo' or 'chart', got {kind!r}")


def make(
    kind: str,
    attributes: dict,
    *,
    width: int = 256,
    height: int = 192,
    seed: int = 0,
    format: str = "JPEG",
    quality: int = 90,
) -> Sample:
    """The pair for a chosen scene, e.g. ``make("photo", {...})`` for a planted test image.

    Photo attributes: count, colour, shape, size, background, pattern, position (None
    unless count is 1). Chart attributes: chart, colour, background, grid, topic, count
    and orientation (bar: vertical/horizontal; diagram: row/column) or trend (line).
    """
    image = render(kind, attributes, width=width, height=height, seed=seed)
    buf = io.BytesIO()
    if format == "JPEG":
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, format)
    texts = captions(kind, attributes)
    return Sample(buf.getvalue(), texts[0], texts, kind, dict(attributes), format, (width, height))


def sample(
    seed: int,
    *,
    kind: str | None = None,
    min_side: int = 72,
    max_side: int = 320,
    chart_share: float = 0.3,
) -> Sample:
    """The pair for ``seed``: same seed, same bytes and captions.

    ``kind`` forces ``"photo"`` or ``"chart"``; otherwise ``chart_share`` of the seeds
    are charts. Sides are drawn in ``[min_side, max_side]`` with aspect ratios up to 3:2;
    a quarter of the images are PNG, the rest JPEG at quality 70-95.
    """
    import PIL.Image

    if kind not in (None, "photo", "chart"):
        raise ValueError(f"kind must be 'photo', 'chart' or None, got {kind!r}")
    rng = np.random.default_rng([seed, 0x5EED])
    if kind is None:
        kind = "chart" if rng.random() < chart_share else "photo"
    attrs = _photo_attributes(rng) if kind == "photo" else _chart_attributes(rng)
    texts = captions(kind, attrs)
    side = int(rng.integers(min_side, max_side + 1))
    other = int(side * rng.uniform(1.0, 1.5))
    width, height = (side, other) if rng.random() < 0.5 else (other, side)
    image = render(kind, attrs, width=width, height=height, seed=int(rng.integers(2**31)))
    buf = io.BytesIO()
    fmt = "PNG" if rng.random() < 0.25 else "JPEG"
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
    else:
        image.save(buf, "PNG", compress_level=1)
    assert isinstance(image, PIL.Image.Image)
    return Sample(
        data=buf.getvalue(),
        caption=texts[0],
        captions=texts,
        kind=kind,
        attributes=attrs,
        format=fmt,
        size=(width, height),
    )


def samples(seed: int, count: int, **options) -> Iterator[Sample]:
    """``count`` pairs from one seed (sample ``i`` uses the sub-seed ``(seed, i)``)."""
    for i in range(count):
        yield sample(seed * 1_000_003 + i, **options)


def gallery(seed: int, count: int, **options) -> list[Sample]:
    """``count`` pairs from ``seed`` whose canonical captions are all different.

    Retrieval metrics over this gallery have one right answer per caption. Seeds are
    drawn in order and a pair whose caption was already taken is skipped.
    """
    seen: set[str] = set()
    out: list[Sample] = []
    i = 0
    while len(out) < count:
        s = sample(seed * 1_000_003 + i, **options)
        i += 1
        if s.caption not in seen:
            seen.add(s.caption)
            out.append(s)
        if i > count * 50:
            raise ValueError(f"could not find {count} different captions from seed {seed}")
    return out
