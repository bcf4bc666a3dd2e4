"""Read config_params from TOML, JSON or a mapping into one flat dict, keeping the line and column of every key,
and convert raw values to their normalised form (coerce_value).

kohya's sd-scripts flattens one level of [sections] in its config files; so do we. Syntax errors carry the
line and column the parser reports; the positions of keys come from a small scanner run over the text once
the parser has accepted it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError

from kohya_backend.config.keys import KeySpec
from kohya_backend.config.kohya_gui import is_gui_config, translate_gui_config
from kohya_backend.config.schema import UNSUPPORTED_VALUES
from kohya_backend.config.scope import out_of_scope
from kohya_backend.config.values import ValueProblem, shown
from kohya_backend.errors import ConfigError, ConfigIssue

Path_ = tuple[str, ...]
Occurrence = tuple[Path_, int, int]

_TOML_HINT = (
    'write one key = value per line; strings need quotes (optimizer_type = "AdamW"); '
    'booleans are lowercase true/false; lists look like ["a=1", "b=2"]'
)
_JSON_HINT = 'write a JSON object such as {"network_dim": 32, "optimizer_type": "AdamW"}'
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class ParsedConfig:
    """config_params as read: flat values, where each key was written (line, column), and the source format."""

    values: dict[str, Any]
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    source_format: str = "mapping"  # "toml", "json", "mapping", or "kohya_ss" (a GUI config, translated)
    notes: list[ConfigIssue] = field(default_factory=list)  # warnings from reading it (the GUI translation's)
    gui_fm_type: str | None = None  # the FM type a kohya_ss GUI config was saved for (its sdxl checkbox)

    def position(self, key: str) -> tuple[int | None, int | None]:
        """(line, column) of a key in the source text, or (None, None) when unknown."""
        where = self.positions.get(key)
        return (where[0], where[1]) if where else (None, None)


class _Cursor:
    """A position in a text that keeps its 1-based line and column up to date as it moves."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1
        self.line_start = 0

    @property
    def column(self) -> int:
        return self.i - self.line_start + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.i : self.i + n]

    def move_to(self, j: int) -> None:
        segment = self.text[self.i : j]
        newlines = segment.count("\n")
        if newlines:
            self.line += newlines
            self.line_start = self.i + segment.rindex("\n") + 1
        self.i = j

    def skip_blanks(self) -> None:
        j = self.i
        while j < len(self.text) and self.text[j] in " \t\r":
            j += 1
        self.move_to(j)

    def skip_line(self) -> None:
        j = self.text.find("\n", self.i)
        self.move_to(len(self.text) if j < 0 else j)


def _end_of_quoted(text: str, start: int, quote: str, escapes: bool) -> int:
    """Index just past the closing `quote` of a string that opens at `start` (text[start:] begins with quote)."""
    j = start + len(quote)
    while True:
        k = text.find(quote, j)
        if k < 0:
            return len(text)
        if escapes:
            backslashes = 0
            while text[k - 1 - backslashes] == "\\":
                backslashes += 1
            if backslashes % 2:
                j = k + 1
                continue
        end = k + len(quote)
        if len(quote) == 3:  # a multi-line string may end with up to two extra quote characters
            while end < len(text) and text[end] == quote[0] and end - k < 5:
                end += 1
        return end


def _skip_toml_string(cur: _Cursor) -> None:
    text = cur.text
    for quote, escapes in (('"""', True), ("'''", False), ('"', True), ("'", False)):
        if text.startswith(quote, cur.i):
            cur.move_to(_end_of_quoted(text, cur.i, quote, escapes))
            return


def _read_toml_key(cur: _Cursor) -> list[str]:
    """Read a (dotted) key up to '=' or ']'; the text is valid TOML, so no error handling is needed."""
    parts: list[str] = []
    while cur.i < len(cur.text):
        cur.skip_blanks()
        ch = cur.peek()
        if ch in ('"', "'"):
            start = cur.i
            _skip_toml_string(cur)
            raw = cur.text[start : cur.i]
            parts.append(json.loads(raw) if ch == '"' else raw[1:-1])
        else:
            match = _BARE_KEY.match(cur.text, cur.i)
            if match is None:
                break
            parts.append(match.group(0))
            cur.move_to(match.end())
        cur.skip_blanks()
        if cur.peek() != ".":
            break
        cur.move_to(cur.i + 1)
    return parts


