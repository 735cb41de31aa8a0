"""The built book in headless Chromium: every chapter loads, figures render, internal links resolve.

Run after the book is built (``make run`` or ``python -m imprint book``); ``IMPRINT_BOOK`` picks the
profile (default ``ci``).
"""

import functools
import http.server
import os
import threading
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
import yaml

from imprint.runtime.provenance import repo_root

pytestmark = pytest.mark.e2e
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
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
    yield driver
    driver.quit()


def _is_chapter(page: str) -> bool:
    return page.startswith("notebooks/") and (BOOK / "src" / page.replace(".html", ".ipynb")).is_file()


@pytest.mark.parametrize("page", _pages() if (BOOK / "src" / "_toc.yml").is_file() else ["index.html"])
def test_page_loads_with_figures_and_working_links(server, browser, page):
    browser.get(urljoin(server, page))
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
    for nb in (BOOK / "src" / "notebooks").glob("*.ipynb"):
        assert nb.stem in text, f"synthesis page lacks {nb.stem}"
