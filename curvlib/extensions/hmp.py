"""HMP: exact Hessian products, per block (``p.hmp``) and for the whole network.

The Hessian needs second-order information from everything downstream of a layer, which
the captures do not hold. So HMP records *what* was differentiated — the extended root
model, the ``(args, kwargs)`` of its forward call, the extended loss with its target and
the weight ``w = d objective / d loss`` — and, on the first product, re-runs

    L(theta) = w * loss(functional_call(root, theta, args, kwargs), y)

once with ``create_graph=True`` (hooks paused, buffers copied so that running statistics
are untouched). Every product is then one double backward through that graph
(Pearlmutter 1994, "Fast exact multiplication by the Hessian"):

    H v = d/dtheta <dL/dtheta, v>         (B vectors at once: ``is_grads_batched``)

and a block product ``H_pp V`` differentiates ``dL/dp`` w.r.t. ``p`` only.

Assumptions (checked where possible, with an error naming the fix): each loss input is the
output of a forward of one extended model (the re-run must reproduce it: no dropout in train
mode, no other randomness); several forwards of that model and several extended losses in
one backward (a GAN's discriminator on real and fake data, ``bce(D(x), 1) + bce(D(G(z)), 0)``)
give the objective ``sum_j w_j loss_j(model(x_j))``, each loss matched by value to the
re-run forward that reproduces its input; parameters unchanged between the
backward and the products (checked with their version counters). Several backwards in one
context (gradient accumulation) record one objective each; products sum over them. Parameters of layers
without an adapter stay fixed. The graph is built lazily, held by the extension until its
next context (or :meth:`HMP.release`), and never by the engine.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlib.engine.capture import LayerCapture
from curvlib.engine.hooks import hooks_paused
from curvlib.engine.records import LossCall, Objective
from curvlib.extensions.base import Extension
from curvlib.extensions.operator import ParameterOperator, SumOperator


class HessianGraph:
    """The gradient of one recorded objective, built with ``create_graph=True`` on demand.

    Args:
        objective: the recorded objective (the extended model, the ``(args, kwargs)`` of its
            forward, and the extended loss reached by the backward: module, input, target, weight).
    """

    def __init__(self, objective: Objective):
        self.objective = objective
        #: the loss named in a mismatch error (the objective's, or the one a re-run failed on)
        self.loss_call: LossCall = objective.loss
        #: the recorded forwards of ``root`` (several: a discriminator on real and on fake
        #: data before one backward) and the extended losses of the backward
        self.forwards: List[Tuple[tuple, Dict[str, Any]]] = [objective.inputs]
        self.loss_calls: List[LossCall] = [objective.loss]
        self.params: List[nn.Parameter] = []  # parameters with Hessian products
        self._versions: List[int] = []
        self._leaves: Optional[List[Tensor]] = None
        self._grads: Optional[List[Tensor]] = None

    @property
    def root(self) -> nn.Module:
        return self.objective.root

    @property
    def root_inputs(self) -> Tuple[tuple, Dict[str, Any]]:
        return self.objective.inputs

    def add(self, p: nn.Parameter) -> None:
        if not any(p is q for q in self.params):
            self.params.append(p)
            self._versions.append(p._version)

    def add_terms(self, forwards: List[Tuple[tuple, Dict[str, Any]]], loss_calls: List[LossCall]) -> None:
        """Record further forwards of the root and losses of the same backward."""
        for inputs in forwards:
            if not any(inputs is f for f in self.forwards):
                self.forwards.append(inputs)
                self._grads = None
        for lc in loss_calls:
            if not any(lc is l for l in self.loss_calls):
                self.loss_calls.append(lc)
                self._grads = None

    def index(self, p: nn.Parameter) -> int:
        return next(i for i, q in enumerate(self.params) if q is p)

    # ------------------------------------------------------------------ build
    def _check_unchanged(self) -> None:
        for p, v in zip(self.params, self._versions):
            if p._version != v:
                raise RuntimeError(
                    "curvlib: HMP products refer to the parameters at the time of the "
                    "backward, but a parameter of shape "
                    f"{tuple(p.shape)} was modified in place since (e.g. optimizer.step()). "
                    "Run the forward and backward inside the curvature context again."
                )

    def _build(self) -> None:
        self._check_unchanged()
        root, (args, kwargs), lc = self.root, self.root_inputs, self.loss_call
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        by_id = {id(p): leaf for p, leaf in zip(self.params, leaves)}
        state = {n: by_id.get(id(p), p.detach()) for n, p in root.named_parameters()}
        state.update({n: b.clone() for n, b in root.named_buffers()})
        # attention through the math kernel: the fused CPU kernel has no double backward
        with torch.enable_grad(), hooks_paused(), sdpa_kernel(SDPBackend.MATH):
            if len(self.forwards) == 1 and len(self.loss_calls) == 1:
                with self._graph_mode():
                    f = functional_call(root, state, args, kwargs)
                    L = lc.module(f, lc.y) * lc.weight
                self._check_output(f)
            else:  # L = sum_j w_j loss_j(root(x_i(j))): each loss on the forward that fed it
                with self._graph_mode():
                    outs = [functional_call(root, state, a, k) for a, k in self.forwards]
                L = 0
                for lc in self.loss_calls:
                    f = next((o for o in outs if self._matches(o, lc)), None)
                    if f is None:
                        self.loss_call = lc
                        self._check_output(outs[0])  # raises, naming the loss
                    with self._graph_mode():
                        L = L + lc.module(f, lc.y) * lc.weight
            grads = torch.autograd.grad(L, leaves, create_graph=True, allow_unused=True)
        self._leaves = leaves
        self._grads = [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)]

    def _graph_mode(self) -> ContextManager:
        """The context the forward is re-run in (subclasses change how the graph is built,
        e.g. the PCH's modified activations)."""
        return contextlib.nullcontext()

    @staticmethod
    def _matches(f: Any, lc: LossCall) -> bool:
        """Whether the re-run output ``f`` reproduces the input of the loss ``lc``."""
        ref = lc.f
        ok = isinstance(f, Tensor) and f.shape == ref.shape
        if ok:
            tol = 1e-3 if ref.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
            ok = bool((f.detach() - ref).abs().max() <= tol * (1 + ref.abs().max()))
        return ok

    def _check_output(self, f: Any) -> None:
        if not self._matches(f, self.loss_call):
            raise RuntimeError(
                f"curvlib: HMP re-ran the extended model {type(self.root).__name__} on its "
                f"recorded input, but the result does not reproduce the input of the loss "
                f"{self.loss_call.module}. HMP assumes loss_fn(model(x), y) with the model "
                "output fed to the loss unchanged, and a deterministic model (call "
                "model.eval() for dropout)."
            )

    def release(self) -> None:
        self._leaves = self._grads = None

    # --------------------------------------------------------------- products
    def _hvp(self, outputs: List[Tensor], inputs: List[Tensor], V: List[Tensor]) -> List[Tensor]:
        """``d <outputs, V_b> / d inputs`` for batched ``V_b`` (``[B, *shape]`` each)."""
        live = [i for i, g in enumerate(outputs) if g.requires_grad]
        if not live:
            return [torch.zeros(V[0].shape[0], *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
        outs, vs = [outputs[i] for i in live], [V[i] for i in live]
        B = vs[0].shape[0]
        kw = dict(retain_graph=True, allow_unused=True)
        if B == 1:
            got = torch.autograd.grad(outs, inputs, [v[0] for v in vs], **kw)
            got = [None if g is None else g.unsqueeze(0) for g in got]
        else:
            try:
                got = torch.autograd.grad(outs, inputs, vs, is_grads_batched=True, **kw)
            except RuntimeError:  # an op without a batching rule for its double backward
                cols = [torch.autograd.grad(outs, inputs, [v[b] for v in vs], **kw) for b in range(B)]
                got = [
                    None if col[0] is None else torch.stack(col)
                    for col in zip(*cols)
                ]
        return [
            torch.zeros(B, *x.shape, dtype=x.dtype, device=x.device) if g is None else g
            for g, x in zip(got, inputs)
        ]

    def matmat(self, V: List[Tensor]) -> List[Tensor]:
        """Whole-network ``H V``: ``[B, *p.shape]`` per parameter of :attr:`params`."""
        self._check_unchanged()
        if self._grads is None:
            self._build()
        return [g.detach() for g in self._hvp(self._grads, self._leaves, V)]

    def block_product(self, p: nn.Parameter, V: Tensor) -> Tensor:
        """``H_pp V`` for ``V`` of shape ``[B, *p.shape]``."""
        if V.ndim != p.ndim + 1 or V.shape[1:] != p.shape:
            raise ValueError(
                f"curvlib: p.hmp of a parameter of shape {tuple(p.shape)} expects "
                f"[V, *{tuple(p.shape)}], got {tuple(V.shape)}."
            )
        self._check_unchanged()
        if self._grads is None:
            self._build()
        i = self.index(p)
        return self._hvp([self._grads[i]], [self._leaves[i]], [V])[0].detach()


class HessianOperator(ParameterOperator):
    """The whole-network Hessian ``d^2 (w * loss) / d theta^2`` over the parameters of the
    extended layers (forward order of the layers, weight before bias: ``H.params``),
    cross-layer terms included; other parameters are held fixed."""

    def __init__(self, graph: HessianGraph, params: List[nn.Parameter]):
        super().__init__(params)
        self.graph = graph
        self._idx = [graph.index(p) for p in params]

    def matmat(self, V: List[Tensor]) -> List[Tensor]:
        full = [None] * len(self.graph.params)
        for i, v in zip(self._idx, V):
            full[i] = v
        B = V[0].shape[0]
        full = [
            torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device) if v is None else v
            for v, p in zip(full, self.graph.params)
        ]
        out = self.graph.matmat(full)
        return [out[i] for i in self._idx]


class HMP(Extension):
    """Exact Hessian block products ``p.hmp: [V, *p.shape] -> [V, *p.shape]`` and the
    whole-network Hessian operator :meth:`operator` (module docstring: how and which
    assumptions). The loss must be extended (``curvlib.extend(loss_fn)``).

    ``p.hmp(V)`` maps ``V`` ``[B, *p.shape]`` (``B`` vectors shaped like ``p``) to ``H_pp V``
    ``[B, *p.shape]``, ``H_pp`` the block of ``p`` of the Hessian. Scaling: the Hessian of the loss
    as the user reduced it (``reduction="mean"``: of the mean over the batch).
    ``ext.operator()`` is the whole-network Hessian over ``H.params`` (extended parameters, forward order, weight before bias; other
    parameters held fixed), with the same interface as :meth:`GGNMP.operator`. The model is
    re-evaluated once, on the first product: it must be deterministic (``model.eval()`` for
    dropout) and its output must feed the loss unchanged; products are refused once a parameter
    changed in place. No ``fisher_type``: the Hessian is exact.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvlib import extend, curvature
        >>> from curvlib.extensions import HMP
        >>> model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
        >>> loss_fn = extend(nn.CrossEntropyLoss())  # HMP always needs the extended loss
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> ext = HMP()
        >>> with curvature(ext):
        ...     loss_fn(model(x), y).backward()
        >>> model[0].weight.hmp(torch.randn(5, 3, 4)).shape  # 5 vectors shaped like the weight
        torch.Size([5, 3, 4])
        >>> H = ext.operator()                   # H(list of tensors shaped like H.params)
        >>> [v.shape for v in H([torch.randn_like(p) for p in H.params])]
        [torch.Size([3, 4]), torch.Size([3]), torch.Size([2, 3]), torch.Size([2])]
    """

    savefield = "hmp"
    #: re-runs the whole objective: exact also when the forward couples the samples
    coupled_samples = "exact"
    #: several backwards in one context: the Hessian of the sum of their objectives
    accumulation = "custom"

    def __init__(self):
        super().__init__("type-2")
        #: builds the recorded objective of a backward (a subclass may re-define the products)
        self.graph_class = HessianGraph
        #: one recorded objective per backward of the last context, with its layers
        self._graphs: List[HessianGraph] = []
        self._layers: List[Dict[nn.Module, Tuple[int, List[nn.Parameter]]]] = []

    def __repr__(self) -> str:
        return "HMP()"

    def sources(self):
        return {"grad"}  # no extra backward: HMP re-runs the objective itself

    @property
    def _graph(self) -> Optional[HessianGraph]:
        """The recorded objective of the last backward."""
        return self._graphs[-1] if self._graphs else None

    def begin(self) -> None:
        self.release()

    def release(self) -> None:
        """Drop the recorded objectives and their gradient graphs."""
        for g in self._graphs:
            g.release()
        self._graphs, self._layers = [], []

    def compute(self, capture: LayerCapture) -> Dict[str, Any]:
        module = capture.module
        obj = capture.objective(type(self).__name__)
        forwards = getattr(capture, "forwards", [(capture.root, capture.root_inputs)])
        if any(r is not capture.root for r, _ in forwards):
            raise NotImplementedError(
                f"curvlib: HMP found calls of {module} from two extended models in one "
                "backward; extend only the outermost model whose output feeds the loss."
            )
        if len(self._graphs) <= capture.backward:  # a new backward: a new objective
            g = self.graph_class(obj)
            self._graphs.append(g)
            self._layers.append({})
        g = self._graphs[-1]
        if g.root is not capture.root:
            raise NotImplementedError(
                f"curvlib: HMP found layers of two extended models ({type(g.root).__name__} "
                f"and {type(capture.root).__name__}) in one backward; extend only the "
                "outermost model whose output feeds the loss."
            )
        # several forwards of the model (a discriminator on real and fake data) and several
        # extended losses in one backward: the objective is the sum of the losses
        g.add_terms([inputs for _, inputs in forwards], capture.loss_calls)
        params = list(capture.params.values())
        for p in params:
            g.add(p)
        self._layers[-1][module] = (capture.order, params)
        return {name: _BlockHMP([g], p) for name, p in capture.params.items()}

    def accumulate(self, capture, name, old, new, counts):
        """The Hessian of the summed objectives of the backwards is the sum of theirs."""
        return _BlockHMP(old.graphs + new.graphs, new.p)

    def operator(self) -> ParameterOperator:
        """The whole-network Hessian operator of the last context (summed over its backwards)."""
        ops = []
        for g, layers in zip(self._graphs, self._layers):
            if layers:
                order = sorted(layers.values(), key=lambda t: t[0])
                ops.append(HessianOperator(g, [p for _, ps in order for p in ps]))
        if not ops:
            raise RuntimeError(
                "curvlib: HMP.operator() needs a loss.backward() inside `with curvature(ext):` first."
            )
        return ops[0] if len(ops) == 1 else SumOperator(ops)


class _BlockHMP:
    """``p.hmp``: ``V [B, *p.shape] -> H_pp V`` (summed over the backwards of its context)."""

    def __init__(self, graphs: List[HessianGraph], p: nn.Parameter):
        self.graphs, self.p = graphs, p

    @property
    def graph(self) -> HessianGraph:
        return self.graphs[-1]

    def __call__(self, V: Tensor) -> Tensor:
        out = self.graphs[0].block_product(self.p, V)
        for g in self.graphs[1:]:
            out = out + g.block_product(self.p, V)
        return out


__all__ = ["HMP", "HessianOperator", "HessianGraph"]
