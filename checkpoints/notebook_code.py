"""Functions and classes defined in a notebook, pickled by value, and back.

The C pickler stores a function or a class by reference (``module.name``),
which a restarted kernel cannot resolve for code that lived only in the
notebook's cells.  :func:`dumps` stores such code by value instead, the way
cloudpickle does for dynamic classes, on the C pickler (so only notebook code
pays a Python call per object):

- a function: its code object, its closure cells (made empty, then filled,
  so a closure may hold the function itself), defaults, ``__dict__``
  (``functools.wraps``' ``__wrapped__``) and the other attributes.  Its globals
  are *not* copied when they are an importable module's namespace: a function
  defined in a notebook cell comes back with the live namespace of
  ``__main__`` (the notebook's) as its ``__globals__``, so it sees globals
  assigned after the restore.  Globals that belong to no module (``exec`` into
  a dict, ``namedtuple``'s ``__new__``) are copied: only the names its code
  uses.
- a class: a skeleton made from its metaclass, name, bases and ``__slots__``
  (the only things a class must have when it is created), then its attributes
  set on it (methods, class-level state, nested classes, dataclass fields);
  an ``abc`` class also registers its virtual subclasses again.  An enum's
  skeleton is made with its members (aliases and Flag boundaries included),
  whose own attributes (set by a member ``__init__``) are set afterwards.
- a ``typing.TypeVar`` defined in the notebook, tracked like a class (below),
  so a generic class's parameters are the notebook's TypeVar.
- ``functools.lru_cache`` wrappers: the cache is made anew around the
  function (its contents are not kept); ``classmethod``, ``staticmethod``,
  ``property``, ``functools.cached_property``, ``mappingproxy``, dict views, ``dataclasses``
  sentinels (``MISSING``, ``KW_ONLY``, the field kinds, which must stay the
  very objects ``dataclasses`` compares against).

A class stored by value carries a tracker id: every copy of the same class met
while one checkpoint is restored (a class stored with its variable and again
inside an instance of a nested class, or in a function's defaults) comes back
as one class object, so ``isinstance`` holds between them.  A class that came
back keeps its id, so pickling it again gives the same bytes.

Part of the file format: a stored checkpoint calls ``make_code``,
``make_cell``, ``make_function``, ``set_function_state``, ``make_class``,
``make_enum``, ``set_class_state``, ``make_lru_cache`` and ``make_typevar``
of this module by name (through ``serialize.load_notebook_code``).  Their names and arguments are
frozen; each takes what it knows and ignores what a later version adds.
Everything else a payload calls belongs to Python (``builtins.getattr``,
``importlib.import_module``, ``property``, ``classmethod``, ...).  Code objects
are bytecode of the Python minor version that wrote them; the caller refuses
to load them on another one.

Never imports IPython, ipykernel or zmq.  Pickling libraries' warnings never
reach the user's cell: they are logged (at INFO: a WARNING with no handler
configured would be printed to the cell's stderr).
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import dataclasses
import dis
import enum
import functools
import importlib
import io
import logging
import operator
import os
import pickle
import sys
import types
import typing
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: ``functools.lru_cache``'s wrapper type (``functools._lru_cache_wrapper``).
LruCacheWrapper: type = type(functools.lru_cache(maxsize=None)(lambda: None))

#: What the top-level pickler hands to :func:`dumps` when :func:`defined_in_notebook`.
CODE_TYPES: tuple[type, ...] = (types.FunctionType, type, LruCacheWrapper, typing.TypeVar)

_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type(), not a static C type

#: Types Python defines but does not name in ``builtins`` (``function``, ``code``, ``mappingproxy``...):
#: stored as ``getattr(types, name)``.
_TYPES_MODULE_NAMES: dict[type, str] = {
    value: name
    for name, value in sorted(vars(types).items())
    if isinstance(value, type) and getattr(builtins, value.__qualname__, None) is not value
}

#: Objects whose identity ``dataclasses`` relies on (``field.default is MISSING``, ``_field_type is _FIELD``).
_SENTINELS: dict[int, tuple[types.ModuleType, str]] = {
    id(getattr(dataclasses, name)): (dataclasses, name)
    for name in ("MISSING", "KW_ONLY", "_FIELD", "_FIELD_CLASSVAR", "_FIELD_INITVAR", "_HAS_DEFAULT_FACTORY")
    if hasattr(dataclasses, name)
}

#: Attributes a function carries besides its code, globals, name and closure.
_FUNCTION_ATTRIBUTES = (
    "__qualname__",
    "__module__",
    "__doc__",
    "__defaults__",
    "__kwdefaults__",
    "__annotations__",
    "__type_params__",  # 3.12+: def f[T](x: T)
)

#: What the enum machinery keeps in an enum's class dict (_member_map_, _value2member_map_, _flag_mask_...):
#: made again with the members, so not stored.
_ENUM_BOOKKEEPING = frozenset(
    name
    for probe in (enum.Enum("_Probe", "A"), enum.Flag("_ProbeFlag", "A"))
    for name in vars(probe)
    if name.startswith("_") and name.endswith("_") and not name.startswith("__")
)

#: Enum members' own attributes that the enum machinery sets (the rest came from a member ``__init__``).
_MEMBER_INTERNALS = frozenset({"_value_", "_name_", "__objclass__", "_sort_order_"})

_CODE_FIELDS = (
    "co_argcount",
    "co_posonlyargcount",
    "co_kwonlyargcount",
    "co_nlocals",
    "co_stacksize",
    "co_flags",
    "co_firstlineno",
    "co_code",
    "co_consts",
    "co_names",
    "co_varnames",
    "co_freevars",
    "co_cellvars",
    "co_filename",
    "co_name",
    "co_qualname",
    "co_linetable",
    "co_exceptiontable",
)

_GLOBAL_OPS = frozenset(dis.opmap[name] for name in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"))

# A class's tracker id is "<token>-<id>": the token is drawn once per process, before the kernel
# forks its checkpoint children, so a class keeps its id from one checkpoint to the next and two
# kernels never share one.
_TOKEN = os.urandom(6).hex()
#: Classes (and TypeVars) that came back from a checkpoint -> the tracker id they were stored with.
_stored_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
#: tracker id -> the live class holding it (so two live classes never take the same id).
_ids_in_use: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


# --- what is notebook code ------------------------------------------------------------


def defined_in_notebook(obj: Any) -> bool:
    """True for a function, class or TypeVar that cannot be found again by its module and name."""
    module_name = getattr(obj, "__module__", None)
    qualname: str = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or ""
    if module_name in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        return True
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is not obj


def is_notebook_code(obj: Any) -> bool:
    """Should the top-level pickler hand ``obj`` to :func:`dumps`?"""
    return isinstance(obj, CODE_TYPES) and defined_in_notebook(obj)


# --- save -------------------------------------------------------------------------------


@contextlib.contextmanager
def warnings_logged(doing: str) -> Iterator[None]:
    """Warnings raised inside go to this module's logger, never to stderr (the user's cell)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place (a save may meet 200k objects)
        try:
            yield
        finally:
            for warning in caught:
                log.info("%s %s while %s", warning.category.__name__, warning.message, doing)


