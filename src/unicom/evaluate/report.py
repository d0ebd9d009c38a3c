"""A whole evaluation run on embeddings: numbers, compact-dimension curves, files.

:func:`evaluate_retrieval` and :func:`evaluate_classification` compute everything first,
then (with ``out``) publish ``metrics.json``, ``metrics.md`` and, for retrieval with
dimensions, ``recall_vs_dimension.png`` as one report (:func:`publish_report`): a failed or
killed run leaves no partial report, and never one run's file beside another's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unicom.evaluate.dims import dimension_curve, prepare_search, score
from unicom.errors import InputError
from unicom.evaluate.metrics import METRIC_KEYS, summarize
from unicom.files import json_text, publish_together, write_bytes_synced

JSON_NAME = "metrics.json"
MARKDOWN_NAME = "metrics.md"
PLOT_NAME = "recall_vs_dimension.png"
EXAMPLES_PNG, EXAMPLES_HTML = "examples.png", "examples.html"
PER_QUERY_NAME = "per_query.parquet"
# the summary of several benchmarks evaluated at once, each one's report in OUT/<benchmark>/
SUMMARY_JSON, SUMMARY_MARKDOWN = "benchmarks.json", "benchmarks.md"
# the comparison of earlier runs' reports and summaries (unicom evaluate --compare)
COMPARISON_JSON, COMPARISON_MARKDOWN, COMPARISON_CSV = "comparison.json", "comparison.md", "comparison.csv"
_REPORT = (JSON_NAME, MARKDOWN_NAME, PLOT_NAME, EXAMPLES_PNG, EXAMPLES_HTML, PER_QUERY_NAME)
_SUMMARY = (SUMMARY_JSON, SUMMARY_MARKDOWN)
_COMPARISON = (COMPARISON_JSON, COMPARISON_MARKDOWN, COMPARISON_CSV)
# the files each kind of run may write to OUT, the one that says they are whole first, then those of
# the other kinds, which it replaces: OUT holds the files of one run
REPORT_NAMES = (*_REPORT, *_SUMMARY, *_COMPARISON)
SUMMARY_NAMES = (*_SUMMARY, *_REPORT, *_COMPARISON)
COMPARISON_NAMES = (*_COMPARISON, *_REPORT, *_SUMMARY)
SHOWN_CLASSES = 10  # class names listed in a message


def select_classes(
    query_labels,
    gallery_labels=None,
    *,
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The query rows and gallery rows whose class is one of ``classes`` (or none of
    ``exclude_classes``), and what was chosen, for the report.

    A class is named by its label as text (``"3"``, ``"cat"``) or, when ``class_names``
    are given (``class_names[label]``), by its name, which wins when it is also the text
    of another class's label (SOP's class ``"11320"`` has the label 11319). Names that match no class of the
    queries or the gallery are an :class:`InputError` naming them. Returns (query rows
    int64, gallery rows int64 or None without a gallery, ``{"classes" | "exclude_classes":
    the names given, "scored_classes": n, "all_classes": n}``).
    """
    if (classes is None) == (exclude_classes is None):
        raise InputError("give the classes to score or the classes to leave out, not both")
    option, given = ("--classes", classes) if classes is not None else ("--exclude-classes", exclude_classes)
    given = [str(name) for name in given]
    if not given:
        raise InputError(f"{option}: no class was named")
    query_labels = np.asarray(query_labels)
    labels = [query_labels] if gallery_labels is None else [query_labels, np.asarray(gallery_labels)]
    present = np.unique(np.concatenate(labels))
    lookup = {}
    if class_names is not None and np.issubdtype(present.dtype, np.integer):
        # names first: a benchmark's class names are often numbers (SOP's class_id, CUB's
        # number without classes.txt) that are also another class's label id ("11320" is
        # class 11320, label 11319); the name is what the report and the cached folder show
        lookup = {str(class_names[value]): value for value in present.tolist() if 0 <= value < len(class_names)}
    for value in present.tolist():
        lookup.setdefault(str(value), value)
    unknown = [name for name in given if name not in lookup]
    if unknown:
        examples = ", ".join(sorted(lookup)[:SHOWN_CLASSES])
        raise InputError(
            f"{option}: no class {', '.join(map(repr, unknown[:SHOWN_CLASSES]))}"
            f"{' ...' if len(unknown) > SHOWN_CLASSES else ''} among the {len(present)} classes of the queries and "
            f"gallery (e.g. {examples}); name a class by its label{' or its name' if class_names is not None else ''}"
        )
    chosen = np.asarray(sorted({lookup[name] for name in given}), dtype=present.dtype)
    keep = np.isin(present, chosen, invert=classes is None)
    rows = [np.flatnonzero(np.isin(array, present[keep])) for array in labels]
    what = {"classes" if classes is not None else "exclude_classes": given, "scored_classes": int(keep.sum()),
            "all_classes": int(len(present))}
    if len(rows[0]) == 0:
        raise InputError(f"{option}: no query belongs to the {what['scored_classes']} classes left to score")
    if gallery_labels is not None and len(rows[1]) == 0:
        raise InputError(f"{option}: no gallery item belongs to the {what['scored_classes']} classes left to score")
    return rows[0], rows[1] if gallery_labels is not None else None, what


