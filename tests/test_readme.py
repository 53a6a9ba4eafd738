"""Every ```python block of README.md and of the documentation's Markdown pages (``docs/``, and
the READMEs that the site includes) runs on its own, as a new user runs it.

A sketch that is not meant to run is written as ```{code-block} python (rendered the same). A
block that trains for long is marked by the line ``<!-- test: slow -->`` right above its fence
and runs only with ``CURVLIB_SLOW=1``: prefer shortening it.

Each block runs in a process of its own, with a fresh namespace and fresh torch and curvlib state
(default dtype, seed, capture tape, caches), in an empty directory, with this checkout's
``curvlib`` first on the path: no block can rely on a name, a gradient or a savefield left by
another block.

By default one interpreter imports ``torch`` and ``curvlib`` (nothing else: no tensor op runs
in it) and forks a child per block, which saves the ~2 s import per block. ``CURVLIB_SLOW=1``
runs each block in a new interpreter instead, exactly as ``/work/shared/tools/fresh-clone-check``
does from a fresh clone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SLOW = os.environ.get("CURVLIB_SLOW") == "1"
#: the Markdown pages whose python blocks run: the README, the site's pages and what they include
PAGES = [README, ROOT / "benchmarks" / "README.md", ROOT / "examples" / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "auto_examples"} & set(p.parts)
)
SLOW_MARK = "<!-- test: slow -->"

# Runs in a fresh interpreter: import once, then fork one child per block file (argv[1:]).
# Prints one line MARK + JSON {"file": ..., "rc": ..., "err": ...} per block (blocks may print too).
_FORK_DRIVER = r"""
import json, os, runpy, sys, traceback
import torch, curvlib, curvlib.extensions, curvlib.solvers  # imported, nothing computed
for path in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        rc, err = 0, ""
        try:
            runpy.run_path(path, run_name="__main__")
        except BaseException:
            rc, err = 1, traceback.format_exc()
        os.write(w, err.encode()[-20000:])
        os.close(w)
        sys.stdout.flush()
        os._exit(rc)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    print("@@readme-block@@" + json.dumps({"file": path, "rc": rc, "err": b"".join(chunks).decode(errors="replace")}), flush=True)
"""


_BLOCK = re.compile(r"(^[^\n]*\n)?```python\n(.*?)```", flags=re.S | re.M)


def _blocks(text: str) -> List[Tuple[str, bool]]:
    """``(code, marked_slow)`` for every ```python block of ``text``."""
    return [(m.group(2), (m.group(1) or "").strip() == SLOW_MARK) for m in _BLOCK.finditer(text)]


def python_blocks(text: str, slow: bool = True) -> List[str]:
    """The ```python blocks of ``text``; ``slow=False`` leaves out those marked slow."""
    return [code for code, marked in _blocks(text) if slow or not marked]


def _page_blocks() -> List[Tuple[str, int, str]]:
    """``(page, number, code)`` for every block that runs now (numbers count all blocks)."""
    return [(str(page.relative_to(ROOT)), i + 1, code) for page in PAGES
            for i, (code, marked) in enumerate(_blocks(page.read_text())) if SLOW or not marked]


BLOCKS = python_blocks(README.read_text())
PAGE_BLOCKS = _page_blocks()


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_blocks(codes: List[str], workdir: Path, fresh_interpreters: bool = SLOW) -> List[Dict[str, object]]:
    """Run each code string on its own (see module docstring); ``[{"rc", "err"}]`` per block."""
    files = []
    for i, code in enumerate(codes):
        f = workdir / f"block{i + 1}.py"
        f.write_text(code)
        files.append(str(f))
    if fresh_interpreters:
        out = []
        for f in files:
            r = subprocess.run([sys.executable, f], cwd=workdir, env=_env(), capture_output=True,
                               text=True, timeout=300)
            out.append({"rc": r.returncode, "err": r.stderr})
        return out
    r = subprocess.run([sys.executable, "-c", _FORK_DRIVER, *files], cwd=workdir, env=_env(),
                       capture_output=True, text=True, timeout=600)
    mark = "@@readme-block@@"
    got = {}
    for line in r.stdout.splitlines():
        if line.startswith(mark):
            d = json.loads(line[len(mark):])
            got[d["file"]] = d
    return [got.get(f, {"rc": -1, "err": f"driver failed (rc {r.returncode}):\n{r.stderr}"}) for f in files]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Dict[str, Dict[str, object]]:
    """``code -> result``: a block that several pages show (the quick start, the optimizer loop)
    runs once."""
    codes = list(dict.fromkeys(code for _, _, code in PAGE_BLOCKS))
    return dict(zip(codes, run_blocks(codes, tmp_path_factory.mktemp("readme"))))


def test_pages_have_examples():
    """The README keeps a quick start and an optimizer loop; the user guide its examples."""
    assert len(BLOCKS) >= 2
    assert len(PAGE_BLOCKS) >= 20
    guide = {page for page, _, _ in PAGE_BLOCKS if page.startswith("docs/user_guide/")}
    assert {f"docs/user_guide/{p}.md" for p in ("extensions", "solvers", "optimizers", "layers", "distributed", "faults")} <= guide


@pytest.mark.parametrize("i", range(len(PAGE_BLOCKS)), ids=lambda i: f"{PAGE_BLOCKS[i][0]}-block{PAGE_BLOCKS[i][1]}")
def test_block_runs_alone(i, results):
    page, number, code = PAGE_BLOCKS[i]
    res = results[code]
    assert res["rc"] == 0, f"{page} python block {number} failed on its own:\n{code}\n{res['err']}"


def test_slow_mark_leaves_a_block_out():
    text = "```python\na = 1\n```\n" + SLOW_MARK + "\n```python\nb = 2\n```\n```{code-block} python\nc\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]
    assert python_blocks(text, slow=False) == ["a = 1\n"]


@pytest.mark.parametrize("fresh", [False, True], ids=["fork", "interpreter"])
def test_harness_isolates_blocks(fresh, tmp_path):
    """The harness runs this checkout's curvlib, fails a block that needs a name from another
    block, and gives each block fresh torch state."""
    codes = [
        "import curvlib, pathlib\nprint('a block may print')\n"
        f"assert pathlib.Path(curvlib.__file__).resolve().is_relative_to(pathlib.Path({str(ROOT)!r}))\n",
        "import torch\nmodel = torch.nn.Linear(2, 2)\ntorch.set_default_dtype(torch.float64)\n",
        "import torch\nmodel.weight\n",
        "import torch\nassert torch.get_default_dtype() == torch.float32\n",
        "raise SystemExit(3)\n",
    ]
    expected = [True, True, False, True, False]
    if fresh:  # a new interpreter costs ~2 s: the cases that matter there
        codes, expected = [codes[0], codes[2]], [True, False]
    res = run_blocks(codes, tmp_path, fresh_interpreters=fresh)
    assert [r["rc"] == 0 for r in res] == expected, res
    assert "NameError" in res[expected.index(False)]["err"]
