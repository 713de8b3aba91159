"""The vocabulary :mod:`effopd_jax.config` writes the trainer's schema in, and the checker that reads it.

A :class:`Field` is one setting: its dotted name, default, :class:`Kind` (which values it accepts),
a one-line doc and, optionally, the :data:`Condition` under which it applies. Kinds and conditions
are frozen dataclasses, i.e. data rather than callables, so that tests and the markdown reference
can read them; each also knows how to check (or evaluate) itself, which is what
:func:`check_settings` uses.

Kept light on purpose (no jax / flax): a config is checked in milliseconds, before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import ml_collections
import numpy as np

# Integer settings become array sizes, loop bounds and int32 step counters on device.
MAX_INT = 2**31 - 1
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Read = Callable[[str], Any]
"""The checked (canonical) value of a field, by its name in the same table."""


class Refused(Exception):
    """A value is not allowed; the message does not name the field (the checker adds that)."""


def show(value: Any) -> str:
    """``repr`` of a config value, shortened so that an error message stays one readable line."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  (a ConfigDict with mixed key types cannot even print itself)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _typed(value: Any) -> str:
    return f"{type(value).__name__} {show(value)}"


def is_group(value: Any) -> bool:
    """Whether ``value`` can hold settings: a ConfigDict or, in a dict-built config, a mapping."""
    return isinstance(value, (ml_collections.ConfigDict, Mapping))


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True must never pass for 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _same(a: Any, b: Any) -> bool:
    """Equality of checked values, where a list and a tuple with the same items are the same."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


# ---------------------------------------------------------------------------------------------
# Conditions: when a field applies. Field names are relative to the table the field is in.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OnField:
    """A condition on one field's value (the shared part of the one-field conditions)."""

    field: str

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)


@dataclasses.dataclass(frozen=True)
class Equals(_OnField):
    """Holds when ``field`` is ``value``."""

    value: Any

    def holds(self, read: Read) -> bool:
        return _same(read(self.field), self.value)

    def describe(self, prefix: str = "") -> str:
        return f"{prefix}{self.field}={self.value!r}"


@dataclasses.dataclass(frozen=True)
class NotEquals(_OnField):
    """Holds when ``field`` is anything but ``value``."""

    value: Any

    def holds(self, read: Read) -> bool:
        return not _same(read(self.field), self.value)

    def describe(self, prefix: str = "") -> str:
        return f"{prefix}{self.field} != {self.value!r}"


@dataclasses.dataclass(frozen=True)
class Greater(_OnField):
    """Holds when ``field`` (a number) is greater than ``value``."""

    value: float

    def holds(self, read: Read) -> bool:
        return read(self.field) > self.value

    def describe(self, prefix: str = "") -> str:
        return f"{prefix}{self.field} > {self.value!r}"


@dataclasses.dataclass(frozen=True)
class NonEmpty(_OnField):
    """Holds when ``field`` (a sequence) has at least one item."""

    def holds(self, read: Read) -> bool:
        return len(read(self.field)) > 0

    def describe(self, prefix: str = "") -> str:
        return f"a non-empty {prefix}{self.field}"


@dataclasses.dataclass(frozen=True)
class AllOf:
    """Holds when every one of ``conditions`` holds."""

    conditions: tuple[Condition, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for condition in self.conditions for f in condition.fields))

    def holds(self, read: Read) -> bool:
        return all(condition.holds(read) for condition in self.conditions)

    def describe(self, prefix: str = "") -> str:
        return " and ".join(condition.describe(prefix) for condition in self.conditions)


@dataclasses.dataclass(frozen=True)
class AnyOf:
    """Holds when at least one of ``conditions`` holds."""

    conditions: tuple[Condition, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for condition in self.conditions for f in condition.fields))

    def holds(self, read: Read) -> bool:
        return any(condition.holds(read) for condition in self.conditions)

    def describe(self, prefix: str = "") -> str:
        return " or ".join(condition.describe(prefix) for condition in self.conditions)


