"""Sphinx configuration for the polycos documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown; the API reference is generated from the numpydoc
docstrings by autodoc + napoleon. No extension needs the network.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document the checkout, not an installed copy

import polycos  # noqa: E402

project = "polycos"
author = "polycos developers"
copyright = "polycos developers"
release = polycos.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "scripts", "Thumbs.db", ".DS_Store", "README.md"]

# --- MyST: $...$ and $$...$$ math, amsmath environments, ::: fences, heading anchors
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_dmath_double_inline = True
myst_heading_anchors = 3

# --- autodoc + napoleon (numpy style throughout)
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
# The frameworks are installed in CI; mock only what this machine lacks so the
# API pages still build (their signatures then come from the docstrings alone).
autodoc_mock_imports = [
    m for m in ("torch", "jax", "jaxlib", "cupy") if importlib.util.find_spec(m) is None
]

# --- no network: intersphinx stays off; unresolved :func:`torch...` refs are plain text
nitpicky = False

# --- HTML
html_theme = "furo"
html_title = f"polycos {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "sphinx"
pygments_dark_style = "monokai"