def class_labelled(query_labels, classes, exclude_classes, lists=None) -> None:
    """An :class:`InputError` when a class subset is asked of a protocol that ranks by
    ``lists`` of relevant gallery items (GLDv2's, Revisited Oxford/Paris's) or has no
    class labels."""
    if (classes is not None or exclude_classes is not None) and (lists is not None or query_labels is None):
        raise InputError("--classes and --exclude-classes need class labels; this protocol ranks by lists of "
                         "relevant gallery items")


def evaluate_retrieval(
    query,
    query_labels=None,
    gallery=None,
    gallery_labels=None,
    *,
    relevant=None,
    subsets: dict[str, np.ndarray] | None = None,
    setups: dict | None = None,
    train=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "recall@1",
    dims: Sequence[int] = (),
    chunk_size: int | None = None,
    out: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    expansion=None,
    device=None,
    examples=None,
    items=None,
    per_query: bool = False,
) -> dict:
    """Score a retrieval protocol on embeddings; optionally write the report under ``out``.

    Args:
        query, gallery: (N, D) embeddings (``gallery=None``: leave-one-out over ``query``).
        query_labels, gallery_labels: class per row; or ``relevant`` lists (GLDv2).
        subsets: named query-row arrays scored separately as well (GLDv2 public/private).
        setups: name -> (positive rows, ignored rows) per query, each setup scored with
            :func:`~unicom.evaluate.metrics.revisited_metrics` (Revisited Oxford/Paris;
            ``ks`` are then the k of mP@k).
        train: train-split embeddings; with ``dims``, the PCA baseline is fitted on them.
        metric: the headline metric, drawn against the dimension.
        dims: dimensions d of the compact-dimension curve (empty: no curve).
        info: extra fields for the report (dataset, model, ...).
        classes, exclude_classes: score only the queries and gallery items of these
            classes, or of all but these (:func:`select_classes`; ``class_names`` lets
            them be named); the report's ``class_subset`` says which.
        expansion: an :class:`~unicom.evaluate.expansion.Expansion` re-ranking every search
            (database-side augmentation, query expansion); the report's ``metrics`` are
            then those of the re-ranked search, ``without_expansion`` those of the plain one.
        device: where the searches run (a torch device, e.g. ``cuda``), in full float32;
            default the CPU. The report records it (``protocol.device``).
        examples: an :class:`~unicom.evaluate.examples.Examples`: queries beside their
            first results of the evaluated search, marked relevant or not, drawn as
            ``examples.png`` and ``examples.html`` under ``out`` and listed in the report's
            ``examples``; ``items``: (query items, gallery items), the
            :class:`~unicom.evaluate.examples.Item` of each row (gallery None for
            leave-one-out), whose images are drawn.
        per_query: also write each query's metrics of the evaluated search as
            ``per_query.parquet`` under ``out`` (:func:`per_query_table`; the queries named
            by ``items``' keys, else by their row).

    Returns the report: ``{**info, "protocol": {...}, "metrics": {...}, "subsets":
    {name: metrics}, "dimensions": [rows of dimension_curve], "class_subset": {...}}``.
    """
    subset = None
    if examples is not None and items is None:
        raise ValueError("examples draw the images of the rows: give items (query items, gallery items)")
    if classes is not None or exclude_classes is not None:
        class_labelled(query_labels, classes, exclude_classes, relevant if setups is None else setups)
        query_rows, gallery_rows, subset = select_classes(
            query_labels, gallery_labels, classes=classes, exclude_classes=exclude_classes, class_names=class_names)
        query, query_labels = np.asarray(query)[query_rows], np.asarray(query_labels)[query_rows]
        if gallery is not None:
            gallery, gallery_labels = np.asarray(gallery)[gallery_rows], np.asarray(gallery_labels)[gallery_rows]
        if items is not None:
            items = ([items[0][i] for i in query_rows],
                     None if items[1] is None else [items[1][i] for i in gallery_rows])
    prepared = prepare_search(query, gallery, expansion=expansion, chunk_size=chunk_size, device=device)
    full = score(query, query_labels, gallery, gallery_labels, relevant=relevant, setups=setups, ks=ks,
                 chunk_size=chunk_size, per_query=bool(subsets) or per_query, expansion=expansion, device=device,
                 prepared=prepared)
    per_query_arrays = full.pop("per_query", None)
    if metric not in full:
        raise ValueError(f"metric {metric!r} is not computed; choose one of {sorted(full)}")
    report: dict[str, Any] = dict(info or {})
    report["protocol"] = {
        "queries": int(np.asarray(query).shape[0]),
        "gallery": None if gallery is None else int(np.asarray(gallery).shape[0]),
        "leave_one_out": gallery is None,
        "embedding_dim": int(np.asarray(query).shape[1]),
        "ks": [int(k) for k in ks],
        "metric": metric,
        "device": str(device) if device is not None else "cpu",
    }
    if setups:
        report["protocol"]["setups"] = list(setups)
    if expansion:
        report["protocol"]["expansion"] = expansion.describe()
    if subset is not None:
        report["class_subset"] = subset
    report["metrics"] = full
    if subsets:
        report["subsets"] = {name: summarize(per_query_arrays, ks, rows) for name, rows in subsets.items()}
    if expansion:  # the plain search beside it, at the full dimension
        plain = score(query, query_labels, gallery, gallery_labels, relevant=relevant, setups=setups, ks=ks,
                      chunk_size=chunk_size, device=device)
        report["without_expansion"] = plain
    if dims:
        report["dimensions"] = dimension_curve(
            query, query_labels, gallery, gallery_labels, dims=dims, train=train, relevant=relevant, setups=setups,
            ks=ks, chunk_size=chunk_size, expansion=expansion, device=device,
        )
    if report.get("dataset") == "ukbench":
        _add_ns_score(report)
    drawn = None
    if examples is not None:
        drawn = _draw_examples(prepared, examples, items, query_labels, gallery_labels, relevant, setups, metric, report)
    table = None
    if per_query:
        keys = [item.key for item in items[0]] if items is not None else [f"#{row}" for row in range(len(query))]
        table = per_query_table(per_query_arrays, keys, query_labels if relevant is None and not setups else None, subsets)
        report["per_query"] = {"file": PER_QUERY_NAME, "columns": table.column_names}
    if out is not None:
        write_retrieval_report(report, out, drawn, table)
    return report


