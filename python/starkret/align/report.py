"""A self-contained HTML page to judge alignment quality at a glance.

Per moment: the description, the chosen image (an embedded thumbnail when the image's
bytes are local, read by :meth:`~starkret.index.db.ImageDB.image_bytes`; a link for
``url:`` images that are not), and the runner-up candidates
with scores and sources. Thumbnails are decoded and cropped by the Rust preprocessor in
one batch, then stored as small JPEGs inside the page.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from starkret._io import atomic_write_text
from starkret.align.aligner import Alignment, Candidate
from starkret.index.db import ImageDB
from starkret.ingest.preprocess import thumbnail_uris

__all__ = ["write_report"]

THUMB = 128
#: The only URL schemes the report turns into links; any other url is shown as text.
WEB_SCHEMES = ("http", "https")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
.m{border-bottom:1px solid #ddd;padding:.8em 0;display:flex;gap:1.2em}
.d{width:26em}.s{font-size:.85em;color:#666}
.c{display:flex;gap:.6em;flex-wrap:wrap}
.c figure{margin:0;width:128px;font-size:.75em;overflow-wrap:anywhere}
.chosen img{outline:3px solid #2a7}.none{color:#b33;font-weight:600}
img{width:128px;height:128px;object-fit:cover;background:#eee;display:block}
.ph{width:128px;height:128px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#888}
"""


def _image_bytes(db: ImageDB, wanted: list[Candidate]) -> dict[str, bytes]:
    """Bytes of the wanted images whose inputs are local (every kind embed reads)."""
    found: dict[str, bytes] = {}
    for c in wanted:
        data = db.image_bytes(c.source, c.key)
        if data is not None:
            found[c.key] = data
    return found


def _thumbnails(images: dict[str, bytes]) -> dict[str, str]:
    """``data:`` URIs of center-cropped thumbnails, decoded in one Rust batch."""
    return thumbnail_uris(images, THUMB)


def _is_web_link(url: str) -> bool:
    """Whether ``url`` may become a link: http(s) only. A url column is untrusted data
    (``javascript:`` in an ``href`` runs when clicked), and browsers drop control
    characters and outer spaces before reading the scheme, so those are refused too."""
    if url != url.strip() or any(ch < " " or ch == "\x7f" for ch in url):
        return False
    return urlsplit(url).scheme.lower() in WEB_SCHEMES


def _figure(c: Candidate, thumbs: dict[str, str], chosen: bool) -> str:
    label = html.escape(f"{c.source} {c.score:+.3f}")
    if c.key in thumbs:
        picture = f'<img src="{thumbs[c.key]}" title="{html.escape(c.key)}">'
    elif c.url and _is_web_link(c.url):
        link = html.escape(c.url)
        picture = f'<a href="{link}" rel="noopener noreferrer"><div class="ph">open ↗</div></a>'
    else:
        picture = '<div class="ph">no preview</div>'
        if c.url:  # javascript:, data:, file: ...: shown as text, never a link
            label += f"<br>{html.escape(c.url)}"
    cls = ' class="chosen"' if chosen else ""
    return (
        f"<figure{cls}>{picture}<figcaption>{label}<br>{html.escape(c.key)}</figcaption></figure>"
    )


def write_report(
    db: ImageDB,
    alignments: Sequence[Alignment],
    path: str | Path,
    *,
    runners_up: int = 4,
    title: str = "starkret alignment report",
) -> Path:
    """Write the HTML page for ``alignments`` to ``path`` and return the path."""
    path = Path(path)
    shown: list[tuple[Alignment, list[Candidate]]] = []
    wanted: dict[str, Candidate] = {}
    for a in alignments:
        others = sorted((c for cs in a.candidates.values() for c in cs), key=lambda c: -c.score)
        chosen_keys = {c.key for c in a.images}
        others = [c for c in others if c.key not in chosen_keys][:runners_up]
        shown.append((a, others))
        for c in [*a.images, *others]:
            wanted.setdefault(c.key, c)
    thumbs = _thumbnails(_image_bytes(db, list(wanted.values())))
    rows = []
    for a, others in shown:
        chosen = "".join(_figure(c, thumbs, True) for c in a.images)
        if not a.images:
            chosen = f'<div class="none">{html.escape(a.status)}</div>'
        rows.append(
            '<div class="m"><div class="d">'
            f"<div>{html.escape(a.description or '(vector query)')}</div>"
            f'<div class="s">{html.escape(a.episode_id)} · session {a.session} · '
            f"{html.escape(a.moment_id)} · {html.escape(a.status)}</div></div>"
            f'<div class="c">{chosen}{"".join(_figure(c, thumbs, False) for c in others)}'
            "</div></div>"
        )
    counts = {
        s: sum(a.status == s for a in alignments) for s in ("ok", "below_threshold", "exhausted")
    }
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(alignments)} moments: {summary}. Green outline: chosen; the others are "
        f"the best remaining candidates of all sources.</p>{''.join(rows)}</body></html>"
    )
    return atomic_write_text(path, page)
