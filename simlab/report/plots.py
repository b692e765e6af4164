"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no display).

Figures are created as :class:`~matplotlib.figure.Figure` objects and rendered to PNG by the Agg
renderer that ``savefig`` picks for the format, so importing this module never changes the
process's matplotlib backend.

Every function takes plain data (lists and dicts read from a run directory) and returns a
:class:`matplotlib.figure.Figure`; :func:`png_bytes` renders it. Choices:

* Accuracy matrices share one colour scale, Dice 0..1 (viridis), so arms and hospitals can be
  compared by colour; each cell is annotated with its value; the untrained model's scores ``b``
  (round 0) sit above ``R`` as a separate row, since FWT reads them.
* Dice over rounds: one panel per hospital (its own stream's domains) plus one for the federation
  (mean over hospitals, every evaluated domain); colour = domain (the same in every panel),
  line style = arm. True domain boundaries are dashed vertical lines half a round before the first
  round of the new domain, labelled along the line with the domain; a gradual transition is shaded
  from its ``start`` round (still pure old domain) to its ``end`` round (pure new domain), the span
  over which the drift schedule ramps linearly.
* Cost: bytes per round (down solid, up dashed) and wall time per round; evaluated rounds are
  drawn with filled markers, because evaluation is what makes their wall time jump.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

__all__ = ["cost_figure", "dice_figure", "png_bytes", "pool_figure", "r_matrix_figure", "routing_figure"]

LINESTYLES = ["-", "--", ":", "-."]
ARM_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
DOMAIN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"]


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def arm_style(i: int) -> dict:
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)]}


def domain_colors(domains: Sequence[str]) -> dict[str, str]:
    return {d: DOMAIN_COLORS[i % len(DOMAIN_COLORS)] for i, d in enumerate(domains)}


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


# --------------------------------------------------------------------------- accuracy matrices
def _draw_matrix(ax, block: dict, title: str) -> object:
    import numpy as np

    stages = block["stages"]
    n = len(stages)
    R = [[math.nan if v is None else float(v) for v in row] for row in block["R"]]
    b = [math.nan if v is None else float(v) for v in block.get("b", [None] * n)]
    M = np.array([b, *R], dtype=float)
    masked = np.ma.masked_invalid(M)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    size = 9 if n <= 4 else 8 if n <= 6 else 6
    for i in range(n + 1):
        for j in range(n):
            v = M[i, j]
            txt = "n/a" if not math.isfinite(v) else f"{v:.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=size,
                    color="black" if (math.isfinite(v) and v > 0.55) or not math.isfinite(v) else "white")
    ax.axhline(0.5, color="white", linewidth=3)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{j + 1}: {s['domain']}" for j, s in enumerate(stages)], rotation=30, ha="right",
                       fontsize=8)
    ax.set_yticks(range(n + 1))
    ax.set_yticklabels(["untrained (r0)"] + [f"{i + 1}: {s['domain']}@r{s['last_round']}" for i, s in enumerate(stages)],
                       fontsize=8)
    ax.set_xlabel("evaluated on\n(stage j's domain test set)", fontsize=9)
    ax.set_ylabel("after stage i (domain@round)", fontsize=9)
    metrics = f"ACC {_fmt(block.get('acc'))}  BWT {_fmt(block.get('bwt'), True)}  FWT {_fmt(block.get('fwt'), True)}"
    ax.set_title(f"{title}\n{metrics}", fontsize=8.5)
    return im