def per_query_table(per_query: dict, keys: Sequence[str], labels=None, subsets: dict | None = None):
    """Each query's metrics as a table (a row per query, in their order): ``query`` (its
    key), ``label`` (with labels), then the per-query arrays of the metrics
    (:func:`~unicom.evaluate.metrics.retrieval_metrics`' ``relevant``, ``first_relevant_rank``
    (0: none relevant), ``map@r``, ``r_precision``, ``map@100``, ``mmp@5``; or the Revisited
    setups' ``ap_<setup>`` and ``p@<k>_<setup>``), NaN where a query is not scored, and a
    boolean ``subset_<name>`` column per subset (GLDv2's ``public``, ``private``)."""
    import pyarrow as pa

    columns: dict = {"query": pa.array([str(key) for key in keys], pa.string())}
    if labels is not None:
        labels = np.asarray(labels)
        columns["label"] = pa.array(labels.tolist())
    for name, values in per_query.items():
        values = np.asarray(values)
        columns[name] = pa.array(values, pa.int64() if values.dtype.kind in "iu" else pa.float64())
    for name, rows in (subsets or {}).items():
        member = np.zeros(len(keys), dtype=bool)
        member[np.asarray(rows, dtype=np.int64)] = True
        columns[f"subset_{name}"] = pa.array(member)
    return pa.table(columns)


def _draw_examples(prepared, choice, items, query_labels, gallery_labels, relevant, setups, metric: str,
                   report: dict):
    """Rank and read the examples ``choice`` asks for (:mod:`unicom.evaluate.examples`) on the
    search ``prepared``, recorded in ``report["examples"]``; returns the rows to draw."""
    from unicom.evaluate.examples import Marks, examples_record, rank_examples, read_example_thumbnails, setup_shown

    setup = None
    if setups:
        setup = setup_shown(setups, metric)
        marks = Marks(setup=setups[setup])
    elif relevant is not None:
        marks = Marks(relevant=relevant)
    else:
        marks = Marks(query_labels, gallery_labels if prepared.gallery is not None else None)
    query_items, gallery_items = items
    gallery_items = query_items if gallery_items is None else gallery_items
    rows = rank_examples(prepared.query, prepared.gallery, marks, choice, query_items, gallery_items,
                         rescore=prepared.rescore, chunk_size=prepared.chunk_size)
    read_example_thumbnails(rows, query_items, gallery_items, choice.thumbnail)
    report["examples"] = examples_record(rows, choice, setup)
    return rows


