"""The built book in headless Chromium: every chapter loads, figures render, internal links resolve, the
maths typesets (no TeX error, no MathJax file that failed to load) and the console logs no error.

Run after the book is built (``make run`` or ``python -m imprint book``); ``IMPRINT_BOOK`` picks the
profile (default ``ci``).
"""

import functools
import http.server
import os
import re
import threading
import time
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
import yaml

from imprint.runtime.provenance import repo_root

pytestmark = pytest.mark.e2e
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|opt|tmp|home|root|usr|scratch)/\S*")
PROGRESS_BAR = re.compile(r"\d+%\|[^|\n]*\|")
# Runs before any page script: MathJax 2 reads window.MathJax as its configuration and calls AuthorInit,
# where hooks record TeX errors, files that failed to load and the end of typesetting.
MATHJAX_HOOKS = """
window.__mathjax = {errors: [], done: false};
window.MathJax = {AuthorInit: function () {
  MathJax.Hub.Register.MessageHook("TeX Jax - parse error", function (m) { window.__mathjax.errors.push("TeX: " + m[1]); });
  MathJax.Hub.Register.MessageHook("Math Processing Error", function (m) { window.__mathjax.errors.push("Math Processing Error: " + m[2]); });
  MathJax.Hub.Register.MessageHook("file load error", function (m) { window.__mathjax.errors.push("File failed to load: " + m[1]); });
  MathJax.Hub.Register.StartupHook("End", function () { MathJax.Hub.Queue(function () { window.__mathjax.done = true; }); });
}};
"""
PROFILE = os.environ.get("IMPRINT_BOOK", "ci")
BOOK = repo_root() / "_build" / "book" / PROFILE
HTML = BOOK / "_build" / "html"


def _pages() -> list[str]:
    toc = yaml.safe_load((BOOK / "src" / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f + ".html" for f in files]


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no built book at {HTML}: run `python -m imprint book --profile {PROFILE}` first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": MATHJAX_HOOKS})
    yield driver
    driver.quit()


def _typeset_problems(browser, timeout: float = 60.0) -> list[str]:
    """Waits for MathJax (on pages that load it) and returns its errors and the page's error text."""
    deadline = time.monotonic() + timeout
    while browser.execute_script("return !!(window.MathJax && window.MathJax.Hub) && !window.__mathjax.done"):
        if time.monotonic() > deadline:
            return [f"MathJax did not finish typesetting within {timeout:.0f} s"]
        time.sleep(0.2)
    problems = list(browser.execute_script("return window.__mathjax ? window.__mathjax.errors : []"))
    text = browser.execute_script("return document.body.innerText")
    problems += [f"page shows {marker!r}" for marker in ("Math Processing Error", "File failed to load")
                 if marker in text]
    problems += [f"TeX error shown: {e}" for e in browser.execute_script(
        "return Array.from(document.querySelectorAll('.MathJax .merror, .MathJax_Error, .noError, mjx-merror'))"
        ".map(e => e.getAttribute('title') || e.textContent)")]
    return problems


def _console_errors(browser) -> list[str]:
    """SEVERE console entries, less the browser's own request for /favicon.ico (the book has none)."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "/favicon.ico " not in entry["message"]]


def _is_chapter(page: str) -> bool:
    return page.startswith("notebooks/") and (BOOK / "src" / page.replace(".html", ".ipynb")).is_file()


@pytest.mark.parametrize("page", _pages() if (BOOK / "src" / "_toc.yml").is_file() else ["index.html"])
def test_page_loads_with_figures_and_working_links(server, browser, page):
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(urljoin(server, page))
    problems = _typeset_problems(browser)
    assert not problems, f"{page}: the maths did not typeset cleanly: {problems}"
    errors = _console_errors(browser)
    assert not errors, f"{page}: the browser console logged errors: {errors}"
    title = browser.execute_script("const h = document.querySelector('article h1'); return h ? h.textContent : ''")
    assert title.strip(), f"{page}: no title"
    errors = browser.find_elements("css selector", "main .output.traceback, main .ansi-red-fg")
    assert not errors, f"{page}: an executed cell shows an error"
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('main img')).map(i => "
        "[i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
    broken = [src for src, done, w, h in images if not done or w < 10 or h < 10]
    assert not broken, f"{page}: empty or missing images {broken}"
    if _is_chapter(page):
        outputs = browser.execute_script(
            "return Array.from(document.querySelectorAll('main .cell_output')).map(e => e.innerText).join('\\n')")
        noise = MACHINE_PATH.findall(outputs) + PROGRESS_BAR.findall(outputs)
        assert not noise, f"{page}: cell outputs show machine paths or progress bars: {noise[:5]}"
        assert "Parameters of this run" in browser.find_element("css selector", "main").text, \
            f"{page}: no word on which parameters applied"
        assert images, f"{page}: a chapter without a single figure"
        numbered = browser.find_elements("css selector", "main figure, main .figure")
        assert numbered, f"{page}: no numbered figure"
    hrefs = browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    for href in hrefs:
        url, fragment = urldefrag(href)
        parsed = urlparse(url)
        if not url.startswith(server):
            continue
        target = HTML / unquote(parsed.path.lstrip("/"))
        if target.is_dir():
            target = target / "index.html"
        assert target.is_file(), f"{page}: broken internal link {href}"
        if fragment and target.suffix == ".html":
            assert f'id="{fragment}"' in target.read_text(errors="ignore"), f"{page}: missing anchor {href}"


def test_synthesis_lists_every_executed_notebook(server, browser):
    browser.get(urljoin(server, "synthesis.html"))
    text = browser.find_element("css selector", "main").text
    links = browser.execute_script("return Array.from(document.querySelectorAll('main a[href]')).map(a => a.href)")
    executed = list((BOOK / "src" / "notebooks").glob("*.ipynb"))
    for nb in executed:
        assert nb.stem in text, f"synthesis page lacks {nb.stem}"
        assert any(href.endswith(f"/{nb.stem}.json") for href in links), f"no link to {nb.stem}'s full metrics"
    rows = browser.execute_script("return Array.from(document.querySelectorAll('main table'))"
                                  ".map(t => t.querySelectorAll('tbody tr').length)")
    assert all(n <= 8 for n in rows), f"the synthesis tables have {rows} rows: headline numbers only (at most 8)"
