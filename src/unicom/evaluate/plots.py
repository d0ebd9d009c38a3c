"""The Recall@1-versus-dimension figure (the Unicom paper's Fig. 1a), as a PNG.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so it neither needs a
display nor changes pyplot's global backend in the caller's process.
"""

from __future__ import annotations

import os
from pathlib import Path

from unicom.files import atomic_path

LABELS = {"first": "first d dimensions", "pca": "PCA to d (fitted on train)"}
STYLES = {"first": {"marker": "o", "color": "#1f77b4"}, "pca": {"marker": "s", "linestyle": "--", "color": "#7f7f7f"}}


def dimension_figure(rows: list[dict], metric: str = "recall@1", title: str = ""):
    """The figure of :func:`plot_dimension_curve` (a ``matplotlib.figure.Figure`` on the Agg canvas).

    The legend sits below the axes, outside them, so that it never hides a point: inside,
    any corner can be where a method's curve runs (a flat PCA row along the bottom, the
    best dimension at the top).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 4.2), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    dimensions = sorted({row["dimension"] for row in rows})
    for method in LABELS:
        points = sorted((row["dimension"], row[metric]) for row in rows if row["method"] == method and metric in row)
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, [100 * y for y in ys], label=LABELS[method], **STYLES[method])
    axes.set_xscale("log", base=2)
    axes.set_xticks(dimensions)
    axes.set_xticklabels([str(d) for d in dimensions])
    axes.minorticks_off()
    axes.set_xlabel("embedding dimension d")
    axes.set_ylabel(f"{metric} (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False, fontsize="small")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure


def plot_dimension_curve(rows: list[dict], path: str | os.PathLike, metric: str = "recall@1", title: str = "",
                         atomic: bool = True) -> Path:
    """Write ``metric`` (in %) against the dimension for each method in ``rows``.

    ``rows``: ``dimension_curve`` output; skipped dimensions are left out. The x axis is
    logarithmic with a tick at every evaluated dimension. Written atomically (``atomic=False``:
    straight to ``path``, a temporary its caller renames); returns the path.
    """
    figure = dimension_figure(rows, metric, title)
    path = Path(path)
    if atomic:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
    else:
        figure.savefig(path, format="png")
    return path


def training_curves(log_file: str | os.PathLike) -> dict:
    """The curves of a training run's ``log.jsonl``: ``{"x": "step", "loss": [(step, loss), ...]}``
    from its ``step`` records, and with evaluations (``eval`` records) ``"eval"``: ``{"benchmark",
    "metric", "weights", metric: [(step, value), ...], "map@r": [...]}`` (MAP@R where the
    benchmark has it) of the benchmark of the last evaluation; where it scored several
    benchmarks, each one's metric as ``"<benchmark> <metric>"`` (``benchmark`` names them all).
    Of ``unicom probe``'s log, whose ``epoch`` records hold the loss and the evaluation's
    ``metrics``, the same against the epoch (``"x": "epoch"``). A line cut short by a kill is
    skipped."""
    from unicom.engine.runlog import read_log

    loss, evaluations, x = [], [], "step"
    for record in read_log(log_file):
        if record.get("event") == "step" and record.get("loss") is not None:
            loss.append((record["step"], record["loss"]))
        elif record.get("event") == "eval":
            evaluations.append(record)
        elif record.get("event") == "epoch" and record.get("loss") is not None:
            x = "epoch"
            loss.append((record["epoch"], record["loss"]))
            if "metrics" in record:
                evaluations.append({"step": record["epoch"], "benchmark": "evaluation", "metric": record.get("metric"),
                                    **record["metrics"]})
    curves: dict = {"x": x, "loss": loss}
    if evaluations:
        last = evaluations[-1]
        # the benchmarks of the last evaluation (a run resumed to score others draws those)
        scored = {record["benchmark"]: record for record in evaluations if record["step"] == last["step"]}
        metric = last.get("metric") or ("mmp@5" if x == "epoch" else "recall@1")
        curves["eval"] = {"benchmark": ", ".join(scored), "metric": metric, "weights": last.get("weights")}
        if len(scored) == 1:
            lines = [(name, last["benchmark"], name) for name in dict.fromkeys((metric, "map@r"))]
        else:
            lines = [(f"{benchmark} {record['metric']}", benchmark, record["metric"])
                     for benchmark, record in scored.items()]
        for label, benchmark, name in lines:
            points = [(record["step"], record[name]) for record in evaluations
                      if record["benchmark"] == benchmark and name in record]
            if points:
                curves["eval"][label] = points
    return curves


def plot_training_curves(log_file: str | os.PathLike, path: str | os.PathLike, title: str = "") -> Path:
    """Write a training run's curves (:func:`training_curves`) as a PNG, atomically: the loss
    against the step (or epoch), and below it, with evaluations, their metrics (in %); returns
    the path."""
    import itertools

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = training_curves(log_file)
    evaluated = curves.get("eval")
    figure = Figure(figsize=(5.6, 6.0 if evaluated else 3.4), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2 if evaluated else 1, 1, sharex=True, squeeze=False)[:, 0]
    if curves["loss"]:
        panels[0].plot(*zip(*curves["loss"]), color="#1f77b4")
    panels[0].set_ylabel("loss")
    if title:
        panels[0].set_title(title)
    if evaluated:
        lines = [name for name, points in evaluated.items() if isinstance(points, list)]
        styles = itertools.cycle([{"marker": marker, "linestyle": linestyle}
                                  for marker, linestyle in zip("os^vDP<>", ["-", "--", ":", "-."] * 2)])
        for name, style in zip(lines, styles):
            steps, values = zip(*evaluated[name])
            panels[1].plot(steps, [100 * value for value in values], label=name, **style)
        panels[1].set_ylabel(f"{evaluated['benchmark']} (%)" if len(lines) <= 2 else "%")
        panels[1].legend(frameon=False, fontsize="small")
    panels[-1].set_xlabel(curves["x"])
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
    for axes in panels:
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