def _add_ns_score(report: dict) -> None:
    """UKBench's N-S score beside each set of metrics of ``report`` (``ns_score``): the mean
    number of a query's 4 relevant images (its own included) among its first 4 results, which
    is 4 x the R-precision, every R being 4."""
    for values in (report["metrics"], report.get("without_expansion"), *report.get("subsets", {}).values(),
                   *report.get("dimensions", [])):
        if values and "r_precision" in values:
            values["ns_score"] = 4 * values["r_precision"]


def publish_report(out: str | os.PathLike, files: dict[str, Callable[[Path], None]]) -> None:
    """Publish a report under the local folder ``out`` as one: ``files`` maps each of its
    file names (of :data:`REPORT_NAMES`) to a function that writes that file's content to
    the path it is given; ``metrics.json`` says a report is whole
    (:func:`unicom.files.publish_together`)."""
    from unicom.models.export import local_output

    out = local_output(out, "the evaluation report")  # a URL would become a local folder 's3:'
    publish_together(out, files, REPORT_NAMES)


def report_task(report: dict) -> str:
    """What a report scores: ``retrieval``, ``classification`` or ``image-text``."""
    if "text_to_image" in report:
        return "image-text"
    return "classification" if any(method in report for method in ("linear_probe", "knn", "zero_shot")) else "retrieval"


def headline_scores(report: dict) -> dict[str, Any]:
    """The scores a benchmark is quoted by, from its report: a retrieval benchmark's headline
    metric with MAP@R (Revisited Oxford/Paris: the medium and hard mAP); a classification
    dataset's metric of the linear probe, kNN and zero-shot; image-text retrieval's Recall@1
    of both directions. Named as in the reports (``recall@1``, ``linear probe accuracy``,
    ``text → image recall@1``)."""
    from unicom.evaluate.image_text import DIRECTION_NAMES, DIRECTIONS

    task = report_task(report)
    if task == "image-text":
        return {f"{DIRECTION_NAMES[direction]} recall@1": report[direction]["recall@1"] for direction in DIRECTIONS}
    protocol = report["protocol"]
    methods = {"linear_probe": "linear probe", "knn": "kNN", "zero_shot": "zero-shot"}
    if task == "classification":
        return {f"{said} {protocol['metric']}": report[method][protocol["metric"]]
                for method, said in methods.items() if method in report}
    return _quoted(report["metrics"], protocol["metric"])