def _skip_toml_value(cur: _Cursor) -> None:
    """Move past one value (arrays and inline tables may span lines) and the rest of its line."""
    depth = 0
    text = cur.text
    while cur.i < len(text):
        ch = text[cur.i]
        if ch in "\"'":
            _skip_toml_string(cur)
        elif ch == "#":
            cur.skip_line()
        elif ch == "\n":
            if depth == 0:
                return
            cur.move_to(cur.i + 1)
        else:
            depth += 1 if ch in "[{" else -1 if ch in "]}" else 0
            cur.move_to(cur.i + 1)


def toml_key_positions(text: str, *, index_arrays: bool = False) -> list[Occurrence]:
    """Every key of a valid TOML text as (table path + key path, line, column), in the order written.

    Keys inside [[array]] tables are skipped, unless `index_arrays`: then each array table's entries are numbered
    from 0 in the path, as in ("datasets", 0, "subsets", 1, "image_dir") (the numbers as strings).
    """
    cur = _Cursor(text)
    table: Path_ = ()
    in_array = False  # keys of [[array]] tables repeat by design and are not config keys: not recorded
    seen_arrays: set[Path_] = set()
    counters: dict[Path_, int] = {}
    out: list[Occurrence] = []
    while cur.i < len(text):
        cur.skip_blanks()
        ch = cur.peek()
        if ch == "\n":
            cur.move_to(cur.i + 1)
        elif ch == "#" or ch == "":
            cur.skip_line()
        elif ch == "[":
            line, column = cur.line, cur.column
            in_array = cur.peek(2) == "[["
            cur.move_to(cur.i + (2 if in_array else 1))
            table = tuple(_read_toml_key(cur))
            if index_arrays:
                table = _indexed(table, counters, seen_arrays, is_array=in_array)
                out.append((table, line, column))
            elif not in_array or table not in seen_arrays:
                out.append((table, line, column))
            if in_array:
                seen_arrays.add(table)
            cur.skip_line()
        else:
            line, column = cur.line, cur.column
            key = tuple(_read_toml_key(cur))
            if index_arrays or not in_array:
                out.append((table + key, line, column))
            cur.move_to(cur.i + 1)  # the '='
            _skip_toml_value(cur)
    return out


def _indexed(table: Path_, counters: dict[Path_, int], arrays: set[Path_], *, is_array: bool) -> Path_:
    """A table header's path with the current entry number after each array-of-tables part."""
    plain: Path_ = ()
    out: Path_ = ()
    for depth, part in enumerate(table):
        plain += (part,)
        out += (part,)
        last = depth == len(table) - 1
        if last and is_array:
            counters[out] = counters.get(out, -1) + 1
            arrays.add(plain)
            out += (str(counters[out]),)
        elif plain in arrays:
            out += (str(counters.get(out, 0)),)
    return out


@dataclass
class _JsonLevel:
    is_object: bool
    key: str | None = None
    expect_key: bool = True


def json_key_positions(text: str) -> list[Occurrence]:
    """Every object key of a valid JSON text that is not inside an array, as (key path, line, column)."""
    cur = _Cursor(text)
    stack: list[_JsonLevel] = []
    out: list[Occurrence] = []
    while cur.i < len(text):
        ch = text[cur.i]
        if ch == '"':
            start, line, column = cur.i, cur.line, cur.column
            cur.move_to(_end_of_quoted(text, cur.i, '"', True))
            top = stack[-1] if stack else None
            if top is not None and top.is_object and top.expect_key:
                top.key, top.expect_key = json.loads(text[start : cur.i]), False
                if all(level.is_object for level in stack):
                    out.append((tuple(str(level.key) for level in stack), line, column))
            continue
        if ch in "{[":
            stack.append(_JsonLevel(is_object=ch == "{"))
        elif ch in "}]" and stack:
            stack.pop()
        elif ch == "," and stack and stack[-1].is_object:
            stack[-1].expect_key = True
        cur.move_to(cur.i + 1)
    return out


