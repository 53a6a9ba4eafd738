"""curvlib's examples: runnable scripts, one module each, run from the repository root as
``python -m examples.<name>`` (e.g. ``python -m examples.demo``). Shared code: :mod:`examples.data`
(the digits every example trains on) and ``examples._experiment`` (the experiment CLIs' loop,
CSV, PNG and table)."""
