"""Headless Chromium for tests: what a page's images really look like once a browser renders them.

``render(html_file)`` copies the page, appends a probe script that records every ``<img>``'s
``naturalWidth`` and on-page box, reads them back with ``--dump-dom`` and takes a full-height
``--screenshot``; tests then check the pixels inside each image's box.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH = 1100
PROBE = """
<script>
window.addEventListener("load", () => {
  const boxes = [...document.images].map(img => {
    const r = img.getBoundingClientRect();
    return {id: img.id, naturalWidth: img.naturalWidth, complete: img.complete,
            x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height};
  });
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.style.display = "none";
  probe.textContent = JSON.stringify({height: document.body.scrollHeight, images: boxes});
  document.body.appendChild(probe);
});
</script>
"""


def _chromium(*args: str, timeout: float = 120) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", "--virtual-time-budget=5000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def render(html_file: Path, workdir: Path) -> tuple[dict, Image.Image]:
    """(probe: page height and every image's naturalWidth and box, screenshot as RGB)."""
    page = workdir / "probe.html"
    page.write_text(Path(html_file).read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                    encoding="utf-8")
    dom = _chromium(f"--window-size={WIDTH},1000", "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, "the probe script did not run: the page did not load"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    shot = workdir / "screenshot.png"
    _chromium(f"--window-size={WIDTH},{probe['height'] + 50}", f"--screenshot={shot}", page.as_uri())
    return probe, Image.open(shot).convert("RGB")


def ink_fraction(screenshot: Image.Image, box: dict) -> float:
    """Share of the box's pixels that are not (near) white: drawn plot, not empty page."""
    import numpy as np

    x, y, w, h = (int(round(box[k])) for k in ("x", "y", "w", "h"))
    region = np.asarray(screenshot.crop((x, y, x + w, y + h)), dtype=np.int16)
    assert region.size, f"image {box.get('id')} has an empty box"
    return float((region.min(axis=2) < 235).mean())


def colour_fraction(screenshot: Image.Image, box: dict) -> float:
    """Share of the box's pixels that are saturated colour (plot lines, bars, heat maps)."""
    import numpy as np

    x, y, w, h = (int(round(box[k])) for k in ("x", "y", "w", "h"))
    region = np.asarray(screenshot.crop((x, y, x + w, y + h)), dtype=np.int16)
    return float(((region.max(axis=2) - region.min(axis=2)) > 60).mean())
