"""The machinery of the config's table of fields: what a field is, the kinds of value, building a section.

A config section is a frozen dataclass whose every field is declared with :func:`field`: its default
(or :data:`REQUIRED`), its kind (type with range or choices, :class:`Kind`), one line of doc, and
when the run reads it (:class:`When`; None: always). :mod:`dyngap_jax.train.sections` holds the
table itself; from it come the defaults (``base_config``), the check of every value and of unknown
fields (:func:`build_section`), the warning about fields the chosen setup ignores, the config
module's docstring and the README's list of fields.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A config field with a bad or missing value; the message starts with the field's path."""


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()  # a field with no default: the data set's config must set it


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class Kind:
    """A field's type and range; :meth:`check` returns the value as the section keeps it."""

    def check(self, value, path: str):
        return value

    def describe(self) -> str:
        return ""

    def plain(self, value):
        """The value as ``config.json`` holds it."""
        if isinstance(value, tuple):
            return [self.plain(v) for v in value]
        return value


class Int(Kind):
    def __init__(self, minimum: int | None = None):
        self.minimum = minimum

    def check(self, value, path):
        if not _is_int(value):
            raise ConfigError(f"config.{path}: must be an integer, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"config.{path}: must be >= {self.minimum}, got {value}")
        return int(value)

    def describe(self):
        return "int" + (f" >= {self.minimum}" if self.minimum is not None else "")


class Num(Kind):
    def __init__(self, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def check(self, value, path):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"config.{path}: must be a finite number, got {value!r}")
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ConfigError(f"config.{path}: must be {'>' if self.low_open else '>='} {self.low}, got {value}")
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise ConfigError(f"config.{path}: must be {'<' if self.high_open else '<='} {self.high}, got {value}")
        return float(value)

    def describe(self):
        if self.low is not None and self.high is not None:
            return f"number in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"number {'>' if self.low_open else '>='} {self.low}"
        return "number"


class Bool(Kind):
    def check(self, value, path):
        if not isinstance(value, bool):
            raise ConfigError(f"config.{path}: must be True or False, got {value!r}")
        return value

    def describe(self):
        return "bool"


class Choice(Kind):
    def __init__(self, *choices: str):
        self.choices = tuple(choices)

    def check(self, value, path):
        if value not in self.choices:
            raise ConfigError(f"config.{path}: unknown {value!r}; known: {', '.join(map(str, self.choices))}")
        return value

    def describe(self):
        return " \\| ".join(map(str, self.choices))


class Text(Kind):
    def __init__(self, nonempty: bool = False, what: str = "text"):
        self.nonempty, self.what = nonempty, what

    def check(self, value, path):
        if not isinstance(value, str) or (self.nonempty and not value):
            raise ConfigError(f"config.{path}: {'a non-empty ' if self.nonempty else ''}{self.what} is required, got {value!r}")
        return value

    def describe(self):
        return self.what


class Maybe(Kind):
    """``None`` (unset: the documented fallback) or a value of ``inner``."""

    def __init__(self, inner: Kind):
        self.inner = inner

    def check(self, value, path):
        return None if value is None else self.inner.check(value, path)

    def describe(self):
        return f"{self.inner.describe()} or None"

    def plain(self, value):
        return None if value is None else self.inner.plain(value)


class Names(Kind):
    """A list of distinct non-empty names (kept as a tuple)."""

    def __init__(self, nonempty: bool = True):
        self.nonempty = nonempty

    def check(self, value, path):
        if (not isinstance(value, (list, tuple)) or (self.nonempty and not value) or len(set(value)) != len(value)
                or not all(isinstance(m, str) and m for m in value)):
            raise ConfigError(f"config.{path}: a {'non-empty ' if self.nonempty else ''}list of distinct names, got {value!r}")
        return tuple(value)

    def describe(self):
        return "list of names"


class Ints(Kind):
    """A list of integers >= ``minimum``, of ``length`` when given (a frame size, frame indices)."""

    def __init__(self, minimum: int, length: int | None = None, what: str = "list of integers"):
        self.minimum, self.length, self.what = minimum, length, what

    def check(self, value, path):
        if (not isinstance(value, (list, tuple)) or not value or (self.length and len(value) != self.length)
                or not all(_is_int(v) and v >= self.minimum for v in value)):
            raise ConfigError(f"config.{path}: {self.what}, got {value!r}")
        return tuple(int(v) for v in value)

    def describe(self):
        return self.what


class Pair(Kind):
    def check(self, value, path):
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"config.{path}: a pair (lo, hi), got {value!r}")
        return tuple(float(x) for x in value)

    def describe(self):
        return "pair (lo, hi)"


class Free(Kind):
    """A mapping checked elsewhere (``by``: who checks it, named in the doc)."""

    def __init__(self, by: str):
        self.by = by

    def check(self, value, path):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.{path}: must be a dict of fields, got {value!r}")
        return plain(value)

    def describe(self):
        return f"dict (checked by {self.by})"


