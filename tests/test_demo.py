"""The demo: scikit-learn's digits through embed layout -> cluster -> train -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_pixel_features_are_centred_unit_rows_of_the_8x8_image():
    from unicom.demo import digit_image, pixel_features

    scan = np.zeros((8, 8))
    scan[2:6, 3] = 16  # a vertical stroke
    features = pixel_features([digit_image(scan)])
    assert features.shape == (1, 64)
    assert abs(float(features.sum())) < 1e-4 and abs(float(np.linalg.norm(features)) - 1) < 1e-5
    grey = features.reshape(8, 8)
    assert grey[3, 3] < 0 < grey[0, 0]  # ink is dark on white: below the image's mean


def test_cluster_purity_counts_the_majority_digit_of_each_pseudo_class(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unicom.demo import cluster_purity

    (tmp_path / "labels").mkdir()
    table = pa.table({"key": ["a", "b", "c", "d", "e"], "label": pa.array([0, 0, 0, 1, 1], pa.int64())})
    pq.write_table(table, tmp_path / "labels" / "labels_0.parquet")
    truth = {"a": 3, "b": 3, "c": 4, "d": 1, "e": 1}
    assert cluster_purity(tmp_path / "labels", truth) == pytest.approx(4 / 5)


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_reports_recall_on_held_out_digits(tmp_path):
    from unicom.demo import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = run(tmp_path / "demo", steps=20)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    for name in ("report.md", "metrics.json", "loss.png", "recall_vs_dimension.png", "cluster_sizes.png",
                 "train/model/unicom_model.json", "clusters/labels/labels_0.parquet", "features/img_emb/img_emb_0.npy"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["recall@1"] == metrics["recall@1"]
    assert set(saved["recall@1"]) == {"clustering_features", "untrained_network", "trained_network",
                                      "trained_network_compact_epoch"}
    assert all(0.0 <= value <= 1.0 for value in saved["recall@1"].values())
    assert saved["training"]["steps"] == 20 and saved["training"]["sample_rate"] < 1
    assert saved["training"]["compact_epoch"]["steps"] == 5
    assert saved["dataset"]["train_images"] + saved["dataset"]["held_out_images"] == 1797
    # the reported numbers are those of `unicom evaluate`'s own reports
    trained = json.loads((out / "evaluate" / "trained_network" / "metrics.json").read_text())
    assert saved["recall@1"]["trained_network"] == trained["metrics"]["recall@1"]
    assert "Recall@1 on held-out digits" in (out / "report.md").read_text()


def test_the_untrained_network_is_the_training_runs_starting_point(tmp_path):
    from support import write_class_folder

    from unicom.demo import repository_config, untrained_model
    from unicom.models.export import read_weights
    from unicom.train.config import load_config
    from unicom.train.trainer import prepare

    write_class_folder(tmp_path / "images", [0, 1], 64, size=32)
    config = load_config(repository_config(), [f"out={tmp_path / 'run'}", f"data.folder={tmp_path / 'images'}"])
    start = prepare(config).backbone.state_dict()
    saved = read_weights(untrained_model(config, tmp_path / "untrained"))
    assert saved.keys() == start.keys()
    assert all(torch.equal(saved[k], start[k]) for k in saved)
