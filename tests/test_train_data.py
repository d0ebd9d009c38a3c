"""Training batches: shards joined with pseudo-labels by key, lists, failures, exact restarts."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import run_workers, write_tar_shard
from torchvision.transforms import ToTensor

from unicom.errors import InputError
from unicom.train.config import load_config
from unicom.train.data import Counters, ListSource, TrainStream, build_source, make_loader, steps_per_epoch


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_collection(root: Path, shards: int = 3, per_shard: int = 12, classes: int = 4, unlabelled_every: int = 5,
                     broken: set[str] = frozenset()) -> dict:
    """Shards whose images are one colour, red = 10 x label; labels of all samples but every
    ``unlabelled_every``-th, written as `unicom cluster` writes them."""
    labels_dir = root / "clusters" / "labels"
    labels_dir.mkdir(parents=True)
    expected = {"labelled": 0, "unlabelled": 0}
    for shard in range(shards):
        samples, keys, labels = [], [], []
        for index in range(per_shard):
            key = f"{shard:03d}{index:04d}"
            label = (shard * per_shard + index) % classes
            image = b"broken" if key in broken else png((10 * label, index, shard))
            samples.append({"key": key, "png": image, "txt": "a caption"})
            if index % unlabelled_every == unlabelled_every - 1:
                expected["unlabelled"] += 1
                continue
            keys.append(key)
            labels.append(label)
        expected["labelled"] += len(keys)
        write_tar_shard(root / f"{shard:05d}.tar", samples)
        table = pa.table({"key": keys, "label": pa.array(labels, pa.int64()), "similarity": pa.array([1.0] * len(keys), pa.float32())})
        pq.write_table(table, labels_dir / f"labels_{shard}.parquet")
    (root / "clusters" / "centroids.json").write_text(json.dumps({"k": classes}))
    return expected


def shard_config(root: Path, *extra: str):
    return load_config(None, ["out=/tmp/unused", f"data.shards={root}", f"data.labels={root / 'clusters'}", *extra])


def labels_of(batch) -> list[int]:
    """The label encoded in each image's red channel."""
    return [round(v) for v in (batch.images[:, 0, 0, 0] * 255 / 10).tolist()]


