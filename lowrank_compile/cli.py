"""`lowrank-compile`: see what the backend plans and rewrites.

    lowrank-compile options [--markdown]
    lowrank-compile inspect SCRIPT [--steps N] [--json] [-- SCRIPT-ARGS...]

Arguments after `--` are passed to SCRIPT.

`inspect` runs a training script that uses `backend="lowrank"` and stops it after N optimizer
steps. It then prints the graphs Dynamo captured (and its graph breaks), the per-parameter plan,
and the backward graph before and after each pass; every node a pass created is marked with
the pass's name.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from collections.abc import Sequence
from typing import Any

from lowrank_compile.config import OPTION_DOCS
from lowrank_compile.config import LowRankConfig

__all__ = ["get_arg_parser", "main", "options_table"]


def options_table(markdown: bool = False) -> str:
    """The documented options with their defaults, as text or a Markdown table."""
    defaults = LowRankConfig().as_dict()
    rows = [
        (name, repr(defaults[name]), accepted, meaning) for name, (accepted, meaning) in OPTION_DOCS.items()
    ]
    if markdown:
        lines = ["| option | default | accepted values | meaning |", "|---|---|---|---|"]
        lines += [f"| `{n}` | `{d}` | {a.replace('|', chr(92) + '|')} | {m} |" for n, d, a, m in rows]
        return "\n".join(lines)
    width = max(len(r[0]) for r in rows)
    return "\n".join(
        f"{n.ljust(width)}  default {d}\n{' ' * width}  accepts {a}\n{' ' * width}  {m}"
        for n, d, a, m in rows
    )


class _StopInspection(Exception):
    pass


def _run_script(script: str, script_args: Sequence[str], steps: int) -> int:
    """Run `script` as __main__ until `steps` optimizer steps have completed; return steps seen."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = 0

    def stop_after(opt: Any, args: Any, kwargs: Any) -> None:
        nonlocal seen
        seen += 1
        if seen >= steps:
            raise _StopInspection

    handle = register_optimizer_step_post_hook(stop_after)
    old_argv = sys.argv
    sys.argv = [script, *script_args]
    try:
        runpy.run_path(script, run_name="__main__")
    except _StopInspection:
        pass
    finally:
        sys.argv = old_argv
        handle.remove()
    return seen


def inspect_report(steps_run: int) -> dict[str, Any]:
    """Everything the backends recorded so far, as plain data."""
    from torch._dynamo.utils import counters

    import lowrank_compile
    from lowrank_compile.backend import all_backends

    graphs = []
    for be in all_backends():
        for g in be.graphs:
            graphs.append(
                {
                    "options": be.config.as_dict(),
                    "graph": g.index,
                    "kind": g.kind,
                    "inputs": g.num_inputs,
                    "parameters": len(g.param_indices),
                    "planned": len(g.planned),
                    "backward_rewritten": g.backward_compiled,
                    "fallback": g.fallback,
                    "passes": [
                        {
                            "name": p.name,
                            "rewrites": p.rewrites,
                            "created": p.created,
                            "before": p.before,
                            "after": p.after,
                        }
                        for p in g.passes
                    ],
                }
            )
    plan = lowrank_compile.current_plan()
    ours, eager = plan.state_bytes()
    return {
        "optimizer_steps": steps_run,
        "graphs": graphs,
        "graph_breaks": {k.splitlines()[0]: v for k, v in counters["graph_break"].items()},
        "plan": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "kind": p.kind.value,
                "rank": p.rank,
                "optimizer": p.optimizer,
                "group": p.group,
                "state_bytes": p.state_bytes,
                "eager_state_bytes": p.eager_state_bytes,
                "reason": p.reason,
            }
            for p in plan.params
        ],
        "state_bytes": {"plan": ours, "eager": eager},
        "plan_table": plan.table(),
    }


def _print_report(rep: dict[str, Any]) -> None:
    print(f"== ran {rep['optimizer_steps']} optimizer step(s)")
    print(f"== {len(rep['graphs'])} graph(s) compiled by the lowrank backend")
    for g in rep["graphs"]:
        if g["kind"] == "update":
            print(f"  graph {g['graph']}: optimizer update of taken-over parameters, {g['inputs']} inputs")
            continue
        if g["kind"] == "other":
            print(f"  graph {g['graph']}: {g['inputs']} inputs, no parameters (compiled by Inductor as is)")
            continue
        status = "backward rewritten" if g["backward_rewritten"] else (g["fallback"] or "no backward rewrite")
        sizes = f"{g['inputs']} inputs, {g['parameters']} parameters, {g['planned']} planned"
        print(f"  graph {g['graph']}: {sizes}; {status}")
    if rep["graph_breaks"]:
        print("== graph breaks")
        for reason, n in rep["graph_breaks"].items():
            print(f"  {n} x {reason}")
    print("== per-parameter plan")
    print(rep["plan_table"])
    for g in rep["graphs"]:
        for p in g["passes"]:
            what = f"{p['rewrites']} rewrites, {len(p['created'])} nodes created"
            print(f"== graph {g['graph']}: pass {p['name']} ({what})")
            print("-- before")
            print(p["before"])
            print("-- after (# <- marks the pass that created a node)")
            print(p["after"])


def get_arg_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    ap = argparse.ArgumentParser(
        prog="lowrank-compile", description="Inspect the lowrank torch.compile backend."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("options", help="print the backend's options and their defaults")
    opt.add_argument("--markdown", action="store_true", help="as a Markdown table")
    ins = sub.add_parser("inspect", help="run a training script and show the plan and rewritten graphs")
    ins.add_argument("script")
    ins.add_argument("--steps", type=int, default=2, help="stop after this many optimizer steps (default 2)")
    ins.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lowrank-compile` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` belongs to the inspected script.
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    args = get_arg_parser().parse_args(argv)
    if args.command == "options":
        print(options_table(markdown=args.markdown))
        return 0
    if args.steps < 1:
        print("lowrank-compile inspect: --steps must be >= 1", file=sys.stderr)
        return 2
    steps = _run_script(args.script, script_args, args.steps)
    rep = inspect_report(steps)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        _print_report(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
