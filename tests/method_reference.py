"""Independent eager references of the GaLore-family methods over Adam / AdamW.

Written from the papers' equations (../shared/ALGORITHMS.md), sharing no code with
lowrank_compile: Adam's formula by hand, the projector from `galore_reference.svd_basis`
(torch.linalg.svd with canonical signs) or from `basis(name, g, side, k)` for random ones.
Notation: G (m x n), P (d x r), R = P^T G (left) or G P (right), N = Adam's step direction on
R (m_hat / (sqrt(v_hat) + eps)); "per kept index" = norms over R's rank axis.

- galore:      W <- W - lr alpha back(N)
- fira:        S = (G - back(R)) * phi, phi = ||N_i|| / ||R_i||; limiter; W <- W - lr (alpha back(N) + S)
- frugal:      W <- W - lr (alpha back(N) + lam sign(G - back(R))); Adam restarts at each new basis
- apollo:      U = G * s, s = ||N_i|| / ||R_i||; limiter; W <- W - lr alpha U
- apollo-mini: as apollo with one s = ||N|| / ||R||
- gradnorm:    W = mag * V / ||V|| per row; AdamW on mag (gradient <G_j, v_j>) and on V through the
               projection of its gradient (mag_j / ||V_j||) (G_j - <G_j, v_j> v_j); V is stored here
The limiter: if ||X_t|| > gamma ||X_{t-1}|| (the previous limited norm),
X_t <- X_t gamma ||X_{t-1}|| / ||X_t||.
AdamW decays W <- W (1 - lr wd) first; Adam adds wd W to G (so to R too), after the projector
is taken from G (the backend's convention, as tests/galore_reference.py).
"""

from __future__ import annotations

import torch
from galore_reference import side_for
from galore_reference import svd_basis


def _ratio(a, b):
    return torch.where(b > 0, a / torch.where(b > 0, b, 1), torch.zeros_like(a))