def test_shards_are_joined_with_their_labels_by_key_and_unlabelled_samples_are_counted(tmp_path):
    expected = write_collection(tmp_path)
    source = build_source(shard_config(tmp_path, "data.shuffle_buffer=8"))
    assert (source.labelled, source.num_classes) == (expected["labelled"], 4)
    reader = TrainStream(source, ToTensor(), batch_size=5, seed=0).reader(0)
    batches = [next(reader) for _ in range(expected["labelled"] // 5)]  # one pass
    for batch in batches:
        assert batch.images.shape == (5, 3, 4, 4)
        assert batch.labels.tolist() == labels_of(batch)
    assert sum(b.unlabelled for b in batches) == expected["unlabelled"]
    assert {b.pass_ for b in batches} == {0}


def test_an_image_that_cannot_be_decoded_is_counted_reported_and_replaced(tmp_path):
    write_collection(tmp_path, broken={"0010003"})
    source = build_source(shard_config(tmp_path))
    reader = TrainStream(source, ToTensor(), batch_size=4, seed=0).reader(0)
    batches = [next(reader) for _ in range(6)]
    assert all(len(b.labels) == 4 for b in batches)
    failures = [f for b in batches for f in b.failures]
    assert sum(b.failed for b in batches) == 1
    assert failures[0]["key"] == "0010003" and failures[0]["source"] == "00001.tar"
    assert "not an image" in failures[0]["reason"]


def test_a_reader_restarted_from_its_position_continues_exactly(tmp_path):
    write_collection(tmp_path)
    source = build_source(shard_config(tmp_path, "data.shuffle_buffer=6"))
    stream = TrainStream(source, ToTensor(), batch_size=4, seed=3)
    reader = stream.reader(0)
    uninterrupted = [next(reader) for _ in range(12)]  # 7 batches per pass: crosses into pass 1
    assert uninterrupted[-1].pass_ == 1
    stop = uninterrupted[4]
    restarted = TrainStream(source, ToTensor(), 4, 3, positions=[(stop.pass_, stop.cursor)]).reader(0)
    for expected in uninterrupted[5:]:
        got = next(restarted)
        assert torch.equal(got.images, expected.images) and torch.equal(got.labels, expected.labels)
        assert (got.pass_, got.cursor) == (expected.pass_, expected.cursor)


def test_loader_workers_resume_in_turn(tmp_path):
    write_collection(tmp_path, shards=4)
    source = build_source(shard_config(tmp_path, "data.shuffle_buffer=4"))
    stream = TrainStream(source, ToTensor(), 3, 1, roles=2)
    uninterrupted = list(itertools.islice(make_loader(stream, 2, torch.device("cpu")), 9))
    assert [b.role for b in uninterrupted] == [0, 1] * 4 + [0]
    done = uninterrupted[:5]  # the last consumed batch came from reader 0
    positions = [(0, 0), (0, 0)]
    for batch in done:
        positions[batch.role] = (batch.pass_, batch.cursor)
    resumed = TrainStream(source, ToTensor(), 3, 1, roles=2, positions=positions, first_role=(done[-1].role + 1) % 2)
    for expected, got in zip(uninterrupted[5:], make_loader(resumed, 2, torch.device("cpu"))):
        assert got.role == expected.role and torch.equal(got.images, expected.images)


def test_a_global_batch_is_the_same_images_on_any_number_of_ranks():
    source = ListSource([f"img{i}.png" for i in range(50)], np.arange(50) % 5, [str(i) for i in range(50)], 5, "list")

    def rows(rank, world, batch):
        records = source.records(7, 0, rank, world, 0, 1, batch, Counters())
        return [r.uid[1] for r in records]

    one = rows(0, 1, 12)
    two = [rows(r, 2, 6) for r in range(2)]
    for step in range(4):  # 50 // 12 = 4 global batches in pass 0
        assert sorted(one[step * 12:(step + 1) * 12]) == sorted(two[0][step * 6:(step + 1) * 6] + two[1][step * 6:(step + 1) * 6])


def test_a_shard_without_labels_is_an_error_naming_it(tmp_path):
    write_collection(tmp_path)
    (tmp_path / "clusters" / "labels" / "labels_2.parquet").unlink()
    with pytest.raises(InputError, match="no labels for 1 of 3 shards \\(numbers 2\\)"):
        build_source(shard_config(tmp_path))


def test_labels_made_from_other_shards_are_detected(tmp_path):
    write_collection(tmp_path)
    table = pa.table({"key": ["elsewhere1", "elsewhere2"], "label": pa.array([0, 1], pa.int64()), "similarity": pa.array([1.0, 1.0], pa.float32())})
    pq.write_table(table, tmp_path / "clusters" / "labels" / "labels_0.parquet")
    with pytest.raises(InputError, match="none of its first 12 sample keys .* is in labels_0.parquet"):
        build_source(shard_config(tmp_path))


def test_labels_keyed_by_another_metadata_column_say_so_and_how_to_cluster_again(tmp_path):
    """`unicom cluster --key-column caption` names the samples by caption: the shards' keys are
    absent from the labels not because they are of other shards, and the error says what is."""
    import numpy as np

    from unicom.formats.clusters import ClusterFolder

    write_collection(tmp_path)
    captions = pa.array([f"caption {i}" for i in range(12)])
    ClusterFolder(tmp_path / "clusters").write_labels(0, captions, np.zeros(12, np.int64), np.ones(12, np.float32),
                                                      {"rows": 12, "invalid": 0, "key_column": "caption"})
    with pytest.raises(InputError) as error:
        build_source(shard_config(tmp_path))
    assert str(error.value) == (
        f"{tmp_path / '00000.tar'}: none of its first 12 sample keys (e.g. '0000000') is in labels_0.parquet (keys like "
        "'caption 0'); the labels name the samples by the metadata column 'caption' (`unicom cluster --key-column "
        "caption`), and training joins them with the samples by key: cluster again with --key-column key")


def _labels_of_other_inputs(root: Path, shard: int) -> None:
    path = root / "clusters" / "labels" / f"labels_{shard}.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "key", pa.array([f"x{key}" for key in table.column("key").to_pylist()])), path)


def test_labels_made_from_other_inputs_for_a_later_shard_stop_the_reader_that_meets_it(tmp_path):
    """The check before training reads the first shard only: a later shard whose label file
    names none of its samples would otherwise be skipped pass after pass, unlabelled."""
    write_collection(tmp_path)
    _labels_of_other_inputs(tmp_path, 2)
    reader = TrainStream(build_source(shard_config(tmp_path, "data.shuffle_buffer=4")), ToTensor(), 4, seed=0).reader(0)
    with pytest.raises(InputError, match=rf"^{tmp_path / '00002.tar'}: none of its samples \(keys like '0020000'\) is in "
                                         r"labels_2.parquet \(keys like 'x0020000'\); the labels were made from other "
                                         r"inputs: cluster these shards again, or leave this one out of data.shards$"):
        for _ in range(20):
            next(reader)


def test_a_readers_error_in_a_decoding_worker_reaches_the_run_as_the_reader_said_it(tmp_path):
    from unicom.train.data import reader_error

    write_collection(tmp_path)
    _labels_of_other_inputs(tmp_path, 2)
    stream = TrainStream(build_source(shard_config(tmp_path, "data.shuffle_buffer=4")), ToTensor(), 4, seed=0)
    with pytest.raises(InputError) as raised:
        list(itertools.islice(make_loader(stream, 1, torch.device("cpu")), 20))
    assert "Traceback" in str(raised.value)
    assert str(reader_error(raised.value)) == (
        f"{tmp_path / '00002.tar'}: none of its samples (keys like '0020000') is in labels_2.parquet (keys like "
        "'x0020000'); the labels were made from other inputs: cluster these shards again, or leave this one out of "
        "data.shards")


def test_a_shard_that_is_not_a_tar_is_refused_before_training_naming_it(tmp_path):
    write_collection(tmp_path)
    (tmp_path / "00001.tar").write_bytes(b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>\n" * 20)
    with pytest.raises(InputError) as error:
        build_source(shard_config(tmp_path))
    assert str(error.value) == (
        f"{tmp_path / '00001.tar'}: not a tar file: it is 1,300 bytes and does not start with a tar header but with "
        "'<!DOCTYPE html><html><body>503 Service U'; download the shard again, or leave it out of data.shards")
    (tmp_path / "00001.tar").write_bytes(b"")
    with pytest.raises(InputError, match="00001.tar: not a tar file: the file is empty; download the shard again"):
        build_source(shard_config(tmp_path))
    (tmp_path / "00002.tar").write_bytes(b"")
    with pytest.raises(InputError, match=rf"00001.tar: not a tar file: the file is empty \(1 more shards are refused "
                                         rf"too: {tmp_path / '00002.tar'}\); download"):
        build_source(shard_config(tmp_path))


def _build_with_rank_one_seeing_whole_shards(rank, world_size, root):
    import unicom.data.shards

    if rank == 1:  # this rank's copy of the shards is whole (node-local copies can differ)
        unicom.data.shards.not_a_tar = lambda path: None
    try:
        build_source(shard_config(Path(root)))
    except InputError as error:
        return str(error)
    return "built"


def test_every_rank_takes_rank_0s_decision_on_shards_that_are_not_tars(tmp_path):
    write_collection(tmp_path)
    (tmp_path / "00002.tar").write_bytes(b"Access Denied" * 50)
    results = run_workers(_build_with_rank_one_seeing_whole_shards, 2, str(tmp_path))
    assert results[0] == results[1] and results[0][0] == "ok"
    assert results[0][1].startswith(f"{tmp_path / '00002.tar'}: not a tar file: it is 650 bytes")


def test_compressed_and_empty_tars_pass_the_shard_check(tmp_path):
    import gzip

    write_collection(tmp_path)
    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress((tmp_path / "00001.tar").read_bytes()))
    (tmp_path / "00001.tar").unlink()
    write_tar_shard(tmp_path / "00003.tar", [])  # a tar of zeros only, with the empty labels clustering gives it
    empty = pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.int64()), "similarity": pa.array([], pa.float32())})
    pq.write_table(empty, tmp_path / "clusters" / "labels" / "labels_3.parquet")
    assert [n for n, _ in build_source(shard_config(tmp_path)).shards] == [0, 1, 2]