def _syntax_error(kind: str, message: str, line: int | None, column: int | None, hint: str) -> ConfigError:
    return ConfigError([ConfigIssue(f"{kind} syntax error: {message}", line=line, column=column, hint=hint)])


def _parse_toml(text: str) -> tuple[dict[str, Any], list[Occurrence]]:
    try:
        doc = tomlkit.parse(text)
    except ParseError as exc:
        message = re.sub(r" at line \d+ col \d+$", "", str(exc))
        raise _syntax_error(
            "TOML", message, exc.line, exc.col + 1, _TOML_HINT
        ) from exc  # tomlkit counts from 0
    return dict(doc.unwrap()), toml_key_positions(text)


def _parse_json(text: str) -> tuple[dict[str, Any], list[Occurrence]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _syntax_error("JSON", exc.msg, exc.lineno, exc.colno, _JSON_HINT) from exc
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("config_params in JSON must be one object {...}", line=1, column=1)])
    return data, json_key_positions(text)


def _last_positions(occurrences: list[Occurrence]) -> tuple[dict[Path_, tuple[int, int]], list[ConfigIssue]]:
    """The position of each key path (its last occurrence), and an issue for each path written twice."""
    seen: dict[Path_, tuple[int, int]] = {}
    issues: list[ConfigIssue] = []
    for path, line, column in occurrences:
        if path in seen and len(path) > 0:
            first = seen[path][0]
            issues.append(
                ConfigIssue(
                    f"{'.'.join(path)} is written twice (lines {first} and {line})",
                    key=path[-1],
                    line=line,
                    column=column,
                    hint="keep one of them",
                )
            )
        seen[path] = (line, column)
    return seen, issues


class _Flattener:
    """Flatten one level of sections as sd-scripts does, noting duplicates and nesting it cannot express."""

    def __init__(self, where: dict[Path_, tuple[int, int]]) -> None:
        self.where = where
        self.values: dict[str, Any] = {}
        self.positions: dict[str, tuple[int, int]] = {}
        self.paths: dict[str, Path_] = {}
        self.issues: list[ConfigIssue] = []

    def _locate(self, path: Path_) -> tuple[int | None, int | None]:
        """Where a path, or failing that the first key under it, was written."""
        if path in self.where:
            return self.where[path]
        inside = [pos for p, pos in self.where.items() if p[: len(path)] == path]
        return min(inside) if inside else (None, None)

    def _issue(self, path: Path_, message: str, hint: str) -> None:
        line, column = self._locate(path)
        self.issues.append(ConfigIssue(message, key=path[-1], line=line, column=column, hint=hint))

    def add(self, path: Path_, value: Any) -> None:
        key = path[-1]
        if not isinstance(key, str):
            self._issue(tuple(str(p) for p in path), f"key {key!r} is not a string", "use kohya's key names")
            return
        if key in self.values:
            first = ".".join(self.paths[key])
            if self.values[key] != value:
                self._issue(
                    path,
                    f"{key} is set twice with different values ({first} = {shown(self.values[key])}, "
                    f"{'.'.join(path)} = {shown(value)})",
                    "sd-scripts would silently keep the last one; keep the one you mean",
                )
            return  # the same value twice is what sd-scripts' flattening accepts
        self.values[key] = value
        self.paths[key] = path
        if path in self.where:
            self.positions[key] = self.where[path]

    def section(self, name: str, body: Mapping[Any, Any]) -> None:
        for key, value in body.items():
            path = (name, str(key))
            if isinstance(value, Mapping):
                self._issue(
                    path,
                    f"{'.'.join(path)} is a nested table; sd-scripts flattens only one level of [sections]",
                    f"move the keys of [{'.'.join(path)}] into [{name}] or to the top level",
                )
            else:
                self.add(path, value)

    def run(self, data: Mapping[Any, Any]) -> None:
        for key, value in data.items():
            name = str(key)
            if isinstance(value, Mapping):
                self.section(name, value)
            elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                self._issue(
                    (name,),
                    f"[[{name}]] is an array of tables, as in a kohya dataset_config file; "
                    "config_params is the flat training config",
                    'save the dataset tables as their own file and set dataset_config = "that_file.toml" (or '
                    "train_data_dir: the parent of <repeats>_<name> folders)",
                )
            else:
                self.add((key,), value)