def dumps(obj: Any) -> bytes:
    """``obj`` (a function or class defined in the notebook) pickled by value, protocol 5."""
    out = io.BytesIO()
    with warnings_logged("pickling notebook code"):
        _Pickler(out).dump(obj)
    return out.getvalue()


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5)
        #: id of a copied globals dict -> the base dict its functions get (one per dict)
        self._globals: dict[int, dict[str, Any]] = {}

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType:
            return self._function(obj) if defined_in_notebook(obj) else NotImplemented
        if isinstance(obj, type):
            return _class_reduce(obj)
        if id(obj) in _SENTINELS:
            return getattr, _SENTINELS[id(obj)]
        reduce = _REDUCERS.get(kind)
        if reduce is not None:
            return reduce(obj)
        if kind is LruCacheWrapper and defined_in_notebook(obj):
            params = obj.cache_parameters()
            state = {k: v for k, v in vars(obj).items() if k != "__wrapped__"}
            return make_lru_cache, (obj.__wrapped__, params["maxsize"], params["typed"], state)
        if isinstance(obj, (classmethod, staticmethod)):
            return kind, (obj.__func__,)
        if isinstance(obj, property):
            return kind, (obj.fget, obj.fset, obj.fdel, obj.__doc__), _instance_dict(obj)
        if isinstance(obj, typing.TypeVar) and defined_in_notebook(obj):
            # By value, tracked like a class: a generic class's parameters stay the notebook's TypeVar.
            variance = (obj.__covariant__, obj.__contravariant__)
            args = (obj.__name__, obj.__bound__, obj.__constraints__, *variance, _tracker_id(obj), None)
            return make_typevar, args
        if isinstance(obj, functools.cached_property):
            # Python 3.11's holds an RLock; __set_name__, which names it, is not called again.
            return kind, (obj.func,), {k: v for k, v in vars(obj).items() if k not in ("func", "lock")}
        return NotImplemented

    def _function(self, func: types.FunctionType) -> Any:
        module = _module_of(func.__globals__)
        state: dict[str, Any] = {}
        if module is not None:
            globals_ref: Any = module  # the live namespace of that module (the notebook's for __main__)
        else:
            globals_ref = self._globals.get(id(func.__globals__))
            if globals_ref is None:
                globals_ref = self._globals[id(func.__globals__)] = _base_globals(func.__globals__)
            state["globals"] = _used_globals(func)
        for name in _FUNCTION_ATTRIBUTES:
            with contextlib.suppress(AttributeError, NameError):  # 3.14 evaluates annotations lazily
                state[name] = getattr(func, name)
        if func.__dict__:
            state["__dict__"] = func.__dict__
        if func.__closure__ is not None:
            cells = {}
            for index, cell in enumerate(func.__closure__):
                with contextlib.suppress(ValueError):  # an empty cell (a name not bound yet)
                    cells[index] = cell.cell_contents
            state["cells"] = cells
        args = (func.__code__, globals_ref, func.__name__, func.__closure__)
        return make_function, args, state, None, None, set_function_state


