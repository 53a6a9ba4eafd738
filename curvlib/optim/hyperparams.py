r"""Hyper-parameters as data: one table of :class:`HyperParameter` per optimizer.

Each optimizer class carries its table (``NaturalGradient.hyperparameters``: the values of a
param group; ``NaturalGradient.arguments``: constructor-only arguments such as ``seed``). The one
table drives

- validation: :func:`validate_group` checks every enforced rule of one param group and raises a
  ``ValueError`` naming the optimizer, the group and the value (the optimizers call it at
  construction and in ``add_param_group``; it has no side effects, so it can run at any time,
  e.g. at ``load_state_dict`` or before a step);
- the defaults (``CORE_DEFAULTS``, ``STEP_DEFAULTS``, ``CG_DEFAULTS`` are :func:`defaults_of` a table);
- the class docstring: :func:`document` appends a "Hyper-parameters" section generated from the
  table at import time, so ``help(NaturalGradient)`` lists every hyper-parameter with its meaning;
- the documentation: :func:`markdown_table` renders the table as Markdown (the README's
  hyper-parameter table is generated from it).

A :class:`Rule` is a predicate of ``(value, group)`` with its description; a rule whose
``enforced`` flag is off is documented (the values users should give) but not yet checked, so
that every value the optimizers accepted before the table existed is still accepted. Every rule
of the optimizers' tables is enforced now (issue 20): at construction, in ``add_param_group``, at
``load_state_dict`` and before each step (a scheduler or a user may change a group between steps).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "REQUIRED", "Rule", "HyperParameter", "one_of", "number", "validate_group", "check_value", "defaults_of",
    "replace_entries", "docstring_section", "document", "markdown_table",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: the default of a hyper-parameter without one (``lr``)
REQUIRED = _Required()


@dataclass(frozen=True)
class Rule:
    """The values a hyper-parameter accepts.

    ``test(value, group) -> bool`` (``group``: the whole param group, for rules that depend on
    another hyper-parameter); ``allowed``: the accepted values in words (documentation);
    ``message``: the error after ``"{where}: "``, a format string with ``{name}`` and ``{value}``
    (default ``"{name}={value!r} must be {allowed}."``).
    """

    test: Callable[[Any, Mapping[str, Any]], bool]
    allowed: str
    message: Optional[str] = None

    def error(self, name: str, value: Any, group: Mapping[str, Any]) -> Optional[str]:
        """The error message for ``value`` (``None``: accepted). A test that raises on an
        unexpected type counts as a refusal."""
        try:
            ok = bool(self.test(value, group))
        except (TypeError, ValueError):
            ok = False
        if ok:
            return None
        template = self.message or "{name}={value!r} must be " + self.allowed + "."
        return template.format(name=name, value=value)


def one_of(*choices: Any, message: Optional[str] = None) -> Rule:
    """``value in choices``."""
    text = ", ".join(_show(c) for c in choices)
    return Rule(lambda v, g: v in choices, f"one of {text}", message)


def number(
    low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False, high_open: bool = False,
    integer: bool = False, finite: bool = False, none: bool = False,
) -> Rule:
    """A number (``integer``: an ``int``) in the interval; ``none``: ``None`` is accepted too."""

    def test(v, g):
        if v is None:
            return none
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if integer else numbers.Real):
            return False
        if finite and not math.isfinite(v):
            return False
        if low is not None and not (v > low if low_open else v >= low):
            return False
        return high is None or (v < high if high_open else v <= high)

    words = ["an int" if integer else ("a finite number" if finite else "a number")]
    if low is not None and high is not None:
        words.append(f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        words.append(f"{'>' if low_open else '>='} {low:g}")
    elif high is not None:
        words.append(f"{'<' if high_open else '<='} {high:g}")
    text = " ".join(words) + (", or None" if none else "")
    return Rule(test, text)


@dataclass(frozen=True)
class HyperParameter:
    """One row of an optimizer's table.

    Args:
        name: the key in the param groups (or the constructor argument).
        type: the type in words (``"float"``, ``"int | callable | 'auto'"``).
        default: the default (:data:`REQUIRED`: none).
        meaning: one line: what it does (Markdown-style backticks).
        allowed: the accepted values (:class:`Rule`), or ``None`` (any value of ``type``).
        enforced: whether :func:`validate_group` checks ``allowed`` (``False``: documented only).
        when: the rule applies only to groups where ``when(group)`` (``adaptive_damping``'s options).
        default_text: how the docs show the default (e.g. ``"(19/20)^5"``).
    """

    name: str
    type: str
    default: Any
    meaning: str
    allowed: Optional[Rule] = None
    enforced: bool = True
    when: Optional[Callable[[Mapping[str, Any]], bool]] = None
    default_text: Optional[str] = None

    def error(self, group: Mapping[str, Any]) -> Optional[str]:
        """The error message of this entry for ``group`` (``None``: fine or not checked)."""
        if self.allowed is None or not self.enforced or (self.when is not None and not self.when(group)):
            return None
        return self.allowed.error(self.name, group.get(self.name, self.default), group)


Table = Tuple[HyperParameter, ...]


def validate_group(table: Iterable[HyperParameter], group: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError(f"{where}: ...")`` at the first entry of ``table`` that ``group``
    violates (enforced rules only); no side effects."""
    for hp in table:
        msg = hp.error(group)
        if msg is not None:
            raise ValueError(f"{where}: {msg}")


def check_value(hp: HyperParameter, value: Any, where: str) -> None:
    """Check one value against ``hp.allowed`` whether or not the rule is enforced on groups
    (constructor arguments such as ``lr``)."""
    if hp.allowed is not None:
        msg = hp.allowed.error(hp.name, value, {hp.name: value})
        if msg is not None:
            raise ValueError(f"{where}: {msg}")


def defaults_of(table: Iterable[HyperParameter]) -> Dict[str, Any]:
    """``{name: default}`` of the entries that have a default."""
    return {hp.name: hp.default for hp in table if hp.default is not REQUIRED}


def replace_entries(table: Sequence[HyperParameter], **changes: Dict[str, Any]) -> Table:
    """A copy of ``table`` with ``changes[name]`` (field -> value) applied to those entries."""
    return tuple(replace(hp, **changes[hp.name]) if hp.name in changes else hp for hp in table)


# ---------------------------------------------------------------- documentation


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        s = f"{v:g}"
        if "e" in s:  # 1e-08 -> 1e-8
            mant, exp = s.split("e")
            return f"{mant}e{int(exp)}"
        return s if "." in s or "inf" in s or "nan" in s else s + ".0"
    return repr(v)


def _default(hp: HyperParameter) -> str:
    if hp.default is REQUIRED:
        return "(required)"
    return hp.default_text or _show(hp.default)


def _allowed(hp: HyperParameter) -> str:
    if hp.allowed is None:
        return ""
    return hp.allowed.allowed + ("" if hp.when is None else " (when used)")


def docstring_section(table: Sequence[HyperParameter], arguments: Sequence[HyperParameter] = ()) -> str:
    """The "Hyper-parameters" section of a class docstring (reST, as ``help()`` shows it)."""
    lines = ["", "    Hyper-parameters (keys of every param group; a dict in ``params`` may override each, and",
             "    schedulers and users may change them between steps):", ""]
    for hp in table:
        lines += _doc_entry(hp)
    if arguments:
        lines += ["", "    Constructor arguments (not per group):", ""]
        for hp in arguments:
            lines += _doc_entry(hp)
    return "\n".join(lines) + "\n"


_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def _rst(text: str) -> str:
    """Markdown code spans (single backticks in the tables) as reStructuredText literals."""
    return _CODE.sub(r"``\1``", text)


def _doc_entry(hp: HyperParameter) -> List[str]:
    allowed = _allowed(hp)
    head = f"    - ``{hp.name}`` ({hp.type}; default {_default(hp)}" + (f"; {allowed}" if allowed else "") + "):"
    return [_rst(head), f"      {_rst(hp.meaning)}"]


def document(cls: type) -> type:
    """Class decorator: append :func:`docstring_section` of ``cls.hyperparameters`` (and
    ``cls.arguments``) to the class docstring."""
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + docstring_section(
        cls.hyperparameters, getattr(cls, "arguments", ())  # type: ignore[attr-defined]
    )
    return cls


def markdown_table(optimizer: Any) -> str:
    """The Markdown table of an optimizer class's (or a table's) hyper-parameters:
    ``| name | type | default | allowed | meaning |``, constructor arguments last, marked
    "(constructor)". The README's hyper-parameter table is ``markdown_table(NaturalGradient)``."""
    if isinstance(optimizer, type):
        rows = [(hp, "") for hp in optimizer.hyperparameters]
        rows += [(hp, " (constructor)") for hp in getattr(optimizer, "arguments", ())]
    else:
        rows = [(hp, "") for hp in optimizer]
    out = ["| name | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for hp, note in rows:
        cells = [f"`{hp.name}`{note}", hp.type, f"`{_default(hp)}`" if hp.default is not REQUIRED else "(required)",
                 _allowed(hp), hp.meaning]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"