@dataclasses.dataclass(frozen=True)
class LongerThan(_OnField):
    """Holds when ``field`` (a sequence) has more than ``count`` items."""

    count: int

    def holds(self, read: Read) -> bool:
        return len(read(self.field)) > self.count

    def describe(self, prefix: str = "") -> str:
        return f"more than {self.count} {prefix}{self.field}"


Condition = Union[Equals, NotEquals, Greater, NonEmpty, AllOf, AnyOf, LongerThan]


# ---------------------------------------------------------------------------------------------
# Kinds: which values a field accepts. check() returns the value in canonical form (a Python
# int / float / bool / tuple) or raises Refused; describe(prefix) is the "allowed" column of the
# reference (prefix: how the table names the fields a kind's condition reads).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int:
    """An int (not a bool, not a float) in ``[low, high]``, or one of the ``special`` values.

    ``digit_strings``: a string of ASCII digits counts as the int it spells, because that is what a
    command-line override of a field whose default is a string (``"pow2"``) delivers.
    """

    low: int
    high: int = MAX_INT
    special: tuple[Any, ...] = ()
    digit_strings: bool = False

    def check(self, value: Any, read: Read, where: str) -> Any:
        # Compared by type as well, so that -1.0 or True never pass for -1 or 1.
        if any(type(value) is type(special) and value == special for special in self.special):
            return value
        if self.digit_strings and isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
            significant = value.lstrip("0") or "0"
            if len(significant) > len(str(self.high)):  # also keeps int() off a huge string
                raise Refused(f"must be {self._allowed()}, got a {len(significant)}-digit number")
            value = int(significant)
        if not (_is_int(value) and self.low <= value <= self.high):
            raise Refused(f"must be {self._allowed()}, got {_typed(value)}")
        return int(value)

    def _allowed(self) -> str:
        allowed = f"an int in [{self.low}, {self.high}]"
        if self.special:
            allowed += f" or one of {self.special}"
        return allowed + (" (a string of digits counts as that int)" if self.digit_strings else "")

    def describe(self, prefix: str = "") -> str:
        text = f"int ≥ {self.low}" if self.high == MAX_INT else f"int in [{self.low}, {self.high}]"
        text += "".join(f" or `{special!r}`" for special in self.special)
        return text + ("; a string of digits counts as that int" if self.digit_strings else "")


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite real number (an int is fine, a bool is not) in the given interval; or None if ``none_ok``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False

    def check(self, value: Any, read: Read, where: str) -> float | None:
        if value is None and self.none_ok:
            return None
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            raise Refused(f"must be a number, got {_typed(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        # Written so that NaN fails: every comparison with NaN is False.
        if not (
            math.isfinite(number)
            and (number > self.low if self.low_open else number >= self.low)
            and (number < self.high if self.high_open else number <= self.high)
        ):
            raise Refused(f"must be finite and in {self._interval()}, got {number}")
        return number

    def _interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def describe(self, prefix: str = "") -> str:
        if self.low == -math.inf and self.high == math.inf:
            text = "finite number"
        elif self.high == math.inf:
            text = f"number {'>' if self.low_open else '≥'} {self.low:g}"
        else:
            text = f"number in {self._interval()}"
        return text + (" or `None`" if self.none_ok else "")


@dataclasses.dataclass(frozen=True)
class Bool:
    """True or False (a numpy bool is fine; 0 / 1 are not)."""

    def check(self, value: Any, read: Read, where: str) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise Refused(f"must be True or False, got {show(value)}")
        return bool(value)

    def describe(self, prefix: str = "") -> str:
        return "`True` / `False`"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of the strings ``choices``."""

    choices: tuple[str, ...]

    def check(self, value: Any, read: Read, where: str) -> str:
        if not (isinstance(value, str) and value in self.choices):
            raise Refused(f"must be one of {self.choices}, got {show(value)}")
        return value

    def describe(self, prefix: str = "") -> str:
        return " / ".join(f"`{choice}`" if choice else "`''`" for choice in self.choices)


@dataclasses.dataclass(frozen=True)
class Identifier:
    """A name that can key metrics and logs: ``[A-Za-z_][A-Za-z0-9_]*``."""

    def check(self, value: Any, read: Read, where: str) -> str:
        if not (isinstance(value, str) and IDENTIFIER.fullmatch(value)):
            raise Refused(f"must be a name matching {IDENTIFIER.pattern}, got {show(value)}")
        return value

    def describe(self, prefix: str = "") -> str:
        return f"name matching `{IDENTIFIER.pattern}`"


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(f"must be a string, got {_typed(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class OptionalPath:
    """``""`` (not set) or an existing directory (``directory``) or path."""

    directory: bool

    def check(self, value: Any, read: Read, where: str) -> str:
        path = _string(value)
        if path and not (os.path.isdir(path) if self.directory else os.path.exists(path)):
            raise Refused(f"no such {'directory' if self.directory else 'path'}: {path!r}")
        return path

    def describe(self, prefix: str = "") -> str:
        return f"`''` or an existing {'directory' if self.directory else 'path'}"


@dataclasses.dataclass(frozen=True)
class ModelPath:
    """An HF checkpoint directory (with a config.json); while ``config_file_when`` holds (the model
    is randomly initialised, so only its architecture is read) also a ``.json`` config file.

    The condition is evaluated while the fields are checked in table order, so it may read only
    fields listed before this one.
    """

    config_file_when: Condition
    required_when: Condition | None = None  # None: always required; otherwise `''` is fine while it fails

    def check(self, value: Any, read: Read, where: str) -> str:
        path = _string(value)
        if not path and self.required_when is not None and not self.required_when.holds(read):
            return path
        config_file_ok = self.config_file_when.holds(read)
        if not path:
            also = " or a config .json file" if config_file_ok else ""
            raise Refused(f"is required (an HF checkpoint directory{also})")
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise Refused(f"{path!r} has no config.json")
        elif not (config_file_ok and path.lower().endswith(".json") and os.path.isfile(path)):
            wanted = "directory or .json file" if config_file_ok else "directory"
            raise Refused(f"no such {wanted}: {path!r}")
        return path

    def describe(self, prefix: str = "") -> str:
        when = self.config_file_when.describe(prefix)
        text = f"HF checkpoint directory (with config.json); with {when} also a config `.json` file"
        if self.required_when is not None:
            text += f"; `''` unless {self.required_when.describe(prefix)}"
        return text


@dataclasses.dataclass(frozen=True)
class PromptFiles:
    """A tuple (or list) of at least ``min_count`` existing files with one of ``suffixes``. A bare
    string is refused: it is not a list of one file but a sequence of characters."""

    suffixes: tuple[str, ...]
    min_count: int = 0

    def check(self, value: Any, read: Read, where: str) -> tuple[str, ...]:
        if not isinstance(value, (tuple, list)):
            raise Refused(f"must be a tuple of file paths, got {_typed(value)}")
        if len(value) < self.min_count:
            raise Refused(f"needs at least {self.min_count} file(s)")
        for path in value:
            if not isinstance(path, str):
                raise Refused(f"every entry must be a path string, got {show(path)}")
            if not os.path.isfile(path):
                raise Refused(f"no such file: {path!r}")
            if os.path.splitext(path)[1].lower() not in self.suffixes:
                raise Refused(f"{path!r}: file type must be one of {self.suffixes}")
        return tuple(value)

    def describe(self, prefix: str = "") -> str:
        files = "tuple of " + " / ".join(f"`{suffix}`" for suffix in self.suffixes) + " files"
        return files + (f", at least {self.min_count}" if self.min_count else "")


@dataclasses.dataclass(frozen=True)
class NotRead:
    """A path field checked for a run that reads no files (a memory plan: no weights, prompts or
    tokenizer): only the type ``kind`` wants is checked (a string; for :class:`PromptFiles` a
    tuple of strings), not that anything exists."""

    kind: OptionalPath | ModelPath | PromptFiles

    def check(self, value: Any, read: Read, where: str) -> str | tuple[str, ...]:
        if isinstance(self.kind, PromptFiles):
            if not isinstance(value, (tuple, list)) or not all(isinstance(path, str) for path in value):
                raise Refused(f"must be a tuple of file paths, got {_typed(value)}")
            return tuple(value)
        return _string(value)

    def describe(self, prefix: str = "") -> str:
        return self.kind.describe(prefix)


@dataclasses.dataclass(frozen=True)
class StrKeyedMapping:
    """A mapping (dict or ConfigDict) whose keys are all strings; or None if ``none_ok``."""

    none_ok: bool = False

    def check(self, value: Any, read: Read, where: str) -> Any:
        if value is None and self.none_ok:
            return None
        try:
            # A ConfigDict sorts its keys to list them, which fails (TypeError) on mixed key types.
            keys = list(value.keys()) if is_group(value) else None
        except TypeError:
            keys = None
        if keys is None or not all(isinstance(key, str) for key in keys):
            raise Refused(f"must be a mapping from names (strings) to values, got {show(value)}")
        return value

    def describe(self, prefix: str = "") -> str:
        return "mapping of names (str) to values" + (" or `None`" if self.none_ok else "")


@dataclasses.dataclass(frozen=True)
class Text:
    """A string; ``non_blank``: with at least one non-whitespace character."""

    non_blank: bool = False

    def check(self, value: Any, read: Read, where: str) -> str:
        text = _string(value)
        if self.non_blank and not text.strip():
            raise Refused("must not be blank")
        return text

    def describe(self, prefix: str = "") -> str:
        return "non-blank string" if self.non_blank else "string"


@dataclasses.dataclass(frozen=True)
class Strings:
    """A tuple (or list) of distinct non-blank strings. A bare string is refused: it is not a list
    of one name but a sequence of characters."""

    def check(self, value: Any, read: Read, where: str) -> tuple[str, ...]:
        if not isinstance(value, (tuple, list)):
            raise Refused(f"must be a tuple of strings, got {_typed(value)}")
        for item in value:
            if not (isinstance(item, str) and item.strip()):
                raise Refused(f"every entry must be a non-blank string, got {show(item)}")
        if len(set(value)) != len(value):
            raise Refused(f"has repeated entries: {show(value)}")
        return tuple(value)

    def describe(self, prefix: str = "") -> str:
        return "tuple of distinct non-blank strings"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """``''`` (none) or a string holding every one of ``required`` as ``{name}``; the only
    placeholders replaced are those of ``placeholders``, every other brace is literal text."""

    placeholders: tuple[str, ...]
    required: tuple[str, ...]

    def check(self, value: Any, read: Read, where: str) -> str:
        text = _string(value)
        missing = [name for name in self.required if "{" + name + "}" not in text]
        if text and missing:
            raise Refused(f"must contain {', '.join('{' + name + '}' for name in missing)}, got {show(text)}")
        return text

    def describe(self, prefix: str = "") -> str:
        names = ", ".join(f"`{{{name}}}`" for name in self.placeholders)
        required = ", ".join(f"`{{{name}}}`" for name in self.required)
        return f"`''` or a string with {required} (placeholders: {names})"


@dataclasses.dataclass(frozen=True)
class Retired:
    """A field that moved; only its placeholder ``None`` is accepted, and it may be missing.

    ``placeholder_type`` is the type of the value it used to hold, so that a command-line override
    of the old name still parses and reaches :func:`check_settings`, which then says where it moved.
    """

    why: str
    moved_to: str
    placeholder_type: type

    def check(self, value: Any, read: Read, where: str) -> None:
        if value is not None:
            raise Refused(
                f"{self.why}: set config.{self.moved_to} (on the command line --config.{self.moved_to}=...)"
            )

    def describe(self, prefix: str = "") -> str:
        return f"`None` (moved to `{self.moved_to}`)"


@dataclasses.dataclass(frozen=True)
class Entries:
    """A tuple (or list) of at least ``min_count`` groups, each checked against the table ``fields``;
    field ``unique`` must differ between entries."""

    fields: tuple[Field, ...]
    unique: str
    min_count: int = 1

    def check(self, value: Any, read: Read, where: str) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, (tuple, list)):
            raise Refused(f"must be a tuple of groups of settings, got {_typed(value)}")
        if len(value) < self.min_count:
            raise Refused(f"needs at least {self.min_count} group(s), got {show(value)}")
        entries = []
        for index, entry in enumerate(value):
            if not is_group(entry):
                raise ValueError(f"config.{where}[{index}]: must be a group of settings, got {_typed(entry)}")
            entries.append(check_settings(entry, self.fields, prefix=f"{where}[{index}]."))
        first_of: dict[Any, int] = {}
        for index, entry in enumerate(entries):
            key = entry[self.unique]
            if key in first_of:
                raise ValueError(
                    f"config.{where}[{index}].{self.unique}: {key!r} is taken by {where}[{first_of[key]}]; "
                    f"every entry needs its own {self.unique}"
                )
            first_of[key] = index
        return tuple(entries)

    def describe(self, prefix: str = "") -> str:
        return f"tuple of groups (fields below), each with its own `{self.unique}`"


Kind = Union[
    Int, Real, Bool, Choice, Identifier, OptionalPath, ModelPath, PromptFiles, NotRead, StrKeyedMapping, Retired,
    Entries, Text, Strings, PromptTemplate,
]


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting.

    Attributes:
      name: dotted path from the table's root (``"loss.topk"``).
      default: what :func:`effopd_jax.config.default_config` sets.
      kind: the values it accepts.
      doc: one line for the reference.
      applies_when: the setting is read only while this holds; otherwise any value but the
        default is refused, so that a setting the chosen mode ignores is never silently ignored.
        It may read any field of the same table (it is evaluated once they are all checked).
      default_doc: how the reference shows the default, when ``repr`` would not be readable.
    """

    name: str
    default: Any
    kind: Kind
    doc: str
    applies_when: Condition | None = None
    default_doc: str = ""

    @property
    def group(self) -> str:
        """The group the field sits in (``"loss"``), ``""`` at the top level."""
        return self.name.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


def _keys(node: Any, where: str) -> list[Any]:
    try:
        return list(node.keys())
    except TypeError:  # a ConfigDict sorts its keys to list them: mixed key types cannot be listed
        raise ValueError(f"{where}: must be a group of named settings, got {show(node)}") from None


def _child_name(where: str, key: Any) -> str:
    """How a message names ``key`` inside ``where`` (``"config.data"``)."""
    return f"{where}.{key}" if isinstance(key, str) and IDENTIFIER.fullmatch(key) else f"{where}[{key!r}]"


def _refuse_unknown_keys(node: Any, known: Mapping[str, Any], where: str) -> None:
    """Every key of ``node`` must be in ``known`` (a tree of names); recurses into known groups."""
    for key in _keys(node, where):
        if not isinstance(key, str) or key not in known:
            guess = difflib.get_close_matches(key, list(known), n=1) if isinstance(key, str) else []
            hint = f"did you mean {guess[0]!r}?" if guess else f"known here: {', '.join(known)}"
            raise ValueError(f"{_child_name(where, key)}: unknown setting ({hint})")
        if known[key] and is_group(node[key]):
            _refuse_unknown_keys(node[key], known[key], f"{where}.{key}")


def _name_tree(fields: Sequence[Field]) -> dict[str, Any]:
    """``{"loss": {"name": {}, ...}, "seed": {}, ...}``: the names a table allows, as a tree."""
    tree: dict[str, Any] = {}
    for field in fields:
        node = tree
        for part in field.name.split("."):
            node = node.setdefault(part, {})
    return tree


def _lookup(node: Any, name: str, prefix: str) -> tuple[Any, str] | None:
    """(The group holding ``name``, its last part), or None when the field or a group is missing."""
    *groups, leaf = name.split(".")
    for depth, part in enumerate(groups):
        if part not in node:
            return None
        node = node[part]
        if not is_group(node):
            group = prefix + ".".join(groups[: depth + 1])
            raise ValueError(f"config.{group}: must be a group of settings, got {_typed(node)}")
    return (node, leaf) if leaf in node else None


def _store(holder: Any, key: str, value: Any) -> None:
    if isinstance(holder, ml_collections.ConfigDict):
        with holder.ignore_type():  # the field's type is the default's (a str), the value an int
            holder[key] = value
    else:
        holder[key] = value


def check_settings(node: Any, fields: Sequence[Field], prefix: str = "", *,
                   assume: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Checks ``node`` (a ConfigDict or mapping) against the table ``fields``.

    In order: no unknown keys (anywhere in the table's groups), every field present and of its
    kind (in table order), then every field whose ``applies_when`` does not hold is at its
    default. A digit string accepted by an :class:`Int` is written back as the int (in place).

    Args:
      node: the settings.
      fields: the table.
      prefix: how messages name ``node`` (``"teachers[0]."``; ``""`` for the root).
      assume: values the ``applies_when`` conditions see instead of the checked ones (a memory
        plan counts prompt files as given: the run will need them, the plan does not read them).

    Returns:
      ``{field name: checked value}``.

    Raises:
      ValueError: ``config.<prefix><field>: <what is wrong>``.
    """
    _refuse_unknown_keys(node, _name_tree(fields), "config" + (f".{prefix[:-1]}" if prefix else ""))
    values: dict[str, Any] = {}

    def read(name: str) -> Any:
        if name not in values:
            raise RuntimeError(f"schema: a condition reads {name!r} before it is checked; list it earlier")
        return values[name]

    for field in fields:
        where = prefix + field.name
        found = _lookup(node, field.name, prefix)
        if found is None:
            if isinstance(field.kind, Retired):
                continue
            raise ValueError(f"config.{where}: missing")
        holder, key = found
        value = holder[key]
        try:
            checked = field.kind.check(value, read, where)
        except Refused as e:
            raise ValueError(f"config.{where}: {e}") from None
        if isinstance(value, str) and not isinstance(checked, str):
            _store(holder, key, checked)
        values[field.name] = checked

    def read_assumed(name: str) -> Any:
        return assume[name] if assume and name in assume else read(name)

    for field in fields:
        condition = field.applies_when
        if condition is None or field.name not in values or condition.holds(read_assumed):
            continue
        if not _same(values[field.name], field.default):
            now = ", ".join(
                f"{'it' if len(condition.fields) == 1 else prefix + name} is {show(read(name))}"
                for name in condition.fields
            )
            raise ValueError(
                f"config.{prefix}{field.name}: only used with {condition.describe(prefix)} ({now}); "
                f"leave it at its default {show(field.default)}"
            )
    return values


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(fields: Sequence[Field], prefix: str = "") -> str:
    """One markdown table: name, default, allowed values, when it applies, what it does."""
    rows = ["| field | default | allowed | used when | what |", "|---|---|---|---|---|"]
    for field in fields:
        default = field.default_doc or repr(field.default)
        when = field.applies_when.describe(prefix) if field.applies_when else "always"
        cells = (f"`{prefix}{field.name}`", f"`{default}`", field.kind.describe(prefix), when, field.doc)
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)