def _instance_dict(obj: Any) -> dict[str, Any] | None:
    return getattr(obj, "__dict__", None) or None


def _module_of(namespace: dict[str, Any]) -> str | None:
    """The name of the module whose namespace ``namespace`` is, if it can be imported again by it."""
    name = namespace.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    return name if module is not None and getattr(module, "__dict__", None) is namespace else None


def _base_globals(namespace: dict[str, Any]) -> dict[str, Any]:
    names = ("__name__", "__package__", "__file__", "__path__")
    base: dict[str, Any] = {k: namespace[k] for k in names if k in namespace}
    own = namespace.get("__builtins__")
    if own is not None and own is not builtins and own is not vars(builtins):
        base["__builtins__"] = own  # namedtuple's __new__ runs with {}: keep it so
    return base


def _used_globals(func: types.FunctionType) -> dict[str, Any]:
    names: set[str] = set()
    codes = [func.__code__]
    while codes:
        code = codes.pop()
        names.update(i.argval for i in dis.get_instructions(code) if i.opcode in _GLOBAL_OPS)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    namespace = func.__globals__
    return {name: namespace[name] for name in sorted(names) if name in namespace}


def _class_reduce(cls: type) -> Any:
    if not cls.__flags__ & _HEAP_TYPE:
        name = _TYPES_MODULE_NAMES.get(cls)
        return (getattr, (types, name)) if name is not None else NotImplemented
    if not defined_in_notebook(cls):
        return NotImplemented
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if "__slots__" in cls.__dict__:
        namespace["__slots__"] = cls.__dict__["__slots__"]
    tracker = _tracker_id(cls)
    attributes = {}
    for name, value in cls.__dict__.items():
        if name in namespace or name in ("__slotnames__", "_abc_impl"):
            continue  # given at creation; a cache copyreg fills; abc's C data (the registry goes below)
        if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)) and value.__objclass__ is cls:
            continue  # __slots__ members, __dict__, __weakref__: made again by type() from __slots__
        attributes[name] = value
    state: dict[str, Any] = {"attributes": attributes}
    if isinstance(cls, abc.ABCMeta):
        state["registered"] = [ref() for ref in abc._get_dump(cls)[0] if ref() is not None]  # type: ignore[attr-defined]
    if issubclass(cls, enum.Enum) and cls.__members__:
        members = {}
        for name, member in cls.__members__.items():
            members[name] = member.value
            attributes.pop(name, None)
        for name in _ENUM_BOOKKEEPING:
            attributes.pop(name, None)
        state["members"] = {
            member.name: own
            for member in cls._member_map_.values()
            if (own := {k: v for k, v in vars(member).items() if k not in _MEMBER_INTERNALS})
        }
        extra = {"boundary": cls.__dict__["_boundary_"]} if cls.__dict__.get("_boundary_") is not None else None
        args: tuple[Any, ...] = (type(cls), cls.__name__, cls.__bases__, namespace, members, tracker, extra)
        return make_enum, args, state, None, None, set_class_state
    args = (type(cls), cls.__name__, _bases(cls), namespace, tracker, None)
    return make_class, args, state, None, None, set_class_state


