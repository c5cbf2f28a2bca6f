"""Worker for tests/test_checkpoint.py: one training run in its own interpreter.

    python ckpt_worker.py OPTIONS_JSON OUT_DIR full     # steps 1..15, checkpoint after step 7
    python ckpt_worker.py OPTIONS_JSON OUT_DIR resume   # fresh model, load the checkpoint, 8..15

Both write the final parameters (and the projectors the backend ends with, and the bytes it
stores for them) to OUT_DIR/<mode>.pt. The model starts from seed 0 in both
modes, so the resumed run only gets step 7's weights and optimizer state from the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from models import mlp_batch
from models import mlp_loss
from models import wide_mlp

SAVE_AT, LAST = 7, 15


def main() -> None:
    options, out, mode = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    model = wide_mlp()
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if n.startswith("0.")], "lr": 3e-3},
            {
                "params": [p for n, p in model.named_parameters() if not n.startswith("0.")],
                "weight_decay": 0.1,
            },
        ],
        lr=1e-2,
    )

    def step(batch):
        loss = mlp_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    # No `import lowrank_compile`: the entry point provides the backend, as in a user's script.
    cstep = torch.compile(step, backend="lowrank", options=options)
    first = 1
    if mode == "resume":
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        first = SAVE_AT + 1
    for i in range(first, LAST + 1):
        cstep(mlp_batch(i))
        if mode == "full" and i == SAVE_AT:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / "ckpt.pt")
    from lowrank_compile.runtime.state import lookup  # only to report what was taken over

    kinds, projectors, projector_bytes = {}, {}, {}
    for n, p in model.named_parameters():
        st = lookup(p)
        if st is not None and st.proj is not None:
            projectors[n] = st.proj.projector().clone()
            projector_bytes[n] = st.owned_bytes()["projectors"]
        if st is not None and st.ostate:
            kinds[n] = (
                ("projected" if st.proj is not None else "full")
                + "/"
                + "+".join(type(v).__name__ for v in st.ostate.values())
                + "".join(f"+{k}" for k in st.mstate)  # a method's own states (Fira, APOLLO)
            )
    torch.save(
        {
            "params": {n: p.detach() for n, p in model.named_parameters()},
            "kinds": kinds,
            "projectors": projectors,
            "projector_bytes": projector_bytes,
        },
        out / f"{mode}.pt",
    )


if __name__ == "__main__":
    main()
