"""The `unicom` command and the package's import cost."""

import subprocess
import sys

import unicom
from unicom.cli import available_commands, main


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


def test_losses_do_not_import_the_trainer_or_the_server():
    code = "import sys, unicom.losses, unicom.optim; print([m for m in sys.modules if m.startswith(('unicom.train', 'fastapi', 'matplotlib'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
