"""What the benchmark prints and writes: Markdown tables (one or more per workload),
the results document with the machine facts, and the chart of ratios to HAProxy.

Formatting only: no measuring, no processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "",
                 "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns)))
                 + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the chart: a figure's ratio to HAProxy's (same worker count)."""

    group: str  # the figure, e.g. "short conn/s"
    series: str  # who, e.g. "dynproxy x1"
    ratio: float


@dataclass
class Section:
    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)  # key figures for the end


# --- numbers -------------------------------------------------------------------------


def num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def span(pair: tuple[float, float] | None, digits: int = 0) -> str:
    return "-" if pair is None else f"{num(pair[0], digits)}-{num(pair[1], digits)}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def workers_cell(workers: int | None) -> str:
    return "-" if workers is None else str(workers)


# --- the document --------------------------------------------------------------------


def document(facts: dict[str, str], method: list[str], sections: list[Section],
             notes: dict[str, str], command: str, chart_name: str | None,
             targets: Table | None = None) -> str:
    lines = ["# Benchmarks: dynproxy against HAProxy and nginx", "",
             f"Produced by `{command}` on {facts.get('date', '?')}. "
             "Every figure is the median of the repetitions, with min-max beside it; "
             "ratios compare medians taken in the same run, with the same number of "
             "workers/threads. Run it again with `tools/bench` (all workloads, about 20 "
             "minutes; `tools/bench --help` for the options).", "",
             "## Machine", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += ["", "## Method", ""] + [f"- {m}" for m in method]
    if notes:
        lines += ["- dynproxy processes seen: "
                  + "; ".join(f"{k}: {v}" for k, v in notes.items())]
    if chart_name:
        lines += ["", f"![ratios to HAProxy]({chart_name})"]
    if targets is not None:
        lines += ["", "## Targets", "", targets.markdown()]
    summary = {k: v for s in sections for k, v in s.summary.items()}
    if summary:
        lines += ["", "## Key figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary.items()]
    for section in sections:
        lines += ["", f"## ({section.key}) {section.title}", ""]
        lines += [table.markdown() for table in section.tables]
    return "\n".join(lines) + "\n"


COLORS = {"haproxy-splice": "#8c8c8c", "nginx": "#2ca02c", "dynproxy": "#1f77b4"}


def chart(bars: list[Bar], path: Path, title: str) -> None:
    """A grouped bar chart of ratios to HAProxy (1.0 = HAProxy), PNG via Agg. One colour
    per proxy; the first worker count pale, the next ones solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(b.group for b in bars))
    series = list(dict.fromkeys(b.series for b in bars))
    value = {(b.group, b.series): b.ratio for b in bars}
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups) + 3), 5.5))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [value.get((g, name), 0.0) for g in groups]
        proxy, _, workers = name.rpartition(" x")
        shown = ax.bar(xs, ys, width, label=name, color=COLORS.get(proxy, "#d62728"),
                       alpha=0.5 if workers == "1" else 1.0, edgecolor="black", linewidth=0.4)
        ax.bar_label(shown, [f"{y:.2f}" if y else "" for y in ys], fontsize=6, rotation=90,
                     padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("ratio to HAProxy, same workers/threads")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
