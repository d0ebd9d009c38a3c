"""The `unicom` command and the package's import cost."""

import subprocess
import sys
from pathlib import Path

import pytest

import unicom
from unicom.cli import available_commands, main
from unicom.errors import InputError


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit:
        assert exit.code == 0
    assert capsys.readouterr().out.strip() == f"unicom {unicom.__version__}"


def test_help_lists_every_installed_command(capsys):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for name in available_commands():
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "unicom", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"unicom {unicom.__version__}"


def test_import_unicom_is_light():
    code = (
        "import sys, unicom; "
        "heavy = [m for m in ('torch', 'numpy', 'matplotlib', 'fastapi', 'sklearn', 'faiss', 'unicom.train') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_losses_do_not_import_the_trainer_the_server_or_triton():
    code = ("import sys, unicom.losses, unicom.optim; from unicom.losses import PartialFC; "
            "print([m for m in sys.modules if m.startswith(('unicom.train', 'fastapi', 'matplotlib', 'triton'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_index_does_not_print_how_faiss_picked_its_build(tmp_path):
    """faiss's loader reports at INFO each build it tries ("Could not load library with
    AVX512 support ..."): not a failure, so `unicom index` does not show it."""
    import numpy as np

    from unicom.formats.embeddings import write_part

    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    result = subprocess.run([sys.executable, "-m", "unicom", "index", "--emb", str(tmp_path / "emb"),
                             "--out", str(tmp_path / "index")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flat index" in result.stderr + result.stdout  # the command's own report still shows
    assert "Loading faiss" not in result.stderr and "Could not load library" not in result.stderr


def test_faiss_warnings_still_show_after_the_commands_configure_logging():
    code = ("import logging; from unicom.commands import configure_logging; configure_logging(); import faiss; "
            "logging.getLogger('faiss.loader').warning('a real faiss.loader warning'); "
            "logging.getLogger('faiss').info('another faiss logger')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert "a real faiss.loader warning" in result.stderr and "another faiss logger" in result.stderr
    assert "Loading faiss" not in result.stderr


def test_s3_clients_say_where_they_found_credentials_only_when_something_is_wrong():
    # botocore reports at INFO where it found credentials and endpoints, on every start of index/serve on s3://
    code = ("import logging; from unicom.commands import configure_logging; configure_logging(); "
            "logging.getLogger('botocore.credentials').info('Found credentials in environment variables.'); "
            "logging.getLogger('aiobotocore.credentials').info('Found credentials in environment variables.'); "
            "logging.getLogger('botocore.credentials').warning('a real botocore warning'); "
            "logging.getLogger('unicom.search.index').info('the command goes on')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stderr.splitlines() == ["a real botocore warning", "the command goes on"]


def test_a_one_process_command_started_by_torchrun_in_several_processes_is_refused(tmp_path, capsys, monkeypatch):
    # what torchrun sets in each of its processes: each would evaluate, index, train the head... alone
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    out = tmp_path / "out"
    for argv in (["evaluate", "--model", "timm/test_vit", "--dataset", "sop", "--out", str(out)],
                 ["index", "--emb", str(tmp_path), "--out", str(out)],
                 ["probe", "--config", "unifex_tiny", "data.train=[a.csv]", f"out={out}"],
                 ["search", "--index", str(tmp_path), "a.jpg"]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert f"unicom {argv[0]}: error: `unicom {argv[0]}` runs in one process, but torchrun started 2" in error
        assert "Run it without torchrun (only cluster, embed, train share their work" in error
        assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a torchrun of one process is one process
    main(["index", "--emb", str(tmp_path), "--out", str(out)])
    assert "torchrun" not in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`unicom train --list-keys | head -3`: the reader closes the pipe (here before the first
    line is written); the command ends without a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "unicom", "train", "--list-keys"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # what `head` does once it has its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) != 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_ctrl_c_during_a_command_ends_it_without_a_traceback_nor_temporaries(tmp_path):
    """Ctrl-C while `unicom embed` waits for an image (a named pipe nobody writes, so the
    command is surely still running): exit status 130, one line saying so, no traceback, and
    nothing half-written in the output folder."""
    import os
    import signal
    import threading
    import time

    from support import tiny_open_clip, write_class_folder

    spec = tiny_open_clip(tmp_path / "clip")
    images = write_class_folder(tmp_path / "images", [0], 2)
    fifo = tmp_path / "never_written.jpg"
    os.mkfifo(fifo)
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{p}\n" for p in [*images, fifo]))
    out = tmp_path / "emb"
    env = dict(os.environ, UNICOM_PROGRESS="1", PYTHONWARNINGS="ignore")
    # Ctrl-C as a terminal delivers it: a shell's background job (`make test &`, nohup) starts with SIGINT
    # ignored, which Python would inherit and then take no Ctrl-C at all
    process = subprocess.Popen([sys.executable, "-m", "unicom", "embed", "--input", str(tmp_path / "list.csv"),
                                "--model", spec, "--out", str(out), "--workers", "0", "--batch-size", "1"],
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    # the progress bar: the model is loaded, images are being read
    while "embed 1 parts" not in "".join(chunks) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is not None or time.monotonic() >= deadline:
        process.kill()
        reader.join(10)
        pytest.fail(f"unicom embed ended or stalled before it was interrupted: {''.join(chunks)[-2000:]}")
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    finally:
        process.kill()
        reader.join(10)
    stderr = "".join(chunks)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.rstrip().endswith("unicom embed: interrupted (Ctrl-C)")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_folder_given_as_the_recipe_is_answered_with_its_recipes(tmp_path, capsys):
    (tmp_path / "b.yaml").write_text("out: runs/b\n")
    (tmp_path / "a.yaml").write_text("out: runs/a\n")
    assert main(["train", "--config", str(tmp_path), "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unicom train: error: {tmp_path}: a folder; --config takes one recipe file such as {tmp_path / 'a.yaml'} "
        "(it holds a.yaml, b.yaml)")


def test_a_shipped_recipe_is_named_by_its_name_with_or_without_its_old_folder(tmp_path, monkeypatch):
    from unicom.engine.recipe import RECIPE_FOLDER, recipe_file
    from unicom.train.config import load_config, to_yaml

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    expected = to_yaml(load_config(RECIPE_FOLDER / "finetune_sop.yaml", validate=False))
    for given in ("finetune_sop", "finetune_sop.yaml", "configs/finetune_sop.yaml", "./configs/finetune_sop.yaml"):
        assert recipe_file(given) == RECIPE_FOLDER / "finetune_sop.yaml"
        assert to_yaml(load_config(given, validate=False)) == expected
    with pytest.raises(InputError, match="finetune_sop.yaml: no recipe file there"):
        recipe_file("elsewhere/finetune_sop.yaml")  # a path names a file, never a shipped recipe


def test_a_file_at_the_given_path_comes_before_the_shipped_recipe_of_that_name(tmp_path, monkeypatch):
    from unicom.engine.recipe import recipe_file
    from unicom.train.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "finetune_sop.yaml").write_text("optim:\n  lr: 0.125\n")
    (tmp_path / "demo").write_text("optim:\n  lr: 0.25\n")
    assert recipe_file("configs/finetune_sop.yaml") == Path("configs/finetune_sop.yaml")
    assert load_config("configs/finetune_sop.yaml", validate=False).optim.lr == 0.125
    assert load_config("demo", validate=False).optim.lr == 0.25


def test_an_unknown_recipe_name_lists_the_shipped_ones_and_the_closest(tmp_path, monkeypatch, capsys):
    from unicom.engine.recipe import shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "finetune_spo", "--print-config"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"unicom train: error: finetune_spo: no recipe file there, nor a recipe of that name shipped "
                     f"with unicom (did you mean finetune_sop?); the shipped recipes: {', '.join(shipped_recipes())} "
                     "(--list-configs says what each is for)")


@pytest.mark.parametrize("command", ["train", "probe"])
def test_list_configs_prints_the_recipes_of_the_command_with_their_first_comment(command, capsys):
    from unicom.engine.recipe import RECIPE_FOLDER

    assert main([command, "--list-configs"]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    expected = sorted(path.stem for path in RECIPE_FOLDER.glob("*.yaml")
                      if path.stem.startswith("unifex_") == (command == "probe"))
    assert [name for name, _ in rows] == expected
    summaries = dict(rows)
    if command == "train":
        assert summaries["demo"] == "The recipe of `make demo` (python -m unicom.demo)"
        assert summaries["pretrain_vit_b16"] == "Unicom pre-training of ViT-B/16 (ICLR 2023, §3-4.1)"
    else:
        assert summaries["unifex_tiny"] == "A UniFEx run that finishes in seconds on a CPU"


def test_a_file_given_as_an_embedding_folder_is_called_a_file(tmp_path, capsys):
    part = tmp_path / "img_emb_0.npy"
    part.write_bytes(b"")
    assert main(["index", "--emb", str(part), "--out", str(tmp_path / "index")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unicom index: error: {part}: a file, not a folder (an embedding folder holds img_emb/, text_emb/ and metadata/)")


@pytest.mark.parametrize("argv, hint", [
    (["embedd"], "embedd: did you mean embed?"),
    (["train", "--print-confg"], "--print-confg: did you mean --print-config?"),
    (["search", "--index", "INDEX", "--txt=cats"], "--txt: did you mean --text?"),
    (["cluster", "shwo"], "shwo: did you mean show?"),
])
def test_a_misspelt_command_or_option_is_a_usage_error_naming_the_closest_one(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(hint)


def test_main_called_from_python_and_interrupted_leaves_the_callers_ctrl_c_alone(monkeypatch, tmp_path, capsys):
    """A script or a notebook calling main(): the command ends with 130, and the next Ctrl-C
    is again a KeyboardInterrupt for the caller, not the end of its process."""
    import signal

    import unicom.commands.index as index_command

    def interrupted(args):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the command works

    monkeypatch.setattr(index_command, "run", interrupted)
    callers = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever started pytest
    try:
        assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index")]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, callers)
    assert capsys.readouterr().err.rstrip().endswith("unicom index: interrupted (Ctrl-C)")


@pytest.mark.parametrize("argv, error", [
    (["embed", "SHARDS", "--out", "OUT", "--model", "M", "--dtype", "fp16"],
     "argument --dtype: invalid choice: 'fp16' (choose from 'float16', 'float32')"),
    (["cluster", "kmean"], "argument stage: invalid choice: 'kmean' (choose from 'run', 'part', 'merge', 'assign', "
                           "'stats', 'show')"),
])
def test_a_wrong_choice_gets_no_guess_from_the_choices_of_another_option(capsys, argv, error):
    """fp16 is a --precision choice and kmeans++ an --init one: neither is a hint for --dtype or the stage."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(error)


def test_an_option_like_no_other_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--qwerty"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --qwerty")
