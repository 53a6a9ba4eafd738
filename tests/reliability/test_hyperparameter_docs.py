"""The hyper-parameter table of the optimizers page is generated from NaturalGradient's table
(``markdown_table``), so that the documented values and the enforced rules cannot drift."""
from __future__ import annotations

from pathlib import Path

from curvlib.optim import NaturalGradient
from curvlib.optim.hyperparams import markdown_table

PAGE = Path(__file__).resolve().parents[2] / "docs" / "user_guide" / "optimizers.md"


def test_the_optimizers_page_table_is_the_rendered_table():
    text = PAGE.read_text()
    begin = text.index("<!-- BEGIN generated hyper-parameter table")
    end = text.index("<!-- END generated hyper-parameter table")
    block = text[text.index("-->", begin) + 3:end].strip()
    assert block == markdown_table(NaturalGradient).strip(), (
        "regenerate the block with curvlib.optim.hyperparams.markdown_table(NaturalGradient)")


def test_every_rule_of_the_tables_is_enforced():
    """Issue 20: no rule is documented without being checked."""
    from curvlib.optim import CGNewton, NoisyNaturalGradient, Preconditioner

    for cls in (NaturalGradient, Preconditioner, CGNewton, NoisyNaturalGradient):
        assert [hp.name for hp in cls.hyperparameters if hp.allowed is not None and not hp.enforced] == [], cls