class Sub(Kind):
    """A nested section (a frozen dataclass of fields)."""

    def __init__(self, cls: type):
        self.cls = cls

    def check(self, value, path):
        return build_section(self.cls, value, path)

    def describe(self):
        return "section"

    def plain(self, value):
        return section_dict(value)


class Each(Kind):
    """``{name: section}``: one nested section a name (a frame modality's settings)."""

    def __init__(self, cls: type, what: str):
        self.cls, self.what = cls, what

    def check(self, value, path):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config.{path}: a dict of {self.what}, got {value!r}")
        return {str(k): build_section(self.cls, v, f"{path}.{k}") for k, v in value.items()}

    def describe(self):
        return f"dict of {self.what}"

    def plain(self, value):
        return {k: section_dict(v) for k, v in value.items()}


@dataclasses.dataclass(frozen=True)
class When:
    """A field is read only when the field at ``path`` takes one of ``values`` (else it is ignored,
    and warned about when set). ``reason`` words the warning (``{value!r}``: the deciding value)."""

    path: str
    values: tuple
    reason: str = ""

    def holds(self, cfg) -> bool:
        return lookup(cfg, self.path) in self.values

    def why(self, cfg) -> str:
        value = lookup(cfg, self.path)
        return self.reason.format(value=value) if self.reason else f"config.{self.path}={value!r}"

    def describe(self) -> str:
        return f"`{self.path}` = {' or '.join(map(str, self.values))}"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One row of the table: the default, the kind, the doc line, when it is read."""

    default: Any
    kind: Kind
    doc: str
    reads: When | None = None


def field(default, kind: Kind, doc: str, reads: When | None = None):
    """A section's field with its row of the table (mutable defaults are copied per instance)."""
    meta = {"spec": Spec(default, kind, doc, reads)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def specs(cls) -> dict[str, Spec]:
    """``{name: Spec}`` of a section class, in declaration order (fields without a spec are derived values)."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls) if "spec" in f.metadata}


def plain(x):
    """A ConfigDict or mapping as plain dicts and lists (what ``config.json`` holds)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def lookup(section, path: str):
    """The value at a dotted ``path`` of a built section (or a plain mapping)."""
    node = section
    for part in path.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def build_section(cls, raw, path: str, derived: Callable[[dict], dict] | None = None):
    """The section ``cls`` from ``raw`` (a mapping; missing fields take their defaults), every value checked.

    An unknown key fails naming it and the section's fields; a required field left unset fails naming it.
    """
    where = f"config.{path}" if path else "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a dict of fields, got {raw!r}")
    table = specs(cls)
    unknown = sorted(set(raw) - set(table))
    if unknown:
        raise ConfigError(f"{where + '.' if path else 'config.'}{unknown[0]}: unknown field; {where} has "
                          f"{', '.join(sorted(table))}")
    values = {}
    for name, s in table.items():
        sub = f"{path}.{name}" if path else name
        value = raw[name] if name in raw else _default(s)
        if value is REQUIRED or (value is None and s.default is REQUIRED):
            raise ConfigError(f"config.{sub}: required, but not set")
        values[name] = s.kind.check(value, sub)
    if derived is not None:
        values.update(derived(values))
    return cls(**values)


def _default(s: Spec):
    if isinstance(s.kind, Sub) and s.default is not REQUIRED:
        return {}  # a subsection left out: every one of its fields takes its default
    if isinstance(s.default, (dict, list)):
        return type(s.default)(s.default)
    return s.default


def section_dict(section) -> dict:
    """A built section as the plain dict ``config.json`` holds (derived values left out)."""
    return {name: s.kind.plain(getattr(section, name)) for name, s in specs(type(section)).items()}


def default_dict(cls) -> dict:
    """The section's defaults as a plain dict (``None`` where a field is required)."""
    out = {}
    for name, s in specs(cls).items():
        if isinstance(s.kind, Sub):
            out[name] = default_dict(s.kind.cls)
        else:
            d = None if s.default is REQUIRED else _default(s)
            out[name] = list(d) if isinstance(d, tuple) else d
    return out


def rows(cls, prefix: str = "") -> list[tuple[str, Spec]]:
    """Every leaf field of a section and its subsections: ``(dotted path, spec)``, depth first."""
    out = []
    for name, s in specs(cls).items():
        path = f"{prefix}{name}"
        if isinstance(s.kind, Sub):
            out += [(p, dataclasses.replace(sp, reads=sp.reads or s.reads)) for p, sp in rows(s.kind.cls, path + ".")]
        else:
            out.append((path, s))
    return out


def describe_default(s: Spec) -> str:
    if s.default is REQUIRED:
        return "required"
    d = s.default
    if isinstance(d, str):
        return f"`{d!r}`"
    return f"`{list(d) if isinstance(d, tuple) else d!r}`"


__all__ = ["Bool", "Choice", "ConfigError", "Each", "Free", "Int", "Ints", "Kind", "Maybe", "Names", "Num", "Pair",
           "REQUIRED", "Spec", "Sub", "Text", "When", "build_section", "default_dict", "field", "lookup", "plain",
           "rows", "section_dict", "specs"]
