"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (and their cells): the recurrence unrolled into Linear parts
over time steps.

The fused recurrent kernels (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``)
apply all weights inside one call, so no module hook sees them. While an extended recurrent layer
runs its forward with gradients, a ``TorchFunctionMode`` (:class:`_Intercept`) catches that call
and runs the same recurrence unrolled, with the operations of PyTorch's CPU implementation in the
same order (``aten/src/ATen/native/RNN.cpp``: the input projection of a whole sequence first, then
per step ``linear_hh(h) + ih_t`` and the cell), so its outputs are the fused module's own: bitwise
in float64 and, for GRU / RNN, in float32 (the float32 LSTM kernel on CPU is oneDNN's: the unrolled
outputs differ from it by round-off). The module's Python forward is untouched (argument checks,
unbatched inputs, default ``(h0, c0)``, ``proj_size``, dropout between layers in training mode,
with the mask drawn by the same ``torch.dropout`` call on the same tensor).

The cells ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell`` (one step per call, in a user's loop) run
the same step: their parts ``ih`` and ``hh`` are one Linear call each per step, and the calls of one
backward are summed as positions, as for every layer called several times.

Parts, for layer ``k`` and direction ``{sfx}`` (``""`` or ``"_reverse"``), each a
:class:`~curvlib.engine.layers.parts.Projection` (a Linear over positions; ``N`` samples,
``T`` time steps, ``G`` = 4, 3 or 1 times ``hidden_size`` for LSTM, GRU, RNN):

- ``ih_l{k}{sfx}`` (``weight_ih_l{k}{sfx}``, ``bias_ih_l{k}{sfx}``): ``x_t W_ih^T + b_ih``, one
  Linear call over all ``T`` steps as positions (input ``[N, T, D]``, output ``[N, T, G]``);
- ``hh_l{k}{sfx}`` (``weight_hh_l{k}{sfx}``, ``bias_hh_l{k}{sfx}``): ``h_{t-1} W_hh^T + b_hh``,
  ``T`` products, recorded as one Linear call on the inputs ``[h_{t-1}]_t`` ``[N, T, H]``
  (``h0`` first; the reverse direction's ``h_{t+1}``);
- ``hr_l{k}{sfx}`` (``weight_hr_l{k}{sfx}``, LSTM with ``proj_size``): ``h_t = m_t W_hr^T``,
  ``m_t = o_t * tanh(c_t)``, likewise over the ``T`` steps.

The per-sample gradient of each weight is then ``sum_t s_t a_t^T`` with ``s_t`` the cotangent of
the part's output at step ``t`` (the gate pre-activations for ``ih`` / ``hh``), so every exact
extension is exact, and KFAC is the "expand" approximation over time steps as positions
(Martens, Ba & Grosse 2018, "Kronecker-factored curvature approximations for recurrent neural
networks"; ``A = 1/(N T) sum_{n,t} a a^T`` of the inputs ``x_t`` resp. ``h_{t-1}``, ``G`` from the
gate pre-activation cotangents, as for a Linear layer over positions).

How the ``T`` products of ``hh`` (and ``hr``) are one call: the recorded output is a *tap*, a zero
tensor ``Z [N, T, G]`` whose step ``t`` is added to the product at step ``t``
(``linear_hh(h) + Z_t``: adding zero changes no value). Its gradient is the stack of the products'
cotangents, collected by one ``unbind``, so the engine sees one call per part (no per-step
records, captures or hooks) and back-propagates its curvature columns to one edge per part.

When: the unrolled forward runs for every forward of an extended model with gradients enabled
(the usual pattern runs the forward before the ``curvature`` context is entered, so the forward
cannot know whether curvature will be asked for). Without gradients (``torch.no_grad()``,
inference), with all parameters frozen, or for a model that is not extended, the fused kernel runs.

Refused (``NotImplementedError`` naming the module, at the forward): a ``PackedSequence`` input.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlib.engine.layers.parts import Projection
from curvlib.engine.layers.base import LayerAdapter

#: the fused kernels and the mode of the module that calls each
_KERNELS = {torch.lstm: "LSTM", torch.gru: "GRU", torch.rnn_tanh: "RNN_TANH", torch.rnn_relu: "RNN_RELU"}
#: the one-step kernels of the cells (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``)
_CELL_KERNELS = {torch.lstm_cell: "LSTM", torch.gru_cell: "GRU", torch.rnn_tanh_cell: "RNN_TANH",
                 torch.rnn_relu_cell: "RNN_RELU"}
#: the modes of ``nn.RNNBase`` with a kernel above
_MODES = ("GRU", "LSTM", "RNN_RELU", "RNN_TANH")


def _tap(like: Tensor, N: int, T: int, G: int) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """A zero tensor ``Z [N, T, G]`` in the graph (a 0-d leaf, expanded) and its steps ``Z[:, t]``:
    the gradient of ``Z`` is the stack of the steps' cotangents (module docstring)."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
    Z = zero.expand(N, T, G)
    return Z, Z.unbind(1)


def _stacked(states: Sequence[Tensor]) -> Tensor:
    """The states ``[N, H]`` of the ``T`` steps as a part's input ``[N, T, H]`` (no graph)."""
    with torch.no_grad():
        return torch.stack([s.detach() for s in states], 1)


def _cell(mode: str, xw: Tensor, hw: Tensor, hidden):
    """One step of PyTorch's CPU cell (``RNN.cpp``: ``LSTMCell``, ``GRUCell``, ``SimpleCell``) from
    the input and hidden projections ``xw``, ``hw`` ``[N, G]``: the new ``h`` (``(h, c)`` for LSTM,
    ``h`` before the projection), the same operations in the same order."""
    if mode == "LSTM":
        i, f, g, o = (hw + xw).chunk(4, 1)
        c = f.sigmoid() * hidden[1] + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c
    if mode == "GRU":
        # the sigmoids on row-strided views, as PyTorch's in-place ones (the rows of H are
        # vectorised the same way: the values are bitwise the fused module's)
        H = hidden.shape[-1]
        (xw_rz, xw_n), (hw_rz, hw_n) = xw.split([2 * H, H], 1), hw.split([2 * H, H], 1)
        r, z = (hw_rz + xw_rz).chunk(2, 1)
        r, z = r.sigmoid(), z.sigmoid()
        n = (xw_n + hw_n * r).tanh()
        return (hidden - n) * z + n
    pre = hw + xw
    return pre.tanh() if mode == "RNN_TANH" else pre.relu()


class _Direction:
    """One layer and direction of the recurrence, unrolled (module docstring).

    ``weights``: ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (``None`` where absent)."""

    def __init__(self, module: nn.Module, record, mode: str, name: str, weights: Sequence[Optional[Tensor]]):
        self.module, self.record, self.mode, self.name = module, record, mode, name
        self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr = weights

    def part(self, kind: str, weight: Tensor, bias: Optional[Tensor] = None) -> Projection:
        return Projection(self.module, f"{kind}_{self.name}", weight, bias)

    def run(self, inp: Tensor, hidden, reverse: bool):
        """``inp [T, N, D]`` (time-major, as PyTorch's kernel sees it), ``hidden``: ``h0 [N, H]``
        or ``(h0, c0)`` -> (outputs ``[h_t]`` in time order, final hidden)."""
        T, N = inp.shape[0], inp.shape[1]
        lstm = self.mode == "LSTM"
        # the input projection of the whole sequence (PyTorch's CPU ``pre_compute_input``)
        Y = F.linear(inp, self.w_ih, self.b_ih).transpose(0, 1)  # [N, T, G]
        self.record(self.part("ih", self.w_ih, self.b_ih), inp.transpose(0, 1), Y)
        # steps of the time-major view: their gradient is stacked [T, N, G], as PyTorch's
        # (the bias gradient sums it in the same order)
        steps = Y.transpose(0, 1).unbind(0)
        Z_hh, taps_hh = _tap(Y, N, T, self.w_hh.shape[0])
        if self.w_hr is not None:
            Z_hr, taps_hr = _tap(Y, N, T, self.w_hr.shape[0])
            m_in: List[Optional[Tensor]] = [None] * T
        h_in: List[Optional[Tensor]] = [None] * T
        outputs: List[Optional[Tensor]] = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            h_in[t] = hidden[0] if lstm else hidden
            hidden = _cell(self.mode, steps[t], F.linear(h_in[t], self.w_hh, self.b_hh) + taps_hh[t], hidden)
            if self.w_hr is not None:
                m_in[t] = hidden[0]
                hidden = (F.linear(hidden[0], self.w_hr) + taps_hr[t], hidden[1])
            outputs[t] = hidden[0] if lstm else hidden
        self.record(self.part("hh", self.w_hh, self.b_hh), _stacked(h_in), Z_hh)
        if self.w_hr is not None:
            self.record(self.part("hr", self.w_hr), _stacked(m_in), Z_hr)
        return outputs, hidden


def _unrolled(module: nn.Module, record, mode: str, args: tuple, kwargs: dict):
    """The fused kernel's call ``(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``, unrolled; returns what the kernel returns."""
    names = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, hx, params = a["input"], a["hx"], list(a["params"])
    has_biases, num_layers, dropout = bool(a["has_biases"]), int(a["num_layers"]), float(a["dropout"])
    train, bidirectional, batch_first = bool(a["train"]), bool(a["bidirectional"]), bool(a["batch_first"])
    lstm = mode == "LSTM"
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)  # w_ih, w_hh[, b_ih, b_hh][, w_hr]
    h0 = hx[0].unbind(0) if lstm else hx.unbind(0)
    c0 = hx[1].unbind(0) if lstm else None
    layer_input = x.transpose(0, 1) if batch_first else x  # [T, N, D], as the kernel
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = params[idx * per:(idx + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if lstm and per in (3, 5) else None
            name = f"l{layer}" + ("_reverse" if d == 1 else "")
            hidden = (h0[idx], c0[idx]) if lstm else h0[idx]
            steps, final = _Direction(module, record, mode, name, (w_ih, w_hh, b_ih, b_hh, w_hr)).run(
                layer_input, hidden, reverse=d == 1
            )
            outs.append(torch.stack(steps, 0))
            finals.append(final)
        layer_input = outs[0] if dirs == 1 else torch.cat(outs, outs[0].dim() - 1)
        if dropout != 0 and train and layer < num_layers - 1:  # between layers, as PyTorch
            layer_input = torch.dropout(layer_input, dropout, True)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    if lstm:
        return output, torch.stack([h for h, _ in finals], 0), torch.stack([c for _, c in finals], 0)
    return output, torch.stack(finals, 0)


def _cell_step(module: nn.Module, record, mode: str, args: tuple, kwargs: dict):
    """A cell's kernel call ``(input, hx, w_ih, w_hh, b_ih, b_hh)`` (one step, ``input [N, D]``):
    the parts ``ih`` and ``hh`` are Linear calls on ``input`` and ``h`` (a cell called once per step
    by a user's loop has its calls summed as positions, as every layer called several times)."""
    names = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")
    a = dict(zip(names, args))
    a.update(kwargs)
    x, hx, w_ih, w_hh = a["input"], a["hx"], a["w_ih"], a["w_hh"]
    b_ih, b_hh = a.get("b_ih"), a.get("b_hh")
    h = hx[0] if mode == "LSTM" else hx
    xw, hw = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    record(Projection(module, "ih", w_ih, b_ih), x, xw)
    record(Projection(module, "hh", w_hh, b_hh), h, hw)
    return _cell(mode, xw, hw, hx)


def _packed(args: tuple) -> bool:
    """Whether a fused kernel call is the ``PackedSequence`` overload ``(data, batch_sizes, hx,
    params, ...)`` (the padded one is ``(input, hx, params, has_biases, ...)``)."""
    return len(args) > 3 and not isinstance(args[3], bool)


class _Intercept(TorchFunctionMode):
    """Active during one forward of an extended recurrent layer: runs its fused kernel unrolled
    with recording parts (module docstring)."""

    def __init__(self, module: nn.Module, record):
        super().__init__()
        self.module, self.record = module, record

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        mode = _KERNELS.get(func)
        cell = _CELL_KERNELS.get(func)
        if (mode is None and cell is None) or not any(p.requires_grad for p in self.module.parameters()):
            return func(*args, **kwargs)
        if cell is not None:
            return _cell_step(self.module, self.record, cell, args, kwargs)
        if _packed(args):
            raise NotImplementedError(
                f"curvlib: {self.module} got a PackedSequence; curvature of recurrent layers "
                "supports padded batches only (the per-sample structure of packed data is not "
                "recorded). Pass the padded batch (torch.nn.utils.rnn.pad_packed_sequence) and read "
                "each sequence's outputs at its own length (a bidirectional layer's reverse "
                "direction then starts at the padding), or run this forward under torch.no_grad() "
                "when no curvature is needed."
            )
        return _unrolled(self.module, self.record, mode, args, kwargs)


class RecurrentAdapter(LayerAdapter):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (tanh, relu): a composite layer whose parts are the
    input, hidden and projection Linears of every layer and direction; ``nn.LSTMCell``,
    ``nn.GRUCell``, ``nn.RNNCell``: the parts ``ih`` and ``hh`` of one step (module docstring)."""

    module_types = (nn.RNNBase, nn.RNNCellBase)
    composite = True

    def check(self, module: nn.Module) -> None:
        if isinstance(module, nn.RNNBase) and getattr(module, "mode", None) not in _MODES:
            raise NotImplementedError(
                f"curvlib: {module} is an nn.RNNBase of mode {getattr(module, 'mode', None)!r}; "
                f"curvature of recurrent layers supports the modes {_MODES} "
                "(nn.LSTM, nn.GRU, nn.RNN)."
            )

    def intercept(self, module: nn.Module, record) -> _Intercept:
        return _Intercept(module, record)


__all__ = ["RecurrentAdapter"]
