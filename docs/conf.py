"""Sphinx configuration of curvlib's documentation site.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W -b html docs docs/_build

``tests/test_docs_build.py`` runs exactly that build (into a temporary folder) with ``-W``; every
```python block of the Markdown pages runs on its own in ``tests/test_readme.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's curvlib (autodoc) and examples
sys.path.insert(0, str(DOCS / "_ext"))

import curvlib  # noqa: E402

project = "curvlib"
author = "the curvlib developers"
copyright = "curvlib developers"
release = version = curvlib.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
    "curvlib_docs",  # docs/_ext: Markdown tables in docstrings, links in included files
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "sg_execution_times.rst"]

# ---------------------------------------------------------------------------- Markdown (MyST)
# ```python blocks are run by tests/test_readme.py; ```{code-block} python blocks are sketches.
# autodoc directives emit reStructuredText: they live in the .rst pages of docs/api/
myst_heading_anchors = 3  # [text](page.md#a-heading) links, as on GitHub

# ---------------------------------------------------------------------------- API (autodoc)
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# ---------------------------------------------------------------------------- examples gallery
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # the scripts train for seconds to minutes: the gallery shows them, tests/examples runs them
    "plot_gallery": False,
    "ignore_pattern": r"(__init__|_experiment|data)\.py$",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "write_computation_times": False,
    "show_signature": False,
    "remove_config_comments": True,  # the sphinx_gallery_thumbnail_path lines of the scripts
}

# ---------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"curvlib {release}"
html_static_path: list = []
