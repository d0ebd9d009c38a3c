"""The clustering output folder: written by `unicom cluster`, read by the trainer through one owner."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.cluster import ClusterInputs, KMeansSettings, cluster
from unicom.errors import InputError
from unicom.formats.clusters import ClusterFolder, PseudoLabels
from unicom.formats.embeddings import EmbeddingFolders, write_part


@pytest.fixture()
def run(tmp_path):
    """A clustering run of 3 parts of 40 samples into k = 4."""
    rng = np.random.default_rng(0)
    for number in range(3):
        write_part(tmp_path / "emb", number, image=rng.standard_normal((40, 6)).astype(np.float32),
                   metadata=pa.table({"key": [f"p{number}-{r}" for r in range(40)]}))
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    cluster(inputs, tmp_path / "out", KMeansSettings(k=4, init="kmeans++"), plot=False)
    return tmp_path / "out"


def test_the_trainer_reads_a_run_as_pyarrow_sees_it(run):
    labels = PseudoLabels(run)
    tables = {n: pq.read_table(run / "labels" / f"labels_{n}.parquet") for n in range(3)}
    assert labels.folder == run / "labels" and sorted(labels.files) == [0, 1, 2]
    assert labels.num_classes == np.load(run / "centroids.npy").shape[0] == 4
    assert labels.labelled_parts == {0, 1, 2}
    values = np.concatenate([t.column("label").to_numpy() for t in tables.values()])
    found = labels.check()
    assert (found.rows, found.low, found.high) == (len(values), int(values.min()), int(values.max()))
    expected = {k: v for t in tables.values() for k, v in zip(t.column("key").to_pylist(), t.column("label").to_pylist())}
    assert labels.lookup() == expected and len(expected) == 120


def test_the_labels_folder_alone_has_no_record_of_k(run):
    labels = PseudoLabels(run / "labels")
    assert sorted(labels.files) == [0, 1, 2] and labels.num_classes is None and labels.labelled_parts is None


def test_parts_the_run_has_not_labelled_yet_are_told_apart_from_parts_it_never_saw(run):
    (run / "labels" / "labels_1.parquet").unlink()
    labels = PseudoLabels(run)
    assert sorted(labels.select([0, 2])) == [0, 2]
    with pytest.raises(InputError, match=r"no labels for 1 of 3 shards \(numbers 1\); the run has not labelled 1 of them "
                                         r"yet: finish `unicom cluster assign`"):
        labels.select([0, 1, 2])
    with pytest.raises(InputError, match=r"no labels for 1 of 2 shards \(numbers 7\); shard <i>\.tar is joined"):
        labels.select([0, 7])


def test_the_writer_records_the_facts_of_each_label_file(run):
    folder = ClusterFolder(run)
    facts = folder.label_facts(0)
    stored = json.loads(pq.read_schema(folder.label_path(0)).metadata[b"unicom.labels"])
    assert facts == stored == {"rows": 40, "invalid": 0, "key_column": "key"}
    assert folder.read_labels(0).schema.names == ["key", "label", "similarity"]


def test_label_files_without_key_and_label_or_with_negative_labels_are_refused(tmp_path):
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "label": [0, -2]}), tmp_path / "labels" / "labels_0.parquet")
    with pytest.raises(InputError, match=r"labels: negative labels \(-2\); labels must be class ids 0..k-1"):
        PseudoLabels(tmp_path).check()
    pq.write_table(pa.table({"key": ["a"], "cluster": [0]}), tmp_path / "labels" / "labels_0.parquet")
    with pytest.raises(InputError, match=r"labels_0\.parquet: expected columns key and label"):
        PseudoLabels(tmp_path).check()


@pytest.mark.parametrize("labels", [[0.0, 1.5], ["0", "1"]], ids=["floats", "strings"])
def test_label_files_whose_labels_are_not_integers_are_refused_naming_the_file_and_type(tmp_path, labels):
    """Labels 1.5 (another tool's output) or "1" would otherwise be taken as class 1."""
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "label": [0, 1]}), tmp_path / "labels" / "labels_0.parquet")
    pq.write_table(pa.table({"key": ["c", "d"], "label": labels}), tmp_path / "labels" / "labels_1.parquet")
    kind = "double" if isinstance(labels[0], float) else "string"
    with pytest.raises(InputError) as error:
        PseudoLabels(tmp_path).check()
    assert str(error.value) == (f"{tmp_path / 'labels' / 'labels_1.parquet'}: the label column holds {kind}, not "
                                "integers; labels are class ids 0..k-1: write the column as int64 (as `unicom cluster` does)")


