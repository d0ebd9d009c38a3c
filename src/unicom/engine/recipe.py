"""The recipe engine: typed dataclass sections read from YAML, ``key=value`` overrides, strict checks.

A recipe is a dataclass (a :class:`Recipe`) whose fields are values (``out``, ``seed``) and
sections (dataclasses: ``model``, ``loss``, ``optim`` ...). Every key has a type and a
default: the dataclasses are the reference. Reading a recipe, or applying
``section.key=value`` overrides from the command line, checks every key and value before
anything runs: an unknown key is an error that lists the valid keys of its section (with
the closest one as a suggestion), a value of the wrong type names the key, the expected
type and the value. :meth:`Recipe.validate` then collects every value out of range and
every bad combination, so that one run of the command reports all of them.

Values of overrides are parsed as YAML (``optim.lr=5e-4``, ``data.shards=[a.tar,b.tar]``,
``model.init=null``); numbers written like ``1e-3`` are accepted for float keys; a key
typed as a string keeps its text as written (a brace pattern is not a YAML mapping).

A section may define ``check(problems, name)``: it appends what is wrong with its own
values to ``problems``, its keys spelled ``{name}.{key}``. :meth:`Recipe.validate` calls
it for every section and then the recipe's own :meth:`Recipe.check` for the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Hashable, Literal, Mapping, Sequence

from unicom.errors import InputError

RECIPE_FOLDER = Path(__file__).resolve().parents[1] / "configs"  # the recipes that ship with unicom (package data)


class Recipe:
    """Base of a whole recipe: a dataclass of values and sections.

    Subclasses set ``command`` (named in messages) and ``kind`` (``invalid {kind} config``)
    and implement :meth:`check` for the keys and combinations that no section checks.
    """

    command: ClassVar[str] = "unicom"
    kind: ClassVar[str] = "recipe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, problems: list[str]) -> None:
        """Append what is wrong beyond the sections' own checks (values and combinations)."""

    def validate(self):
        """Raise :class:`InputError` listing every value out of range and every bad
        combination (types were checked on reading); returns the recipe."""
        problems: list[str] = []
        for item in dataclasses.fields(self):
            section = getattr(self, item.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "check"):
                section.check(problems, item.name)
        self.check(problems)
        if problems:
            raise InputError(f"invalid {self.kind} config:\n  " + "\n  ".join(problems))
        return self


def check(condition: bool, problems: list[str], message: str) -> None:
    """Add ``message`` to ``problems`` when ``condition`` fails (validation reports them all at once)."""
    if not condition:
        problems.append(message)


def check_local_out(out: str | None, problems: list[str], inputs: str) -> None:
    """A run folder (``out``: checkpoints renamed into place, logs, the exported model) is local;
    ``inputs`` names what may be URLs instead."""
    from unicom import storage

    check(not (out and storage.is_url(out)), problems,
          f"out must be a local folder, got the URL {out!r} ({inputs} may be URLs); copy OUT/model to the bucket afterwards")


