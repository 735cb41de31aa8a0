"""A Sphinx extension the book build loads: each page's scripts without duplicates.

sphinx-thebe adds its configuration script (``const THEBE_JS_URL = ...``) once per read of the sources,
and Jupyter Book's build reads them more than once; the second copy redeclares a ``const`` and the
browser logs a SyntaxError on every page. Keeping the first of identical script entries removes it.
"""

from __future__ import annotations


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {})
        key = (str(getattr(script, "filename", script) or ""), attributes.get("body"))  # None and "" alike
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def setup(app):
    app.connect("html-page-context", _unique_scripts, priority=900)  # after the extensions that add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
