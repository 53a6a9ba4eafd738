"""KFAC on real architectures (issue 8): a torchvision-style resnet18 (eval mode, batch 32,
32x32 inputs) and a 2-layer TransformerEncoder (d_model 128, seq 64, batch 32) against
curvlinops' KFACLinearOperator on the layers both support (Linear and Conv2d: the norm layers'
and attention's parameters are frozen in both, so both compute the same factors), and an
Embedding with V = 50,000 (time and peak memory against the plain backward; curvlinops has no
Embedding support).

    python benchmarks/bench_layers.py [--reps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from common import backward_fn, curvlinops_kfac_fn, timing_report


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 layout (BasicBlock x [2, 2, 2, 2], widths 64-512)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        layers.append(BasicBlock(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    def __init__(self, d: int = 128, layers: int = 2, classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def freeze_all_but(model: nn.Module, kinds) -> None:
    """Freeze every parameter except those of modules of ``kinds`` (attention's projections,
    applied functionally, are frozen too: curvlinops does not see them)."""
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(isinstance(m, kinds) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear))


def plain_and_curvlib(base: nn.Module, x, y, fisher_types):
    """The plain forward+backward of a copy of ``base`` and curvlib's KFAC backward of another
    copy, per fisher_type, as benchmark functions."""
    import curvlib
    from curvlib.extensions import KFAC

    plain, ours = copy.deepcopy(base), curvlib.extend(copy.deepcopy(base))
    ce, ours_loss = nn.CrossEntropyLoss(), curvlib.extend(nn.CrossEntropyLoss())

    def run_ours(ft):
        return backward_fn(ours, ours_loss, x, y, lambda: curvlib.curvature(KFAC(fisher_type=ft)))

    return {"plain fwd+bwd": backward_fn(plain, ce, x, y), **{f"curvlib {ft}": run_ours(ft) for ft in fisher_types}}


def kfac_fns(make, x, y, kinds, fisher_types=("mc", "type-2")):
    torch.manual_seed(0)
    base = make().eval()
    freeze_all_but(base, kinds)
    cl = copy.deepcopy(base)
    params = [p for p in cl.parameters() if p.requires_grad]

    def run_cl(ft):
        return curvlinops_kfac_fn(cl, params, x, y, ft)

    ours = plain_and_curvlib(base, x, y, fisher_types)
    fns = {"plain fwd+bwd": ours.pop("plain fwd+bwd")}
    for ft in fisher_types:
        fns[f"curvlib {ft}"] = ours[f"curvlib {ft}"]
        fns[f"curvlinops {ft}"] = run_cl(ft)
    return fns


def embedding_fns(V: int = 50_000, D: int = 64, N: int = 32, T: int = 64):
    torch.manual_seed(0)

    class Bag(nn.Module):  # Embedding -> mean over the sequence -> Linear(D, 10)
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, 10)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    x, y = torch.randint(0, V, (N, T)), torch.randint(0, 10, (N,))
    return plain_and_curvlib(Bag(), x, y, ("empirical", "mc", "type-2"))


def report(name, fns, reps):
    med = timing_report(name, fns, reps, ms_digits=1, warmup=1)
    for ft in ("mc", "type-2"):
        a, b = f"curvlib {ft}", f"curvlinops {ft}"
        if a in med and b in med:
            print(f"{ft}: curvlib / curvlinops = {med[a] / med[b]:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    report("resnet18 (eval), batch 32, 32x32, Conv2d + Linear", kfac_fns(resnet18, x, y, (nn.Conv2d, nn.Linear)), args.reps)
    x, y = torch.randn(32, 64, 128, generator=g), torch.randint(0, 10, (32,), generator=g)
    report("TransformerEncoder 2 x d128, seq 64, batch 32, feed-forward + head Linears",
           kfac_fns(Transformer, x, y, (nn.Linear,)), args.reps)
    report("Embedding V=50,000 D=64, seq 64, batch 32 (mean over the sequence, Linear head)", embedding_fns(), args.reps)


if __name__ == "__main__":
    main()
