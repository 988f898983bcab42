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


# ---- driving a live page (rmgl serve's) over the DevTools protocol


class DevToolsPage:
    """One page of headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ended by a NUL byte, commands on fd 3,
    answers and events on fd 4): navigate, choose a file in an ``<input type=file>``,
    click like a mouse, evaluate JavaScript, take a screenshot. Console errors, uncaught
    exceptions and failed loads are collected in ``errors``.

    Examples::

        with DevToolsPage(find_browser(), tmp_path / "profile") as page:
            page.navigate("http://127.0.0.1:8000/")
            page.set_files("#query-file", [crop])
            page.click("#search-button")
    """

    def __init__(self, browser: str, profile: Path, size: tuple[int, int] = (1280, 1000)):
        import threading

        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()

        def to_fds_3_and_4() -> None:  # in the child, before exec
            import fcntl

            read_high = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            write_high = fcntl.fcntl(answers_write, fcntl.F_DUPFD, 10)
            os.dup2(read_high, 3)
            os.dup2(write_high, 4)

        self.process = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=to_fds_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(answers_write)
        self.errors: list[str] = []
        self.events: list[dict] = []
        self._answers_by_id: dict[int, dict] = {}
        self._next_id = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "DOM"):
            self.send(f"{domain}.enable", session=self.session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=size[0],
            height=size[1],
            deviceScaleFactor=1,
            mobile=False,
        )

    def __enter__(self) -> DevToolsPage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for fd in (self._commands, self._answers):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._answers, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._changed:
                    self._changed.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._changed:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers_by_id[message["id"]] = message
                    else:
                        self._event(message)
                self._changed.notify_all()

    def _event(self, message: dict) -> None:
        self.events.append(message)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(
                str(details.get("exception", {}).get("description") or details.get("text"))
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))  # fmt: skip
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        import time

        with self._changed:
            self._next_id += 1
            number = self._next_id
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._changed:
            while number not in self._answers_by_id:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise TimeoutError(f"no answer to {method} from the browser")
                self._changed.wait(left)
            answer = self._answers_by_id.pop(number)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def evaluate(self, expression: str):
        result = self.send(
            "Runtime.evaluate",
            session=self.session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> object:
        """Evaluate ``expression`` until it is truthy; returns its value."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", session=self.session, url=url)
        self.wait_for("document.readyState === 'complete'")

    def _node(self, selector: str) -> int:
        root = self.send("DOM.getDocument", session=self.session)["root"]["nodeId"]
        node = self.send("DOM.querySelector", session=self.session, nodeId=root, selector=selector)
        if not node.get("nodeId"):
            raise RuntimeError(f"no element {selector}")
        return node["nodeId"]

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """What a user does with the file chooser (input and change events fire)."""
        self.send(
            "DOM.setFileInputFiles",
            session=self.session,
            nodeId=self._node(selector),
            files=[str(Path(p).resolve()) for p in paths],
        )

    def click(self, selector: str) -> None:
        """A mouse click in the middle of the element, as a user's."""
        node = self._node(selector)
        self.send("DOM.scrollIntoViewIfNeeded", session=self.session, nodeId=node)
        quad = self.send("DOM.getBoxModel", session=self.session, nodeId=node)["model"]["content"]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                session=self.session,
                type=kind,
                x=x,
                y=y,
                button="left",
                clickCount=1,
            )

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.send("Page.captureScreenshot", session=self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
