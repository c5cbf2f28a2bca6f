"""`lowrank-compile`: see what the backend plans and rewrites.

    lowrank-compile options [--markdown]
    lowrank-compile inspect SCRIPT [--steps N] [--json] [--html REPORT.html] [--png TIMELINE.png]
                            [-- SCRIPT-ARGS...]
    lowrank-compile estimate [--model llama-60m|130m|350m|1b|7b|all|CONFIG.json] [--rank R]
                             [--state-bits B] [--projector P] [--projector-bits B]
                             [--options JSON] [--dtype fp32|bf16] [--batch B] [--seq S] [--json]

Arguments after `--` are passed to SCRIPT.

`inspect` runs a training script that uses `backend="lowrank"` and stops it after N optimizer
steps. It then prints the graphs Dynamo captured (and its graph breaks), the per-parameter plan,
the memory plan by category, the memory timeline of the last step (bytes live, from the
profiler's allocation events), and the backward graph before and after each pass; every node a
pass created is marked with the pass's name. `--html` writes all of it as one page, with the
timeline plot embedded; `--png` writes the plot.

`estimate` prints training memory by category for eager AdamW (fp32, bf16), 8-bit AdamW,
galore_torch, GaLore per-layer, Q-GaLore and APOLLO as their papers count it, and lowrank
(weights in `--dtype`), computed on fake tensors (nothing is allocated).
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


def _run_script(
    script: str, script_args: Sequence[str], steps: int, timeline: bool = False
) -> dict[str, Any]:
    """Run `script` as __main__ until `steps` optimizer steps have completed.

    Returns the steps seen and, with `timeline`, the live bytes over the last step: the script
    runs under the profiler (allocation events) and the step boundaries are the times of the
    optimizer-step post hooks.
    """
    import contextlib
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = 0
    marks: list[int] = []

    def stop_after(opt: Any, args: Any, kwargs: Any) -> None:
        nonlocal seen
        seen += 1
        marks.append(time.time_ns())
        if seen >= steps:
            raise _StopInspection

    handle = register_optimizer_step_post_hook(stop_after)
    old_argv = sys.argv
    sys.argv = [script, *script_args]
    prof: Any = None
    if timeline:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with prof if prof is not None else contextlib.nullcontext():
            runpy.run_path(script, run_name="__main__")
    except _StopInspection:
        pass
    finally:
        sys.argv = old_argv
        handle.remove()
    out: dict[str, Any] = {"steps": seen, "timeline": None}
    if prof is not None:
        out["timeline"] = _timeline(prof, marks)
    return out


def _timeline(prof: Any, marks: list[int]) -> dict[str, Any]:
    """Live bytes at each allocation event of the last step (times in ms from its start)."""
    from lowrank_compile._compat import allocation_events

    mem = allocation_events(prof)
    start = marks[-2] if len(marks) >= 2 else (mem[0][0] if mem else 0)
    end = marks[-1] if marks else (mem[-1][0] if mem else 0)
    live, times, values, before = 0, [], [], 0
    for t, b in mem:
        if t < start:
            before = live = live + b
            continue
        if t > end:
            break
        live += b
        times.append((t - start) / 1e6)
        values.append(live)
    return {"ms": times, "bytes": values, "start_bytes": before, "peak_bytes": max(values, default=before)}


def timeline_png(timeline: dict[str, Any], path: str, memory: dict[str, Any] | None = None) -> None:
    """Plot the step's live bytes (and the memory plan's persistent categories) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    mb = 2**20
    ax.step(timeline["ms"], [b / mb for b in timeline["bytes"]], where="post", label="live bytes (allocator)")
    if memory:
        base = 0.0
        for key in ("weights", "optimizer_states", "projectors", "gradients", "buffers"):
            if memory.get(key):
                base += memory[key] / mb
                ax.axhline(base, ls="--", lw=0.8, color="gray")
                ax.text(0, base, f" + {key.replace('_', ' ')}", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("ms since the previous optimizer step")
    ax.set_ylabel("MiB live")
    ax.set_title(f"memory timeline of one training step (peak {timeline['peak_bytes'] / mb:.1f} MiB)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect_report(steps_run: int, timeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the backends recorded so far, as plain data."""
    from torch._dynamo.utils import counters

    import lowrank_compile
    from lowrank_compile.backend import all_backends
    from lowrank_compile.memory import explain

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
                    "backward_variant_calls": dict(g.variant_calls),
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
    from lowrank_compile.backend import all_bindings

    retraces = [
        {"optimizer": type(b.opt).__name__, **r}
        for b in all_bindings()
        if b._opt_ref() is not None
        for r in b.retraces
    ]
    plan = lowrank_compile.current_plan()
    ours, eager = plan.state_bytes()
    return {
        "optimizer_steps": steps_run,
        "graphs": graphs,
        "graph_breaks": {k.splitlines()[0]: v for k, v in counters["graph_break"].items()},
        "hyper_parameter_retraces": retraces,
        "plan": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "kind": p.kind.value,
                "method": p.method,
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
        "memory": explain().as_dict(),
        "timeline": timeline,
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
    retraces = rep.get("hyper_parameter_retraces") or []
    if retraces:
        print(f"== {len(retraces)} update recompile(s) caused by hyper-parameter changes")
        for r in retraces:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in r["changes"])
            print(f"  {r['optimizer']} group {r['group']} before update {r['update']}: {what}")
    else:
        print("== no update recompiles caused by hyper-parameter changes")
    if rep["graph_breaks"]:
        print("== graph breaks")
        for reason, n in rep["graph_breaks"].items():
            print(f"  {n} x {reason}")
    print("== per-parameter plan")
    print(rep["plan_table"])
    print("== memory plan (bytes; activations are not traced by inspect)")
    for key, value in rep["memory"].items():
        if key != "method":
            print(f"  {key:20s} {value:>14,}")
    tl = rep.get("timeline")
    if tl:
        print(
            f"== memory timeline of step {rep['optimizer_steps']}: {len(tl['ms'])} allocation events, "
            f"{tl['start_bytes']:,} B live at its start, peak {tl['peak_bytes']:,} B"
        )
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
    ins.add_argument("--html", metavar="REPORT.html", help="also write the report as one HTML page")
    ins.add_argument("--png", metavar="TIMELINE.png", help="also write the memory timeline plot")
    est = sub.add_parser("estimate", help="training memory by category, on fake tensors")
    est.add_argument(
        "--model",
        default="all",
        help="llama-60m|llama-130m|llama-350m|llama-1b|llama-7b, all, or a CONFIG.json",
    )
    est.add_argument("--rank", default=None, help="lowrank rank: int, fraction, or none (default: 0.25)")
    est.add_argument("--state-bits", type=int, default=None, help="lowrank state bits: 32 or 8 (default 8)")
    est.add_argument(
        "--projector", default=None, help="lowrank projector (svd, randomized, dct, sparse, gaussian)"
    )
    est.add_argument(
        "--projector-bits", type=int, default=None, help="lowrank projector_bits: 32, 16, 8 or 4"
    )
    est.add_argument(
        "--options", default=None, help="further lowrank options as JSON, e.g. '{\"clip_sketch\": 0}'"
    )
    est.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16"), help="weights of the per-method rows"
    )
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=256)
    est.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def _rank_arg(text: str | None) -> Any:
    if text is None:
        return None
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _estimate(args: argparse.Namespace) -> int:
    from lowrank_compile.memory import MODELS
    from lowrank_compile.memory import estimate
    from lowrank_compile.memory import estimate_table

    options: dict[str, Any] = {}
    rank = _rank_arg(args.rank)
    if rank is not None:
        options["rank"] = None if rank == "none" else rank
    if args.state_bits is not None:
        options["state_bits"] = args.state_bits
    if args.projector is not None:
        options["projector"] = args.projector
    if args.projector_bits is not None:
        options["projector_bits"] = args.projector_bits
    if args.options:
        extra = json.loads(args.options)
        if not isinstance(extra, dict):
            raise SystemExit(f"--options must be a JSON object, got {args.options!r}")
        options.update(extra)
    models = list(MODELS) if args.model == "all" else [args.model]
    out: dict[str, Any] = {}
    for m in models:
        rows = estimate(m, batch=args.batch, seq=args.seq, options=options, dtype=args.dtype)
        out[m] = [r.as_dict() for r in rows]
        if not args.json:
            print(estimate_table(rows, f"{m}, batch {args.batch} x seq {args.seq}"))
            print()
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def html_report(rep: dict[str, Any], png: bytes | None) -> str:
    """The inspect report as one self-contained HTML page."""
    import base64
    import html

    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lowrank-compile inspect</title>",
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:.5em;"
        "overflow-x:auto;font-size:12px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px;font-size:13px}</style></head><body>",
        f"<h1>lowrank-compile inspect</h1><p>{rep['optimizer_steps']} optimizer step(s) run.</p>",
        "<h2>Graphs</h2><table><tr><th>graph</th><th>kind</th><th>inputs</th><th>parameters</th>"
        "<th>planned</th><th>backward</th></tr>",
    ]
    for g in rep["graphs"]:
        bw = "rewritten" if g["backward_rewritten"] else (g["fallback"] or "-")
        parts.append(
            f"<tr><td>{g['graph']}</td><td>{esc(g['kind'])}</td><td>{g['inputs']}</td>"
            f"<td>{g['parameters']}</td><td>{g['planned']}</td><td>{esc(str(bw))}</td></tr>"
        )
    parts.append("</table><h2>Graph breaks</h2>")
    if rep["graph_breaks"]:
        parts.append("<ul>" + "".join(f"<li>{n} x {esc(r)}</li>" for r, n in rep["graph_breaks"].items()))
        parts.append("</ul>")
    else:
        parts.append("<p>none</p>")
    parts.append(
        "<h2>Per-parameter plan</h2><table><tr><th>name</th><th>shape</th><th>kind</th><th>method</th>"
        "<th>rank</th><th>state bytes</th><th>eager AdamW-style bytes</th><th>reason</th></tr>"
    )
    for p in rep["plan"]:
        parts.append(
            f"<tr><td>{esc(p['name'])}</td><td>{'x'.join(map(str, p['shape']))}</td><td>{p['kind']}</td>"
            f"<td>{p.get('method') or '-'}</td><td>{p['rank'] if p['rank'] is not None else '-'}</td>"
            f"<td>{p['state_bytes']}</td>"
            f"<td>{p['eager_state_bytes']}</td><td>{esc(p['reason'])}</td></tr>"
        )
    parts.append("</table><h2>Memory plan</h2><table><tr><th>category</th><th>bytes</th></tr>")
    for key, value in rep["memory"].items():
        if key != "method":
            parts.append(f"<tr><td>{esc(key)}</td><td>{value:,}</td></tr>")
    parts.append("</table><h2>Memory timeline of the last step</h2>")
    if png is not None:
        parts.append(
            f"<img alt='memory timeline' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    else:
        parts.append("<p>not recorded</p>")
    parts.append("<h2>Passes</h2>")
    for g in rep["graphs"]:
        for p in g["passes"]:
            parts.append(
                f"<h3>graph {g['graph']}: pass {esc(p['name'])} ({p['rewrites']} rewrites, "
                f"{len(p['created'])} nodes created)</h3><h4>before</h4><pre>{esc(p['before'])}</pre>"
                f"<h4>after (# &lt;- marks the pass that created a node)</h4><pre>{esc(p['after'])}</pre>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


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
    if args.command == "estimate":
        return _estimate(args)
    if args.steps < 1:
        print("lowrank-compile inspect: --steps must be >= 1", file=sys.stderr)
        return 2
    want_timeline = bool(args.html or args.png)
    ran = _run_script(args.script, script_args, args.steps, timeline=want_timeline)
    rep = inspect_report(ran["steps"], ran["timeline"])
    png: bytes | None = None
    if want_timeline and rep["timeline"] and rep["timeline"]["ms"]:
        import os
        import tempfile

        path = args.png or os.path.join(tempfile.mkdtemp(), "timeline.png")
        timeline_png(rep["timeline"], path, rep["memory"])
        with open(path, "rb") as f:
            png = f.read()
    if args.html:
        with open(args.html, "w") as f:
            f.write(html_report(rep, png))
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        _print_report(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