def _quoted(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """A retrieval benchmark's headline ``metric`` of its ``metrics`` with MAP@R, or the hard
    mAP of Revisited Oxford/Paris (whose headline is the medium one)."""
    names = dict.fromkeys((metric, "map_hard" if "map_hard" in metrics else "map@r"))
    return {name: metrics[name] for name in names if name in metrics}


def summary_markdown(summary: dict) -> str:
    """The summary of several benchmarks (:func:`publish_summary`) as a markdown table, in %."""
    lines = [f"# {summary['evaluated']} on {len(summary['benchmarks'])} benchmarks", "",
             "| benchmark | task | scores (%) | report |", "|---|---|---|---|"]
    for row in summary["benchmarks"]:
        scores = ", ".join(f"{name} {_percent(value)}" for name, value in row["scores"].items())
        lines.append(f"| {row['dataset']} | {row['task']} | {scores} | [{row['report']}]({row['report']}) |")
    return "\n".join(lines) + "\n"


def publish_summary(out: str | os.PathLike, reports: dict[str, dict]) -> dict:
    """Publish the summary of the ``reports`` of several benchmarks, by name (each one's report
    in ``out/<name>/``), as ``benchmarks.json`` and ``benchmarks.md`` under ``out``, as one set that
    replaces an earlier run's report or summary there (:func:`unicom.files.publish_together`);
    returns the summary, its ``markdown`` added."""
    from unicom.models.export import local_output

    first = next(iter(reports.values()))
    summary = {"evaluated": report_heading(first, ("model", "pretrained", "embeddings"), "evaluation"), "benchmarks": [
        {"dataset": name, "task": report_task(report), "scores": headline_scores(report),
         "report": f"{name}/{MARKDOWN_NAME}"} for name, report in reports.items()]}
    markdown = summary_markdown(summary)
    out = local_output(out, "the evaluation report")
    publish_together(out, {SUMMARY_JSON: lambda path: write_bytes_synced(path, json_text(summary).encode()),
                           SUMMARY_MARKDOWN: lambda path: write_bytes_synced(path, markdown.encode())}, SUMMARY_NAMES)
    return {**summary, "markdown": markdown}


def compare_runs(folders: Sequence[str | os.PathLike]) -> dict:
    """The scores of earlier runs, side by side: each folder's as :func:`run_scores` reads them.
    Returns ``{"runs": [{"folder", "evaluated"}], "rows": [{"dataset", "score", "values": [one
    per run, None where it has no such score]}]}``, the rows in the order the runs first give
    them."""
    runs, values_of = [], {}
    for index, folder in enumerate(folders):
        evaluated, benchmarks = run_scores(folder)
        runs.append({"folder": str(folder), "evaluated": evaluated})
        for dataset, quoted in benchmarks:
            for name, value in quoted.items():
                values_of.setdefault((dataset, name), [None] * len(folders))[index] = value
    rows = [{"dataset": dataset, "score": name, "values": values} for (dataset, name), values in values_of.items()]
    return {"runs": runs, "rows": rows}


def run_scores(folder: str | os.PathLike) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """What a run's folder says was evaluated, and each benchmark's scores as a summary quotes
    them (:func:`headline_scores`): a ``unicom evaluate`` run's ``benchmarks.json`` (several
    benchmarks) or ``metrics.json`` (one), or a ``unicom train`` run's last evaluation while it
    trained (the ``eval`` records of ``log.jsonl``'s last step scored, ``eval.benchmark``)."""
    import json

    from unicom.engine.runlog import LOG_FILE, read_log

    folder = Path(folder)
    if (folder / SUMMARY_JSON).is_file():
        path = folder / SUMMARY_JSON
    elif (folder / JSON_NAME).is_file():
        path = folder / JSON_NAME
    elif (folder / LOG_FILE).is_file():
        scored = [record for record in read_log(folder / LOG_FILE) if record.get("event") == "eval"]
        if not scored:
            raise InputError(f"{folder}: a training run that scored no benchmark while it trained (eval.benchmark); "
                             f"evaluate its model (unicom evaluate --model {folder / 'model'} --dataset ...) and "
                             "compare that evaluation's folder")
        step = scored[-1]["step"]
        return (f"unicom train, step {step}",
                [(record["benchmark"], _quoted(record, record["metric"])) for record in scored if record["step"] == step])
    else:
        raise InputError(f"{folder}: holds neither {SUMMARY_JSON} (unicom evaluate --dataset A,B,...) nor "
                         f"{JSON_NAME} (one benchmark) nor {LOG_FILE} (a unicom train run); give the --out folders of "
                         "unicom evaluate or unicom train runs")
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        if path.name == SUMMARY_JSON:
            return written["evaluated"], [(row["dataset"], row["scores"]) for row in written["benchmarks"]]
        evaluated = report_heading(written, ("model", "pretrained", "embeddings"), "evaluation")
        return evaluated, [(written.get("dataset") or "embeddings", headline_scores(written))]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a report unicom evaluate writes ({type(error).__name__}: {error}); run that "
                         "evaluation again") from None


def comparison_markdown(comparison: dict) -> str:
    """:func:`compare_runs` as a markdown table: a row per benchmark and score, a column per
    run (in %, the best of each row in bold), the runs listed below it."""
    runs = comparison["runs"]
    lines = [f"# {len(runs)} evaluations compared", "",
             "| benchmark | score | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |",
             "|---" * (len(runs) + 2) + "|"]
    for row in comparison["rows"]:
        given = [value for value in row["values"] if value is not None]
        best = max(given) if len(given) > 1 else None
        cells = ["" if value is None else f"**{_percent(value)}**" if value == best else _percent(value)
                 for value in row["values"]]
        lines.append(f"| {row['dataset']} | {row['score']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- run {i + 1}: {run['evaluated']} ({run['folder']})" for i, run in enumerate(runs)]
    return "\n".join(lines) + "\n"


def publish_comparison(out: str | os.PathLike, comparison: dict) -> str:
    """Publish :func:`compare_runs`'s ``comparison`` under ``out`` as ``comparison.json``,
    ``comparison.md`` and ``comparison.csv`` (a row per run, benchmark and score: ``run``,
    ``folder``, ``evaluated``, ``dataset``, ``score``, ``value``), as one set that replaces an
    earlier run's files there; returns the markdown."""
    import csv
    import io

    from unicom.models.export import local_output

    markdown = comparison_markdown(comparison)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["run", "folder", "evaluated", "dataset", "score", "value"])
    for row in comparison["rows"]:
        for index, (run, value) in enumerate(zip(comparison["runs"], row["values"])):
            if value is not None:
                writer.writerow([index + 1, run["folder"], run["evaluated"], row["dataset"], row["score"], repr(float(value))])
    out = local_output(out, "the comparison")
    publish_together(out, {COMPARISON_JSON: lambda path: write_bytes_synced(path, json_text(comparison).encode()),
                           COMPARISON_MARKDOWN: lambda path: write_bytes_synced(path, markdown.encode()),
                           COMPARISON_CSV: lambda path: write_bytes_synced(path, table.getvalue().encode())},
                     COMPARISON_NAMES)
    return markdown