def test_the_format_owners_import_neither_faiss_nor_torch_nor_a_stage():
    code = ("import sys, unicom.formats.clusters, unicom.formats.embeddings; "
            "print(sorted(m for m in sys.modules if m in ('faiss', 'torch', 'pyarrow') "
            "or m.startswith(('unicom.cluster', 'unicom.train', 'unicom.search', 'unicom.evaluate'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_label_file_without_occurrences_gives_each_repeated_key_its_rows_in_order(tmp_path):
    """A file of an earlier version: the n-th sample of a key takes the n-th row of the key
    where the key has as many samples as rows."""
    from unicom.formats.clusters import check_all_met, label_of, read_shard_labels

    path = tmp_path / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "a", "c", "a", "c"], "label": [3, 1, 0, 2, 3, 2]}), path)
    lookup = read_shard_labels(path)
    assert not lookup.exact
    assert [label_of(lookup, key) for key in ["a", "b", "a", "c", "a", "c", "d"]] == [3, 1, 0, 2, 3, 2, None]
    check_all_met(lookup)


def test_a_label_file_with_occurrences_labels_the_samples_it_names_and_no_other(tmp_path):
    """Samples 0 and 2 of key a were labelled (sample 1 failed to embed): sample 1 stays
    unlabelled and sample 2 keeps its own label; the one row of c names c's second sample."""
    from unicom.formats.clusters import check_all_met, label_of, read_shard_labels

    path = tmp_path / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "a", "c"], "occurrence": pa.array([0, 0, 2, 1], pa.int32()),
                             "label": [3, 1, 0, 2]}), path)
    lookup = read_shard_labels(path)
    assert lookup.exact
    assert [label_of(lookup, key) for key in ["a", "b", "a", "c", "a", "c", "b"]] == [3, 1, None, None, 0, 2, None]
    check_all_met(lookup)


def test_a_label_file_without_occurrences_refuses_a_key_whose_rows_differ_with_more_samples_than_rows(tmp_path):
    from unicom.formats.clusters import AmbiguousLabels, label_of, read_shard_labels

    path = tmp_path / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "b"], "label": [3, 1, 0]}), path)
    lookup = read_shard_labels(path)
    assert [label_of(lookup, "b"), label_of(lookup, "b")] == [1, 0]
    with pytest.raises(AmbiguousLabels, match="'b' is on 2 label row"):
        label_of(lookup, "b")


def test_a_label_file_without_occurrences_gives_a_keys_one_label_to_every_sample_of_the_key(tmp_path):
    """As before the column existed: a key on one row, or on rows that share a label, labels
    each of its samples however many there are (a sample of it that failed to embed included)."""
    from unicom.formats.clusters import check_all_met, label_of, read_shard_labels

    path = tmp_path / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "c", "c", "c"], "label": [3, 2, 2, 2]}), path)
    lookup = read_shard_labels(path)
    assert [label_of(lookup, key) for key in ["a", "c", "a", "c"]] == [3, 2, 3, 2]
    check_all_met(lookup)  # c: two samples for three rows of one label, nothing to tell apart


