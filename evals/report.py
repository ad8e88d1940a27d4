"""Outputs of ``quantforge eval``: ``results.json``, a markdown table and a quality-vs-size PNG beside it.

All three are written atomically (temporary file, then rename); existing files are replaced only with ``force``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..io import atomic_file, check_output
from . import schema


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def task_keys(results: dict[str, Any]) -> list[str]:
    """``<task>_acc`` (or ``_acc_norm`` where only that exists) columns, in task order."""
    keys = []
    rows = [results["reference"], *results["artifacts"]]
    for task in results.get("tasks", {}):
        for suffix in ("_acc", "_acc_norm"):
            key = task + suffix
            if any(key in r["metrics"] for r in rows):
                keys.append(key)
                break
    return keys


def markdown_table(results: dict[str, Any]) -> str:
    """One row per artifact (reference first): size, bpw, PPL, KLD mean / median / p99, top-1, task accuracies."""
    acc = task_keys(results)
    head = ["artifact", "format", "type", "size (MiB)", "bpw", "PPL", "KLD mean", "KLD median", "KLD p99", "top-1 %"]
    head += [f"{k} %" for k in acc]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for i, art in enumerate([results["reference"], *results["artifacts"]]):
        m = art["metrics"]
        name = f"{art['name']} (reference)" if i == 0 else art["name"]
        cells = [
            name, art["format"], str(art.get("type") or "-"), _fmt(art["size_bytes"] / 2**20, ".1f"),
            _fmt(art["bpw"], ".2f"), _fmt(m.get("ppl"), ".4f"), _fmt(m.get("kld_mean"), ".6f"),
            _fmt(m.get("kld_median"), ".6f"), _fmt(m.get("kld_p99"), ".5f"),
            _fmt(None if m.get("top1") is None else 100 * m["top1"], ".2f"),
        ]
        for k in acc:
            v, err = m.get(k), m.get(k + "_stderr")
            cell = _fmt(None if v is None else 100 * v, ".2f")
            if err is not None and v is not None:
                cell += f" ± {100 * err:.2f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    lines.append("")
    lines.append(f"PPL/KLD: {s.get('text_name') or 'text'}, n_ctx {s['n_ctx']}, {s['n_chunks']} chunks, "
                 f"{results['reference']['metrics'].get('n_tokens', '?')} scored tokens, KLD base {s['kld_base']}"
                 + (f"; tasks: limit {s['limit']} per task, seed {results['seed']}" if acc else ""))
    gate = results.get("gate")
    if gate:
        lines.append("")
        lines.append(f"Gate against {gate.get('baseline')}: {'passed' if gate['passed'] else 'FAILED'}")
        for f in gate["failures"]:
            lines.append(f"- {f['artifact']} {f['metric']}: {f['value']} (baseline {f['baseline']}, "
                         f"limit {f['limit']})")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`figure` as a PNG."""
    figure(results).savefig(str(path), format="png")


def figure(results: dict[str, Any]) -> Any:
    """Quality against size: mean KLD (log scale) and PPL against size in plain MiB (no offset notation), one
    labelled point per artifact; labels of crowded points are moved apart and tied to their point by a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = [results["reference"], *results["artifacts"]]
    fig = Figure(figsize=(11, 4.8), dpi=110)
    canvas = FigureCanvasAgg(fig)
    panels = (("kld_mean", "mean KLD vs reference (nats)"), ("ppl", "perplexity"))
    axes = []
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        pts = [(r["size_bytes"] / 2**20, r["metrics"].get(key), r["name"]) for r in rows]
        pts = [(x, y, n) for x, y, n in pts if isinstance(y, (int, float)) and (key != "kld_mean" or y > 0)]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, color="tab:blue", zorder=3)
            xs = [p[0] for p in pts]
            pad = max((max(xs) - min(xs)) * 0.08, 1.0)
            ax.set_xlim(min(xs) - pad, max(xs) + pad * 2.5)
        if key == "kld_mean" and pts:
            ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if abs(v) >= 10 else f"{v:.3g}"))
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        axes.append((ax, pts))
    fig.suptitle(f"quality vs size (reference: {results['reference']['name']})", fontsize=10)
    fig.tight_layout()
    canvas.draw()
    for ax, pts in axes:
        _label_points(ax, pts)
    canvas.draw()
    return fig


LABEL_OFFSETS = ((5, 4), (5, -11), (-5, 4), (-5, -11), (5, 15), (-5, 15), (5, -22), (-5, -22))
"""Candidate label positions around a point (points, x then y); negative x puts the label on the left."""


def _label_points(ax: Any, pts: list[tuple[float, float, str]]) -> None:
    """Place each name at the first candidate offset whose box overlaps no placed label and no other point;
    when none is free, stack it below the others at the panel's right with a thin line to its point."""
    fontsize = 7
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0
    marks = [ax.transData.transform((x, y)) for x, y, _ in pts]
    taken: list[tuple[float, float, float, float]] = []
    stacked = 0
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1]))
    for i in order:
        x, y, name = pts[i]
        probe = ax.text(0, 0, name, fontsize=fontsize)
        ext = probe.get_window_extent(renderer=renderer)
        probe.remove()
        w, h = ext.width, ext.height
        px, py = marks[i]
        placed = None
        for dx, dy in LABEL_OFFSETS:
            x0 = px + dx * scale - (w if dx < 0 else 0)
            box = (x0, py + dy * scale, x0 + w, py + dy * scale + h)
            if not _overlaps(box, taken) and not _covers(box, marks, i) and _inside(box, ax):
                placed = (dx, dy, box)
                break
        if placed is not None:
            dx, dy, box = placed
            taken.append(box)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                        ha="right" if dx < 0 else "left")
            continue
        bbox = ax.get_window_extent(renderer=renderer)
        tx, ty = bbox.x1 - w - 4 * scale, bbox.y1 - (stacked + 1) * (h + 3 * scale)
        stacked += 1
        taken.append((tx, ty, tx + w, ty + h))
        ax.annotate(name, (x, y), xytext=(tx, ty), textcoords="figure pixels", fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6})


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def _covers(box: tuple[float, float, float, float], marks: list[Any], own: int) -> bool:
    r = 3.0
    return any(j != own and box[0] - r < mx < box[2] + r and box[1] - r < my < box[3] + r
               for j, (mx, my) in enumerate(marks))


def _inside(box: tuple[float, float, float, float], ax: Any) -> bool:
    b = ax.get_window_extent()
    return b.x0 <= box[0] and box[2] <= b.x1 and b.y0 <= box[1] and box[3] <= b.y1


def output_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``results.json`` -> (``results.json``, ``results.md``, ``results.png``)."""
    p = Path(out)
    return p, p.with_suffix(".md"), p.with_suffix(".png")


def write(results: dict[str, Any], out: str | os.PathLike[str], force: bool = False) -> tuple[Path, Path, Path]:
    """Validate and write the JSON, the markdown table and the PNG; refuse existing files unless ``force``."""
    schema.validate(results)
    paths = output_paths(out)
    for p in paths:
        check_output(p, force)
    json_path, md_path, png_path = paths
    with atomic_file(png_path, force=True) as tmp:
        plot(results, tmp)
    with atomic_file(md_path, force=True) as tmp:
        tmp.write_text(markdown_table(results), encoding="utf-8")
    with atomic_file(json_path, force=True) as tmp:
        tmp.write_text(schema.dumps(results), encoding="utf-8")
    return paths


def write_json(results: dict[str, Any], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Validate and write only the JSON document (the gate-only mode updates its input this way)."""
    schema.validate(results)
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(schema.dumps(results), encoding="utf-8")
    return Path(out)