def _examples_note(report: dict) -> str:
    """What the examples of ``report`` show, in a sentence: which queries, which search."""
    shown = report["examples"]
    drawn = len(shown["queries"])
    which = (f"{drawn} queries drawn at random (seed {shown['seed']}) among those whose first result is not relevant"
             if shown["failures"] else f"{drawn} queries drawn at random (seed {shown['seed']})")
    search = "the re-ranked search" if report["protocol"].get("expansion") else "the search"
    setup = f"; marks of the {shown['setup']} setup" if shown.get("setup") else ""
    return f"{which}, each with its first {shown['k']} results of {search}{setup}."


def write_retrieval_report(report: dict, out: str | os.PathLike, examples=None, per_query=None) -> None:
    """Write ``report`` under ``out`` as one set (:func:`publish_report`): metrics.json,
    metrics.md, the dimension curve's plot, ``examples`` (rows of
    :func:`unicom.evaluate.examples.rank_examples`) as examples.png and examples.html, and
    the ``per_query`` table (:func:`per_query_table`) as per_query.parquet."""
    from unicom.evaluate.plots import plot_dimension_curve

    files = {JSON_NAME: lambda path: write_bytes_synced(path, json_text(report).encode()),
             MARKDOWN_NAME: lambda path: write_bytes_synced(path, retrieval_markdown(report).encode())}
    if per_query is not None:
        import pyarrow.parquet as pq

        def write_table(path: Path) -> None:
            import pyarrow as pa

            sink = pa.BufferOutputStream()
            pq.write_table(per_query, sink)
            write_bytes_synced(path, sink.getvalue().to_pybytes())

        files[PER_QUERY_NAME] = write_table
    if examples is not None:
        from unicom.evaluate.examples import render_html, render_png

        side = report["examples"]["thumbnail"]
        title = report_heading(report, ("dataset", "model", "embeddings"), "retrieval") + ": examples"
        note = _examples_note(report)
        files[EXAMPLES_PNG] = lambda path: write_bytes_synced(path, render_png(examples, side))
        files[EXAMPLES_HTML] = lambda path: write_bytes_synced(path, render_html(examples, side, title, note).encode())
    if report.get("dimensions"):  # without a curve, an earlier run's is removed with the rest of its report
        title = " / ".join(str(report[k]) for k in ("dataset", "model") if report.get(k))
        files[PLOT_NAME] = lambda path: plot_dimension_curve(report["dimensions"], path, metric=report["protocol"]["metric"],
                                                             title=title, atomic=False)
    publish_report(out, files)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def report_heading(report: dict, keys: Sequence[str], fallback: str) -> str:
    """A report's title: its fields ``keys`` that are given, joined, "each image averaged
    with its mirror" where the report says ``flip`` and "at scales …" where it gives ``scales``;
    ``fallback`` when none is given."""
    heading = " · ".join(str(report[k]) for k in keys if report.get(k)) or fallback
    heading += " · each image averaged with its mirror" if report.get("flip") else ""
    if report.get("scales"):
        heading += f" · at scales {', '.join(f'{scale:g}' for scale in report['scales'])}"
    return heading