def test_a_label_file_without_occurrences_refuses_a_key_with_fewer_samples_than_rows(tmp_path):
    from unicom.formats.clusters import AmbiguousLabels, check_all_met, label_of, read_shard_labels

    path = tmp_path / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "b"], "label": [3, 1, 0]}), path)
    lookup = read_shard_labels(path)
    assert [label_of(lookup, "a"), label_of(lookup, "b")] == [3, 1]
    with pytest.raises(AmbiguousLabels, match="'b' is on 2 label row.* but 1 samples carry it"):
        check_all_met(lookup)


def test_a_shard_whose_samples_all_share_one_key_is_joined_in_one_pass_over_its_labels(tmp_path):
    """800,000 rows of one key (a shard repacked from many with the same names): the labels
    are collected once each, not copied into a longer tuple at every row (quadratic: minutes)."""
    rows = 800_000
    code = ("import numpy as np, pyarrow as pa, pyarrow.parquet as pq\n"
            "from unicom.formats.clusters import label_of, read_shard_labels\n"
            f"path = {str(tmp_path / 'labels_0.parquet')!r}\n"
            f"pq.write_table(pa.table({{'key': ['k'] * {rows}, 'occurrence': np.arange({rows}, dtype=np.int32), "
            f"'label': np.arange({rows}) % 5}}), path)\n"
            "lookup = read_shard_labels(path)\n"
            f"labels = [label_of(lookup, 'k') for _ in range({rows})]\n"
            "print(len(labels), labels[:6], labels[-1])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == f"{rows} [0, 1, 2, 3, 4, 0] {(rows - 1) % 5}", done.stderr


@pytest.mark.parametrize("statistics", [True, False], ids=["with-statistics", "without-statistics"])
def test_label_files_with_rows_without_a_label_are_refused_naming_the_file_and_the_count(tmp_path, statistics):
    """A null label (pandas' <NA> in an Int64 column) was counted as a labelled row, then read
    as unlabelled by the shard reader, and broke the class counts and lists with a TypeError."""
    (tmp_path / "labels").mkdir()
    path = tmp_path / "labels" / "labels_0.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "label": pa.array([2, None, None], pa.int64())}), path,
                   write_statistics=statistics)
    with pytest.raises(InputError) as error:
        PseudoLabels(tmp_path).check()
    assert str(error.value) == (f"{path}: 2 row(s) without a label (null); a label file lists labelled samples only "
                                "(a sample not in it is unlabelled and skipped): leave those rows out")


@pytest.mark.parametrize("kind", [pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.uint32(), pa.uint64()], ids=str)
def test_label_files_of_any_integer_type_are_read_with_their_range(tmp_path, kind):
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "c"], "label": pa.array([2, 0, 5], kind)}),
                   tmp_path / "labels" / "labels_0.parquet")
    pq.write_table(pa.table({"key": ["d"], "label": pa.array([1], kind)}), tmp_path / "labels" / "labels_1.parquet",
                   write_statistics=False)
    found = PseudoLabels(tmp_path).check()
    assert (found.rows, found.low, found.high, found.file_rows) == (4, 0, 5, (3, 1))


def test_labels_of_parts_written_with_and_without_occurrences_load_as_one_table(tmp_path):
    """Parts embedded and clustered by an earlier version beside parts of this one."""
    from unicom.formats.clusters import ClusterFolder, load_labels

    folder = ClusterFolder(tmp_path)
    facts = {"rows": 2, "invalid": 0, "key_column": "key"}
    folder.write_labels(0, pa.array(["a", "b"]), np.array([1, 0]), np.ones(2, np.float32), facts)
    folder.write_labels(1, pa.array(["c", "c"]), np.array([0, 1]), np.ones(2, np.float32), facts, pa.array([0, 1]))
    table = load_labels(tmp_path)
    assert table.column("key").to_pylist() == ["a", "b", "c", "c"]
    assert table.column("occurrence").to_pylist() == [None, None, 0, 1]
    assert table.column("label").to_pylist() == [1, 0, 0, 1]
