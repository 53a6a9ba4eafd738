"""The documentation site builds without a warning: ``python -m sphinx -W -b html docs docs/_build``
(README.md, "Documentation"), here into a temporary folder with fresh doctrees, so that every
page is read again and every warning shows.

``-W`` turns a broken cross-reference, a page missing from the table of contents, a docstring
that reStructuredText cannot parse or an example without a title into a failure. The build must
stay under 2 minutes on 2 cores (about 30 s on a loaded machine; sphinx-gallery shows the
examples without running them).
"""
from __future__ import annotations

import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / "doctrees"),
         *extra, str(DOCS), str(out / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    r = _build(out)
    assert r.returncode == 0, f"the documentation does not build with -W:\n{r.stderr[-6000:]}"
    return out / "html"


def _text(html: Path) -> str:
    """The page's text, tags removed (highlighted code comes back in one piece)."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", "", html.read_text())))


def test_every_page_is_built(site):
    pages = ["index", "getting_started", "design", "results", "benchmarks", "api/index", "auto_examples/index"]
    pages += [f"user_guide/{p}" for p in ("index", "extensions", "solvers", "optimizers", "layers", "distributed", "faults")]
    pages += [f"api/{p}" for p in ("curvlib", "extensions", "solvers", "optim", "engine")]
    missing = [p for p in pages if not (site / f"{p}.html").is_file()]
    assert not missing, missing


def test_api_reference_has_the_public_names(site):
    """autodoc found the docstrings of every public class and function (an import failure would
    leave the pages empty; Markdown pages would print autodoc's reStructuredText as text)."""
    import curvlib.extensions
    import curvlib.optim
    import curvlib.solvers

    for module in (curvlib.extensions, curvlib.solvers, curvlib.optim):
        html = (site / "api" / f"{module.__name__.split('.')[-1]}.html").read_text()
        assert ".. py:" not in html and ".. autoclass" not in html
        absent = [name for name in module.__all__ if callable(getattr(module, name))
                  and f'id="{module.__name__}.{name}"' not in html]
        assert not absent, f"{module.__name__}: not in the API reference: {absent}"
    assert "Kronecker factors" in _text(site / "api" / "extensions.html")


def test_markdown_tables_in_docstrings_render_as_tables(site):
    """curvlib.extensions' module docstring holds a Markdown table (docs/_ext/curvlib_docs.py)."""
    html = (site / "api" / "extensions.html").read_text()
    assert "<table" in html and "kfac_corrected" in html and "|---|" not in html


def test_gallery_shows_every_example_script(site):
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_") and p.stem != "data"}
    assert scripts and not [s for s in scripts if not (site / "auto_examples" / f"{s}.html").is_file()]
    assert "python -m examples.demo" in _text(site / "auto_examples" / "index.html")


def test_included_readmes_and_their_links(site):
    """benchmarks/README.md and examples/README.md are part of the site; their links to files
    beside them (results/*.md, *.png) resolve to copies of those files."""
    assert "bench_optim.py" in _text(site / "benchmarks.html")
    results = (site / "results.html").read_text()
    assert "Two-level KFAC against KFAC" in results
    links = re.findall(r'href="(_downloads/[^"]+)"', results)
    assert any(l.endswith("autoencoder.md") for l in links) and all((site / l).is_file() for l in links)
    images = re.findall(r'src="(_images/[^"]+)"', results)
    assert all((site / i).is_file() for i in images)


def test_hyper_parameter_table_has_its_marked_place(site):
    """The optimizers page keeps the place that the generated hyper-parameter table fills."""
    text = (DOCS / "user_guide" / "optimizers.md").read_text()
    begin, end = text.index("<!-- BEGIN generated hyper-parameter table"), text.index("<!-- END generated hyper-parameter table")
    assert begin < end and "| `damping` |" in text[begin:end]
    assert "damping_decay" in _text(site / "user_guide" / "optimizers.html")


def test_markdown_table_conversion():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from curvlib_docs import markdown_tables_to_rst
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    lines = ["Text.", "", "  | a | b |", "  |---|:-:|", "  | `x\\|y` | |", "", "After."]
    assert markdown_tables_to_rst(lines) == [
        "Text.", "", "", "  .. list-table::", "     :header-rows: 1", "",
        "     * - a", "       - b", "     * - `x|y`", "       - ..", "", "", "After.",
    ]
    plain = ["| not a table |", "no separator row"]
    assert markdown_tables_to_rst(plain) == plain


def test_links_of_included_files(tmp_path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from curvlib_docs import relative_links
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    src, other = tmp_path / "docs", tmp_path / "examples"
    (other / "results").mkdir(parents=True)
    src.mkdir()
    (other / "results" / "cnn.md").write_text("table")
    text = "[table](results/cnn.md), ![plot](results/cnn.png), [web](https://x.org/a.md), [gone](results/no.md), [here](#top)"
    assert relative_links(text, other / "README.md", src) == (
        "[table](path:/../examples/results/cnn.md), ![plot](results/cnn.png), [web](https://x.org/a.md), "
        "[gone](results/no.md), [here](#top)"
    )


def test_design_citations_name_existing_sections():
    """Docstrings cite the design document as ``docs/design.md §N``: every cited section exists."""
    sections = set(re.findall(r"^## (\d+)\. ", (DOCS / "design.md").read_text(), flags=re.M))
    assert sections == {str(n) for n in range(1, 7)}
    cited = {}
    for path in [*ROOT.glob("curvlib/**/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("tests/**/*.py")]:
        for n in re.findall(r"docs/design\.md\s+§(\d+)", path.read_text()):
            cited.setdefault(n, str(path.relative_to(ROOT)))
    assert cited and set(cited) <= sections, cited
