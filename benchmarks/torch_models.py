"""PyTorch peers of the benchmark models, with weights copied from the Flax models.

Everything here mirrors a deqjax model exactly (same maths, same weights, float32):

* :class:`TorchMDEQ` — the MDEQ classifier of :mod:`deqjax.models.mdeq` (Bai, Koltun &
  Kolter 2020) with the equilibrium solved by ``torchdeq`` (Geng & Kolter 2023,
  "TorchDEQ: a library for deep equilibrium models").
* :class:`TorchConvNet` — the small explicit conv net of the APGD workload
  (:func:`benchmarks.common.SmallConvNet`).
* :class:`TorchCPLNet` — the Convex Potential Layer network of Meunier et al. 2022
  ("A Dynamical System Perspective for Lipschitz Neural Networks", ICML), written in
  the structure of the authors' code: ``conv2d`` → ReLU → ``conv_transpose2d``, and a
  power iteration on a persistent buffer ``u`` (one iteration per training step).

Layout: torch is NCHW/OIHW, Flax NHWC/HWIO; the copy functions transpose. Flax's
``padding="SAME"`` with stride 2 pads (0, 1) (low, high) on 28×28, so the torch
injection pads explicitly with ``F.pad(x, (0, 1, 0, 1))``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

GN_EPS = 1e-6  # flax.linen.GroupNorm default epsilon


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def conv_w(k) -> torch.Tensor:
    """HWIO (Flax) → OIHW (torch)."""
    return _t(np.transpose(np.asarray(k), (3, 2, 0, 1)))


def same_pad(x, k: int, stride: int):
    """Flax/TF 'SAME' padding (asymmetric for even totals) for an NCHW input."""
    out = []
    for size in (x.shape[-1], x.shape[-2]):  # W then H (F.pad order)
        o = -(-size // stride)
        total = max((o - 1) * stride + k - size, 0)
        out += [total // 2, total - total // 2]
    return F.pad(x, out)


def _gn(module: nn.GroupNorm, p):
    module.weight.data.copy_(_t(p["scale"]))
    module.bias.data.copy_(_t(p["bias"]))


def _conv(module: nn.Conv2d, p):
    module.weight.data.copy_(conv_w(p["kernel"]))
    module.bias.data.copy_(_t(p["bias"]))


def _dense(module: nn.Linear, p):
    module.weight.data.copy_(_t(np.asarray(p["kernel"]).T))
    module.bias.data.copy_(_t(p["bias"]))


# ------------------------------------------------------------------------- MDEQ
class TorchMDEQCell(nn.Module):
    """f(z, u) = GN(ReLU(z + GN(conv_b(ReLU(GN(conv_a(z))))) + u)) (NCHW)."""

    def __init__(self, width=32, inner=64, groups=8):
        super().__init__()
        self.conv_a = nn.Conv2d(width, inner, 3, padding=1)
        self.conv_b = nn.Conv2d(inner, width, 3, padding=1)
        self.gn_a = nn.GroupNorm(groups, inner, eps=GN_EPS)
        self.gn_b = nn.GroupNorm(groups, width, eps=GN_EPS)
        self.gn_out = nn.GroupNorm(groups, width, eps=GN_EPS)

    def forward(self, z, u):
        h = F.relu(self.gn_a(self.conv_a(z)))
        h = self.gn_b(self.conv_b(h))
        return self.gn_out(F.relu(z + h + u))


class TorchMDEQ(nn.Module):
    """Injection → torchdeq equilibrium of the cell → GN → head → dense; the head is
    ``"gap"`` (global average pool) or ``"pool_flatten"`` (2×2 average pool, flatten in
    NHWC order as Flax), as :class:`deqjax.models.mdeq.Head`.

    ``deq_kwargs`` go to ``torchdeq.get_deq`` (solver names, iterations, ift, …).
    With ``unroll_iters > 0`` the equilibrium is instead an Anderson solve that
    autograd differentiates through (:func:`anderson_unrolled`, the memory
    workload's "unroll" backward)."""

    def __init__(
        self,
        width=32,
        inner=64,
        groups=8,
        num_classes=10,
        deq_kwargs=None,
        anderson_m=5,
        unroll_iters=0,
        head_kind="gap",
        size=28,
    ):
        super().__init__()
        self.inj = nn.Conv2d(1, width, 3, stride=2, padding=0)
        self.cell = TorchMDEQCell(width, inner, groups)
        self.head_gn = nn.GroupNorm(groups, width, eps=GN_EPS)
        if head_kind not in ("gap", "pool_flatten"):
            raise ValueError(f"unknown head {head_kind!r}; choose 'gap' or 'pool_flatten'")
        self.head_kind = head_kind
        feats = width if head_kind == "gap" else width * (-(-size // 4)) ** 2
        self.dense = nn.Linear(feats, num_classes)
        self.anderson_m, self.unroll_iters = anderson_m, unroll_iters
        self.deq = None
        if not unroll_iters:
            from torchdeq import get_deq

            self.deq = get_deq(**(deq_kwargs or {}))

    def load_flax(self, params):
        p = params["params"] if "params" in params else params
        _conv(self.inj, p["injection"]["conv"])
        c = p["equilibrium"]["cell"]
        _conv(self.cell.conv_a, c["conv_a"])
        _conv(self.cell.conv_b, c["conv_b"])
        for name in ("gn_a", "gn_b", "gn_out"):
            _gn(getattr(self.cell, name), c[name])
        _gn(self.head_gn, p["head"]["gn"])
        _dense(self.dense, p["head"]["dense"])
        return self

    def forward(self, x):  # x: NCHW in [0, 1]
        u = self.inj(same_pad(x, 3, 2))
        z0 = torch.zeros_like(u)
        if self.unroll_iters:
            z = anderson_unrolled(lambda z: self.cell(z, u), z0, self.unroll_iters, self.anderson_m)
        else:
            zs, _ = self.deq(lambda z: self.cell(z, u), z0, solver_kwargs={"m": self.anderson_m})
            z = zs[-1]
        h = self.head_gn(z)
        if self.head_kind == "gap":
            return self.dense(h.mean(dim=(2, 3)))
        h = F.avg_pool2d(h, 2, 2, ceil_mode=True)  # = Flax 'SAME' on even sizes
        return self.dense(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


def anderson_unrolled(f, z0, iters: int, m: int = 5, lam: float = 1e-4):
    """Anderson acceleration (Walker & Ni 2011) written out-of-place so autograd can
    backpropagate through every step (the peer of deqjax's ``backward="unroll"``).
    Same update as torchdeq's solver; returns the last iterate."""
    bsz = z0.shape[0]
    xs, fs = [z0.reshape(bsz, -1)], [f(z0).reshape(bsz, -1)]
    z = fs[0]
    for _ in range(1, iters):
        xs.append(z)
        fs.append(f(z.view_as(z0)).reshape(bsz, -1))
        xs, fs = xs[-m:], fs[-m:]
        n = len(xs)
        g = torch.stack(fs, 1) - torch.stack(xs, 1)
        h = g @ g.transpose(1, 2) + lam * torch.eye(n)[None]
        a = torch.zeros(bsz, n + 1, n + 1)
        a[:, 0, 1:] = 1
        a[:, 1:, 0] = 1
        a = a + F.pad(h, (1, 0, 1, 0))
        rhs = torch.zeros(bsz, n + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(a, rhs)[:, 1:, 0]
        z = (alpha[:, None] @ torch.stack(fs, 1))[:, 0]
    return z.view_as(z0)


# ------------------------------------------------------------- small conv net
class TorchConvNet(nn.Module):
    """conv3×3(1→16) → ReLU → conv3×3/2(16→32) → ReLU → flatten(NHWC) → dense 100
    → ReLU → dense 10; the twin of :class:`benchmarks.common.SmallConvNet`."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=0)
        self.d1 = nn.Linear(14 * 14 * 32, 100)
        self.d2 = nn.Linear(100, 10)

    def load_flax(self, params):
        p = params["params"]
        _conv(self.c1, p["c1"]), _conv(self.c2, p["c2"])
        _dense(self.d1, p["d1"]), _dense(self.d2, p["d2"])
        return self

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(same_pad(h, 3, 2)))
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # NHWC flatten as Flax
        return self.d2(F.relu(self.d1(h)))


# ----------------------------------------------------------------------- CPL
class ConvexPotentialLayerConv(nn.Module):
    """x − 2/(σ²+1e-4) · convᵀ(ReLU(conv(x) + b)), σ by power iteration on a buffer."""

    def __init__(self, size, cin, cout, k=3, eps=1e-4):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("u", torch.randn(1, cin, size, size))
        self.pad, self.eps = k // 2, eps

    def forward(self, x):
        res = F.relu(F.conv2d(x, self.kernel, self.bias, padding=self.pad))
        res = F.conv_transpose2d(res, self.kernel, padding=self.pad)
        with torch.no_grad():  # one power-iteration step, persistent vector
            u = self.u / self.u.norm()
            u = F.conv_transpose2d(
                F.conv2d(u, self.kernel, padding=self.pad), self.kernel, padding=self.pad
            )
            self.u.copy_(u / u.norm().clamp_min(1e-12))
        sigma = F.conv2d(self.u, self.kernel, padding=self.pad).norm()
        return x - 2.0 / (sigma**2 + self.eps) * res


class ConvexPotentialLayerLinear(nn.Module):
    def __init__(self, cin, cout, eps=1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("u", torch.randn(cin))
        self.eps = eps

    def forward(self, x):
        res = F.linear(F.relu(F.linear(x, self.weight, self.bias)), self.weight.t())
        with torch.no_grad():
            u = self.u / self.u.norm()
            u = self.weight.t() @ (self.weight @ u)
            self.u.copy_(u / u.norm().clamp_min(1e-12))
        sigma = (self.weight @ self.u).norm()
        return x - 2.0 / (sigma**2 + self.eps) * res


class TorchCPLNet(nn.Module):
    """Pad channels → conv CPLs → sum-pool/k → flatten (NHWC order) → dense CPLs →
    truncate to the first ``num_classes`` coordinates."""

    def __init__(
        self,
        size=28,
        depth=4,
        depth_linear=2,
        channels=16,
        inner=32,
        linear_width=784,
        num_classes=10,
        pool=4,
    ):
        super().__init__()
        self.channels, self.pool, self.num_classes = channels, pool, num_classes
        self.convs = nn.ModuleList(
            ConvexPotentialLayerConv(size, channels, inner) for _ in range(depth)
        )
        flat = (size // pool) ** 2 * channels
        self.linear_width = linear_width
        d = max(flat, linear_width)
        self.denses = nn.ModuleList(
            ConvexPotentialLayerLinear(d, linear_width) for _ in range(depth_linear)
        )

    def load_flax(self, variables):
        p, s = variables["params"], variables["power_iteration"]
        for i, layer in enumerate(self.convs):
            layer.kernel.data.copy_(conv_w(p[f"convs_{i}"]["kernel"]))
            layer.bias.data.copy_(_t(p[f"convs_{i}"]["bias"]))
            layer.u.copy_(_t(np.transpose(np.asarray(s[f"convs_{i}"]["u"]), (0, 3, 1, 2))))
        for i, layer in enumerate(self.denses):
            layer.weight.data.copy_(_t(p[f"denses_{i}"]["kernel"]))
            layer.bias.data.copy_(_t(p[f"denses_{i}"]["bias"]))
            layer.u.copy_(_t(s[f"denses_{i}"]["u"]))
        return self

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        for layer in self.convs:
            x = layer(x)
        x = F.avg_pool2d(x, self.pool, divisor_override=self.pool)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        if x.shape[1] < self.linear_width:
            x = F.pad(x, (0, self.linear_width - x.shape[1]))
        for layer in self.denses:
            x = layer(x)
        return x[:, : self.num_classes]


def torchdeq_kwargs(cfg) -> dict:
    """torchdeq settings equal to a deqjax DEQConfig (forward and implicit backward)."""
    f, m = cfg.forward, cfg.adjoint_solver
    assert f.method == "anderson" and m == "anderson", "the port matches Anderson only"
    return dict(
        core="indexing",
        ift=True,
        f_solver="anderson",
        f_max_iter=f.max_iter,
        f_tol=f.tol,
        f_stop_mode=f.stop_mode,
        b_solver="anderson",
        b_max_iter=cfg.adjoint_max_iter,
        b_tol=cfg.adjoint_tol,
        b_stop_mode="rel",
    )


def robust_flags(model, x_adv, y, correct, batch=250):
    """Per example: correct on the clean input and still right on ``x_adv`` (eval mode)."""
    model.eval()
    with torch.no_grad():
        pred = np.concatenate(
            [model(x_adv[i : i + batch]).argmax(1).numpy() for i in range(0, len(y), batch)]
        )
    return correct & (pred == y)
