r"""Data-parallel optimizers on ``torch.distributed`` (the communication of :mod:`curvlib.optim`).

``NaturalGradient``, ``Preconditioner`` and ``CGNewton`` find an initialized default process group
(or take ``process_group=``) and then train as one process on the concatenated batch. The scheme
is KAISA's (Pauloski et al. 2021, kfac-pytorch): curvature factors are all-reduced, each inverse
is computed on one process and broadcast. Only this module imports ``torch.distributed``; the
engine, the extensions and the solvers stay single-process.

**What is averaged, and how (the scaling of each factor).** Each rank ``r`` computes, on its local
batch of ``N_r`` samples (``R_r`` rows: samples times positions for the ``A`` of a convolution),
its loss ``L_r`` (reduction ``mean`` or ``sum``), gradient ``g_r`` and KFAC factors

    A_r = 1/R_r sum_{rows of r} a a^T            (a mean over rows, whatever the reduction)
    G_r = sum_{samples of r} s s^T               (s carries the loss scaling: for ``mean``,
                                                  s s^T has 1/N_r inside, so G_r = 1/N_r sum ...)

``DistributedDataParallel`` (and this module, without DDP) averages the gradients:
``g = 1/W sum_r g_r``, the gradient of ``L = 1/W sum_r L_r``. The curvature consistent with that
gradient is the one of the same ``L``:

    G = 1/W sum_r G_r,     A = sum_r R_r A_r / sum_r R_r,     diag = 1/W sum_r diag_r,

and the same for bias and norm-layer factors (they carry the loss scaling, like ``G``). With a
``mean`` loss and equal local batches, ``L`` is the mean loss of the concatenated batch of
``N = W N_r`` samples, and ``G = 1/N sum_n s s^T``, ``A = 1/R sum a a^T``: the factors of one
process on the concatenated batch, exactly. Summing ``G`` (as gradient accumulation over
micro-batches does, because there the gradients are summed too) would be off by the world size
``W``; so would averaging with a ``sum`` loss and then summing the gradients. With a ``sum`` loss,
DDP's average trains on ``1/W`` times the concatenated batch's loss (DDP's documented behaviour;
multiply the loss by ``W`` for the plain sum), and the curvature above is that loss's. ``A`` is
weighted by the rows of each rank, so it is the concatenated batch's even for unequal batches
(the gradient average, DDP's, then is not). The empirical and type-2 Fisher are deterministic
functions of the batch, so 2 processes match 1 to round-off; ``"mc"`` draws its targets from a
generator seeded per rank and step (from the optimizer's generator, which stays identical on all
ranks), so it matches in distribution.

**Communication per step.** (1) A tiny all-reduce (MAX) of ``[W per-rank non-finite flags, layout
size, gradient checksum, parameter checksum]`` (signs folded in, so MAX gives min and max): every
rank learns whether any rank hit a NaN/Inf, whether the gradients are already synchronized (DDP:
identical on all ranks) and, with ``check_sync=True``, whether the parameters drifted apart or
the ranks' hyper-parameters differ (a checksum of their printed values; the one that differs is named).
(2) On curvature steps, **one bucketed all-reduce** of the captured curvature (symmetric factors
as upper triangles, ``m (m+1) / 2`` of ``m^2`` entries), the row counts of the ``A`` factors and,
without DDP, the gradients; on other steps without DDP, an all-reduce of the gradients only.
(3) On inverse steps, the inverses are assigned to ranks by estimated cost (``m^3`` per factor,
largest first, each to the least loaded rank), each rank builds its own, an ``all_gather_object``
of their small descriptions (shapes, the damping used, or the error) follows, then one broadcast
per rank of the inverses it built. Each inverse is thus computed once in the group.

**Failures.** Every rank raises the same ``FloatingPointError`` in the same step when any rank
hits a non-finite gradient or curvature (before any update, so no rank is half-updated), and the
same ``RuntimeError`` when a rank cannot build an inverse it owns. The optimizer must be stepped
on every rank in the same way (same calls, same param groups and hyper-parameters).

**The optimizer's side** (the functions at the end of this module): :func:`check_group` refuses
curvatures that cannot run data-parallel (:attr:`CurvatureKind.distributed`), :func:`synchronize`
runs (1) and (2) at the start of a step's plan on the savefields each group's curvature kind
names (:meth:`CurvatureKind.averaged_fields`), and :func:`build_inverse` runs (3).
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from curvlib.optim.curvatures import CurvatureKind, unwrap
from curvlib.optim.damping import robust_inverse
from curvlib.optim.tensors import finite, tree_leaves

AUTO = "auto"

#: leaves of a curvature value: ``"loss"`` (carries the loss scaling: averaged over ranks) or
#: ``"rows"`` (a mean over rows: weighted by each rank's row count)
LOSS, ROWS = "loss", "rows"


def data_parallel(process_group: Any = AUTO, check_sync: bool = False) -> Optional["DataParallel"]:
    """The :class:`DataParallel` helper for ``process_group`` (``"auto"``: the default group when
    ``torch.distributed`` is initialized; ``None``: single process), or ``None`` for one process."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(
                f"curvlib.optim: process_group={process_group!r}; use 'auto' (the default group when "
                "torch.distributed is initialized), a ProcessGroup, or None (single process)."
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "curvlib.optim: process_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first."
        )
    if dist.get_world_size(process_group) == 1:
        return None
    return DataParallel(process_group, check_sync)


