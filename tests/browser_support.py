"""Open a page in headless Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it)
and report what a reader would see: a screenshot, whether every image loaded, and any console
error. No browser automation library: the page is copied with a small recorder script in
its head, and ``--dump-dom`` returns the recorder's findings once the page has loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Collects uncaught errors, failed resource loads (capture phase) and console.error calls,
# then, on load, writes {images, broken, errors} into <pre id="rmgl-check">.
RECORDER = """<script>
window.__rmglErrors = [];
window.addEventListener('error', function (e) {
  window.__rmglErrors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || e.type));
}, true);
var __rmglConsoleError = console.error;
console.error = function () {
  window.__rmglErrors.push(Array.prototype.join.call(arguments, ' '));
  __rmglConsoleError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt || i.src.slice(0, 60); });
  var out = document.createElement('pre');
  out.id = 'rmgl-check';
  out.textContent = JSON.stringify({images: images.length, broken: broken, errors: window.__rmglErrors});
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    """A Chromium binary: ``$RMGL_CHROMIUM``, else the first of :data:`BROWSERS` on PATH."""
    chosen = os.environ.get("RMGL_CHROMIUM")
    if chosen:
        return chosen
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageCheck:
    images: int
    broken: list[str]
    errors: list[str]
    console: list[str]  # console lines Chromium logged on stderr
    screenshot: Path


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def check_page(
    browser: str, page: Path, work: Path, size: tuple[int, int] = (1280, 1600)
) -> PageCheck:
    """Open ``page`` (a local HTML file) twice: once as it is for a screenshot, once with
    the recorder for the image and error checks."""
    work.mkdir(parents=True, exist_ok=True)
    screenshot = work / "screenshot.png"
    shot = _run(
        browser,
        work / "profile-shot",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={screenshot}",
        page.resolve().as_uri(),
    )
    if not screenshot.is_file():
        raise RuntimeError(f"no screenshot from {browser}: {shot.stderr[-2000:]}")
    text = page.read_text(encoding="utf-8")
    instrumented = page.with_name(page.stem + ".checked.html")
    instrumented.write_text(text.replace("<head>", "<head>" + RECORDER, 1), encoding="utf-8")
    dump = _run(
        browser,
        work / "profile-dom",
        "--virtual-time-budget=10000",
        "--dump-dom",
        instrumented.resolve().as_uri(),
    )
    found = re.search(r'<pre id="rmgl-check">(.*?)</pre>', dump.stdout, re.S)
    if not found:
        raise RuntimeError(
            f"the recorder did not report (load event never fired?): {dump.stderr[-2000:]}"
        )
    import html

    result = json.loads(html.unescape(found.group(1)))
    console = [line for line in (shot.stderr + dump.stderr).splitlines() if ":CONSOLE" in line]
    return PageCheck(result["images"], result["broken"], result["errors"], console, screenshot)
