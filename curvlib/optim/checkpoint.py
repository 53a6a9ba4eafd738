r"""What ``load_state_dict`` checks before it loads anything (issue 20, item 1).

A checkpoint of another model, another optimizer or a corrupted file must be refused at load
time, naming what does not fit, and not at the next step, after some parameters have moved.
:func:`check` is called by :meth:`CurvatureOptimizer.load_state_dict
<curvlib.optim.core.CurvatureOptimizer.load_state_dict>` on the checkpoint's param groups and
per-parameter state (after migration) and raises ``ValueError`` when

- the state dict is not a curvlib optimizer's (no ``"curvlib"`` entry: e.g. ``torch.optim.SGD``'s),
  or another curvlib optimizer class saved it (``state_dict()["curvlib"]["optimizer"]``);
- the number of param groups or of parameters in a group differs;
- a group's hyper-parameters break a rule of the optimizer's table (hyper-parameters the
  checkpoint lacks, added since it was written, take their defaults);
- a parameter's state does not fit the parameter: a tensor that has the parameter's shape
  (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``direction``) has another shape, or the
  running curvature (``running``, ``inverse_of``) does not fit the group's curvature kind
  (:meth:`~curvlib.optim.curvatures.CurvatureKind.fits`: the factors' sizes multiply to the
  parameter's size, a diagonal has its shape).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from torch import Tensor

#: per-parameter state entries shaped like their parameter
PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "direction")
#: per-parameter state entries holding a curvature value of the group's kind
CURVATURE_VALUED = ("running", "inverse_of")


def class_name(opt: Any) -> str:
    """The curvlib optimizer class of ``opt`` (the first class of its MRO defined in
    ``curvlib.optim``, so that a user's subclass loads its base class's checkpoints)."""
    for cls in type(opt).__mro__:
        if cls.__module__.startswith("curvlib.optim"):
            return cls.__name__
    return type(opt).__name__


def check(opt: Any, extra: Optional[Mapping[str, Any]], groups: List[Dict[str, Any]],
          state: Mapping[Any, Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` if the checkpoint (``extra = state_dict["curvlib"]``, the param
    ``groups`` and per-parameter ``state``) does not fit ``opt`` (module docstring). Fills the
    hyper-parameters a group lacks with ``opt.defaults`` (in ``groups``); changes nothing else."""
    where = f"{opt._where}.load_state_dict"
    ours = class_name(opt)
    if extra is None:
        raise ValueError(
            f"{where}: this is not a checkpoint of a curvlib optimizer (it has no 'curvlib' entry; e.g. a "
            f"torch.optim state dict); nothing was loaded. Load a {ours}.state_dict()."
        )
    saved = extra.get("optimizer")
    if saved is not None and saved != ours:
        raise ValueError(f"{where}: the checkpoint was saved by {saved}, not {ours}; nothing was loaded.")
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{where}: the checkpoint has {len(groups)} param groups, the optimizer {len(opt.param_groups)}; "
            "nothing was loaded."
        )
    for gi, (g, cur) in enumerate(zip(groups, opt.param_groups)):
        if len(g["params"]) != len(cur["params"]):
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint has {len(g['params'])} parameters, the optimizer's "
                f"{len(cur['params'])}; it was saved for another model. Nothing was loaded."
            )
        for k, v in opt.defaults.items():
            g.setdefault(k, v)
        try:
            opt.check_group(dict(g, params=cur["params"]), gi)
        except ValueError as e:
            raise ValueError(f"{where}: the checkpoint's hyper-parameters are refused; nothing was loaded. {e}") from e
    for gi, (g, cur) in enumerate(zip(groups, opt.param_groups)):
        kind = opt._kind(g)
        for i, (key, p) in enumerate(zip(g["params"], cur["params"])):
            s = state.get(key)
            if s is not None:
                _check_param(opt, where, kind, g, opt._name(gi, i, p), p, s)


def _check_param(opt: Any, where: str, kind: Any, group: Mapping[str, Any], name: str, p: Tensor,
                 s: Mapping[str, Any]) -> None:
    for k in PARAM_SHAPED:
        t = s.get(k)
        if isinstance(t, Tensor) and t.shape != p.shape:
            raise ValueError(
                f"{where}: the checkpoint's {k!r} of {name} has shape {tuple(t.shape)}, the parameter "
                f"{tuple(p.shape)}; it was saved for another model. Nothing was loaded."
            )
    if kind is None:
        return
    for k in CURVATURE_VALUED:
        v = s.get(k)
        if v is not None and not kind.fits(p, v):
            raise ValueError(
                f"{where}: the checkpoint's {k!r} curvature of {name} (shapes {_shapes(v)}) does not fit a "
                f"{kind.name!r} curvature of a parameter of shape {tuple(p.shape)} (saved for another model or "
                "another curvature). Nothing was loaded."
            )


def _shapes(v: Any) -> Any:
    if isinstance(v, Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)):
        return [_shapes(x) for x in v]
    return type(v).__name__


__all__ = ["check", "class_name", "PARAM_SHAPED", "CURVATURE_VALUED"]
