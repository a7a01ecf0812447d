"""Read a YAML spec into a pydantic model; every error names the file, the field and what was expected."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and field."""


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not str(item).startswith(("function-", "union[", "literal[")) and "[" not in str(item):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


# Field names whose values are never echoed back in an error (a key pasted into the wrong field stays secret).
SECRET_FIELD = re.compile(r"secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key", re.I)


def parse_spec(model: type[M], data: Any, source: str = "<spec>") -> M:
    """Validate `data` (a dict) against `model`; raise SpecError with one line per bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            given = e.get("input")
            shown = "" if e["type"] == "missing" or isinstance(given, dict) else f" (given: {given!r})"
            if any(SECRET_FIELD.search(str(part)) for part in e["loc"]):
                shown = " (value hidden: the field's name says it may be a secret)"
            msg = e["msg"].removeprefix("Value error, ")
            where = _field_path(e["loc"])
            lines.append(f"  {msg}{shown}" if where == "<root>" else f"  {where}: {msg}{shown}")
        raise SpecError(f"{source}: invalid spec\n" + "\n".join(lines)) from None


class AliasRefused(yaml.MarkedYAMLError):
    """A YAML alias (`*name`) in a spec; problem_mark is where it stands."""


class SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases. An alias repeats its anchor's subtree by reference, so a few hundred
    bytes of nested aliases ("billion laughs") expand to gigabytes once the spec is validated, hashed or
    written back as JSON. Anchors alone repeat nothing and load as before."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(problem=f"alias *{event.anchor}", problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with SpecLoader; a syntax error or an alias raises SpecError naming its position."""
    try:
        return yaml.load(text, Loader=SpecLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(err, AliasRefused):
            raise SpecError(f"{source}: YAML {err.problem}{where}: anchors/aliases (`&name` / `*name`) are not "
                            "allowed in cfaudit specs; write the repeated value out in full") from None
        raise SpecError(f"{source}: YAML syntax error{where}: {getattr(err, 'problem', err)}") from None


def load_spec(model: type[M], path: str | Path) -> M:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"Spec file not found: {path}")
    return parse_spec(model, read_yaml(path.read_text(), str(path)), source=str(path))
