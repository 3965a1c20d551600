"""What ``starkret dedup`` found, for a person to check the threshold by eye: the largest
groups as text, and an HTML page (``--report``) with their thumbnails.

Thumbnails are read with :meth:`~starkret.index.db.ImageDB.image_bytes` (only from the
inputs the sources' manifests record) and decoded in one Rust batch; an image whose
bytes are not local is shown by its key. Every member is shown with its cosine to the
group's kept image (outlined in green).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starkret._io import atomic_write_text
from starkret.index.db import ImageDB
from starkret.index.duplicates import read_record
from starkret.ingest.preprocess import thumbnail_uris
from starkret.store.outputs import OutputGuard

__all__ = ["Member", "largest_groups", "report_outputs", "text_report", "write_dedup_report"]

THUMB = 128

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
.g{border-bottom:1px solid #ddd;padding:.8em 0}
.c{display:flex;gap:.6em;flex-wrap:wrap}
figure{margin:0;width:128px;font-size:.75em;overflow-wrap:anywhere}
.kept img,.kept .ph{outline:3px solid #2a7}
img{width:128px;height:128px;object-fit:cover;background:#eee;display:block}
.ph{width:128px;height:128px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#888}
"""


@dataclass(frozen=True)
class Member:
    """One image of a group: its source, row, key, cosine to the kept image."""

    source: str
    row: int
    key: str
    cosine: float
    kept: bool


def largest_groups(db: ImageDB, count: int = 50, per_group: int = 12) -> list[list[Member]]:
    """The ``count`` largest recorded groups (kept image first, then by cosine), at most
    ``per_group`` members each."""
    record = read_record(db.root, with_clusters=False)
    if record is None or not len(record.members_group):
        return []
    sizes = np.bincount(record.members_group)
    groups = np.argsort(-sizes, kind="stable")[: max(0, count)]
    groups = groups[sizes[groups] > 1]
    names = record.sources
    out = []
    for g in groups.tolist():
        at = np.flatnonzero(record.members_group == g)
        kept = at[record.members_kept[at]][0]
        ks, kr = names[int(record.members_source[kept])], int(record.members_row[kept])
        anchor = db.vectors(ks, [kr])[0]
        members = []
        for i in at.tolist():
            s, r = names[int(record.members_source[i])], int(record.members_row[i])
            cosine = float(db.vectors(s, [r])[0] @ anchor)
            key = db.metadata(s).take([r], columns=("key",))["key"][0]
            members.append(Member(s, r, str(key), cosine, bool(record.members_kept[i])))
        members.sort(key=lambda m: (not m.kept, -m.cosine, m.source, m.row))
        out.append(members[:per_group])
    return out


def text_report(groups: list[list[Member]], count: int = 5) -> str:
    """The first ``count`` groups, one line per member."""
    lines = []
    for n, members in enumerate(groups[:count], 1):
        lines.append(f"group {n}:")
        for m in members:
            mark = "keep" if m.kept else "drop"
            lines.append(f"  {mark} {m.cosine:.4f}  {m.source:<12} {m.key}")
    return "\n".join(lines)


def _figure(m: Member, thumbs: dict[str, str]) -> str:
    label = html.escape(f"{m.source} {m.cosine:.4f}" + (" kept" if m.kept else ""))
    if m.key in thumbs:
        picture = f'<img src="{thumbs[m.key]}" title="{html.escape(m.key)}">'
    else:
        picture = '<div class="ph">no preview</div>'
    cls = ' class="kept"' if m.kept else ""
    caption = f"<figcaption>{label}<br>{html.escape(m.key)}</figcaption>"
    return f"<figure{cls}>{picture}{caption}</figure>"


def write_dedup_report(
    db: ImageDB, path: str | os.PathLike, *, groups: int = 50, per_group: int = 12
) -> Path:
    """Write the HTML page of the largest recorded groups to ``path``; returns it."""
    found = largest_groups(db, groups, per_group)
    images = {}
    for members in found:
        for m in members:
            data = db.image_bytes(m.source, m.key)
            if data is not None:
                images[m.key] = data
    thumbs = thumbnail_uris(images, THUMB) if images else {}
    record = read_record(db.root, with_clusters=False)
    info = record.info if record is not None else {}
    rows = [
        f'<div class="g"><div>group {n}: {len(members)} shown</div><div class="c">'
        + "".join(_figure(m, thumbs) for m in members)
        + "</div></div>"
        for n, members in enumerate(found, 1)
    ]
    title = "starkret dedup report"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape(str(info.get('groups', 0)))} groups at cosine &ge; "
        f"{html.escape(str(info.get('threshold')))}; "
        f"{html.escape(str(info.get('dropped', 0)))} images left out of searches. "
        f"The {len(found)} largest groups; green outline: the image kept "
        f"({html.escape(str(info.get('keep_rule', '')))}); numbers: cosine to it.</p>"
        f"{''.join(rows)}</body></html>"
    )
    return atomic_write_text(path, page)


def report_outputs(db_folder: str | os.PathLike, report: str | os.PathLike) -> OutputGuard:
    """The guard of the report file: never a file the user owns, never inside the DB."""
    db_folder = Path(db_folder)
    folders = [db_folder]
    if db_folder.is_dir():
        folders.extend(p for p in db_folder.iterdir() if p.is_dir())
    report = Path(report)
    guard = OutputGuard(
        report.with_name(report.name + ".starkret"),
        written_by="starkret dedup",
        input_folders=folders,
    )
    guard.file(report, "--report")
    return guard
