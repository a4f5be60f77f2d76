"""Sweep plots (PNG, matplotlib's Agg canvas, no pyplot state) and aligned text tables of result rows."""

from __future__ import annotations

from numbers import Number


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plot_sweep needs matplotlib ({err}): pip install matplotlib "
                          f"(or pip install 'zinfer[plot]')") from err
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: renders headless, leaves pyplot's backend alone
    return fig


def plot_sweep(rows: list[dict], x: str, y: str, out_png: str, ceiling: float | None = None,
               title: str = "", *, series: str | None = None) -> str:
    """Plot y against x for each row (one line per value of `series`), the ceiling as a dashed line."""
    missing = [i for i, row in enumerate(rows) if x not in row or y not in row]
    if not rows or missing:
        raise ValueError(f"plot_sweep needs rows with keys {x!r} and {y!r}; "
                         f"{'no rows given' if not rows else f'rows {missing} lack them'}")
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get(series) if series else None, []).append(row)
    fig = _figure()
    ax = fig.add_subplot()
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r[x])
        ax.plot([r[x] for r in group], [r[y] for r in group], marker="o",
                label=f"{series}={label}" if series else y)
    if ceiling is not None:
        ax.axhline(ceiling, linestyle="--", color="gray", label=f"ceiling {ceiling:.4g}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, format="png")
    return out_png


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 0.01 else f"{value:,.2f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as an aligned text table: a header, a rule, numbers right-aligned, missing cells "-"."""
    columns = list(columns) if columns is not None else list(rows[0]) if rows else []
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), Number) or row.get(c) is None for row in rows) for c in columns]

    def line(values):
        parts = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line("-" * w for w in widths)] + [line(r) for r in cells])