def _triu_index(m: int, cache: Dict[int, Tensor] = {}) -> Tensor:  # noqa: B006 (a cache)
    if m not in cache:
        cache[m] = torch.triu_indices(m, m)
    return cache[m]


def pack(t: Tensor, sym: bool = True) -> Tensor:
    """A symmetric factor ``[*B, m, m]`` (``sym``) as its upper triangle ``[*B * m (m+1) / 2]``
    (flat); other tensors flattened."""
    if sym and t.dim() >= 2 and t.shape[-1] == t.shape[-2]:
        i, j = _triu_index(t.shape[-1])
        return t[..., i, j].reshape(-1)
    return t.reshape(-1)


def unpack(flat: Tensor, like: Tensor, sym: bool = True) -> Tensor:
    """Inverse of :func:`pack` (the lower triangle mirrored from the upper one)."""
    if sym and like.dim() >= 2 and like.shape[-1] == like.shape[-2]:
        m = like.shape[-1]
        i, j = _triu_index(m)
        out = like.new_zeros(like.shape)
        v = flat.reshape(*like.shape[:-2], -1)
        out[..., i, j] = v
        out[..., j, i] = v
        return out
    return flat.reshape(like.shape).clone()


def assign(costs: Sequence[float], world: int) -> List[int]:
    """Owners of jobs with ``costs``: largest first, each to the least loaded rank (lowest rank on
    ties); deterministic, so every rank computes the same assignment."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _export(part: Any) -> Tuple[Any, List[Tensor], Any]:
    """A per-parameter inverse (a tensor or an object with tensor attributes) as a picklable
    description, its tensors, and the part itself with those tensors made contiguous: the
    receivers get contiguous copies, and the ranks must apply bit-identical inverses (a matmul
    may round differently on a column-major ``eigh`` output than on its contiguous copy)."""
    if isinstance(part, Tensor):
        part = part.contiguous()
        return ("tensor", [(tuple(part.shape), part.dtype)]), [part], part
    for k, v in list(vars(part).items()):
        if isinstance(v, Tensor) and k != "terms":
            setattr(part, k, v.contiguous())
    attrs = {k: v for k, v in vars(part).items() if k != "terms"}
    names = [k for k, v in attrs.items() if isinstance(v, Tensor)]
    meta = {k: v for k, v in attrs.items() if not isinstance(v, Tensor)}
    shapes = [(tuple(attrs[k].shape), attrs[k].dtype) for k in names]
    return (type(part), meta, names, shapes), [attrs[k] for k in names], part


def _import(spec: Any, tensors: List[Tensor], terms: Any) -> Any:
    if spec[0] == "tensor":
        return tensors[0]
    cls, meta, names, _ = spec
    obj = cls.__new__(cls)
    obj.__dict__.update(meta)
    obj.__dict__.update(zip(names, tensors))
    obj.terms = terms
    return obj


def _shapes(spec: Any) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    return spec[1] if spec[0] == "tensor" else spec[3]


class DataParallel:
    """Collectives of a data-parallel optimizer over ``group`` (module docstring).

    Attributes:
        rank, world: this process's rank and the group's size.
        stats: running totals: ``inverses`` (per-parameter inverses this rank built),
            ``allreduce_bytes``, ``broadcast_bytes``, ``comm_seconds``, ``inverse_seconds``.
        last: the last step's ``bucket_bytes`` (curvature bucket, as sent), ``grad_bytes`` (the
            gradients it preconditions), ``broadcast_bytes`` and ``grads_synced``.
    """

    def __init__(self, group: Any, check_sync: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.ranks = [dist.get_global_rank(group, r) for r in range(self.world)]
        self.check_sync = bool(check_sync)
        #: where the group's collectives want their tensors (NCCL: the current GPU)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.stats: Dict[str, float] = dict(inverses=0, allreduce_bytes=0, broadcast_bytes=0, comm_seconds=0.0, inverse_seconds=0.0)
        self.last: Dict[str, Any] = {}

    # ------------------------------------------------------------------ primitives
    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        """``t`` reduced over the ranks, in place when ``t`` is on :attr:`device` (the current CUDA
        device under NCCL, which takes no CPU tensors); otherwise a reduced copy there."""
        t = t.to(self.device)
        t0 = time.perf_counter()
        dist.all_reduce(t, op=op, group=self.group)
        self.stats["comm_seconds"] += time.perf_counter() - t0
        self.stats["allreduce_bytes"] += t.numel() * t.element_size()
        return t

    def mean(self, tensors: List[Tensor]) -> List[Tensor]:
        """``1/W sum_r`` of each tensor, in one all-reduce per dtype (new tensors)."""
        out: List[Optional[Tensor]] = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].reshape(-1) for i in idx]).div_(self.world)
            flat = self._all_reduce(flat)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = piece.reshape(tensors[i].shape).to(tensors[i].device)
        return out  # type: ignore[return-value]

    def mean_scalar(self, value: Any) -> Optional[float]:
        """The mean over ranks of a number (a loss; ``None`` stays ``None`` on every rank)."""
        if value is None:
            return None
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self._all_reduce(t)) / self.world

    def averaged(self, A: Callable) -> Callable:
        """``v -> 1/W sum_r A_r v`` for a product ``A`` (a tensor or a list of tensors): the
        product of the loss whose gradient the optimizer averages (one all-reduce per product;
        every rank runs the same CG iterations)."""

        def apply(v):
            out = A(v)
            return self.mean(list(out)) if isinstance(out, (list, tuple)) else self.mean([out])[0]

        return apply

    def seed(self, gen: torch.Generator, source: torch.Generator) -> None:
        """Seed the capture generator ``gen`` from the shared ``source`` and the rank."""
        base = int(torch.randint(0, 2**62, (1,), generator=source))
        gen.manual_seed(base + 7919 * self.rank)

    # ------------------------------------------------------------------ checks
    def agree(
        self, step: int, bad: bool, layout: int, grads: List[Tensor], params: List[Tensor],
        hyper: Optional[List[Dict[str, str]]] = None,
    ) -> bool:
        """The small MAX all-reduce: raise the same error on every rank if any rank is ``bad``
        (non-finite), the ranks' layouts differ, or (``check_sync``) their parameters or their
        hyper-parameters ``hyper`` (one dict of printed values per param group) differ; returns
        whether the gradients are identical on all ranks (synchronized, e.g. by DDP)."""
        gsum = float(sum(g.double().sum() for g in grads)) if grads and not bad else 0.0
        psum = float(sum(p.detach().double().sum() for p in params)) if self.check_sync else 0.0
        hsum = float(zlib.crc32(repr(hyper).encode())) if self.check_sync and hyper is not None else 0.0
        flags = [0.0] * self.world + [layout, -layout, gsum, -gsum, psum, -psum, hsum, -hsum]
        flags[self.rank] = float(bad)
        v = torch.tensor(flags, dtype=torch.float64, device=self.device)  # built where NCCL reduces it
        v = self._all_reduce(v, dist.ReduceOp.MAX).cpu()
        flags = [r for r in range(self.world) if v[r] > 0]
        if flags:
            raise FloatingPointError(
                f"curvlib.optim: rank(s) {flags} of {self.world} hit a NaN or Inf in the gradient or the "
                f"captured curvature at step {step}; no rank took the step, parameters and optimizer state "
                "are unchanged on every rank. Skip this batch (opt.zero_grad()) on all ranks or lower the "
                "learning rate."
            )
        mx, mn = v[self.world], -v[self.world + 1]
        if mx != mn:
            raise RuntimeError(
                f"curvlib.optim: at step {step} the ranks disagree on which parameters have a gradient or "
                "captured curvature; every rank must run the same model, capture and step (DDP with "
                "find_unused_parameters leaves unused gradients None on some ranks only: set them to zero)."
            )
        if self.check_sync:
            pmx, pmn = float(v[self.world + 4]), -float(v[self.world + 5])
            if pmx != pmn:
                raise RuntimeError(
                    f"curvlib.optim: check_sync: the parameters differ across ranks before step {step} "
                    f"(checksums between {pmn!r} and {pmx!r}); they were not broadcast at the start "
                    "(DistributedDataParallel does it) or were changed on one rank only."
                )
            if float(v[self.world + 6]) != -float(v[self.world + 7]):  # every rank sees it: gather to name it
                every: List[Any] = [None] * self.world
                dist.all_gather_object(every, hyper, group=self.group)
                raise RuntimeError(f"curvlib.optim: check_sync: {_first_difference(every)} before step {step}; "
                                   "every rank must use the same hyper-parameters (set them, and run schedulers, "
                                   "on all ranks alike).")
        return bool(v[self.world + 2] == -v[self.world + 3])

    # ------------------------------------------------------------------ the bucket
    def reduce(self, grads: List[Tensor], entries: List[Tuple[Any, List[str], int, bool]], sync_grads: bool) -> Tuple[List[Tensor], List[Any]]:
        """One all-reduce per dtype of the curvature ``entries`` and (``sync_grads``) ``grads``.

        ``entries``: ``(value, roles, rows, sym)`` per parameter, ``value`` a tensor or list of
        tensors, ``roles`` one of :data:`LOSS` / :data:`ROWS` per leaf, ``rows`` the row count of
        its :data:`ROWS` leaves, ``sym``: its square leaves are symmetric (sent as triangles). Returns the averaged gradients (``grads`` themselves when not synced)
        and values (module docstring).
        """
        W = float(self.world)
        pieces: List[Tuple[Tensor, float]] = []  # (tensor to send, scale)
        for value, roles, rows, sym in entries:
            leaves = value if isinstance(value, list) else [value]
            for t, role in zip(leaves, roles):
                pieces.append((pack(t, sym), float(rows) if role == ROWS else 1.0 / W))
            if ROWS in roles:
                pieces.append((leaves[roles.index(ROWS)].new_tensor([float(rows)]), 1.0))
        ncurv = len(pieces)
        if sync_grads:
            pieces += [(g.reshape(-1), 1.0 / W) for g in grads]
        self.last = dict(bucket_bytes=0, grad_bytes=sum(g.numel() * g.element_size() for g in grads), grads_synced=not sync_grads, broadcast_bytes=0)
        if not pieces:
            return grads, [e[0] for e in entries]
        out: List[Optional[Tensor]] = [None] * len(pieces)
        for dtype in dict.fromkeys(t.dtype for t, _ in pieces):
            idx = [i for i, (t, _) in enumerate(pieces) if t.dtype == dtype]
            flat = torch.cat([pieces[i][0] * pieces[i][1] for i in idx])
            flat = self._all_reduce(flat)
            self.last["bucket_bytes"] += flat.numel() * flat.element_size()
            for i, piece in zip(idx, flat.split([pieces[i][0].numel() for i in idx])):
                out[i] = piece.to(pieces[i][0].device)
        values, k = [], 0
        for value, roles, rows, sym in entries:
            leaves = value if isinstance(value, list) else [value]
            red = [out[k + j] for j in range(len(leaves))]
            k += len(leaves)
            if ROWS in roles:
                total = out[k]
                k += 1
                red = [r / total if role == ROWS else r for r, role in zip(red, roles)]
            new = [unpack(r, t, sym) for r, t in zip(red, leaves)]
            values.append(new if isinstance(value, list) else new[0])
        new_grads = [out[ncurv + i].reshape(g.shape) for i, g in enumerate(grads)] if sync_grads else grads
        return new_grads, values

    # ------------------------------------------------------------------ sharded inverses
    def sharded_inverses(self, build, values: List[Any], costs: List[float], terms_of) -> Tuple[List[Any], float]:
        """Per-parameter inverses, each built on one rank and broadcast.

        ``build(i) -> (part, damping_used)`` builds inverse ``i`` (may raise); ``values[i]`` the
        curvature it inverts (to rebuild ``terms``: ``terms_of(value, dtype)``). Returns the parts
        (in order) and the largest damping used.
        """
        owners = assign(costs, self.world)
        mine: Dict[int, Any] = {}
        local: List[Any] = []
        error: Optional[str] = None
        t0 = time.perf_counter()
        for i, r in enumerate(owners):
            if r != self.rank:
                continue
            try:
                part, used = build(i)
            except (ValueError, RuntimeError) as e:
                error = f"{type(e).__name__}: {e}"
                break
            spec, tensors, part = _export(part)
            mine[i] = (part, tensors)
            local.append((i, spec, used))
            self.stats["inverses"] += 1
        self.stats["inverse_seconds"] += time.perf_counter() - t0
        gathered: List[Any] = [None] * self.world
        t0 = time.perf_counter()
        dist.all_gather_object(gathered, (error, local), group=self.group)
        self.stats["comm_seconds"] += time.perf_counter() - t0
        errors = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
        if errors:
            r, e = errors[0]
            raise RuntimeError(f"curvlib.optim: rank {r} could not build the inverse it owns ({e}); no rank took the step.")
        parts: List[Any] = [None] * len(values)
        used_all = 0.0
        sent = 0
        for r, (_, items) in enumerate(gathered):
            if not items:
                continue
            for i, spec, used in items:
                used_all = max(used_all, float(used))
            # one broadcast per dtype of everything rank r built
            shapes = [(i, spec, s) for i, spec, _ in items for s in _shapes(spec)]
            for dtype in dict.fromkeys(s[1] for _, _, s in shapes):
                sizes = [torch.Size(s[0]).numel() for _, _, s in shapes if s[1] == dtype]
                if r == self.rank:  # (NCCL broadcasts from the current CUDA device)
                    flat = torch.cat([t.reshape(-1) for i, _, _ in items for t in mine[i][1] if t.dtype == dtype])
                    flat = flat.to(self.device)
                else:
                    flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
                t0 = time.perf_counter()
                dist.broadcast(flat, src=self.ranks[r], group=self.group)
                self.stats["comm_seconds"] += time.perf_counter() - t0
                sent += flat.numel() * flat.element_size()
                if r != self.rank:
                    it = iter(flat.split(sizes))
                    recv = {}
                    for i, spec, _ in items:
                        # fresh (aligned) copies: BLAS kernels may round differently on a view at an
                        # offset, and the ranks must apply bit-identical inverses
                        recv[i] = [next(it).reshape(s).clone() if d == dtype else None for s, d in _shapes(spec)]
                    for i, spec, _ in items:
                        prev = parts[i] if isinstance(parts[i], list) else [None] * len(_shapes(spec))
                        parts[i] = [p if p is not None else q for p, q in zip(prev, recv[i])]
            for i, spec, _ in items:
                if r == self.rank:
                    parts[i] = mine[i][0]
                else:
                    dtype = _shapes(spec)[0][1]
                    parts[i] = _import(spec, parts[i], terms_of(values[i], dtype))
        self.stats["broadcast_bytes"] += sent
        self.last["broadcast_bytes"] = self.last.get("broadcast_bytes", 0) + sent
        return parts, used_all


def _first_difference(every: List[Any]) -> str:
    """Words for the first hyper-parameter whose printed value differs across ranks."""
    if any(h is None or len(h) != len(every[0]) for h in every):
        return "the ranks have different numbers of param groups"
    for gi, group in enumerate(every[0]):
        for key in sorted(set().union(*(h[gi].keys() for h in every))):
            values = [h[gi].get(key) for h in every]
            if len(set(values)) > 1:
                shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                return f"param group {gi} has {key} = {shown}"
    return "the hyper-parameters differ across ranks"


def hyper_parameters(param_groups: List[Mapping[str, Any]]) -> List[Dict[str, str]]:
    """Each group's hyper-parameters as printed values (``repr``; callables by their name), the
    ``params`` left out: what ``check_sync`` compares across ranks."""
    out = []
    for g in param_groups:
        out.append({k: (f"<callable {getattr(v, '__qualname__', type(v).__name__)}>" if callable(v) else repr(v))
                    for k, v in g.items() if k not in ("params", "param_names")})
    return out


# ---------------------------------------------------------------- the optimizer's side


def check_group(opt: Any, group: Mapping[str, Any], gi: int) -> None:
    """Refuse a param group whose curvature cannot run data-parallel."""
    kind = opt._kind(group)
    if kind is not None and not kind.distributed:
        ok = [name for name, k in opt.kinds.items() if k.distributed]
        raise NotImplementedError(
            f"{opt._where}: param group {gi}: curvature={kind.name!r} cannot run data-parallel yet: "
            f"{kind.not_distributed}. Use curvature={' or '.join(map(repr, ok))} with torch.distributed, or "
            "process_group=None to run each process on its own."
        )


def roles(field: str, p: Tensor, value: Any, ext: Any) -> List[str]:
    """:data:`LOSS` / :data:`ROWS` per leaf of ``p``'s captured ``value`` (module docstring)."""
    if not isinstance(value, list) or len(value) == 1:
        return [LOSS]
    ia = getattr(ext, "act_index", {}).get(id(p))
    if ia is None:
        raise RuntimeError(
            f"curvlib.optim: cannot tell which factor of the captured {field!r} curvature of a parameter of "
            f"shape {tuple(p.shape)} is the activation factor A; data-parallel averaging needs it."
        )
    return [ROWS if i == ia else LOSS for i in range(len(value))]