def parse_config(source: str | Mapping[str, Any]) -> ParsedConfig:
    """Parse config_params given as TOML text, JSON object text or a mapping; raises ConfigError."""
    occurrences: list[Occurrence] = []
    if isinstance(source, Mapping):
        data, fmt = dict(source), "mapping"
    elif isinstance(source, str):
        text = source.lstrip("\ufeff")
        if text.lstrip().startswith("{"):
            data, occurrences = _parse_json(text)
            fmt = "json"
        else:
            data, occurrences = _parse_toml(text)
            fmt = "toml"
    else:
        raise ConfigError(
            [ConfigIssue(f"config_params must be TOML/JSON text or a mapping, not {type(source).__name__}")]
        )
    where, issues = _last_positions(occurrences)
    flat = _Flattener(where)
    flat.run(data)
    issues.extend(flat.issues)
    if issues:
        raise ConfigError(issues)
    parsed = ParsedConfig(values=flat.values, positions=flat.positions, source_format=fmt)
    if is_gui_config(parsed.values):
        parsed = _from_gui(parsed)
    refusal = out_of_scope(parsed.values)
    if refusal is not None:
        refusal.line, refusal.column = parsed.position(refusal.key or "")
        raise ConfigError([refusal])
    return parsed


def _from_gui(parsed: ParsedConfig) -> ParsedConfig:
    """A kohya_ss GUI config as the sd-scripts config the GUI trains with; positions follow the GUI's keys."""
    try:
        translated = translate_gui_config(parsed.values)
    except ConfigError as exc:
        for issue in exc.issues:
            if issue.key is not None and issue.line is None:
                issue.line, issue.column = parsed.position(issue.key)
        raise
    positions = {
        key: parsed.positions[source]
        for key, source in translated.origin.items()
        if source in parsed.positions and key in translated.values
    }
    for note in translated.notes:
        if note.key is not None:
            note.line, note.column = parsed.position(note.key)
    return ParsedConfig(
        values=translated.values,
        positions=positions,
        source_format="kohya_ss",
        notes=translated.notes,
        gui_fm_type=translated.fm_type,
    )


_FALSE = frozenset({"false", "no", "off", "0"})


def _describe(value: Any) -> str:
    return f"{shown(value)} ({type(value).__name__})"


