"""``unicom convert``: released checkpoint <-> model folder, with identical tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from support import random_unicom_vit

from unicom.cli import main
from unicom.models.encoders import load_encoder
from unicom.models.unicom_vit import ViTSettings

TINY = ViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=1, mlp_dim=256, embedding_dim=16)


@pytest.fixture
def released_file(tmp_path):
    path = tmp_path / "FP16-ViT-tiny.pt"
    torch.save({k: v.half() for k, v in random_unicom_vit(TINY, seed=11).state_dict().items()}, path)
    return path


def test_released_to_unicom_and_back_gives_identical_tensors(released_file, tmp_path, capsys):
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")]) == 0
    assert "16-d embeddings" in capsys.readouterr().out
    assert main(["convert", "unicom-to-released", str(tmp_path / "model"), str(tmp_path / "back.pt")]) == 0
    original = torch.load(released_file, weights_only=True)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(original)  # same keys, in the module's order
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_converted_folder_embeds_like_the_released_file(released_file, tmp_path):
    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    from_file, from_folder = load_encoder(str(released_file)), load_encoder(str(tmp_path / "model"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_folder.encode_image(x), from_file.encode_image(x), rtol=1e-5, atol=1e-5)
    assert from_folder.embedding_dim == from_file.embedding_dim == 16


def test_a_head_count_given_as_json_settings_completes_the_sizes_read_off_the_shapes(tmp_path, capsys):
    # 32-d heads: the shapes say width 64, which would be read as one 64-d head
    two_heads = dataclasses.replace(TINY, heads=2)
    network = random_unicom_vit(two_heads, seed=3)
    torch.save(network.state_dict(), tmp_path / "my-vit.pt")
    assert main(["convert", "released-to-unicom", str(tmp_path / "my-vit.pt"), str(tmp_path / "model"),
                 "--arch", '{"heads": 2}']) == 0
    assert "width 64, depth 2, 2 heads" in capsys.readouterr().out
    assert json.loads((tmp_path / "model" / "unicom_model.json").read_text())["settings"] == two_heads.to_dict()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_encoder(str(tmp_path / "model")).encode_image(x), network(x))


def test_arch_that_is_not_a_json_object_is_refused_naming_the_option(released_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model"), "--arch", '{"heads": 2'])
    assert "argument --arch: '{\"heads\": 2' is not a JSON object of ViT settings" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_provenance_names_the_source_file_and_its_checksum(released_file, tmp_path):
    import hashlib

    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    provenance = json.loads((tmp_path / "model" / "unicom_model.json").read_text())["provenance"]
    assert provenance["source"] == released_file.name
    assert provenance["sha256"] == hashlib.sha256(released_file.read_bytes()).hexdigest()
    assert provenance["released_name"] is None  # custom sizes, not one of the four releases


def test_float32_model_is_cast_to_float16_on_request(tmp_path):
    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess

    model = random_unicom_vit(TINY, seed=12)
    save_model(tmp_path / "model", model, "unicom_vit", TINY, clip_preprocess(32))
    main(["convert", "unicom-to-released", str(tmp_path / "model"), str(tmp_path / "out.pt"), "--dtype", "float16"])
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert state["pos_embed"].dtype == torch.float16
    assert state["feature.1.num_batches_tracked"].dtype == torch.int64  # only floating tensors are cast
    assert torch.equal(state["pos_embed"].float(), model.pos_embed.detach())  # the weights are fp16-exact


def test_values_float16_cannot_hold_are_refused_rather_than_written_as_inf(tmp_path, capsys):
    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess

    model = random_unicom_vit(TINY, seed=3)
    with torch.no_grad():
        model.feature[1].running_var.fill_(1e5)  # beyond float16's largest value, 65504
    save_model(tmp_path / "model", model, "unicom_vit", TINY, clip_preprocess(32))
    assert main(["convert", "unicom-to-released", str(tmp_path / "model"), str(tmp_path / "out.pt"), "--dtype", "float16"]) == 2
    assert "values of feature.1.running_var exceed the range of torch.float16" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert main(["convert", "unicom-to-released", str(tmp_path / "model"), str(tmp_path / "out.pt"), "--dtype", "float32"]) == 0


def test_existing_outputs_are_not_replaced_without_overwrite(released_file, tmp_path, capsys):
    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")]) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model"), "--overwrite"]) == 0


def test_another_projects_weights_in_the_output_are_not_replaced_without_overwrite(released_file, tmp_path, capsys):
    timm_folder = tmp_path / "timm-model"
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
    (timm_folder / "model.safetensors").write_bytes(b"their weights")
    assert main(["convert", "released-to-unicom", str(released_file), str(timm_folder)]) == 2
    assert "holds a model.safetensors without unicom_model.json" in capsys.readouterr().err
    assert (timm_folder / "model.safetensors").read_bytes() == b"their weights"
    assert main(["convert", "released-to-unicom", str(released_file), str(timm_folder), "--overwrite"]) == 0
    assert sorted(p.name for p in timm_folder.iterdir()) == ["model.safetensors", "unicom_model.json"]  # no stale timm config


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_other_files_is_refused_before_any_download(tmp_path, capsys, overwrite):
    taken = tmp_path / "run-7"
    taken.mkdir()
    for name in ("embed_config.json", "img_emb", "notes.txt"):
        (taken / name).write_text(name)
    downloads = tmp_path / "downloads"
    assert main(["convert", "released-to-unicom", "ViT-B/32", str(taken), "--download-root", str(downloads),
                 *overwrite]) == 2
    assert (f"{taken}: a folder that holds no model but other files (embed_config.json, img_emb, notes.txt); the model "
            f"would be written beside them: give an empty or new folder (e.g. {taken / 'model'})") in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["embed_config.json", "img_emb", "notes.txt"]
    assert not downloads.exists()


def test_an_empty_folder_takes_the_model(released_file, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["model.safetensors", "unicom_model.json"]


def test_a_model_folder_given_as_the_released_source_says_it_is_one(released_file, tmp_path, capsys):
    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    capsys.readouterr()
    assert main(["convert", "released-to-unicom", str(tmp_path / "model"), str(tmp_path / "again")]) == 2
    message = capsys.readouterr().err
    assert f"{tmp_path / 'model'}: a model folder already; a released-format checkpoint is one file" in message
    assert "unicom convert unicom-to-released FOLDER FILE.pt" in message
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("direction", ["released-to-unicom", "unicom-to-released"])
def test_an_output_url_is_refused_rather_than_written_to_a_local_folder_named_after_it(
    released_file, tmp_path, monkeypatch, capsys, direction
):
    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    source = str(released_file) if direction == "released-to-unicom" else str(tmp_path / "model")
    assert main(["convert", direction, source, "s3://bucket/models/out"]) == 2
    assert "s3://bucket/models/out: " in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_other_architectures_have_no_released_form(tmp_path, monkeypatch, capsys):
    from torch import nn

    from unicom.models import export, registry

    monkeypatch.setitem(registry.ARCHITECTURES, "linear", registry.Architecture("linear", lambda s: nn.Linear(2, 2)))
    preprocess = {"size": 4, "resize_mode": "squash", "interpolation": "bilinear", "mean": [0, 0, 0], "std": [1, 1, 1]}
    export.save_model(tmp_path / "m", nn.Linear(2, 2), "linear", {}, preprocess, embedding_dim=2)
    assert main(["convert", "unicom-to-released", str(tmp_path / "m"), str(tmp_path / "out.pt")]) == 2
    assert "architecture 'linear' has no released-checkpoint form" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_a_model_folder_is_not_written_over_a_file(released_file, tmp_path, capsys):
    (tmp_path / "taken").write_bytes(b"a file")
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "taken"), "--overwrite"]) == 2
    assert "taken: is a file; a model is written as a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_bytes() == b"a file"


def test_a_released_file_is_not_written_over_a_folder(released_file, tmp_path, capsys):
    main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "model")])
    (tmp_path / "out").mkdir()
    assert main(["convert", "unicom-to-released", str(tmp_path / "model"), str(tmp_path / "out"), "--overwrite"]) == 2
    assert "out: is a folder; the released format is one file" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _killed_while_writing(script: str) -> None:
    """Run ``script`` in a Python process whose safetensors/torch writes are cut by kill -9
    after their first bytes, as a machine that is shut down mid-write."""
    import signal
    import subprocess
    import sys

    prelude = (
        "import os, signal, safetensors.torch, torch\n"
        "def killed(obj, path, *args, **kwargs):\n"
        "    with open(path, 'wb') as out:\n"
        "        out.write(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "safetensors.torch.save_file = killed\n"
        "torch.save = killed\n"
    )
    result = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def test_a_convert_killed_mid_write_leaves_nothing_behind_once_rerun(released_file, tmp_path):
    model = tmp_path / "model"
    _killed_while_writing(f"from unicom.cli import main; main(['convert', 'released-to-unicom', {str(released_file)!r}, {str(model)!r}])")
    assert [p.name for p in model.iterdir()] != []  # the killed write's temporary file
    assert main(["convert", "released-to-unicom", str(released_file), str(model)]) == 0
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors", "unicom_model.json"]

    _killed_while_writing(f"from unicom.cli import main; main(['convert', 'unicom-to-released', {str(model)!r}, {str(tmp_path / 'back.pt')!r}])")
    assert main(["convert", "unicom-to-released", str(model), str(tmp_path / "back.pt")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FP16-ViT-tiny.pt", "back.pt", "model"]


@pytest.mark.slow
def test_a_convert_the_disk_refuses_says_what_to_do_in_both_directions(released_file, tmp_path):
    """A full disk (here a file-size limit of 4 KB): safetensors' and torch's writers report
    it in their own words (SafetensorError, 'unexpected pos'); an error naming the output and
    what to do, no traceback, no temporary left, and a rerun with room writes the model."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process

    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path / "room")]) == 0
    runs = {
        "model": (["released-to-unicom", str(released_file), str(tmp_path / "model")],
                  f"{tmp_path / 'model'}: the model could not be written (the write stopped short, as on a full disk ("),
        "back.pt": (["unicom-to-released", str(tmp_path / "room"), str(tmp_path / "back.pt")],
                    f"{tmp_path}: back.pt could not be written (the write stopped short, as on a full disk ("),
    }
    for name, (arguments, said) in runs.items():
        failed = subprocess.run([sys.executable, "-m", "unicom.cli", "convert", *arguments], capture_output=True,
                                text=True, preexec_fn=limit_file_size, timeout=300)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr
        assert said in failed.stderr and "free space there or write to another folder, then run again" in failed.stderr
        assert [p.name for p in tmp_path.rglob("*.tmp")] == []
        assert main(["convert", *arguments]) == 0
    back, released = torch.load(tmp_path / "back.pt"), torch.load(released_file)
    assert back.keys() == released.keys() and all(torch.equal(back[k], released[k]) for k in released)