class MethodReference:
    def __init__(
        self,
        model,
        opt,
        projected,
        method,
        rank,
        update_gap,
        scale,
        proj_type,
        rule,
        gamma=1.01,
        free_scale=1.0,
        free_rule="signsgd",
        basis=None,
    ):
        self.model, self.opt, self.rule, self.method = model, opt, rule, method
        self.rank, self.gap, self.scale = rank, update_gap, scale
        self.gamma, self.free_scale, self.free_rule = gamma, free_scale, free_rule
        self.basis = basis
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in projected}
        self.side = {n: side_for(tuple(p.shape), proj_type) for n, p in self.params.items()}
        self.group = {
            n: next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            for n, p in self.params.items()
        }
        self.state = {n: {"t": 0, "k": 0, "adam_t": 0, "prev": 0.0} for n in self.params}

    def proj(self, x, p, side):
        return p.t() @ x if side == "left" else x @ p

    def back(self, x, p, side):
        return p @ x if side == "left" else x @ p.t()

    def kept_norms(self, x, side):  # one norm per kept index, shaped to broadcast over m x n
        return x.norm(dim=0, keepdim=True) if side == "left" else x.norm(dim=1, keepdim=True)

    def limit(self, st, x):
        norm = x.norm()
        if st["prev"] > 0 and norm > self.gamma * st["prev"]:
            x = x * (self.gamma * st["prev"] / norm)
            norm = x.norm()
        st["prev"] = norm
        return x

    @torch.no_grad()
    def step(self):
        grads = {}
        for n, p in self.params.items():
            grads[n] = p.grad
            p.grad = None
        self.opt.step()  # the other parameters, by torch.optim itself
        for n, p in self.params.items():
            g = grads[n]
            if g is None:
                continue
            st, grp, side = self.state[n], self.group[n], self.side[n]
            lr, wd = grp["lr"], grp["weight_decay"]
            if self.method == "gradnorm":
                self.gradnorm_step(p, g, st, grp, side)
                continue
            if st["t"] % self.gap == 0:  # the projector comes from the gradient before an L2 decay
                st["k"] += 1
                st["P"] = (
                    svd_basis(g, self.rank, side) if self.basis is None else self.basis(n, g, side, st["k"])
                )
                if self.method == "frugal" and st["k"] > 1:  # Adam restarts in the new basis
                    st.pop("m"), st.pop("v")
                    st["adam_t"] = 0
            P = st["P"]
            if self.rule == "adam" and wd:
                g = g + wd * p
            st["t"] += 1
            st["adam_t"] += 1
            t = st["adam_t"]
            r = self.proj(g, P, side)
            b1, b2 = grp["betas"]
            m = st.setdefault("m", torch.zeros_like(r))
            v = st.setdefault("v", torch.zeros_like(r))
            m.mul_(b1).add_(r, alpha=1 - b1)
            v.mul_(b2).addcmul_(r, r, value=1 - b2)
            N = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + grp["eps"])
            if self.rule == "adamw":
                p.mul_(1 - lr * wd)
            if self.method == "galore":
                upd = self.scale * self.back(N, P, side)
            elif self.method == "fira":
                phi = _ratio(self.kept_norms(N, side), self.kept_norms(r, side))
                upd = self.scale * self.back(N, P, side) + self.limit(st, (g - self.back(r, P, side)) * phi)
            elif self.method == "frugal":
                free = g - self.back(r, P, side)
                free = free.sign() if self.free_rule == "signsgd" else free
                upd = self.scale * self.back(N, P, side) + self.free_scale * free
            elif self.method in ("apollo", "apollo-mini"):
                if self.method == "apollo":
                    s = _ratio(self.kept_norms(N, side), self.kept_norms(r, side))
                else:
                    s = _ratio(N.norm(), r.norm())
                upd = self.scale * self.limit(st, g * s)
            else:  # pragma: no cover
                raise ValueError(self.method)
            p.sub_(lr * upd)

    def adam(self, st, prefix, x, grp):
        """Adam's direction m_hat / (sqrt(v_hat) + eps) for gradient x, states under `prefix`."""
        b1, b2 = grp["betas"]
        st[prefix + "t"] = st.get(prefix + "t", 0) + 1
        t = st[prefix + "t"]
        m = st.setdefault(prefix + "m", torch.zeros_like(x))
        v = st.setdefault(prefix + "v", torch.zeros_like(x))
        m.mul_(b1).add_(x, alpha=1 - b1)
        v.mul_(b2).addcmul_(x, x, value=1 - b2)
        return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + grp["eps"])

    def gradnorm_step(self, p, g, st, grp, side):
        """GradNormLoRP, V kept explicitly: W = mag * V / ||V|| per row; V = W, mag = ||W|| at first."""
        lr, wd = grp["lr"], grp["weight_decay"]
        if "V" not in st:
            st["V"] = p.detach().clone()
            st["mag"] = p.detach().norm(dim=1)
        V, mag = st["V"], st["mag"]
        vn = V.norm(dim=1, keepdim=True)
        vhat = V / vn
        dmag = (g * vhat).sum(dim=1)
        dV = (mag[:, None] / vn) * (g - dmag[:, None] * vhat)
        if st["t"] % self.gap == 0:  # the projector comes from the direction's gradient
            st["P"] = svd_basis(dV, self.rank, side)
        st["t"] += 1
        P = st["P"]
        N = self.adam(st, "dir_", self.proj(dV, P, side), grp)
        Nm = self.adam(st, "mag_", dmag, grp)
        mag.mul_(1 - lr * wd).sub_(lr * Nm)  # AdamW on the magnitudes
        V.mul_(1 - lr * wd).sub_(lr * self.scale * self.back(N, P, side))  # and on the direction
        p.copy_(mag[:, None] * V / V.norm(dim=1, keepdim=True))

    def zero_grad(self):
        self.opt.zero_grad()