def _to_bool(value: Any) -> bool:
    """kohya's reading of a switch: sd-scripts tests it with `if args.x`, so any text but "" is on (even "false");
    validation warns about the false-looking words."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return bool(value.strip())
    raise ValueProblem(
        f"expected true or false, got {_describe(value)}", "write true or false, without quotes"
    )


def is_false_word(value: Any) -> bool:
    """A string that reads as "off" to a person but as true to sd-scripts ("false", "no", "off", "0")."""
    return isinstance(value, str) and value.strip().lower() in _FALSE


def _to_number(value: Any, whole: bool) -> float | int:
    wanted = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueProblem(f"expected {wanted}, got {_describe(value)}")
    number: float | int
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueProblem(f"expected {wanted}, got {shown(value)}") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueProblem(f"expected a finite number, got {shown(value)}")
    if whole:
        if isinstance(number, float) and not number.is_integer():
            raise ValueProblem(f"expected a whole number, got {shown(value)}")
        return int(number)
    return float(number)


def _to_float(value: Any) -> float:
    if isinstance(value, (list, tuple)):
        numbers = {float(_to_number(v, False)) for v in value}
        if len(numbers) != 1:
            raise ValueProblem(
                f"one value is needed, got {list(value)}",
                "separate learning rates per text encoder are not implemented: give one number",
            )
        return numbers.pop()
    return float(_to_number(value, False))


def _to_str(spec: KeySpec, value: Any) -> str:
    if value is False and spec.kind == "path":
        return ""  # sd-scripts reads a path of false (resume = false) as not set
    if not isinstance(value, str):
        raise ValueProblem(f"expected a string, got {_describe(value)}", f'quote it: {spec.name} = "..."')
    return value


def _to_kv_list(spec: KeySpec, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = value.replace(
            '"', ""
        ).split()  # the kohya_ss GUI's one-string form, read as it reads it
    elif isinstance(value, Mapping):
        items = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueProblem(f'expected a list of "key=value" strings, got {_describe(value)}')
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueProblem(
                f'each item must be a "key=value" string, got {shown(item)}',
                f'write {spec.name} = ["key=value", ...]',
            )
        key, val = item.split("=", 1)
        out.append(f"{key.strip()}={val.strip()}")
    return tuple(out)


def _to_resolution(value: Any) -> tuple[int, int]:
    parts: list[Any]
    if isinstance(value, str):
        parts = re.split(r"[,xX]", value.strip())
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) not in (1, 2):
        raise ValueProblem(
            f"expected one size or width,height, got {shown(value)}", 'write resolution = "512" or "512,768"'
        )
    try:
        sides = [int(_to_number(p, True)) for p in parts]
    except ValueProblem:
        raise ValueProblem(
            f"expected one size or width,height, got {shown(value)}", 'write resolution = "512" or "512,768"'
        ) from None
    w, h = (sides[0], sides[0]) if len(sides) == 1 else (sides[0], sides[1])
    return w, h


def _to_steps_or_fraction(value: Any) -> int | float:
    if isinstance(value, str) and value.strip().endswith("%"):
        value = float(_to_number(value.strip()[:-1], False)) / 100.0
    number = _to_number(value, False)
    if number < 0:
        raise ValueProblem(f"must be 0 or more, got {shown(value)}")
    if number < 1 and not float(number).is_integer():
        return float(number)
    if not float(number).is_integer():
        raise ValueProblem(
            f"expected whole steps or a fraction below 1, got {shown(value)}", "e.g. 100 or 0.05"
        )
    return int(number)


def _check_range(spec: KeySpec, value: float | int | tuple[int, int]) -> None:
    numbers = value if isinstance(value, tuple) else (value,)
    low, high = spec.minimum, spec.maximum
    for number in numbers:
        too_low = low is not None and (number <= low if spec.exclusive_minimum else number < low)
        if too_low or (high is not None and number > high):
            lo = "" if low is None else f"{'>' if spec.exclusive_minimum else '>='} {low:g}"
            hi = "" if high is None else f"<= {high:g}"
            raise ValueProblem(
                f"{number} is out of range", f"allowed: {' and '.join(x for x in (lo, hi) if x)}"
            )


def _match_choice(spec: KeySpec, value: Any) -> Any:
    choices = spec.choices or ()
    for choice in choices:
        if choice == value or (isinstance(value, str) and str(choice).lower() == value.strip().lower()):
            return choice
    allowed = ", ".join(str(c) for c in choices)
    lowered = value.strip().lower() if isinstance(value, str) else None
    special = UNSUPPORTED_VALUES.get(spec.name, {})
    if lowered in special:
        why = special[lowered]
        raise ValueProblem(
            f"kohya accepts {spec.name} = {shown(value)} but this trainer does not implement it"
            + (f": {why}" if why else ""),
            f"choose one of {allowed}",
        )
    raise ValueProblem(f"{shown(value)} is not allowed", f"choose one of {allowed}")


_CONVERTERS: dict[str, Callable[[KeySpec, Any], Any]] = {
    "bool": lambda spec, v: _to_bool(v),
    "int": lambda spec, v: int(_to_number(v, True)),
    "float": lambda spec, v: _to_float(v),
    "str": _to_str,
    "path": _to_str,
    "list": _to_kv_list,
    "resolution": lambda spec, v: _to_resolution(v),
    "steps_or_fraction": lambda spec, v: _to_steps_or_fraction(v),
}


def coerce_value(spec: KeySpec, value: Any) -> Any:
    """Convert one raw value (TOML/JSON, strings for numbers allowed) to its normalised form; None = unset."""
    if value is None:
        return None
    if isinstance(value, str) and not value.strip() and spec.kind != "list" and spec.default != "":
        return None  # kohya_ss's GUI writes "" for unset values
    result = _CONVERTERS[spec.kind](spec, value)
    if result == "" and spec.kind == "path":
        return None
    if spec.zero_is_unset and result == 0:
        return None
    if spec.choices is not None:
        result = _match_choice(spec, result)
    elif isinstance(result, (int, float, tuple)) and not isinstance(result, bool):
        _check_range(spec, result)
    return result
