"""Fine-tuning labels as given: ids are prototype rows or mapped visibly, never silently renumbered;
nested class folders are read only as the recipe says."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from unicom.errors import InputError
from unicom.train.config import load_config
from unicom.train.data import build_source

TINY = [
    "model.image_size=16", "model.patch_size=8", "model.width=32", "model.depth=1", "model.heads=2",
    "model.embedding_dim=8", "data.batch_size=2", "data.workers=0", "loss.scale=16", "loss.sample_rate=1.0",
    "train.steps=1", "log.tensorboard=false", "train.device=cpu",
]


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def table(folder: Path, labels: list) -> Path:
    """``folder/list.csv`` with one image per label."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        (folder / f"{i}.png").write_bytes(png((i * 20, 0, 0)))
        rows.append(f"{i}.png,{label}")
    path = folder / "list.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def source_of(listing: Path, *extra: str):
    return build_source(load_config(None, ["out=/tmp/unused", f"data.table={listing}", *extra]))


def test_a_negative_label_is_an_error_naming_the_file_and_row(tmp_path):
    listing = table(tmp_path, [0, 1, 2, -1])
    with pytest.raises(InputError, match=r"list\.csv: data rows \[4\] have negative labels \(e\.g\. -1\)"):
        source_of(listing)


def test_a_label_beyond_the_given_number_of_classes_is_an_error(tmp_path):
    listing = table(tmp_path, [0, 1, 99, 1])
    with pytest.raises(InputError, match=r"list\.csv: data rows \[3\] have labels beyond loss\.num_classes=3 \(e\.g\. 99\)"):
        source_of(listing, "loss.num_classes=3")


def test_a_label_that_is_not_a_whole_number_is_an_error(tmp_path):
    listing = table(tmp_path, [0, 1.5, 2, 3])
    with pytest.raises(InputError, match=r"list\.csv: data rows \[2\] have 'label' values that are not whole numbers"):
        source_of(listing)


def test_with_the_number_of_classes_given_each_id_is_its_own_prototype_row(tmp_path):
    listing = table(tmp_path, [4, 0, 4, 2])
    source = source_of(listing, "loss.num_classes=6")
    assert source.labels.tolist() == [4, 0, 4, 2]
    assert source.num_classes == 6


def test_the_mapping_of_given_ids_to_prototype_rows_is_written_and_printed(tmp_path):
    from unicom.train.trainer import train

    listing = table(tmp_path / "data", [3, 7, 9, 3, 7, 9])
    console = io.StringIO()
    train(load_config(None, [f"out={tmp_path / 'run'}", f"data.table={listing}", *TINY]), console=console)
    lines = (tmp_path / "run" / "classes.csv").read_text().splitlines()
    assert lines == ["prototype,label", "0,3", "1,7", "2,9"]
    assert "3 labels -> prototype rows: 3 -> 0, 7 -> 1, 9 -> 2" in console.getvalue()


def nested(root: Path) -> Path:
    """``alphabet/character/*.png``: 2 alphabets, 5 characters, 2 images each."""
    for alphabet, characters in (("greek", ["alpha", "beta", "gamma"]), ("latin", ["a", "b"])):
        for character in characters:
            folder = root / alphabet / character
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}.png").write_bytes(png((len(character) * 30, i * 40, 0)))
    return root


def test_nested_class_folders_are_refused_with_what_was_found_and_what_to_do(tmp_path):
    root = nested(tmp_path / "omniglot")
    with pytest.raises(InputError) as caught:
        build_source(load_config(None, ["out=/tmp/unused", f"data.folder={root}"]))
    message = str(caught.value)
    assert "2 top-level folders, 5 folders with images" in message
    assert "data.folder_classes=leaf" in message and "data.folder_classes=top" in message


def test_nested_class_folders_as_leaf_or_top_classes_when_the_recipe_says_so(tmp_path):
    root = nested(tmp_path / "omniglot")
    leaf = build_source(load_config(None, ["out=/tmp/unused", f"data.folder={root}", "data.folder_classes=leaf"]))
    assert leaf.num_classes == 5
    assert leaf.class_labels == ["greek/alpha", "greek/beta", "greek/gamma", "latin/a", "latin/b"]
    top = build_source(load_config(None, ["out=/tmp/unused", f"data.folder={root}", "data.folder_classes=top"]))
    assert top.num_classes == 2 and top.class_labels == ["greek", "latin"]
