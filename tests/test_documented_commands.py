"""Every ``unicom ...`` command line that README.md and docs/*.md show is one the command
line accepts: its subcommand and options exist, and its ``KEY=VALUE`` recipe overrides and
``--config`` files are ones ``unicom train`` / ``unicom probe`` know.

A command in a code block is parsed whole, as the shell would hand it over, unless it has
placeholders (``...``, ``[--optional]``); those and the commands quoted in the text
(```unicom cluster part --k K```) are checked option by option. A shell line is cut into its
commands (``unicom embed ... 2>&1 | tee log && unicom cluster ...``: two, each checked). The Python names the docs
show (``unicom.cluster.load_labels``, ``from unicom.losses import ArcFace``) exist."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from unicom.cli import available_commands
from unicom.engine.recipe import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what starts a command: `unicom X`, `python -m unicom X`, `-m unicom.cli X`, `-m unicom.train`
START = re.compile(r"(?:^|[\s`$(])(?:unicom|-m unicom\.cli|-m unicom)\s+(?P<rest>[a-z].*)|-m unicom\.train\b(?P<train>.*)")


def _snippets(text: str, fenced: bool = False) -> list[tuple[int, str, bool]]:
    """(line number, text, fenced) of each fenced code line (continuations joined) and each
    inline code span of a Markdown ``text`` (with ``fenced``: every line is code)."""
    found, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.lstrip().startswith("#"):  # a comment: prose, its quoted commands are fragments
            found.extend((number, span, False) for span in re.findall(r"`([^`]+)`", line))
        elif fenced:
            pending, start = (pending + " " + line.strip(), start) if pending else (line.strip(), number)
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            found.append((start, pending, True))
            pending = ""
        else:
            found.extend((number, span, False) for span in re.findall(r"`([^`]+)`", line))
    return found


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(where, [command, *words], whole) of every unicom command line of the docs and of the
    commands' ``--help``; ``whole``: a code block's line, not a fragment quoted in the text."""
    commands = available_commands()
    sources = [(str(path.relative_to(ROOT)), _snippets(path.read_text())) for path in DOCUMENTS]
    sources += [(f"unicom {name} --help", _snippets(_parser(name).format_help(), fenced=True)) for name in commands]
    lines = []
    for source, snippets in sources:
        for number, text, fenced in snippets:
            lines += [(f"{source}:{number}", words, fenced) for words in line_commands(text, commands)]
    return lines


def line_commands(text: str, commands) -> list[list[str]]:
    """[command, *words] of each unicom command of a shell line ``text`` (``unicom embed ...
    2>&1 | tee log && unicom cluster ...`` holds two, without the redirection and the pipe)."""
    found = []
    while (match := START.search(text)) is not None:
        rest = f"train {match.group('train')}" if match.group("rest") is None else match.group("rest")
        try:
            words, text = _first_command(rest)
        except ValueError:  # an unbalanced quote: a prose fragment, not a command
            break
        if words and words[0] in commands:
            found.append(words)
    return found


SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}  # what ends a command on a shell line (and any other run of ();<>|&
# that is not a redirection)
REDIRECTS = {">", ">>", "<", ">&", "&>", ">|"}


def _first_command(line: str) -> tuple[list[str], str]:
    """The words of the first command of a shell ``line`` (without its redirections:
    ``2>&1``, ``> log``) and the rest of the line after it (``| tee log``, ``&& unicom ...``)."""
    line = re.sub(r"(?<=\s)\d(?=>)", "", line)  # the descriptor of `2>&1`, `2> log` (not the 3 of `--k 3 > log`)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    tokens, words, index = list(lexer), [], 0

    def operator(token: str) -> bool:
        return set(token) <= set(lexer.punctuation_chars)

    while index < len(tokens):
        token = tokens[index]
        if token in SEPARATORS or (operator(token) and token not in REDIRECTS):
            return words, " ".join(t if operator(t) else shlex.quote(t) for t in tokens[index + 1:])
        if token in REDIRECTS:
            index += 2  # the redirection and its target
        else:
            words.append(token)
            index += 1
    return words, ""


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    module = importlib.import_module(available_commands()[command][0])
    parser = argparse.ArgumentParser(prog=f"unicom {command}", exit_on_error=False)
    module.add_arguments(parser)
    parser.add_argument("--storage-options")
    return parser


