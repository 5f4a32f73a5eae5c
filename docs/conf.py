"""Sphinx configuration for kernrnn's documentation (``nox -s docs``).

Built with warnings as errors and nitpicky references: every cross-reference
to a kernrnn object must resolve.  No intersphinx, so the build needs no
network; references to NumPy, Numba, pluggy and hypothesis types are listed in
``nitpick_ignore_regex`` instead.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import kernrnn  # noqa: E402  (the installed package being documented)

project = "kernrnn"
author = "kernrnn developers"
copyright = "kernrnn developers"
release = kernrnn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped inside the package and copied into _static/: the math
    # renders offline, with no request to a CDN.
    "sphinx-mathjax-offline",
    "kernrnn_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# examples/ holds real packages (their README is not a page).  The reports under
# benchmarks/ are pages of their own, in the toctree of benchmarks.md.
exclude_patterns = ["_build", "examples/**", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

nitpicky = True
nitpick_ignore_regex = [
    # Third-party and standard types named in signatures and docstrings.
    (r"py:.*", r"(np|numpy|numba|pluggy|hypothesis|typing|collections\.abc|types)\..*"),
    (r"py:.*", r"(Callable|Iterator|Path|optional)"),
    # Array shapes written as [T, B, I] in docstrings are not references.
    (r"py:.*", r"\[.*"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = False
napoleon_numpy_docstring = True

html_theme = "furo"
html_title = f"kernrnn {release}"
html_static_path = []