def _bases(cls: type) -> tuple:
    """``Generic[T]`` rather than ``Generic`` (which cannot be subclassed as such), when given."""
    if typing.is_typeddict(cls):
        return tuple(b for b in cls.__bases__ if b is not dict)  # its metaclass adds dict itself
    original = cls.__dict__.get("__orig_bases__")
    if isinstance(original, tuple) and any(hasattr(b, "__origin__") for b in original):
        if all(isinstance(b, type) or hasattr(b, "__origin__") for b in original):
            return original
    return cls.__bases__


def _tracker_id(obj: Any) -> str:
    with contextlib.suppress(TypeError):  # a metaclass that makes its classes unhashable
        stored = _stored_ids.get(obj)
        if stored is not None:
            return stored
    return f"{_TOKEN}-{id(obj):x}"


def _code_reduce(code: types.CodeType) -> Any:
    return make_code, ({name: getattr(code, name) for name in _CODE_FIELDS if hasattr(code, name)},)


def _module_reduce(module: types.ModuleType) -> Any:
    if sys.modules.get(module.__name__) is not module:
        raise pickle.PicklingError(f"module {module.__name__!r} cannot be imported again by its name")
    return importlib.import_module, (module.__name__,)


_REDUCERS: dict[type, Any] = {
    types.CodeType: _code_reduce,
    types.CellType: lambda cell: (make_cell, ()),  # filled by the function that holds it
    types.ModuleType: _module_reduce,
    types.MappingProxyType: lambda proxy: (types.MappingProxyType, (dict(proxy),)),
    types.MemberDescriptorType: lambda d: (getattr, (d.__objclass__, d.__name__)),
    types.GetSetDescriptorType: lambda d: (getattr, (d.__objclass__, d.__name__)),
    # dict views, as a view of a dict holding only what the view shows
    type({}.keys()): lambda view: (operator.methodcaller("keys"), (dict.fromkeys(view),)),
    type({}.values()): lambda view: (operator.methodcaller("values"), (dict(enumerate(view)),)),
    type({}.items()): lambda view: (operator.methodcaller("items"), (dict(view),)),
}


# --- load: the names stored payloads call (frozen) ---------------------------------------

#: Classes (and TypeVars) made while one checkpoint is restored: tracker id -> class (see :func:`loads`).
_scope: dict[str, Any] | None = None
#: Their ids whose state has been set (a second copy of the same class does not set it again).
_scope_done: set[int] = set()
_scopes: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], set[int]]] = weakref.WeakKeyDictionary()


def loads(data: bytes, scope: object | None = None) -> Any:
    """Rebuild what :func:`dumps` pickled (the caller has checked the data and the Python version).

    Classes with the same tracker id loaded under the same ``scope`` (a restore)
    come back as one class.
    """
    global _scope, _scope_done
    tracked: tuple[dict[str, Any], set[int]] = ({}, set())
    if scope is not None:
        with contextlib.suppress(TypeError):
            tracked = _scopes.setdefault(scope, tracked)
    previous = _scope, _scope_done
    _scope, _scope_done = tracked
    try:
        with warnings_logged("loading notebook code"):
            return pickle.loads(data)
    finally:
        _scope, _scope_done = previous


def make_code(fields: dict[str, Any]) -> types.CodeType:
    """A code object with these ``co_*`` fields."""
    return _template_code.replace(**{k: v for k, v in fields.items() if hasattr(_template_code, k)})


_template_code = (lambda: None).__code__


def make_cell() -> types.CellType:
    """An empty closure cell (the function holding it fills it)."""
    return types.CellType()


def make_function(code: types.CodeType, globals_ref: Any, name: str, closure: tuple | None) -> types.FunctionType:
    """A function; ``globals_ref`` is a module name (its live namespace) or a dict of its own."""
    namespace = vars(importlib.import_module(globals_ref)) if isinstance(globals_ref, str) else globals_ref
    return types.FunctionType(code, namespace, name, None, closure)


