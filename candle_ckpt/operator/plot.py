"""`candle-ckpt plot`: metric curves over epochs from the history, as text or a picture.

The live timeline is drawn as a line (text: `*`), each abandoned timeline apart
(text: `x`), with `last`, `best`, saved epochs and the epochs runs resumed from after a
kill or a rollback marked. The picture needs matplotlib (the optional extra `plot`),
imported only when a picture is asked for; the text chart needs nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import CheckpointError
from ..core.format.timelines import EpochRecord, History

TEXT_WIDTH = 72
TEXT_HEIGHT = 16


@dataclass(frozen=True)
class Marks:
    """What the chart marks besides the curves."""

    last: int | None
    best: int | None
    saved: list[int]
    rewinds: list[int]


def chosen_metrics(
    history: History, requested: Sequence[str] | None, tracked: str | None
) -> list[str]:
    """The metrics to draw: `requested`, else `tracked` when recorded, else the first.

    Raises:
        CheckpointError: the history records no epoch, or a requested metric is
            recorded by no epoch (the message lists those that are).
    """
    names = history.metric_names
    if not history.epochs:
        raise CheckpointError(
            f"'{history.path}' records no epoch (a tree written before "
            f"format 2, or no epoch has completed); nothing to plot"
        )
    if not requested:
        return [tracked if tracked in names else names[0]] if names else []
    missing = [name for name in requested if name not in names]
    if missing:
        raise CheckpointError(
            f"--metric {', '.join(map(repr, missing))}: no epoch in "
            f"'{history.path}' records it; recorded metrics: "
            f"{', '.join(names) or 'none'}"
        )
    return list(requested)


def _points(records: list[EpochRecord], metric: str) -> list[tuple[int, float]]:
    return [
        (r.epoch, value)
        for r in records
        if (value := r.metrics.get(metric)) is not None and math.isfinite(value)
    ]


def _abandoned_timelines(history: History) -> list[list[EpochRecord]]:
    """The abandoned epochs and those after `last`, grouped by run, in file order."""
    groups: dict[str, list[EpochRecord]] = {}
    for record in history.epochs:
        if record.abandoned or record.after_last:
            groups.setdefault(record.run_id, []).append(record)
    return list(groups.values())


def text_chart(
    history: History, metric: str, marks: Marks, width: int = TEXT_WIDTH, height: int = TEXT_HEIGHT
) -> list[str]:
    """The lines of a text chart of `metric` over epochs (see the module docstring)."""
    live = _points(history.live, metric)
    abandoned = [p for group in _abandoned_timelines(history) for p in _points(group, metric)]
    every = live + abandoned
    if not every:
        return [f"{metric}: no finite value recorded"]
    first = min(e for e, _ in every)
    last = max(e for e, _ in every)
    low = min(v for _, v in every)
    high = max(v for _, v in every)
    span = last - first
    # Few epochs are spread over the width; many share columns.
    step = max(1, (width - 1) // span) if 0 < span < width else 1
    columns = span * step + 1 if span < width else width

    def column(epoch: int) -> int:
        if span < width:
            return (epoch - first) * step
        return (epoch - first) * (columns - 1) // span

    def row(value: float) -> int:
        return 0 if high == low else round((high - value) * (height - 1) / (high - low))

    grid = [[" "] * columns for _ in range(height)]
    for epoch, value in abandoned:
        grid[row(value)][column(epoch)] = "x"
    for epoch, value in live:
        grid[row(value)][column(epoch)] = "*"
    marker_row = [" "] * columns
    for epochs, symbol in (
        (marks.saved, "s"),
        (marks.rewinds, "R"),
        ([marks.best] if marks.best else [], "B"),
        ([marks.last] if marks.last else [], "L"),
    ):
        for epoch in epochs:
            if first <= epoch <= last:
                marker_row[column(epoch)] = symbol
    labels = {
        0: f"{high:.6g}",
        height - 1: f"{low:.6g}",
        (height - 1) // 2: f"{(high + low) / 2:.6g}",
    }
    margin = max(map(len, labels.values()))
    lines = [f"{metric} over epochs {first}-{last} ({len(live)} live, {len(abandoned)} abandoned)"]
    lines += [
        f"{labels.get(i, ''):>{margin}} |{''.join(cells)}".rstrip() for i, cells in enumerate(grid)
    ]
    lines.append(f"{'':>{margin}} +{'-' * columns}")
    lines.append(f"{'':>{margin}}  {''.join(marker_row)}".rstrip())
    lines.append(f"{'':>{margin}}  {first:<{max(columns - len(str(last)), 1)}}{last}")
    lines.append(
        "* live timeline   x abandoned (after a restart or rollback) or after "
        "last   s saved   R resumed from   B best   L last"
    )
    return lines


def write_picture(history: History, metrics: list[str], marks: Marks, out: str) -> None:
    """Draw `metrics` into `out` (.png or .svg) with matplotlib.

    Raises:
        CheckpointError: matplotlib is not installed, or `out` has another suffix.
    """
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".png", ".svg"):
        raise CheckpointError(
            f"--out {out!r}: the suffix is {suffix or 'missing'}; expected .png or .svg"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise CheckpointError(
            "--out needs matplotlib, which is not installed: "
            "pip install 'candle_ckpt[plot]' (or omit --out for a "
            "text chart)"
        ) from None
    figure, axes = pyplot.subplots(
        len(metrics), 1, squeeze=False, sharex=True, figsize=(9, 3 * len(metrics))
    )
    for axis, metric in zip(axes[:, 0], metrics):
        for group in _abandoned_timelines(history):
            points = _points(group, metric)
            if points:
                axis.plot(*zip(*points), color="0.6", linestyle="--", linewidth=1)
        live = _points(history.live, metric)
        if live:
            axis.plot(*zip(*live), color="C0", linewidth=1.5, label=f"{metric} (live)")
            values = dict(live)
            saved = [(e, values[e]) for e in marks.saved if e in values]
            if saved:
                axis.plot(*zip(*saved), "o", color="C0", markersize=3, label="saved")
        for epoch in marks.rewinds:
            axis.axvline(epoch, color="C3", linestyle=":", linewidth=1)
        if marks.best is not None:
            axis.axvline(marks.best, color="C2", linewidth=1, label=f"best ({marks.best})")
        if marks.last is not None:
            axis.axvline(marks.last, color="C1", linewidth=1, label=f"last ({marks.last})")
        axis.set_ylabel(metric)
        axis.legend(fontsize="small")
    axes[-1, 0].set_xlabel(
        "epoch (dotted: resumed from, after a kill or rollback; dashed grey: abandoned)"
    )
    figure.tight_layout()
    figure.savefig(out)
    pyplot.close(figure)