def retrieval_markdown(report: dict) -> str:
    """The report as markdown tables: metrics (in %), subsets, and the dimension curve."""
    protocol = report["protocol"]
    heading = report_heading(report, ("dataset", "model", "embeddings"), "retrieval")
    search = "leave-one-out" if protocol["leave_one_out"] else f"against a gallery of {protocol['gallery']:,}"
    if report.get("distractors"):
        search += f" ({report['distractors']['count']:,} of them distractors, {report['distractors']['embeddings']})"
    metrics = report["metrics"]
    if protocol.get("setups"):
        queries = {"roxford5k": "cropped to their boxes", "rparis6k": "cropped to their boxes",
                   "holidays": "each removed from its own ranking",
                   "copydays": "attacked copies, each against the originals"}.get(report.get("dataset"), "")
        lines = [f"# {heading}", "", f"{protocol['queries']} queries{', ' + queries if queries else ''}, {search}, "
                 f"dimension {protocol['embedding_dim']}; each setup's ignored images are removed from the ranking.", ""]
        lines += _setup_table(metrics, protocol["setups"], protocol["ks"])
        if report.get("whitening"):
            lines[4:4] = [_whitening_line(report["whitening"]), ""]
        if protocol.get("expansion"):
            at = 6 if report.get("whitening") else 4
            lines[at:at] = [_expansion_line(protocol["expansion"]), ""]
            lines += ["", "Without re-ranking:", ""] + _setup_table(report["without_expansion"], protocol["setups"],
                                                                   protocol["ks"])
    else:
        lines = [
            f"# {heading}",
            "",
            f"{protocol['queries']} queries {search}, dimension {protocol['embedding_dim']}; "
            f"{metrics['n_queries']} scored, {metrics['n_excluded']} without a relevant item excluded.",
            "",
        ]
        if report.get("class_subset"):
            lines[-1:-1] = ["", _class_subset_line(report["class_subset"])]
        if report.get("whitening"):
            lines[-1:-1] = ["", _whitening_line(report["whitening"])]
        if protocol.get("expansion"):
            lines[-1:-1] = ["", _expansion_line(protocol["expansion"], protocol["leave_one_out"])]
        columns = [f"recall@{k}" for k in protocol["ks"]] + list(METRIC_KEYS)
        rows = [("all", metrics)] + list(report.get("subsets", {}).items())
        if protocol.get("expansion"):
            rows.append(("all, without re-ranking", report["without_expansion"]))
        lines += ["| queries | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, values in rows:
            lines.append(f"| {name} | " + " | ".join(_percent(values[c]) for c in columns) + " |")
        if report.get("dataset") == "ukbench":
            lines += ["", _ns_line(rows)]
    if report.get("dimensions"):
        metric = protocol["metric"]
        by = {(row["method"], row["dimension"]): row for row in report["dimensions"]}
        dims = sorted({row["dimension"] for row in report["dimensions"]})
        has_pca = any(method == "pca" for method, _ in by)
        lines += ["", f"## {metric} (%) by embedding dimension", ""]
        lines += ["| dimension | first d dimensions |" + (" PCA to d |" if has_pca else ""),
                  "|---|---|" + ("---|" if has_pca else "")]
        for d in dims:
            cells = [_curve_cell(by.get((method, d)), metric) for method in ("first", "pca")[: 1 + has_pca]]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        skipped = [row["skipped"] for row in report["dimensions"] if "skipped" in row]
        lines += [""] + [f"- {why}" for why in skipped] if skipped else []
    if report.get("examples"):
        lines += ["", f"Examples ({EXAMPLES_HTML}, {EXAMPLES_PNG}): {_examples_note(report)}"]
    if report.get("per_query"):
        lines += ["", f"Per query ({PER_QUERY_NAME}): each query's metrics of the search above, a row per query "
                      f"({', '.join(report['per_query']['columns'])})."]
    return "\n".join(lines) + "\n"


def _ns_line(rows) -> str:
    """The sentence of UKBench's N-S scores (:func:`_add_ns_score`) of each row of the table."""
    scores = ", ".join(f"{values['ns_score']:.3f} ({name})" for name, values in rows)
    return f"N-S score (of its object's 4 images, a query's own included, how many are among its first 4): {scores}."


def _whitening_line(whitening: dict) -> str:
    """The sentence saying what the embeddings were whitened with (the report's ``whitening``)."""
    if whitening.get("method") == "discriminative":
        return (f"Whitened: every embedding centred and projected so that the differences of the "
                f"{whitening['pairs']:,} matching pairs of {whitening['rows']:,} embeddings of "
                f"{whitening['embeddings']} ({whitening['classes']:,} classes) are white, along the axes that separate "
                "them most (discriminative whitening).")
    return (f"Whitened: every embedding centred and scaled along the principal axes of {whitening['rows']:,} "
            f"embeddings of {whitening['embeddings']} (PCA whitening).")


def _expansion_line(expansion: dict, leave_one_out: bool = False) -> str:
    """The sentence saying how the searches were re-ranked (the report's ``protocol.expansion``)."""
    searched = "item" if leave_one_out else "gallery item"
    parts = {"dba": f"each {searched} augmented with its {{k}} nearest others (DBA, α = {{alpha:g}})",
             "qe": "each query expanded with its {k} nearest gallery items (αQE, α = {alpha:g}) and searched again"}
    said = [parts[name].format(**expansion[name]) for name in ("dba", "qe") if name in expansion]
    if "k_reciprocal" in expansion:
        kr = expansion["k_reciprocal"]
        said.append(f"each {searched} ranked by λ = {kr['lambda']:g} of its distance to the query and 1 - λ of the "
                    f"Jaccard distance of their k-reciprocal neighbourhoods (k1 = {kr['k1']}, k2 = {kr['k2']})")
    if "diffusion" in expansion:
        d = expansion["diffusion"]
        spectral = f", on the graph's {d['rank']} leading eigenvectors" if d.get("rank") else ""
        said.append(f"each query's similarities spread over the graph of the {searched}s' reciprocal {d['k']} nearest "
                    f"neighbours (diffusion, γ = {d['gamma']:g}, α = {d['alpha']:g}{spectral}) and the {searched}s "
                    "ranked by it")
    return "Re-ranked: " + "; then ".join(said) + "."


def _setup_table(metrics: dict, setups, ks) -> list[str]:
    """One row per setup (Revisited Oxford/Paris): mAP and mP@k in %, queries scored."""
    lines = ["| setup | mAP | " + " | ".join(f"mP@{k}" for k in ks) + " | queries scored |",
             "|---" * (len(ks) + 3) + "|"]
    for name in setups:
        cells = [_percent(metrics[f"map_{name}"])] + [_percent(metrics[f"mp@{k}_{name}"]) for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {metrics[f'n_queries_{name}']} |")
    return lines


def _class_subset_line(subset: dict) -> str:
    only = "classes" in subset
    names = subset["classes" if only else "exclude_classes"]
    listed = ", ".join(names[:SHOWN_CLASSES]) + (f" and {len(names) - SHOWN_CLASSES} more" if len(names) > SHOWN_CLASSES else "")
    scored = f"{subset['scored_classes']} of {subset['all_classes']} classes"
    return f"Scored on {scored}: {'only' if only else 'all but'} {listed} (queries and gallery alike)."


def _curve_cell(row: dict | None, metric: str) -> str:
    if row is None:
        return ""
    return "skipped" if "skipped" in row else _percent(row[metric])


def evaluate_classification(
    train,
    train_labels,
    test,
    test_labels,
    *,
    metric: str = "accuracy",
    probe: bool = True,
    knn: bool = True,
    knn_k: int = 20,
    temperature: float = 0.07,
    out: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    names: tuple[str, str] = ("train", "test"),
    zero_shot: dict | None = None,
) -> dict:
    """Linear probe and kNN accuracy of frozen features; optionally write the report.
    ``names``: how errors name the train and test splits (e.g. their folders). ``train`` may
    be None when neither the probe nor kNN runs; ``zero_shot``: the scores of
    :func:`unicom.evaluate.zero_shot.zero_shot_scores`, reported beside them."""
    from unicom.evaluate.probe import check_splits, knn_accuracy, linear_probe

    if train is None and (probe or knn):
        raise InputError("the linear probe and kNN classification are fitted on train features; none were given")
    train, train_labels, test, test_labels = check_splits(train, train_labels, test, test_labels, names)
    report: dict[str, Any] = dict(info or {})
    report["protocol"] = {
        "train": 0 if train is None else int(len(train)),
        "test": int(len(test)),
        "classes": int(len(np.unique(np.asarray(test_labels if train is None else train_labels)))),
        "embedding_dim": int(np.asarray(test).shape[1]),
        "metric": metric,
    }
    if probe:
        report["linear_probe"] = linear_probe(train, train_labels, test, test_labels, metric=metric)
    if knn:
        report["knn"] = knn_accuracy(train, train_labels, test, test_labels, k=knn_k, temperature=temperature)
    if zero_shot is not None:
        report["zero_shot"] = zero_shot
    if out is not None:
        publish_report(out, {JSON_NAME: lambda path: write_bytes_synced(path, json_text(report).encode()),  # a retrieval run's curve is removed
                             MARKDOWN_NAME: lambda path: write_bytes_synced(path, classification_markdown(report).encode())})
    return report


def classification_markdown(report: dict) -> str:
    protocol = report["protocol"]
    heading = report_heading(report, ("dataset", "model", "embeddings"), "classification")
    lines = [
        f"# {heading}",
        "",
        (f"{protocol['train']} train and " if protocol["train"] else "")
        + f"{protocol['test']} test images, {protocol['classes']} classes, "
        f"dimension {protocol['embedding_dim']}; the dataset's metric is {protocol['metric']}.",
        "",
        "| method | accuracy (%) | mean per class (%) | setting |",
        "|---|---|---|---|",
    ]
    if "linear_probe" in report:
        p = report["linear_probe"]
        lines.append(f"| linear probe | {_percent(p['accuracy'])} | {_percent(p['mean_per_class'])} | C = {p['C']:.4g} |")
    if "knn" in report:
        k = report["knn"]
        lines.append(f"| kNN | {_percent(k['accuracy'])} | {_percent(k['mean_per_class'])} | "
                     f"k = {k['k']}, T = {k['temperature']} |")
    if "zero_shot" in report:
        z = report["zero_shot"]
        lines.append(f"| zero-shot | {_percent(z['accuracy'])} | {_percent(z['mean_per_class'])} | "
                     f"{z['prompts_per_class']} prompts a class ({z['templates']}); top-5 {_percent(z['top5'])} |")
    return "\n".join(lines) + "\n"
