"""The report in a real browser: every image decodes, no script error, a screenshot is taken.

Headless Chromium (`/usr/bin/chromium`, Debian package `chromium`; `.ci/run` installs it).
The check works on a copy of report.html with a probe script injected at the top of <head>:
it records window errors and, after load, whether every <img> decoded (complete and
naturalWidth > 0), into a `data-check` attribute that `--dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_compare import small_compare

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars"]

PROBE = """<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  window.__errs.push(String(e.message || (e.target && (e.target.src || '').slice(0, 40)) || e));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.alt || i.src.slice(0, 40); });
  document.documentElement.setAttribute('data-check', JSON.stringify(
      {n: imgs.length, bad: bad, errors: window.__errs}));
});
</script>"""


def _chromium(args, tmp_path, timeout=120):
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _ = small_compare(tmp_path_factory.mktemp("browser_compare"))
    return out / "report.html"


def test_report_renders_in_chromium(report, tmp_path):
    html = report.read_text()
    probe_copy = tmp_path / "report_checked.html"
    probe_copy.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    r = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                   "--dump-dom", probe_copy.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-check="([^"]*)"', r.stdout)
    assert m, "the load handler never ran: " + r.stdout[:500]
    check = json.loads(m.group(1).replace("&quot;", '"'))
    n_expected = html.count("<img ")
    assert n_expected >= 5
    assert check["n"] == n_expected
    assert check["bad"] == [], f"images that did not decode: {check['bad']}"
    assert check["errors"] == []
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console

    shot = tmp_path / "report.png"
    r = _chromium(["--window-size=1280,2000", f"--screenshot={shot}", report.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 20_000  # a blank page compresses to ~5 KB
    docs_img = Path(__file__).resolve().parents[1] / "docs" / "img"
    if docs_img.is_dir():  # the demo screenshot in the docs is refreshed by hand, not here
        (tmp_path / "latest.png").write_bytes(data)
