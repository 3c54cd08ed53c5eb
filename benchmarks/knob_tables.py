"""Write one Markdown table of options per registered method, generated from the option classes' pydantic schema.

    python benchmarks/knob_tables.py           # writes docs/methods/knobs/<method>.md
    python benchmarks/knob_tables.py --check   # exits 1, naming the files, if any written file would change

Each row is a key of `method: {name: <method>, ...}`: its name, type (with its bounds), default and the field's
`description=` (its meaning, then its source). Nested sections (icm_fusion's `fusion:`) are flattened as
`fusion.<key>`. The tables are never edited by hand: change the `description=` in the code and run the script.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
KNOB_DIR = ROOT / "docs" / "methods" / "knobs"
COMMAND = "python benchmarks/knob_tables.py"


def _number(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _bounds(metadata: list[Any]) -> list[str]:
    """`ge=0.0, lt=1.0` -> ["≥ 0", "< 1"]; a list's min_length -> "at least N items"."""
    shown = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            shown.append(f"≥ {_number(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            shown.append(f"> {_number(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            shown.append(f"≤ {_number(item.le)}")
        elif isinstance(item, annotated_types.Lt):
            shown.append(f"< {_number(item.lt)}")
        elif isinstance(item, annotated_types.MinLen):
            shown.append(f"at least {item.min_length} item" + ("s" if item.min_length != 1 else ""))
    return shown


def type_text(annotation: Any) -> str:
    """A type as a config author reads it: `one of `a`, `b``, `int or null`, `list of int ≥ 1`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is typing.Annotated:
        inner, *metadata = args
        extra = []
        for item in metadata:
            extra.extend(_bounds(getattr(item, "metadata", [item])))
        return " ".join([type_text(inner), *extra])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args)
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {type_text(args[0])} to {type_text(args[1])}" if args else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {bool: "bool", int: "int", float: "float", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def field_type(field: FieldInfo) -> str:
    text = type_text(field.annotation)
    bounds = _bounds(field.metadata)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in a YAML config."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
    else:
        value = field.default
    if isinstance(value, float):
        return f"`{value!r}`"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def knob_rows(options: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field, nested models flattened; in declaration order, except that
    the routed-inference keys every routed method shares come last, after the method's own."""
    from loracl.methods.routing import RoutedBranchOptions, RoutedInferenceOptions

    shared = set(RoutedBranchOptions.model_fields) if issubclass(options, RoutedInferenceOptions) else set()
    rows = []
    for name, field in sorted(options.model_fields.items(), key=lambda item: item[0] in shared):
        key = prefix + name
        rows.append((f"`{key}`", field_type(field), default_text(field), field.description or ""))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows.extend(knob_rows(field.annotation, prefix=f"{key}."))
    return rows


def method_page(name: str) -> str:
    """The Markdown file of one method: the generated-by line, a heading, the table."""
    from loracl.methods.registry import method_class

    method = method_class(name)
    options = method.Options
    source = Path(inspect.getsourcefile(options) or "").resolve()
    try:
        where = source.relative_to(ROOT).as_posix()
    except ValueError:
        where = source.name
    lines = [
        f"_Generated by `{COMMAND}` from `{options.__name__}` ({where}); edit the `description=` there, not this file._",
        "",
        f"# `{name}` options",
        "",
    ]
    if method.description:
        lines += [f"{method.description[0].upper()}{method.description[1:]}.", ""]
    rows = knob_rows(options)
    if not rows:
        lines.append("This method has no options of its own (`method: {name: " + name + "}`).")
        return "\n".join(lines) + "\n"
    lines += [
        f"Keys of `method: {{name: {name}, ...}}` in a run config (or `--set method.<key>=<value>`).",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cell(part) for part in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def expected_files() -> dict[Path, str]:
    """Every file the generator writes, with its content."""
    from loracl.methods.registry import available_methods

    return {KNOB_DIR / f"{name}.md": method_page(name) for name in available_methods()}


def stale_files() -> list[Path]:
    """Files that would change (or be removed) if the generator ran now."""
    expected = expected_files()
    stale = [path for path, text in expected.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if KNOB_DIR.is_dir():
        stale += sorted(path for path in KNOB_DIR.glob("*.md") if path not in expected)
    return stale


def write_files() -> list[Path]:
    """Write every table (and remove tables of methods no longer registered); returns the paths that changed."""
    changed = stale_files()
    expected = expected_files()
    KNOB_DIR.mkdir(parents=True, exist_ok=True)
    for path in changed:
        if path in expected:
            path.write_text(expected[path], encoding="utf-8")
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a written file would change")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run `{COMMAND}`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_files():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