def curvature_entries(opt: Any) -> List[Tuple[Tensor, str, Any, List[str], int, bool]]:
    """This step's captured curvature to average: ``(p, savefield, value, roles, rows, sym)``."""
    record = opt._captured()
    if record is None:
        return []
    out = []
    for gi, group in enumerate(opt.param_groups):
        if not opt._due(gi, record.step):
            continue
        kind: CurvatureKind = opt._kind(group)
        for field in kind.averaged_fields(group):
            ext = next((e for e in record.extensions if e.savefield == field), None)
            counts = record.context.counts(ext) if ext is not None else {}
            for p in group["params"]:
                value = p.__dict__.get(field) if p.grad is not None else None
                if value is None:
                    continue
                out.append((p, field, value, roles(field, p, value, unwrap(ext)), counts.get(id(p), 1), kind.symmetric))
    return out


def synchronize(opt: Any) -> None:
    """Agree on failures, then average the gradients (when not synchronized by DDP) and the
    captured curvature in one bucket, in place (``p.grad`` and the savefields)."""
    dp, k = opt.core.distributed, opt.core.step
    entries = curvature_entries(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    with_grad = [p for p in params if p.grad is not None]
    bad = any(not finite(p.grad) for p in with_grad) or any(not finite(t) for e in entries for t in tree_leaves(e[2]))
    layout = sum(p.grad.numel() for p in with_grad) + sum(t.numel() for e in entries for t in tree_leaves(e[2]))
    hyper = hyper_parameters(opt.param_groups) if dp.check_sync else None
    synced = dp.agree(k, bad, layout, [p.grad for p in with_grad], params, hyper)
    grads, values = dp.reduce([p.grad for p in with_grad], [e[2:] for e in entries], not synced)
    if not synced:
        for p, g in zip(with_grad, grads):
            p.grad.copy_(g)
    for e, v in zip(entries, values):
        setattr(e[0], e[1], v)


def build_inverse(dp: Optional[DataParallel], kind: CurvatureKind, params, sources, lam: float, mode: str, group,
                  where: str, names: Optional[List[str]] = None):
    """``robust_inverse``; data-parallel: each parameter's inverse built on one rank (by cost)
    and broadcast. Returns ``(solve, damping_used)``."""
    if dp is None:
        return robust_inverse(kind, params, sources, lam, mode, group, where, names)

    def build(i):
        solve, used = robust_inverse(kind, [params[i]], [sources[i]], lam, mode, group, where,
                                     None if names is None else [names[i]])
        return solve.parts[0], used

    def terms_of(value, dtype):
        if not isinstance(value, list):
            return None
        terms = [value] if isinstance(value[0], Tensor) else value
        return [[t.to(dtype) for t in term] for term in terms]

    costs = [kind.inverse_cost(c, mode) for c in sources]
    parts, used = dp.sharded_inverses(build, sources, costs, terms_of)
    return kind.solve_from_parts(params, parts), used


__all__ = [
    "AUTO", "DataParallel", "data_parallel", "assign", "pack", "unpack", "LOSS", "ROWS", "check_group", "synchronize",
    "curvature_entries", "build_inverse",
]
