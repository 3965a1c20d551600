"""Writes the fuzz targets' seed corpus (fuzz/seeds/<target>/): a few KB, deterministic.

Run through `scripts/fuzz.sh seeds`; the output is committed, so CI never runs this.
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent / "seeds"


def gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    rgb = Image.new("RGB", size)
    rgb.putdata(
        [(x * 255 // w, y * 255 // h, (x + y) * 7 % 256) for y in range(h) for x in range(w)]
    )
    return rgb.convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def tar_of(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    # Keep the end-of-archive marker, drop the padding to a 10 KB record after it.
    data = out.getvalue().rstrip(b"\0")
    return data + bytes(-len(data) % 512 + 1024)


def pax_records(**records: str) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        while n != len(body) + len(str(n)):
            n = len(body) + len(str(n))
        out += str(n).encode() + body
    return out


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    jpeg = encoded(gradient("RGB", (24, 16)), "JPEG", quality=80)
    png = encoded(gradient("RGB", (20, 14)), "PNG")
    seeds = {
        "decode": {
            # decode_independent embeds these two: they must stay valid, baseline images.
            "good.jpg": jpeg,
            "good.png": png,
            "progressive.jpg": encoded(gradient("RGB", (17, 9)), "JPEG", progressive=True),
            "gray.jpg": encoded(gradient("L", (9, 13)), "JPEG", quality=60),
            "gray_alpha.png": encoded(gradient("LA", (7, 5)), "PNG"),
            "palette.png": encoded(gradient("P", (11, 6)), "PNG"),
            "rgba.png": encoded(gradient("RGBA", (6, 6)), "PNG"),
            "bilevel.png": encoded(gradient("1", (13, 3)), "PNG"),
            "gray16.png": encoded(gradient("I;16", (5, 9)), "PNG"),
            "gif.gif": encoded(gradient("P", (4, 4)), "GIF"),
            # thin images: the resampler's memory must follow the crop, not the long side
            "thin.png": encoded(gradient("L", (1, 1000)), "PNG"),
            "thin.jpg": encoded(gradient("L", (1, 400)), "JPEG", quality=50),
        },
        "tar_stream": {
            "sample.tar": tar_of(
                [
                    ("00000.jpg", jpeg[:200]),
                    ("00000.txt", b"a caption"),
                    ("00000.json", b'{"url": "http://x/0.jpg", "width": 24, "height": 16}'),
                    ("00001.png", png[:64]),
                ]
            ),
            "pax_long_name.tar": tar_of(
                [(f"{'d' * 120}/00002.jpg", b"xyz"), ("__key__.txt", b"k")], tarfile.PAX_FORMAT
            ),
            "gnu_long_name.tar": tar_of([(f"{'e' * 110}/3.jpg", b"j")], tarfile.GNU_FORMAT),
        },
        "pax": {
            "path_and_size": pax_records(path="dir/0.jpg", size="2"),
            "other_keys": pax_records(mtime="1700000000.5", uname="me", path="x.y/0.txt"),
        },
        "patterns": {
            "range": b"cc12m/{00000..01242}.tar",
            "alternatives": b"{a,b,{c,d}e}/{0..3}-*.tar",
            "reverse": b"s/{9..07}/x[0-9]?.tar",
        },
        # Raw bytes for the `arbitrary`-built input: any bytes make some input.
        "select": {
            "small": bytes(range(0, 256, 3)),
            "ones": bytes([1, 0, 0, 0, 63, 128] * 12),
        },
    }
    total = 0
    for target, files in seeds.items():
        (ROOT / target).mkdir(parents=True)
        for name, data in files.items():
            (ROOT / target / name).write_bytes(data)
            total += len(data)
    print(f"wrote {sum(map(len, seeds.values()))} seeds, {total} bytes, under {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