def test_a_shard_that_breaks_off_is_reported_once_not_every_pass(tmp_path):
    write_collection(tmp_path, shards=1)
    data = (tmp_path / "00000.tar").read_bytes()
    source = build_source(shard_config(tmp_path))
    inside = tarfile.open(tmp_path / "00000.tar").getmembers()[12].offset_data + 2
    (tmp_path / "00000.tar").write_bytes(data[:inside])  # the download broke off inside a member
    counters = Counters()
    read = [len(list(source.records(0, pass_, 0, 1, 0, 1, 1, counters))) for pass_ in range(3)]
    assert read[0] == read[1] == read[2] > 0
    unlabelled, failed, failures = counters.take()
    assert failed == 1 and [f["source"] for f in failures] == [str(tmp_path / "00000.tar")]
    assert failures[0]["reason"].startswith("shard broke off after ")


def test_labels_beyond_the_number_of_classes_are_an_error(tmp_path):
    write_collection(tmp_path)
    (tmp_path / "clusters" / "centroids.json").write_text(json.dumps({"k": 3}))
    with pytest.raises(InputError, match="labels reach 3, but there are only 3 classes"):
        build_source(shard_config(tmp_path))


def test_an_epoch_is_one_pass_over_the_labelled_samples(tmp_path):
    expected = write_collection(tmp_path)
    source = build_source(shard_config(tmp_path))
    assert steps_per_epoch(source, world_size=2, batch_size=2, accumulation=2) == expected["labelled"] // 8