# ------------------------------------------------------------------ typed reading


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(annotation)) else inner
    if origin is list:
        (item,) = typing.get_args(annotation)
        plural = {int: "integers", float: "numbers", bool: "true or false values", str: "strings"}
        return f"a list of {plural.get(item, _type_name(item))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation, raw: bool):
    """``value`` as ``annotation``; ``raw``: it is the text of a command-line override."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and type(None) in args):
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str) and raw:
            import yaml

            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = parsed
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item, raw) for v in value]
        if isinstance(value, str) and item is str:  # one shard pattern instead of a list
            return [value]
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise _Mismatch from None
            if number.is_integer():
                return int(number)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if raw or isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise TypeError(f"unsupported annotation {annotation}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of the recipe class ``cls`` (``model.name``, ``optim.lr``, ...)."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys.extend(valid_keys(hints[name], f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str, section_cls, section: str, source: str) -> InputError:
    names = list(_fields(section_cls))
    close = difflib.get_close_matches(key.split(".")[-1], names, n=1)
    hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return InputError(f"{source}: unknown key {key!r}{hint}; valid keys of {where}: {', '.join(names)}")


def _set(obj, key: str, value: Any, raw: bool, source: str) -> None:
    """Set dotted ``key`` of the dataclass ``obj`` to ``value``, checking name and type."""
    parts = key.split(".")
    target, section = obj, ""
    for depth, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in hints:
            raise _unknown_key(".".join(parts[: depth + 1]), type(target), section, source)
        annotation = hints[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(annotation):
                raise InputError(f"{source}: {'.'.join(parts[: depth + 1])} is a value, not a section; cannot set {key!r}")
            target, section = getattr(target, part), ".".join(parts[: depth + 1])
            continue
        if dataclasses.is_dataclass(annotation):
            if raw or not isinstance(value, Mapping):
                keys = ", ".join(f"{key}.{name}" for name in _fields(annotation))
                raise InputError(f"{source}: {key!r} is a section; set its keys instead: {keys}")
            for name, inner in value.items():
                _set(obj, f"{key}.{name}", inner, raw, source)
            return
        try:
            setattr(target, part, _coerce(value, annotation, raw))
        except _Mismatch:
            raise InputError(f"{source}: {key} must be {_type_name(annotation)}, got {value!r}") from None


def from_dict(cls, data: Mapping[str, Any], source: str = "config"):
    """A recipe of class ``cls`` from a nested mapping (a parsed YAML file); types checked, values not yet."""
    if not isinstance(data, Mapping):
        names = ", ".join(f"{name}:" for name, f in _fields(cls).items() if dataclasses.is_dataclass(_hints(cls)[name]))
        raise InputError(f"{source}: expected a mapping of sections ({names} ...), got {type(data).__name__}")
    config = cls()
    for key, value in data.items():
        _set(config, str(key), value, raw=False, source=source)
    return config


def apply_overrides(config, overrides: Sequence[str]):
    """Apply ``section.key=value`` strings to ``config`` (values parsed as YAML, typed by the key)."""
    import yaml

    command = getattr(config, "command", "unicom")
    for text in overrides:
        if "=" not in text:
            raise InputError(f"override {text!r}: expected key=value, e.g. optim.lr=5e-4 (valid keys: {command} --list-keys)")
        key, value = text.split("=", 1)
        key = key.strip()
        annotation = _annotation(key, type(config))
        # Strings stay as written (a brace pattern is not a YAML mapping; a string-or-list key's
        # value unless it is a [list]); other types parse as YAML.
        if annotation is not None and (_is_plain_string(annotation) or
                                       (_is_string_or_list(annotation) and not value.strip().startswith("["))):
            parsed: Any = None if value.strip().lower() in ("null", "none", "~") and _optional(annotation) else value
        else:
            try:
                parsed = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                parsed = value
        _set(config, key, parsed, raw=isinstance(parsed, str), source=f"override {text!r}")
    return config


def _annotation(key: str, cls):
    annotation = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _hints(cls)
        if part not in hints:
            return None
        annotation = cls = hints[part]
    return annotation


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_plain_string(annotation) -> bool:
    if annotation is str:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and args == [str]


def _is_string_or_list(annotation) -> bool:
    """``str | list[str]`` (optional or not): one string or a list of them."""
    args = {a for a in typing.get_args(annotation) if a is not type(None)}
    return str in args and all(a is str or typing.get_origin(a) is list for a in args)


def load(cls, path: str | os.PathLike | None, overrides: Sequence[str] = (), validate: bool = True):
    """Read a recipe file of class ``cls`` (a path or URL, or the name of a shipped recipe:
    :func:`recipe_file`; its defaults when ``path`` is None), apply
    ``key=value`` overrides, validate; every problem is an :class:`InputError`.

    ``validate=False`` checks keys and types only (a recipe still being written, e.g. for
    ``--print-config``); :meth:`Recipe.validate` then says what it lacks to run."""
    import yaml

    data: Any = {}
    source = "defaults"
    if path is not None:
        path = recipe_file(path)
        try:
            data = _read_yaml(_recipe_text(path), path) or {}
        except yaml.YAMLError as error:
            raise InputError(f"{path}: not valid YAML ({error})") from error
        source = str(path)
    config = from_dict(cls, data, source)
    apply_overrides(config, overrides)
    return config.validate() if validate else config


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with unicom, by name (the file's name without ``.yaml``)."""
    return {path.stem: path for path in sorted(RECIPE_FOLDER.glob("*.yaml"))}