def test_arch_given_with_a_released_name_is_refused_before_the_download_not_ignored(tmp_path, capsys, monkeypatch):
    # the name's own sizes would be converted and --arch dropped without a word
    monkeypatch.setenv("UNICOM_BASE_URL", "http://127.0.0.1:9")  # nothing is fetched: refused before
    assert main(["convert", "released-to-unicom", "ViT-B/32", str(tmp_path / "model"), "--download-root", str(tmp_path),
                 "--arch", '{"heads": 2}']) == 2
    assert capsys.readouterr().err.strip().endswith(
        "ViT-B/32: arch={'heads': 2} was given, but a released name, a model folder or an hf-hub model records its "
        "own architecture; arch applies only to a released-format file (.pt/.safetensors): leave it out")
    assert not (tmp_path / "model").exists()


def test_a_checkpoint_is_converted_into_the_folder_that_holds_it(released_file, tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir()) == [released_file.name]
    assert main(["convert", "released-to-unicom", str(released_file), str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([released_file.name, "model.safetensors",
                                                                 "unicom_model.json"])


def test_the_folder_released_files_are_downloaded_to_is_not_refused_for_its_downloads(tmp_path, capsys,
                                                                                    monkeypatch):
    # a download kept there by a run that failed afterwards: a rerun goes on to the download (offline here)
    (tmp_path / "FP16-ViT-B-32.pt").write_bytes(b"a download cut short")
    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    assert main(["convert", "released-to-unicom", "ViT-B/32", str(tmp_path), "--download-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no model but other files" not in err and "UNICOM_OFFLINE" in err, err