def r_matrix_figure(panels: Sequence[tuple[str, dict]], suptitle: str, ncols: int | None = None) -> Figure:
    """Heatmaps of accuracy matrices, one panel per (title, block); block = summary's R/b/stages dict.

    Default layout: one row for up to 3 panels, 2 x 2 for 4, rows of 3 beyond.
    """
    n_panels = len(panels)
    if ncols is None:
        ncols = n_panels if n_panels <= 3 else 2 if n_panels == 4 else 3
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    size = max(len(block["stages"]) for _, block in panels)
    cell = 0.62 if size <= 3 else 0.55
    w = 2.1 + cell * size  # y tick labels + cells
    h = 1.9 + cell * 0.8 * (size + 1)  # title + cells + rotated x tick labels
    # a panel is at least 4.4 in wide: its two-line title (arm, ACC/BWT/FWT) must fit over the cells
    fig = Figure(figsize=(max(w, 4.4) * ncols + 0.9, h * nrows + 0.4), layout="constrained")
    # the colour bar gets its own narrow grid column, so it never sits on a panel's title or labels
    gs = fig.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [0.05])
    im = None
    for k, (title, block) in enumerate(panels):
        im = _draw_matrix(fig.add_subplot(gs[k // ncols, k % ncols]), block, title)
    if im is not None:
        fig.colorbar(im, cax=fig.add_subplot(gs[:, ncols]), label="Dice")
    fig.suptitle(suptitle, fontsize=11)
    return fig


# ------------------------------------------------------------------------------- Dice over rounds
def _boundaries(ax, stages: Sequence[dict], spans: Sequence[tuple[int, int]]) -> list[str]:
    """Dashed lines where a new domain starts, labelled along the line; shaded gradual transitions.

    Returns the domains present from round 1 (named in the panel title instead of on a line).
    """
    for lo, hi in spans:
        ax.axvspan(lo, hi, color="#999999", alpha=0.15, linewidth=0)
        ax.text((lo + hi) / 2, 0.015, "gradual transition", ha="center", va="bottom", fontsize=7,
                color="#555555", transform=ax.get_xaxis_transform())
    labels: dict[float, list[str]] = {}
    for s in stages:
        labels.setdefault(s["first_round"] - 0.5, [])
        if s["domain"] not in labels[s["first_round"] - 0.5]:
            labels[s["first_round"] - 0.5].append(s["domain"])
    initial: list[str] = []
    for x, names in sorted(labels.items()):
        if x <= 0.5:
            initial += names
            continue
        ax.axvline(x, color="#444444", linestyle="--", linewidth=1)
        ax.text(x - 0.06, 0.985, "→ " + " + ".join(names), ha="right", va="top", fontsize=7, color="#222222",
                rotation=90, transform=ax.get_xaxis_transform())
    return initial


def dice_figure(panels: Sequence[dict], arms: Sequence[str], domain_order: Sequence[str], rounds: int,
                ncols: int = 2) -> Figure:
    """Dice over rounds.

    ``panels``: dicts with ``title``, ``series`` {(arm, domain): [(round, dice), ...]}, ``stages``
    (list of {domain, first_round, last_round}) and ``spans`` [(start, end)] of gradual transitions.
    """
    colors = domain_colors(domain_order)
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.6 * ncols, 3.6 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, p in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for (arm, dom), pts in p["series"].items():
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, [math.nan if y is None else y for y in ys], color=colors.get(dom, "black"),
                    marker="o", markersize=3, linewidth=1.5, **arm_style(list(arms).index(arm)))
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(-0.5, rounds + 0.5)
        initial = _boundaries(ax, p["stages"], p.get("spans", []))
        ax.set_xlabel("round (0 = untrained model)")
        ax.set_ylabel("Dice (mean of foreground classes)")
        start = f"\nfrom round 1: {', '.join(initial)}" if initial else ""
        ax.set_title(p["title"] + start, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    from matplotlib.lines import Line2D

    used = [d for d in domain_order if any(dom == d for p in panels for (_, dom) in p["series"])]
    handles = [Line2D([], [], color=colors[d], linewidth=2, label=d) for d in used]
    handles += [Line2D([], [], color="black", label=f"arm {a}", **arm_style(i)) for i, a in enumerate(arms)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
               title="colour: test domain; line style: arm", title_fontsize=8)
    return fig


# ------------------------------------------------------------------------------ pool and routing
def pool_figure(pool: dict[str, list[tuple[int, float]]], forks: dict[str, list[tuple[int, str, float]]],
                arms: Sequence[str], rounds: int) -> Figure:
    """Pool size K per round (steps) per arm; fork events as triangles labelled with the hospital."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    kmax = 1.0
    for i, arm in enumerate(arms):
        pts = sorted(pool.get(arm, []))
        color = ARM_COLORS[i % len(ARM_COLORS)]
        if pts:
            xs, ys = zip(*pts)
            ax.step(xs, ys, where="post", color=color, label=f"{arm}: pool size", **arm_style(i))
            kmax = max(kmax, max(ys))
            size_at = dict(pts)
        else:
            size_at = {}
        for t, hospital, member in forks.get(arm, []):
            y = size_at.get(t, member + 1)
            ax.plot([t], [y], marker="^", color=color, markersize=8, linestyle="none")
            ax.annotate(f"{hospital}→#{int(member)}", (t, y), textcoords="offset points", xytext=(4, 6), fontsize=7,
                        color=color)
    if any(forks.get(a) for a in arms):
        from matplotlib.lines import Line2D

        extra = [Line2D([], [], marker="^", color="gray", linestyle="none", label="fork (hospital→new member)")]
    else:
        extra = []
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + extra, fontsize=8, loc="upper left")
    ax.set_xlim(-0.5, rounds + 0.5)
    ax.set_ylim(0, kmax + 1)
    ax.set_xlabel("round")
    ax.set_ylabel("models in the pool (K)")
    ax.set_title("model pool size over rounds, with fork events", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    return fig


def routing_figure(purity: dict[tuple[str, str], list[tuple[int, float]]], arms: Sequence[str],
                   domain_order: Sequence[str], rounds: int) -> Figure:
    """Routing purity per test domain over rounds (colour = domain, line style = arm)."""
    colors = domain_colors(domain_order)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    for (arm, dom), pts in purity.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, color=colors.get(dom, "black"), marker="o", markersize=3,
                label=f"{dom} ({arm})", **arm_style(list(arms).index(arm)))
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, rounds + 0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("routing purity (share of a domain's\ntest images sent to its majority member)")
    ax.set_title("routing purity per test domain", fontsize=10, loc="left")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------ cost
def cost_figure(costs: dict[str, list[dict]], arms: Sequence[str], rounds: int) -> Figure:
    """Bytes per round (down, up, amplitude bank if any) and wall time per round, one colour per arm."""
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_b, ax_t = fig.subplots(1, 2)
    for i, arm in enumerate(arms):
        rows = sorted(costs.get(arm, []), key=lambda c: c["round"])
        color = ARM_COLORS[i % len(ARM_COLORS)]
        traffic = [c for c in rows if "bytes_down" in c or "bytes_up" in c]
        if traffic:
            xs = [c["round"] for c in traffic]
            ax_b.plot(xs, [c.get("bytes_down", 0) / 1e6 for c in traffic], color=color, linestyle="-",
                      marker=".", label=f"{arm}: down")
            ax_b.plot(xs, [c.get("bytes_up", 0) / 1e6 for c in traffic], color=color, linestyle="--",
                      marker=".", label=f"{arm}: up")
            if any(c.get("bytes_bank") for c in traffic):
                ax_b.plot(xs, [c.get("bytes_bank", 0) / 1e6 for c in traffic], color=color, linestyle=":",
                          label=f"{arm}: amplitude bank")
        timed = [c for c in rows if c.get("wall_time_s") is not None]
        if timed:
            ax_t.plot([c["round"] for c in timed], [c["wall_time_s"] for c in timed], color=color,
                      label=arm, **arm_style(i))
            ev = [c for c in timed if c.get("evaluated")]
            ax_t.plot([c["round"] for c in ev], [c["wall_time_s"] for c in ev], color=color, marker="o",
                      linestyle="none", markersize=5)
            nev = [c for c in timed if not c.get("evaluated")]
            ax_t.plot([c["round"] for c in nev], [c["wall_time_s"] for c in nev], color=color, marker="o",
                      markerfacecolor="white", linestyle="none", markersize=5)
    for ax in (ax_b, ax_t):
        ax.set_xlim(-0.5, rounds + 0.5)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        top = max((max(line.get_ydata(), default=0.0) for line in ax.lines), default=0.0)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)  # room above the highest marker
    ax_b.set_ylabel("MB per round")
    ax_b.set_title("bytes sent per round (down: server→hospitals, up: replies)", fontsize=10, loc="left")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("wall time per round (filled marker: round with evaluation)", fontsize=10, loc="left")
    if ax_b.lines:
        ax_b.legend(fontsize=7, loc="best", ncol=2 if len(arms) > 2 else 1)
    if ax_t.lines:
        ax_t.legend(fontsize=7, loc="best")
    return fig