def recipe_file(given: str | os.PathLike) -> Path | str:
    """The recipe file that ``--config`` names: a URL (``s3://``, ``https://`` ..., read where
    it is) or a path to a file, else the name of a recipe that ships with unicom
    (``pretrain_vit_b32``, or ``pretrain_vit_b32.yaml``, or ``configs/pretrain_vit_b32.yaml``,
    the path of the repository's folder of recipes in earlier versions). A file at the given
    path always comes first."""
    from unicom import storage

    if storage.is_url(given):
        return storage.text(given)
    path = Path(given)
    if path.is_file():
        return path
    if path.is_dir():
        recipes = sorted(p.name for p in path.glob("*.yaml"))
        raise InputError(f"{path}: a folder; --config takes one recipe file"
                         + (f" such as {path / recipes[0]} (it holds {', '.join(recipes)})" if recipes else ""))
    shipped = shipped_recipes()
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in shipped and str(path.parent) in (".", "configs"):
        return shipped[name]
    close = difflib.get_close_matches(name, shipped, n=1)
    raise InputError(f"{given}: no recipe file there, nor a recipe of that name shipped with unicom"
                     + (f" (did you mean {close[0]}?)" if close else "")
                     + f"; the shipped recipes: {', '.join(shipped)} (--list-configs says what each is for)")


def _recipe_text(path: Path | str) -> str:
    """The text of a recipe file, local or at a URL (:func:`recipe_file`)."""
    from unicom import storage

    if isinstance(path, Path):
        return path.read_text()
    try:
        return storage.read_bytes(path, missing_is_final=True).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a recipe, not UTF-8 text ({error})") from None
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except storage.FetchError as error:
        raise InputError(f"{path}: the recipe cannot be read ({error})") from None


def recipe_summary(path: Path) -> str:
    """What a recipe file is for: its first comment, to its first colon (the shipped ones say
    there what they are, then how)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    return text.split(": ", 1)[0].rstrip(".")


def _read_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping, which YAML readers
    resolve silently by keeping the last (a second ``optim:`` section would replace the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor`: the keys given beside it replace the merged ones
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # SafeLoader's own error names it
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise InputError(f"{path}: line {line}: key {key!r} is given twice (first on line {seen[key]}); "
                                     "a recipe gives each key once: merge the two")
                seen[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def default_values(cls) -> dict[str, Any]:
    """Every dotted key of the recipe class ``cls`` with its default value."""
    return flatten(dataclasses.asdict(cls()))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(before: Mapping[str, Any], now, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, value now)`` of every key that differs between a stored
    recipe (a nested dict, e.g. read back from a checkpoint) and the recipe ``now``.

    A key the stored recipe lacks (it was added to unicom since) counts as its default:
    what the stored run did. Keys starting with one of ``ignore`` are left out.
    """
    stored, current, defaults = flatten(before), flatten(now.to_dict()), default_values(type(now))
    changed = []
    for key in sorted(set(stored) | set(current)):
        old = stored.get(key, defaults.get(key))
        if old != current.get(key) and not key.startswith(tuple(ignore)):
            changed.append((key, old, current.get(key)))
    return changed


def yaml_value(value: Any) -> str:
    """``value`` written as in a YAML recipe, on one line: ``null``, ``true``, ``1.0e-05``,
    ``[0.9, 0.999]``, ``ViT-B-32`` (quoted only where YAML needs it)."""
    import yaml

    text = yaml.safe_dump([value], default_flow_style=True, width=2**31 - 1).strip()
    return text[1:-1]  # the value inside the one-item list


def to_yaml(config) -> str:
    """The recipe as YAML that :func:`load` reads back to an equal recipe."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


__all__ = ["Recipe", "check", "load", "from_dict", "apply_overrides", "valid_keys", "default_values", "flatten",
           "changed_keys", "to_yaml", "yaml_value"]
