"""Checks for values read from files (and given as options): the right type, inside its range,
else one sentence that names the file and the field.

    raw = mapping(read_json(path), "the file", path)
    step = field(raw, "step", int, path, lo=0)           # a whole number >= 0
    lr = field(raw, "lr", float, path, lo=0, default=0.0) # finite; 0.0 when absent

Types: int (a whole number; not a bool, not 3.0), float (a finite number; an int is accepted
and returned as a float), str, bool, dict (a mapping) and list. Nested fields are named with
dots and indices: "splits.train.shards[0].file".
"""

from __future__ import annotations

import math

import torch

from md4.errors import UserError

MISSING = object()
KINDS = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
         dict: "a mapping", list: "a list"}


def shown(value, limit: int = 40) -> str:
    """repr(value), shortened to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(name: str, where, what: str) -> UserError:
    """The error: "In WHERE, NAME WHAT." (or "NAME WHAT." without a place)."""
    return UserError(f"In {where}, {name} {what}." if where else f"{name} {what}.")


def describe(typ: type, lo=None, hi=None) -> str:
    kind = KINDS[typ]
    if lo is not None and hi is not None:
        return f"{kind} in {lo}..{hi}" if typ is int else f"{kind} in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f"at least {lo:g} ({kind})"
    if hi is not None:
        return f"at most {hi:g} ({kind})"
    return kind


def check(value, typ: type, name: str, where=None, lo=None, hi=None):
    """`value` if it has type `typ` (see the module docstring) and lies in [lo, hi]; else a
    UserError naming `name` (and the file `where`)."""
    ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and typ is float:
        ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise fail(name, where, f"must be {describe(typ, lo, hi)}, got {shown(value)}")
    return value


def field(d: dict, key: str, typ: type, where, lo=None, hi=None, default=MISSING, prefix: str = ""):
    """d[key] checked with `check`; `default` when the key is absent (without a default, a
    missing key is an error). `prefix` names the mapping d inside the file, e.g. "splits.train."."""
    if key not in d:
        if default is MISSING:
            raise fail(f"{prefix}{key}", where, "is missing")
        return default
    return check(d[key], typ, f"{prefix}{key}", where, lo, hi)


def in_file(where, fn, *args, **kwargs):
    """fn(*args, **kwargs), a UserError it raises named with the file `where` its values come from:
    "In WHERE, what it says." (for the checks a constructor makes, e.g. a Config's)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        message = str(e)
        raise UserError(f"In {where}, {message[0].lower()}{message[1:]}") from None


def mapping(value, name: str, where=None) -> dict:
    return check(value, dict, name, where)


def one_of(value, choices, name: str, where=None):
    """`value` if it is one of `choices` (a string, usually)."""
    if not isinstance(value, str) or value not in choices:
        raise fail(name, where, f"must be one of {', '.join(map(str, choices))}, got {shown(value)}")
    return value


def known_keys(d: dict, keys, name: str, where=None) -> None:
    """No key of d outside `keys`."""
    unknown = sorted(set(d) - set(keys), key=str)
    if unknown:
        raise fail(name, where, f"has an unknown key {shown(unknown[0])} (known: {', '.join(keys) or 'none'})")


def finite_tensors(tensors: dict, where, prefix: str = "") -> None:
    """Every floating-point tensor among the values is finite (no NaN or infinity)."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            what = "NaN" if torch.isnan(t).any() else "infinite values"
            raise fail(f"{prefix}{key}", where, f"holds {what}; every value must be finite")
