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


def sweep_figure(rows: list[dict], x: str, y: str, ceiling: float | str | None = None, title: str = "", *,
                 series: str | None = None, ceiling_label: str = ""):
    """The sweep's matplotlib Figure: y against x for each row, one line per value of `series`.

    `ceiling`, dashed and labelled "ceiling: ...": a number is one horizontal line; the name of a row key is each
    series' own ceiling at each x, in its colour (a throughput ceiling moves with the batch and lengths, so a
    horizontal rule would misstate it). `ceiling_label` adds what bounds it, e.g. "pcie bound".
    """
    per_row = isinstance(ceiling, str)
    keys = (x, y, ceiling) if per_row else (x, y)
    missing = [i for i, row in enumerate(rows) if any(k not in row for k in keys)]
    if not rows or missing:
        raise ValueError(f"plot_sweep needs rows with keys {', '.join(map(repr, keys))}; "
                         f"{'no rows given' if not rows else f'rows {missing} lack them'}")
    suffix = f" ({ceiling_label})" if ceiling_label else ""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get(series) if series else None, []).append(row)
    fig = _figure()
    ax = fig.add_subplot()
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r[x])
        xs, name = [r[x] for r in group], f"{series}={label}" if series else y
        (line,) = ax.plot(xs, [r[y] for r in group], marker="o", label=name)
        if per_row:
            ax.plot(xs, [r[ceiling] for r in group], linestyle="--", color=line.get_color(),
                    label=f"ceiling: {name}{suffix}")
    if ceiling is not None and not per_row:
        ax.axhline(ceiling, linestyle="--", color="gray", label=f"ceiling: {ceiling:.4g}{suffix}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sweep(rows: list[dict], x: str, y: str, out_png: str, ceiling: float | str | None = None,
               title: str = "", *, series: str | None = None, ceiling_label: str = "") -> str:
    """Write `sweep_figure(...)` to `out_png` and return the path."""
    fig = sweep_figure(rows, x, y, ceiling, title, series=series, ceiling_label=ceiling_label)
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
