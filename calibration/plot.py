"""``sensitivity.png``: predicted KLD increase by layer and tensor kind (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..formats import get_format


def reference_type(cands: dict[str, Any]) -> str | None:
    """The GGUF candidate nearest 4.5 bits per weight (``q4_k``/``iq4_xs`` on wide rows, ``q4_0``/``iq4_nl`` else)."""
    gguf = [t for t in cands if t not in ("f16", "nf4")]
    if not gguf:
        return None
    return min(gguf, key=lambda t: (abs(get_format(t).bits_per_weight - 4.5), t))


def low_bit_type(cands: dict[str, Any]) -> str | None:
    """The GGUF candidate nearest 2 bits per weight among those below 3 (``iq2_xxs`` when offered), else None."""
    low = [t for t in cands if t not in ("f16", "nf4") and get_format(t).bits_per_weight < 3.0]
    return min(low, key=lambda t: (abs(get_format(t).bits_per_weight - 2.0), t)) if low else None


def plot_sensitivity(table: dict[str, Any], path: str | Path) -> Path:
    """Heat maps (kind x layer) of log10 predicted KLD: at the ~4.5 bpw GGUF type, the ~2 bpw one (the i-quants,
    where offered) and nf4; measured
    cells are dotted. Non-layer tensors (embedding, output) are listed in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tensors = table["tensors"]
    layers = sorted({e["layer"] for e in tensors.values() if e["layer"] is not None})
    kinds = sorted({e["kind"] for e in tensors.values() if e["layer"] is not None})
    panels = [("~4.5 bpw GGUF type", reference_type), ("~2 bpw GGUF type", low_bit_type),
              ("nf4", lambda c: "nf4" if "nf4" in c else None)]
    panels = [p for p in panels if any(p[1](e["candidates"]) for e in tensors.values() if e["layer"] is not None)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.3 * len(layers) + 2), 2.2 + 2.0 * len(panels)),
                             squeeze=False)
    for ax, (title, pick) in zip(axes[:, 0], panels, strict=True):
        grid = np.full((len(kinds), len(layers)), np.nan)
        for e in tensors.values():
            if e["layer"] is None:
                continue
            t = pick(e["candidates"])
            if t is None:
                continue
            rec = e["candidates"][t]
            v = rec.get("predicted_kld")
            r, c = kinds.index(e["kind"]), layers.index(e["layer"])
            if v is not None and v > 0:
                grid[r, c] = math.log10(v)
            if rec.get("measured_kld") is not None:
                ax.plot(c, r, "k.", markersize=3)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set_xlabel("layer")
        ax.set_title(f"log10 predicted KLD increase, tensor alone at {title} (dots: measured)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    extra = []
    for name, e in tensors.items():
        if e["layer"] is None:
            t = reference_type(e["candidates"])
            v = e["candidates"].get(t, {}).get("predicted_kld") if t else None
            if v is not None:
                extra.append(f"{name} @ {t}: {v:.2e}")
    if extra:
        fig.suptitle("; ".join(extra), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out