def test_an_image_folder_takes_pseudo_labels_by_relative_path(tmp_path):
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name)
    (tmp_path / "clusters" / "labels").mkdir(parents=True)
    table = pa.table({"key": ["a/1.png", "b/3.png"], "label": pa.array([1, 0], pa.int64()), "similarity": pa.array([1.0, 1.0], pa.float32())})
    pq.write_table(table, tmp_path / "clusters" / "labels" / "labels_0.parquet")
    config = load_config(None, ["out=/tmp/unused", f"data.folder={tmp_path / 'images'}", f"data.labels={tmp_path / 'clusters'}"])
    source = build_source(config)
    assert source.keys == ["a/1.png", "b/3.png"] and source.labels.tolist() == [1, 0]
    assert source.unlabelled == 1


def test_a_list_whose_key_repeats_takes_the_keys_label_rows_in_order_across_parts(tmp_path):
    """Rows of a list that share a key were each embedded and clustered on their own (parts of
    3 and 2 rows): the n-th row of the key takes the key's n-th label row, as shards do, not
    all of them the last."""
    (tmp_path / "clusters" / "labels").mkdir(parents=True)
    rows = [("k", "1.png"), ("a", "2.png"), ("k", "3.png"), ("k", "4.png"), ("b", "5.png")]
    for _, name in rows:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "list.csv").write_text("key,path\n" + "".join(f"{key},{tmp_path / name}\n" for key, name in rows))
    for part, (keys, labels) in enumerate([(["k", "a", "k"], [2, 1, 0]), (["k", "b"], [3, 1])]):
        table = pa.table({"key": keys, "label": pa.array(labels, pa.int64()), "similarity": pa.array([1.0] * len(keys), pa.float32())})
        pq.write_table(table, tmp_path / "clusters" / "labels" / f"labels_{part}.parquet")
    config = load_config(None, ["out=/tmp/unused", f"data.table={tmp_path / 'list.csv'}", f"data.labels={tmp_path / 'clusters'}"])
    source = build_source(config)
    assert source.keys == ["k", "a", "k", "k", "b"] and source.labels.tolist() == [2, 1, 0, 3, 1]
    assert [Path(p).name for p in source.images] == ["1.png", "2.png", "3.png", "4.png", "5.png"]


