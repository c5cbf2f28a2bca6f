"""An independent eager reference of GaLore over torch.optim's update rules.

Written from the GaLore paper and torch.optim's documented update rules. It shares no code with
lowrank_compile: its own side rule, its own SVD call, and the AdamW/Adam/SGD/Lion formulas by hand.
Parameters that are not projected are left to the real torch.optim optimizer, called with the
projected parameters' `.grad` removed, so it skips them.

GaLore, for a projected m x n parameter W with gradient G and update counter t (0-based):
- if t % update_gap == 0: P = top-r singular vectors of G (fp32): right ones (n x r, R = G P) when
  the larger side is kept on the left (m >= n for "std"), left ones (m x r, R = P^T G) otherwise;
- the optimizer's rule runs on R with R-shaped states (never rotated);
- W <- W * (1 - lr * wd) - lr * scale * back(N) (decoupled decay), or with L2 decay R + wd * P^T W
  (left) / R + wd * W P (right) before the rule.
"""

from __future__ import annotations

import torch


def side_for(shape, proj_type):
    m, n = shape
    if proj_type in ("left", "right"):
        return proj_type
    big_rows = m >= n
    if proj_type == "std":
        return "right" if big_rows else "left"
    return "left" if big_rows else "right"


def svd_basis(g, rank, side, signs="canonical"):
    """GaLore's basis; "canonical" flips each column whose entry of largest magnitude is negative."""
    u, s, vh = torch.linalg.svd(g.float(), full_matrices=False)
    p = u[:, :rank] if side == "left" else vh[:rank].t()
    if signs == "canonical":
        cols = []
        for j in range(p.shape[1]):
            c = p[:, j]
            cols.append(-c if c[c.abs().argmax()] < 0 else c)
        p = torch.stack(cols, dim=1)
    return p.to(g.dtype)


class GaLoreReference:
    def __init__(self, model, opt, projected, rank, update_gap, scale, proj_type, rule, basis=None):
        """`projected`: names of the projected parameters; `rule`: adamw | adam | sgd | lion.

        `basis(name, g, side, k)`, when given, makes the projector of the k-th refresh (k = 1, 2, ...)
        instead of GaLore's SVD (for the seeded random projectors).
        """
        self.basis = basis
        self.model, self.opt, self.rule = model, opt, rule
        self.rank, self.gap, self.scale = rank, update_gap, scale
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in projected}
        self.side = {n: side_for(tuple(p.shape), proj_type) for n, p in self.params.items()}
        self.group = {}
        for n, p in self.params.items():
            for g in opt.param_groups:
                if any(q is p for q in g["params"]):
                    self.group[n] = g
        self.state = {n: {"t": 0} for n in self.params}

    def proj(self, x, p, side):
        return p.t() @ x if side == "left" else x @ p

    def back(self, x, p, side):
        return p @ x if side == "left" else x @ p.t()

    @torch.no_grad()
    def step(self, svd_from=None):
        """`svd_from`: name -> gradient to take a refresh's SVD from (default: the step's gradient)."""
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
            if st["t"] % self.gap == 0:
                st["k"] = st.get("k", 0) + 1
                if self.basis is not None:
                    st["P"] = self.basis(n, g, side, st["k"])
                else:
                    st["P"] = svd_basis(g if svd_from is None else svd_from[n], self.rank, side)
            P = st["P"]
            r = self.proj(g, P, side)
            lr, wd = grp["lr"], grp["weight_decay"]
            st["t"] += 1
            t = st["t"]
            if self.rule in ("adamw", "adam"):
                b1, b2 = grp["betas"]
                if self.rule == "adam" and wd:
                    r = r + wd * self.proj(p, P, side)
                m = st.setdefault("m", torch.zeros_like(r))
                v = st.setdefault("v", torch.zeros_like(r))
                m.mul_(b1).add_(r, alpha=1 - b1)
                v.mul_(b2).addcmul_(r, r, value=1 - b2)
                mhat = m / (1 - b1**t)
                vhat = v / (1 - b2**t)
                n_ = mhat / (vhat.sqrt() + grp["eps"])
                if self.rule == "adamw":
                    p.mul_(1 - lr * wd)
                p.add_(self.back(n_, P, side), alpha=-lr * self.scale)
            elif self.rule == "sgd":
                mom, damp, nest = grp["momentum"], grp["dampening"], grp["nesterov"]
                if wd:
                    r = r + wd * self.proj(p, P, side)
                if mom:
                    if "buf" not in st:
                        st["buf"] = r.clone()
                    else:
                        st["buf"].mul_(mom).add_(r, alpha=1 - damp)
                    d = r + mom * st["buf"] if nest else st["buf"]
                else:
                    d = r
                p.add_(self.back(d, P, side), alpha=-lr * self.scale)
            elif self.rule == "lion":
                b1, b2 = grp["betas"]
                m = st.setdefault("m", torch.zeros_like(r))
                c = (b1 * m + (1 - b1) * r).sign()
                p.mul_(1 - lr * wd)
                p.add_(self.back(c, P, side), alpha=-lr * self.scale)
                m.mul_(b2).add_(r, alpha=1 - b2)
            else:  # pragma: no cover
                raise ValueError(self.rule)

    def zero_grad(self):
        self.opt.zero_grad()
