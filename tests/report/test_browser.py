"""End to end: a small real study on the tiny reference model (two seeds, two generations), its report
written by `evoprune report` and by ``study.report``, opened in headless Chromium through the
DevTools protocol: every figure drew its traces, the console logged no error and nothing was
fetched from the network. A screenshot of the page is saved (``$EVOPRUNE_REPORT_SCREENSHOT``, else
in the test's tmp folder).

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped, with the reason, only where no
Chromium binary exists. Installs nothing at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

CONFIG = {
    "model": "reference:tiny",
    "calibration": {"num_sequences": 8, "seq_len": 64},
    "space": {"attention": "kv_groups", "mlp_step": 16, "drop_blocks": True},
    "budget": {"metric": "params", "max_ratio": 0.8},
    "stages": [
        {"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64, "promote": {"top_k": 3}},
        {"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64},
    ],
    "sampler": {"name": "evolutionary", "options": {"offspring": 6, "parents": 2, "init": [
        # a uniform baseline and a depth-pruned one (layer 2 removed), as a user would seed them
        {"layers": [{"num_kv_heads": 1, "q_per_kv": 2, "mlp_channels": 112}] * 4},
        {"layers": [{"num_kv_heads": 2, "q_per_kv": 2, "mlp_channels": 176},
                    {"num_kv_heads": 2, "q_per_kv": 2, "mlp_channels": 112},
                    {"num_kv_heads": 0, "q_per_kv": 0, "mlp_channels": 0},
                    {"num_kv_heads": 2, "q_per_kv": 2, "mlp_channels": 112}]},
    ]}},
    "objectives": ["kl", "params"],
    "seed": 1,
}

_PLOTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (gd) {
  return {data: (gd.data || []).length, full: (gd._fullData || []).length,
          svg: gd.querySelectorAll('.main-svg').length,
          drawn: gd.querySelectorAll('.scatterlayer .trace, .barlayer .trace, .heatmaplayer .hm').length,
          title: ((gd.layout || {}).title || {}).text || ''};
}))"""


def _browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DevTools:
    """A minimal Chrome DevTools protocol client: commands in order, events collected meanwhile."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    exe = _browser()
    if exe is None:
        pytest.skip(f"no Chromium browser found (looked for {', '.join(BROWSERS)}); `apt-get install chromium`")
    pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives Chromium's DevTools protocol")
    profile = tmp_path / "chromium-profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
         "--remote-allow-origins=*", f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
        stdout=log, stderr=log, start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            pages = [t for t in json.load(resp) if t.get("type") == "page"]
        tools = _DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the browser we started, and its children
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _open(tools: _DevTools, path: Path, n_figures: int, timeout: float = 90.0) -> list[dict]:
    for domain in ("Page", "Runtime", "Log", "Network"):
        tools.call(f"{domain}.enable")
    tools.call("Page.navigate", url=path.as_uri())
    deadline = time.monotonic() + timeout
    plots: list[dict] = []
    while time.monotonic() < deadline:
        if tools.evaluate("document.readyState") == "complete":
            plots = json.loads(tools.evaluate(_PLOTS_JS))
            if len(plots) >= n_figures and all(p["svg"] and p["drawn"] for p in plots):
                return plots
        time.sleep(0.25)
    return plots


def _screenshot(tools: _DevTools, out: Path) -> None:
    import base64

    height = int(tools.evaluate("document.documentElement.scrollHeight"))
    tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=min(height, 16000), deviceScaleFactor=1,
               mobile=False)
    time.sleep(1.0)  # plotly re-lays out responsive figures on resize
    tools.evaluate("window.scrollTo(0, 0)")
    shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    out.write_bytes(base64.b64decode(shot["data"]))


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append("log: " + p["entry"].get("text", ""))
    return out


def _remote_requests(events: list[dict]) -> list[str]:
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return [u for u in urls if not u.startswith(("file:", "data:", "about:", "blob:"))]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(browser, reference_tiny, tmp_path, capsys):
    from evoprune import create_study
    from evoprune._cli import main
    from evoprune.report import load_snapshot

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    study = create_study(CONFIG, storage=url, study_name="e2e")
    study.run(n_generations=2)
    snap = load_snapshot(study)
    assert snap.space is not None and snap.space_note == ""  # costs from the reference model's config.json
    assert {snap.trials[n].source for n in snap.complete_numbers()} >= {"seed", "evolution"}
    from_python = study.report(tmp_path / "python.html")
    study.close()
    assert from_python.is_file()

    out = tmp_path / "report.html"
    assert main(["report", "--storage", url, "--study", "e2e", "--out", str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    text = out.read_text()
    n_figures = text.count('<div class="figure">')
    assert n_figures == 5

    plots = _open(browser, out, n_figures)
    assert len(plots) == n_figures, plots
    for p in plots:  # every figure has its traces, an SVG and drawn trace elements
        assert p["data"] > 0 and p["full"] > 0 and p["svg"] > 0 and p["drawn"] > 0, p
    assert not _errors(browser.events), _errors(browser.events)
    assert not _remote_requests(browser.events)

    # the Pareto table sorts by a click on a header (numbers, not text)
    order = browser.evaluate("""(function () {
      var t = document.querySelector('table.sortable'); t.querySelectorAll('th')[0].click();
      t.querySelectorAll('th')[0].click();
      return JSON.stringify(Array.from(t.tBodies[0].rows).map(function (r) { return +r.cells[0].textContent; }));
    })()""")
    numbers = json.loads(order)
    assert numbers == sorted(numbers, reverse=True) and numbers

    shot = Path(os.environ.get("EVOPRUNE_REPORT_SCREENSHOT") or tmp_path / "report.png")
    _screenshot(browser, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