def set_function_state(func: types.FunctionType, state: dict[str, Any]) -> types.FunctionType:
    state = dict(state)
    for index, value in state.pop("cells", {}).items():
        func.__closure__[index].cell_contents = value  # type: ignore[index]
    func.__globals__.update(state.pop("globals", {}))
    func.__dict__.update(state.pop("__dict__", {}))
    for name, value in state.items():
        setattr(func, name, value)
    return func


def make_class(
    metaclass: type, name: str, bases: tuple, namespace: dict[str, Any], tracker: str | None, extra: Any
) -> type:
    """A class with nothing but ``namespace`` (module, qualname, slots); :func:`set_class_state` fills it."""
    existing = _tracked(tracker)
    if existing is not None:
        return existing
    cls = types.new_class(name, bases, {"metaclass": metaclass}, lambda ns: ns.update(namespace))
    return _track(tracker, cls)


def make_enum(
    metaclass: type,
    name: str,
    bases: tuple,
    namespace: dict[str, Any],
    members: dict[str, Any],
    tracker: str | None,
    extra: Any,
) -> type:
    """An enum with its members (by value, in order: aliases stay aliases); the rest is set afterwards."""
    existing = _tracked(tracker)
    if existing is not None:
        return existing
    keywords = {}
    if isinstance(extra, dict) and extra.get("boundary") is not None:
        keywords["boundary"] = extra["boundary"]
    classdict = metaclass.__prepare__(name, bases, **keywords)
    for key, value in namespace.items():
        classdict[key] = value
    member = getattr(enum, "member", None)  # 3.11+: a value that looks like a method is still a member
    for key, value in members.items():
        classdict[key] = member(value) if member is not None and hasattr(value, "__get__") else value
    cls = metaclass.__new__(metaclass, name, bases, classdict, **keywords)  # type: ignore[call-overload]
    for key, value in members.items():
        made = getattr(cls, "__members__", {})[key]._value_
        if not (made is value or made == value):
            # A member __new__ that stores another value than it was given: its arguments are gone.
            raise pickle.UnpicklingError(f"enum {name}'s members were made by its own __new__: cannot make them again")
    return _track(tracker, cls)


def set_class_state(cls: type, state: dict[str, Any]) -> type:
    if id(cls) in _scope_done:
        return cls  # another copy of the same class, already restored from this checkpoint
    is_enum = isinstance(cls, enum.EnumMeta)
    for name, value in state.get("attributes", {}).items():
        if is_enum and name.startswith("_") and name.endswith("_") and not name.startswith("__") and name in vars(cls):
            continue  # an enum's own bookkeeping (_member_map_, _flag_mask_...): made with the skeleton
        setattr(cls, name, value)
    for subclass in state.get("registered", ()):
        cls.register(subclass)  # type: ignore[attr-defined]
    members: Any = getattr(cls, "__members__", {})
    for name, own in state.get("members", {}).items():
        members[name].__dict__.update(own)
    _scope_done.add(id(cls))
    return cls


def make_lru_cache(func: Any, maxsize: int | None, typed: bool, state: dict[str, Any]) -> Any:
    """``functools.lru_cache(maxsize, typed)(func)``, empty, with the wrapper's own attributes."""
    wrapper = functools.lru_cache(maxsize=maxsize, typed=typed)(func)
    vars(wrapper).update(state)
    return wrapper


def make_typevar(
    name: str, bound: Any, constraints: tuple, covariant: bool, contravariant: bool, tracker: str | None, extra: Any
) -> Any:
    """A ``typing.TypeVar`` defined in the notebook (one object per tracker id, as classes)."""
    existing = _tracked(tracker)
    if existing is not None:
        return existing
    variance = {"covariant": covariant, "contravariant": contravariant}
    return _track(tracker, typing.TypeVar(name, *constraints, bound=bound, **variance))


def _tracked(tracker: str | None) -> Any:
    return _scope.get(tracker) if _scope is not None and tracker is not None else None


def _track(tracker: str | None, cls: Any) -> Any:
    if tracker is None:
        return cls
    if _scope is not None:
        _scope[tracker] = cls
    # Pickled again, it keeps its id (same bytes as stored), unless another live class holds that id.
    with contextlib.suppress(TypeError):
        if _ids_in_use.get(tracker) is None:
            _ids_in_use[tracker] = cls
            _stored_ids[cls] = tracker
    return cls
