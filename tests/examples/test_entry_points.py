"""The examples are one package, run from the repository root as ``python -m examples.<name>``:
no script edits ``sys.path``, every command the documentation gives names an existing module, and
a script that imports its siblings runs that way in a fresh interpreter."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCUMENTS = [ROOT / "README.md", EXAMPLES / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(EXAMPLES.glob("*.py"))]
MODULE_COMMAND = re.compile(r"(?:python|torchrun[^\n`]*?) -m examples\.(\w+)")


def test_no_script_edits_sys_path():
    offenders = [p.name for p in EXAMPLES.glob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, f"examples edit sys.path (run them as python -m examples.<name> instead): {offenders}"


def test_documented_commands_name_existing_modules():
    named, stale = set(), []
    for doc in DOCUMENTS:
        if "_build" in doc.parts:
            continue
        text = doc.read_text()
        named |= set(MODULE_COMMAND.findall(text))
        stale += [f"{doc.relative_to(ROOT)}: {m}" for m in re.findall(r"(?:python|nproc_per_node \d+) examples/\w+\.py", text)]
    assert not stale, f"commands that run an example as a file (use python -m examples.<name>): {stale}"
    missing = sorted(m for m in named if not (EXAMPLES / f"{m}.py").is_file())
    assert not missing, f"documented examples that do not exist: {missing}"
    assert {"demo", "exp_autoencoder", "distributed_mnist"} <= named


def test_module_entry_point_runs_from_the_root():
    """``exp_two_level`` imports three siblings; ``--help`` imports them all and exits 0."""
    r = subprocess.run([sys.executable, "-m", "examples.exp_two_level", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--model" in r.stdout