def _subcommand_options(parser: argparse.ArgumentParser, word: str) -> dict:
    """The options of ``word``'s parser when it names a subcommand (``convert unicom-to-released``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and word in action.choices:
            return action.choices[word]._option_string_actions
    return {}


def _placeholder(word: str) -> bool:
    return word in ("...", "…") or word.startswith("[") or word.endswith("]") and not "=" in word


COMMANDS = documented_commands()


def test_a_shell_line_holds_its_commands_without_pipes_and_redirections():
    line = ("unicom embed --input 'a b/' --out E 2>&1 | tee log && python -m unicom cluster --embeddings E --k 3 > out "
            "&& unicom index --embeddings E --out I | tail -1")
    assert line_commands(line, available_commands()) == [
        ["embed", "--input", "a b/", "--out", "E"], ["cluster", "--embeddings", "E", "--k", "3"],
        ["index", "--embeddings", "E", "--out", "I"]]
    assert line_commands("unicom train --config configs/a.yaml  # then unicom serve", available_commands()) == [
        ["train", "--config", "configs/a.yaml"]]


def test_the_docs_show_commands_of_every_stage():
    shown = {words[0] for _, words, whole in COMMANDS if whole}
    assert shown == set(available_commands())


@pytest.mark.parametrize("where, words, whole", COMMANDS, ids=[f"{where} {' '.join(words)}" for where, words, _ in COMMANDS])
def test_a_documented_command_line_is_accepted(where, words, whole):
    command, *rest = words
    parser = _parser(command)
    known = dict(parser._option_string_actions)
    for word in rest:
        known.update(_subcommand_options(parser, word))
        option = word.strip("[]").split("=", 1)[0]
        if option.startswith("--"):
            assert option in known, f"{where}: `unicom {command}` has no option {option}"
    if not whole or any(_placeholder(word) for word in rest):
        return
    intermixed = getattr(parser, "intermixed", False)
    try:
        (parser.parse_intermixed_args if intermixed else parser.parse_args)(rest)
    except (argparse.ArgumentError, SystemExit) as error:
        pytest.fail(f"{where}: `unicom {' '.join(words)}` is refused: {error}")


def _loader(command: str):
    if command == "train":
        from unicom.train.config import default_values, load_config
        return load_config, default_values
    from unicom.unifex.config import default_values, load_probe_config
    return load_probe_config, default_values


@pytest.mark.parametrize("command", ["train", "probe"])
def test_documented_recipes_are_valid(command):
    """A whole command's recipe loads and validates; a fragment's overrides name known keys."""
    load, defaults = _loader(command)
    keys, problems = set(defaults()), []
    for where, words, whole in COMMANDS:
        if words[0] != command:
            continue
        overrides = [word for word in words[1:] if "=" in word and not word.startswith("-")]
        problems += [f"{where}: unknown key {key!r}" for key in (o.split("=", 1)[0] for o in overrides) if key not in keys]
        config = words[words.index("--config") + 1] if "--config" in words else None
        runs = not {"--list-keys", "--print-config", "--export-from", "--help"} & set(words)
        if whole and runs and not any(map(_placeholder, words)) and (config is None or config in shipped_recipes()):
            if "--out" in words:
                overrides.append(f"out={words[words.index('--out') + 1]}")
            try:
                load(config, overrides)
            except Exception as error:  # noqa: BLE001 -- every documented recipe's problem, listed
                problems.append(f"{where}: {error}")
    assert problems == []


# dotted names of the docs that are not Python objects: the parquet schema-metadata key of label files
def _parquet_metadata_keys() -> set[str]:
    """The parquet key-value metadata keys the formats write (``unicom.labels`` ...): names the
    docs show that are not Python."""
    from unicom.formats.clusters import LABEL_METADATA_KEY
    from unicom.formats.embeddings import SETTINGS_KEY
    from unicom.search.metadata_rows import BUILD_KEY

    return {key.decode() for key in (LABEL_METADATA_KEY, SETTINGS_KEY, BUILD_KEY)}


NOT_PYTHON = _parquet_metadata_keys()


def documented_python_names() -> list[tuple[str, str]]:
    """(where, name) of every ``unicom.a.b`` name and every ``from unicom.x import a, b``
    of README.md and docs/*.md."""
    names = {}
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for name in re.findall(r"\bunicom(?:\.[A-Za-z_]\w*)+", line):
                names.setdefault(name, where)
            imported = re.match(r"\s*from (unicom[\w.]*) import ([\w, ]+)", line)
            if imported:
                for name in imported.group(2).split(","):
                    names.setdefault(f"{imported.group(1)}.{name.strip()}", where)
    return sorted((where, name) for name, where in names.items() if name not in NOT_PYTHON)


def _resolve(name: str):
    import importlib

    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module = ".".join(parts[:split])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if not (module == error.name or module.startswith(f"{error.name}.")):
                raise  # the module exists but needs another one (an optional dependency)
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(name)


def test_the_python_names_the_docs_show_exist():
    missing = []
    for where, name in documented_python_names():
        try:
            _resolve(name)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] == "unicom":  # not an optional dependency (fastapi ...) absent here
                missing.append(f"{where}: {name} ({error})")
        except AttributeError as error:
            missing.append(f"{where}: {name} ({error})")
    assert missing == []


def _table_defaults(path: Path, header: str):
    """(where, names, default) of the rows of ``path``'s tables headed ``| header | default |``."""
    rows, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(f"| {header} | default |"):
            inside = True
        elif inside and line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append((f"{path.relative_to(ROOT)}:{number}", re.findall(r"`([^`]+)`", cells[0]), cells[1]))
        elif not line.startswith("|"):
            inside = False
    return rows


PROSE = object()  # a default the docs describe in words ("see below", "from the labels")


def _stated(text: str):
    """A default as the docs write it: 256, `auto`, off, false, none, 0.0; else PROSE."""
    text = text.strip("`")
    words = {"off": False, "false": False, "true": True, "none": None, "—": None}
    if text in words:
        return words[text]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|\d+e-?\d+", text):
        return float(text)
    return text if re.fullmatch(r"[a-z][\w+-]*", text) and text not in ("all", "required") else PROSE


@pytest.mark.parametrize("document, command", [("clustering.md", "cluster"), ("embedding.md", "embed")])
def test_option_defaults_in_the_docs_are_the_parsers(document, command):
    actions = _parser(command)._option_string_actions
    wrong, checked = [], 0
    for where, names, text in _table_defaults(ROOT / "docs" / document, "option"):
        stated = _stated(text)
        for name in names:
            option = name.split()[0]
            if option in actions and stated is not PROSE:
                checked += 1
                if actions[option].default != stated:
                    wrong.append(f"{where}: {option} default {text}, the parser's {actions[option].default!r}")
    assert wrong == [] and checked >= 5


@pytest.mark.parametrize("document, command", [("training.md", "train"), ("unifex.md", "probe")])
def test_recipe_defaults_in_the_docs_are_the_recipes(document, command):
    _, defaults = _loader(command)
    values, wrong, checked = defaults(), [], 0
    for where, names, text in _table_defaults(ROOT / "docs" / document, "key"):
        stated = [_stated(part) for part in text.split(",")] if len(names) > 1 else [_stated(text)]
        for name, value in zip(names, stated):
            if name in values and value is not PROSE:
                checked += 1
                if values[name] != value:
                    wrong.append(f"{where}: {name} default {value!r}, the recipe's {values[name]!r}")
    assert wrong == [] and checked >= 5


def test_https_urls_need_no_extra_as_the_storage_docs_say():
    """docs/storage.md lists https:// as needing nothing; fsspec reads it with aiohttp, which
    it installs only with its `http` extra: the base install asks for that extra."""
    import tomllib

    from packaging.requirements import Requirement

    row = next(line for line in (ROOT / "docs" / "storage.md").read_text().splitlines() if line.startswith("| `https://"))
    assert row.rstrip(" |").endswith("| —")
    required = [Requirement(line) for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert any(r.name == "fsspec" and "http" in r.extras for r in required) or any(r.name == "aiohttp" for r in required)


def test_the_readme_install_names_every_extra_of_the_package():
    """What `pip install -e '.[extra]'` lines the README shows cover pyproject.toml's extras,
    and name no extra the package lacks."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    shown = set()
    for group in re.findall(r"pip install -e '\.\[([a-z0-9_,-]+)\]'", (ROOT / "README.md").read_text()):
        shown.update(group.split(","))
    assert shown == extras