def test_an_image_folder_with_labels_keyed_by_caption_says_so_and_how_to_cluster_again(tmp_path):
    import numpy as np

    from unicom.formats.clusters import ClusterFolder

    for name in ("a/1.png", "b/3.png"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name)
    ClusterFolder(tmp_path / "clusters").write_labels(0, pa.array(["a cat", "a dog"]), np.array([1, 0]), np.ones(2, np.float32),
                                                      {"rows": 2, "invalid": 0, "key_column": "caption"})
    config = load_config(None, ["out=/tmp/unused", f"data.folder={tmp_path / 'images'}", f"data.labels={tmp_path / 'clusters'}"])
    with pytest.raises(InputError) as error:
        build_source(config)
    assert str(error.value) == (
        f"{tmp_path / 'images'}: none of its keys (e.g. 'a/1.png') is in the labels of {tmp_path / 'clusters' / 'labels'} "
        "(keys like 'a cat'); the labels name the samples by the metadata column 'caption' (`unicom cluster --key-column "
        "caption`), and training joins them with the samples by key: cluster again with --key-column key")


def test_a_class_folder_has_contiguous_labels_in_folder_order(tmp_path):
    for name in ("cat/1.png", "dog/2.png", "dog/3.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    source = build_source(load_config(None, ["out=/tmp/unused", f"data.folder={tmp_path}"]))
    assert source.labels.tolist() == [0, 1, 1] and source.num_classes == 2


def test_an_empty_shard_is_left_out_so_no_rank_meets_a_pass_without_samples(tmp_path):
    write_collection(tmp_path)
    write_tar_shard(tmp_path / "00001.tar", [])  # an empty shard, and the empty labels clustering gives it
    empty = pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.int64()), "similarity": pa.array([], pa.float32())})
    pq.write_table(empty, tmp_path / "clusters" / "labels" / "labels_1.parquet")
    source = build_source(shard_config(tmp_path))
    assert [number for number, _ in source.shards] == [0, 2]
    assert source.describe() == "2 shards (1 more without a labelled sample left out), 20 labelled samples, 4 classes"
    # rank 1 of 2 reads one shard per pass: the empty one would have stopped it
    reader = TrainStream(source, ToTensor(), batch_size=5, seed=0, rank=1, world_size=2).reader(0)
    batches = [next(reader) for _ in range(20)]  # 2 batches per pass: 10 passes
    assert [b.pass_ for b in batches] == [p for p in range(10) for _ in range(2)]


def test_a_batch_that_no_reader_can_fill_from_its_shards_is_refused_before_training(tmp_path):
    write_collection(tmp_path, shards=2)  # 10 labelled samples per shard
    source = build_source(shard_config(tmp_path))
    # one shard per rank and pass: a batch of 11 would be read for ever and never filled
    with pytest.raises(InputError, match=r"data.batch_size=11 cannot be filled: 2 rank\(s\) x 1 reader\(s\) share 2 "
                                         r"shards, so a reader may get only 1 shard\(s\) per pass, and the largest 1 hold "
                                         r"10 labelled samples; .* lower data.batch_size to at most 10"):
        source.check_readers(world_size=2, roles=1, batch_size=11)
    source.check_readers(world_size=2, roles=1, batch_size=10)
    source.check_readers(world_size=1, roles=1, batch_size=11)  # one reader reads both shards


def test_shards_without_labelled_samples_do_not_count_as_shards_that_feed_a_reader(tmp_path):
    write_collection(tmp_path, shards=2)
    write_tar_shard(tmp_path / "00001.tar", [])
    empty = pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.int64()), "similarity": pa.array([], pa.float32())})
    pq.write_table(empty, tmp_path / "clusters" / "labels" / "labels_1.parquet")
    source = build_source(shard_config(tmp_path))
    with pytest.raises(InputError, match=r"^1 shards with labelled samples \(1 more without\) cannot feed 2 ranks x 1 readers"):
        source.check_readers(world_size=2, roles=1, batch_size=1)


