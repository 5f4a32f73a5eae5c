"""The docs render math offline: MathJax ships with them, and no page loads a script from a CDN.

The build itself fails on a remote script (``kernrnn_docs._check_offline``);
these tests check that guard and the configuration without running Sphinx.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import kernrnn_docs  # noqa: E402


def test_remote_scripts_are_found_and_local_ones_are_not():
    html = ('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
            '<script defer src="_static/mathjax/tex-chtml.js"></script>'
            '<link rel="stylesheet" href="//fonts.example.org/a.css">'
            '<link rel="canonical" href="https://kernrnn.example.org/">')
    assert kernrnn_docs.remote_scripts(html) == [
        'src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js',
        'href="//fonts.example.org/a.css']


def test_mathjax_is_served_from_the_docs_themselves():
    conf = (DOCS / "conf.py").read_text()
    assert '"sphinx-mathjax-offline"' in conf and '"sphinx.ext.mathjax"' in conf
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None:
        pytest.skip("the docs extra is not installed")
    assert (Path(spec.origin).parent / "static" / "mathjax" / "tex-chtml.js").is_file()
