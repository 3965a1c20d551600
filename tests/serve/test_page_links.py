"""The serve page turns no data into a link: its only ``src`` is the server's own
``/image/`` path, and it writes no ``href`` (a url column may hold ``javascript:``)."""

from __future__ import annotations

import re
from importlib import resources

from starkret.serve.app import image_path

PAGE = resources.files("starkret.serve").joinpath("static/index.html").read_text()
SCRIPT = PAGE[PAGE.index("<script>") : PAGE.index("</script>")]


def test_the_page_script_sets_no_href_and_only_a_checked_image_src():
    assert not re.search(r"href|innerHTML|outerHTML|insertAdjacentHTML|document\.write", SCRIPT)
    sources = re.findall(r"\.src\s*=\s*(.*);$", SCRIPT, flags=re.MULTILINE)
    # the checked server path, the checked http(s) redirect, or the bytes fetched from it
    assert sorted(set(sources)) == [
        "URL.createObjectURL(await response.blob())",
        "path",
        "redirect",
    ]
    assert 'hit.image.startsWith("/image/") ? hit.image : null' in SCRIPT
    assert "/^https?:\\/\\//i.test(url) ? url : null" in SCRIPT
    assert "const path = serverImage(hit);" in SCRIPT
    assert 'const redirect = response.type === "opaqueredirect" ? webUrl(hit.url) : null;' in SCRIPT


def test_the_image_path_of_a_hostile_key_stays_a_server_path():
    for key in ("javascript:alert(1)", "//evil.example/x", "../../etc/passwd", "a b?c#d"):
        path = image_path("cc12m", key)
        assert path.startswith("/image/cc12m/") and ":" not in path and "?" not in path
        assert "#" not in path and " " not in path
