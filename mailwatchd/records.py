"""typing.NamedTuple's class syntax without importing typing or collections.

`sendmail -t` runs once per message, and typing (it imports re, contextlib, warnings and
collections) would cost each run more than all of mailwatchd's own modules; collections alone,
for namedtuple, about as much as all of them. The modules on the submission path import
NamedTuple from here: mypy sees typing.NamedTuple (it takes any name TYPE_CHECKING as true), the
interpreter builds a class that behaves as collections.namedtuple's: a tuple subclass with the
annotated fields (read-only), their defaults, `_fields`, `_field_defaults`, `_make`, `_replace`,
`_asdict`, its repr, equality, hashing and pickling, plus the class body's docstring, methods and
properties. tests/test_imports.py holds it to typing.NamedTuple.

The daemon reads these fields for every message: where the C accessor operator.itemgetter is already
loaded (the daemon has imported collections long before), the fields use it, as namedtuple's do; a
`sendmail` run, which must not import it, gets one Python function per field.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    # What the class body gives that is not copied onto the record class (typing.NamedTupleMeta's list).
    _NOT_COPIED = frozenset({"__module__", "__name__", "__annotations__"})

    def _field(index):
        _operator = sys.modules.get("_operator")
        getter = _operator.itemgetter(index) if _operator is not None else lambda record: record[index]
        return property(getter, doc=f"Alias for field number {index}")

    def _record_class(typename, namespace):
        """collections.namedtuple(typename, the annotated fields, defaults=...) and the class body's own members."""
        fields = tuple(namespace.get("__annotations__", {}))
        if any(name.startswith("_") for name in fields):
            raise ValueError(f"{typename}: field names cannot start with an underscore")
        with_default = [name for name in fields if name in namespace]
        required = len(fields) - len(with_default)
        if list(fields[required:]) != with_default:
            raise TypeError(f"{typename}: a field without a default follows one with a default")
        defaults = tuple(namespace[name] for name in with_default)

        def __new__(cls, *args, **kwargs):
            if not kwargs and len(args) == len(fields):
                return tuple.__new__(cls, args)
            if len(args) > len(fields):
                raise TypeError(f"{typename}() takes {len(fields)} positional arguments but {len(args)} were given")
            values = list(args)
            for index in range(len(args), len(fields)):
                if fields[index] in kwargs:
                    values.append(kwargs.pop(fields[index]))
                elif index >= required:
                    values.append(defaults[index - required])
                else:
                    raise TypeError(f"{typename}() missing required argument: {fields[index]!r}")
            if kwargs:
                raise TypeError(f"{typename}() got an unexpected or repeated keyword argument {next(iter(kwargs))!r}")
            return tuple.__new__(cls, values)

        def _make(cls, iterable):
            result = tuple.__new__(cls, iterable)
            if len(result) != len(fields):
                raise TypeError(f"Expected {len(fields)} arguments, got {len(result)}")
            return result

        def _replace(self, /, **changes):
            result = tuple.__new__(type(self), map(changes.pop, fields, self))
            if changes:
                raise ValueError(f"Got unexpected field names: {list(changes)!r}")
            return result

        def __repr__(self):
            shown = ", ".join(f"{name}={value!r}" for name, value in zip(fields, self, strict=True))
            return f"{type(self).__name__}({shown})"

        def _asdict(self):
            return dict(zip(fields, self, strict=True))

        def __getnewargs__(self):
            return tuple(self)

        members = {
            "__doc__": f"{typename}({', '.join(fields)})",
            "__module__": namespace["__module__"],
            "__annotations__": dict(namespace.get("__annotations__", {})),
            "__slots__": (),
            "_fields": fields,
            "_field_defaults": dict(zip(fields[required:], defaults, strict=True)),
            "__new__": __new__,
            "_make": classmethod(_make),
            "_replace": _replace,
            "__repr__": __repr__,
            "_asdict": _asdict,
            "__getnewargs__": __getnewargs__,
            "__match_args__": fields,
        }
        members.update((name, _field(index)) for index, name in enumerate(fields))
        members.update((key, value) for key, value in namespace.items() if key not in _NOT_COPIED and key not in fields)
        return type(typename, (tuple,), members)

    class _NamedTupleMeta(type):
        def __new__(cls, typename, bases, namespace):
            return _record_class(typename, namespace)

    # The base a record class names; never a record itself (type.__new__ skips the metaclass's __new__).
    NamedTuple = type.__new__(_NamedTupleMeta, "NamedTuple", (), {})