def test_samples_of_a_shard_that_share_a_key_each_take_their_own_label_row(tmp_path):
    """A shard holding the keys k0, k1, k2 twice (a repacked set): `unicom embed` wrote one row
    per sample and `unicom cluster` labelled each, in the shard's order; the n-th sample of a
    key takes the n-th label row of that key, not the last row's label for all of them."""
    labels = [0, 1, 2, 3, 0, 1]
    keys = [f"k{i % 3}" for i in range(6)]
    write_tar_shard(tmp_path / "00000.tar", [{"key": key, "png": png((10 * label, 0, 0))} for key, label in zip(keys, labels)])
    (tmp_path / "clusters" / "labels").mkdir(parents=True)
    pq.write_table(pa.table({"key": keys, "label": pa.array(labels, pa.int64())}),
                   tmp_path / "clusters" / "labels" / "labels_0.parquet")
    (tmp_path / "clusters" / "centroids.json").write_text(json.dumps({"k": 4}))
    source = build_source(shard_config(tmp_path))
    records = sorted(source.records(0, 0, 0, 1, 0, 1, 6, Counters()), key=lambda r: r.uid)
    assert [(r.key, r.label) for r in records] == list(zip(keys, labels))


def _one_key_twice(root: Path, label_rows: dict) -> None:
    """Shard 0: k0 (a broken image), k0 (red 20), k1 (red 10); its label file ``label_rows``."""
    write_tar_shard(root / "00000.tar", [{"key": "k0", "png": b"broken"}, {"key": "k0", "png": png((20, 0, 0))},
                                         {"key": "k1", "png": png((10, 0, 0))}])
    (root / "clusters" / "labels").mkdir(parents=True)
    pq.write_table(pa.table(label_rows), root / "clusters" / "labels" / "labels_0.parquet")
    (root / "clusters" / "centroids.json").write_text(json.dumps({"k": 3}))


def test_a_key_repeated_in_a_shard_labels_only_the_sample_its_occurrence_names(tmp_path):
    """Two samples keyed k0 and one label row, for the second (the first failed to embed):
    the first stays unlabelled, the second takes the row."""
    _one_key_twice(tmp_path, {"key": ["k0", "k1"], "occurrence": pa.array([1, 0], pa.int32()),
                              "label": pa.array([2, 1], pa.int64())})
    source = build_source(shard_config(tmp_path))
    counters = Counters()
    records = sorted(source.records(0, 0, 0, 1, 0, 1, 2, counters), key=lambda r: r.uid)
    assert [(r.uid[1], r.key, r.label) for r in records] == [(1, "k0", 2), (2, "k1", 1)]
    assert counters.unlabelled == 1


def test_a_label_file_without_occurrences_gives_its_one_row_of_a_key_to_every_sample_of_it(tmp_path):
    """An earlier version's label file, k0's broken first sample not embedded: its one row
    labels both samples of k0, as it did then (the broken one is then dropped when decoded)."""
    _one_key_twice(tmp_path, {"key": ["k0", "k1"], "label": pa.array([2, 1], pa.int64())})
    source = build_source(shard_config(tmp_path))
    records = sorted(source.records(0, 0, 0, 1, 0, 1, 2, Counters()), key=lambda r: r.uid)
    assert [(r.uid[1], r.key, r.label) for r in records] == [(0, "k0", 2), (1, "k0", 2), (2, "k1", 1)]


def test_a_label_file_without_occurrences_is_refused_for_a_key_whose_rows_differ_and_outnumber_its_samples(tmp_path):
    """An earlier version's label file with three rows of k0, of two labels, for its two
    samples: which row is whose is unknown; the shard, the label file and the key are named,
    and what to do."""
    _one_key_twice(tmp_path, {"key": ["k0", "k0", "k0", "k1"], "label": pa.array([2, 0, 2, 1], pa.int64())})
    source = build_source(shard_config(tmp_path))
    with pytest.raises(InputError) as error:
        list(source.records(0, 0, 0, 1, 0, 1, 2, Counters()))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / '00000.tar'} with {tmp_path / 'clusters' / 'labels' / 'labels_0.parquet'}: "
                              "key 'k0' is on 3 label row(s) but 2 samples carry it")
    assert "Run `unicom embed` with this version into a new --out, then `unicom cluster` on that into a new --out" in message
