"""Turn a namespace into one pickle per variable, and back.

Save path: :func:`snapshot` pickles each variable on its own with the C pickler
at protocol 5.  Large contiguous buffers (numpy arrays, pandas blocks) leave
the pickle stream out-of-band so the store can keep each one as its own blob,
and a buffer that did not change is never written again.  Only what the C
pickler cannot do by reference goes to :mod:`.notebook_code`, which pickles it
by value: functions, lambdas, closures, classes and ``lru_cache`` wrappers
defined in the notebook (instances of such classes stay on the C pickler; only
their class is handed over).

One pickle per variable keeps unchanged variables byte-identical from one
checkpoint to the next and isolates failures: a variable that cannot be
pickled is skipped with its reason and costs nobody else.  Sharing between
variables is kept three ways: a variable that *is* another variable's object
(``a = b = []``) is stored as an alias; a non-container object met inside one
variable that is another variable's top-level object (an instance's notebook
class, a shared array) is stored as a reference to that variable; and a
variable found to hold another variable's list, dict, set or bytearray
(``table = {"rows": rows}``) is pickled again with ``persistent_id`` so the
container stays shared (a Python call per object, paid only by such
variables; see :class:`_ContainerWatch`).  References to data point only to
variables that come earlier in the namespace, so they never form a cycle the
loader could not resolve; references to notebook classes and functions may
point anywhere (those are pickled by value, never referring back).

Restore path: :class:`Loader` unpickles variables on demand, resolving those
references, so each variable loads once whatever the order.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import resource
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import notebook_code

#: Buffers smaller than this stay inside the pickle: a blob file per tiny array
#: would cost more than it saves.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


@dataclass
class Variable:
    """One saved variable, ready for the store.

    ``kind`` is ``"pickle"`` (``payload`` plus out-of-band ``buffers``),
    ``"module"`` (re-imported by ``target`` name) or ``"alias"`` (the same
    object as variable ``target``).
    """

    name: str
    type: str
    kind: str
    payload: bytes = b""
    buffers: list[memoryview] = field(default_factory=list)
    target: str = ""
    #: for a variable carried forward unloaded (see :class:`NotRestored`): its
    #: manifest entry in the checkpoint it came from, stored again as it is
    stored: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        """Bytes this variable takes in the store (before deduplication)."""
        if self.stored is not None:
            return int(self.stored.get("size", 0))
        return len(self.payload) + sum(b.nbytes for b in self.buffers)


@dataclass
class Skipped:
    """A variable that was not saved (or not restored), and why."""

    name: str
    type: str
    reason: str


@dataclass
class Snapshot:
    """The pickled state of a namespace at one instant."""

    variables: list[Variable]
    skipped: list[Skipped]

    @property
    def size(self) -> int:
        return sum(v.size for v in self.variables)


class NotRestored:
    """Stands in the namespace for a variable whose saved data could not be loaded.

    Its data verified but could not be unpickled (a module that is not
    installed, a class that no longer exists).  Checkpoints keep storing the
    saved bytes unchanged for as long as the name holds this placeholder, so
    the variable comes back once the cause is fixed and the kernel restarts;
    reassigning or deleting the name lets it go.  Part of the file format:
    checkpoints may reference ``durable_kernel.checkpoints.serialize.NotRestored``.
    """

    __slots__ = ("name", "type", "reason", "advice", "entry")

    def __init__(self, name: str, type: str, reason: str, advice: str, entry: dict[str, Any]):
        self.name, self.type, self.reason, self.advice, self.entry = name, type, reason, advice, entry

    def __repr__(self) -> str:
        return f"<{self.name} was not restored ({self.type}): {self.reason}. {self.advice}>"

    def __reduce__(self) -> Any:
        # Met inside another variable (``items = [df]``): kept as this placeholder.
        return (NotRestored, (self.name, self.type, self.reason, self.advice, self.entry))

    def __getattr__(self, attribute: str) -> Any:
        raise AttributeError(
            f"{self.name} was not restored ({self.reason}), so it has no attribute {attribute!r}. {self.advice}"
        )


def type_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s type, as the manifest records it."""
    t = type(obj)
    module = getattr(t, "__module__", None) or "?"
    return f"{module}.{getattr(t, '__qualname__', t.__name__)}"


# --- what stored pickles reference: part of the file format --------------------------------------
#
# A checkpoint's pickles call these by their module path when they load, so their
# names and meaning are frozen: renaming one would make every user's checkpoints
# unloadable.  The underscored names are how checkpoints written by 0.1 refer to
# the same functions; they stay for as long as such checkpoints may exist.


def load_notebook_code(data: bytes) -> Any:
    """Rebuild a function or class defined in a notebook (pickled by :mod:`.notebook_code`).

    Its code is bytecode, which only the Python minor version that wrote it can
    run: from another version it is refused (:class:`OtherPython`), as by :func:`load_dill`.
    """
    _refuse_other_python()
    return notebook_code.loads(data, scope=_active_loader)


def load_dill(data: bytes) -> Any:
    """Rebuild a function or class defined in a notebook (pickled by dill: how 0.1 and 0.2 stored it).

    Its code is bytecode, which only the Python minor version that wrote it can
    run (another one may crash running it): from another version it is refused
    (:class:`OtherPython`) and the variable is not restored, its data kept.
    """
    _refuse_other_python()
    import dill

    with notebook_code.warnings_logged("loading notebook code pickled by dill"):
        return dill.loads(data)


class OtherPython(Exception):
    """Notebook code stored by another Python minor version than the one running."""


def _refuse_other_python() -> None:
    written = _active_loader.python_of_current() if _active_loader is not None else None
    if written is None:
        return
    wrote = ".".join(written.split(".")[:2])
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if wrote != running:
        raise OtherPython(
            f"notebook code saved by Python {wrote}, whose bytecode Python {running} cannot run; "
            f"a kernel on Python {wrote} restores it"
        )


def import_module(name: str) -> types.ModuleType:
    """A module met inside a variable, imported again by its name."""
    return importlib.import_module(name)


#: How often (in bytes of pickle written) a foreground save asks how much memory is left.
_MEMORY_CHECK_BYTES = 1 << 20


class TooLarge(Exception):
    """A variable grew past ``max_variable_bytes`` while being pickled."""


class _Output(io.BytesIO):
    """The pickle's destination; gives up as soon as the variable is too large.

    The C pickler writes a file object frame by frame, so a 10 GiB variable is
    refused after its first frames over the limit, not after 10 GiB of copies.
    """

    def __init__(self, limit: int | None, memory_left: Callable[[], int | None] | None = None):
        super().__init__()
        self.limit = limit
        #: bytes the process may still allocate (None: unknown); asked every _MEMORY_CHECK_BYTES
        #: written, so what the pickler's memo takes counts too, not only the pickle itself
        self.memory_left = memory_left
        # Not for the first MiB: small variables always fit, even when the
        # allocator holds on to memory a failed big one freed.
        self._next_memory_check = _MEMORY_CHECK_BYTES
        self.out_of_band = 0

    def write(self, data: Any) -> int:
        n = super().write(data)
        self.check()
        return n

    def check(self) -> None:
        if self.limit is not None and self.tell() + self.out_of_band > self.limit:
            raise TooLarge(f"larger than max_variable_bytes ({self.limit} bytes)")
        if self.memory_left is not None and self.tell() >= self._next_memory_check:
            self._next_memory_check = self.tell() + _MEMORY_CHECK_BYTES
            left = self.memory_left()
            if left is not None and left <= 0:
                raise TooLarge("not enough free memory to save it")


class _Pickler(pickle.Pickler):
    """The C pickler, handing only what it cannot do by reference to :mod:`.notebook_code`."""

    def __init__(self, file: _Output, top_level: Mapping[int, tuple[str, int]], buffers: list[memoryview]):
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self._file = file
        self._top_level = top_level
        self._buffers = buffers
        self.current: int = 0
        self.position: int = 0

    def _take_buffer(self, buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # keep small buffers in-band
        self._buffers.append(view)
        self._file.out_of_band += view.nbytes
        self._file.check()
        return False

    def reducer_override(self, obj: Any) -> Any:
        # Only called for objects that are not builtin containers or atoms, so
        # plain data keeps the C pickler's speed.
        ref = self._top_level.get(id(obj))
        if ref is not None and id(obj) != self.current:
            if ref[1] < self.position or isinstance(obj, (types.FunctionType, type)):
                return variable, (ref[0],)
        numpy = sys.modules.get("numpy")
        if numpy is not None and self._file.limit is not None and isinstance(obj, numpy.ndarray):
            # numpy's __reduce__ copies a memmap or a non-contiguous array
            # whole before the pickler sees a byte: refuse it before that.
            self._file.out_of_band += obj.nbytes
            try:
                self._file.check()
            finally:
                self._file.out_of_band -= obj.nbytes
        if isinstance(obj, types.ModuleType):
            return import_module, (obj.__name__,)
        if notebook_code.is_notebook_code(obj):
            return load_notebook_code, (notebook_code.dumps(obj),)
        return NotImplemented


class _SharingPickler(_Pickler):
    """Also keeps top-level containers shared when met inside other variables."""

    def __init__(
        self,
        file: _Output,
        top_level: Mapping[int, tuple[str, int]],
        buffers: list[memoryview],
        containers: Mapping[int, tuple[str, int]],
    ):
        super().__init__(file, top_level, buffers)
        self._containers = containers

    def persistent_id(self, obj: Any) -> Any:
        ref = self._containers.get(id(obj))
        if ref is not None and ref[1] < self.position:
            return ref[0]
        return None


_CONTAINERS = (list, dict, set, bytearray)
#: Past this many top-level containers, watching each one after every variable
#: costs more than sharing them all.
_MAX_CONTAINERS_WATCHED = 256


class _ContainerWatch:
    """Tells, after a fast pickle, whether it met an earlier variable's container.

    The C pickler's memo holds a reference to every object it pickled, so
    until the memo is cleared a top-level container met inside the variable
    has one more reference than before: only such a variable is pickled again
    with ``persistent_id`` sharing, and nobody else pays a Python call per object.
    """

    def __init__(self, namespace: Mapping[str, Any], containers: Mapping[int, tuple[str, int]]):
        self.watched = [(namespace[name], position) for name, position in containers.values()]

    def counts(self) -> list[int]:
        """Reference counts now, taken just before each pickle: buffers kept from earlier
        variables hold references too, so one baseline for the whole snapshot would not do."""
        return [sys.getrefcount(obj) for obj, _ in self.watched]

    def met_earlier(self, position: int, before: list[int]) -> bool:
        """Did the pickle just made (memo still full) meet a container of a variable before ``position``?"""
        return any(
            pos < position and sys.getrefcount(obj) > count
            for (obj, pos), count in zip(self.watched, before, strict=True)
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


def snapshot(
    namespace: Mapping[str, Any],
    names: Iterable[str] | None = None,
    max_variable_bytes: int | None = None,
    skip: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    stop_on: tuple[type[BaseException], ...] = (),
    memory_left: Callable[[], int | None] | None = None,
) -> Snapshot:
    """Pickle ``names`` (default: all) of ``namespace``, one variable at a time.

    Never raises for a bad variable, whatever its pickling hooks raise
    (``SystemExit`` and ``GeneratorExit`` included): it goes to
    ``Snapshot.skipped`` with the reason, and the others are saved.  Only
    ``KeyboardInterrupt`` and the ``stop_on`` exception types propagate.
    ``skip`` maps names not to even try to the reason to report;
    ``progress(name)`` is called before each variable is pickled (so a caller
    can tell which one hangs).  ``memory_left()`` says how many more bytes
    may be allocated (None: unknown): a variable whose pickling would bring
    that to zero is skipped ("not enough free memory"), so saving in a
    container near its memory limit never gets the process killed.
    """
    with _recursion_within_stack(), notebook_code.warnings_logged("saving"):  # never into the user's cell
        return _snapshot(namespace, names, max_variable_bytes, skip or {}, progress, stop_on, memory_left)


@contextlib.contextmanager
def _recursion_within_stack():
    """Cap the recursion limit at what the C stack can hold while pickling.

    The C pickler recurses on the C stack, guarded only by the recursion
    limit: a user who raised it (to build deep structures) would otherwise
    get a segmentation fault instead of a RecursionError for a deep object.
    """
    previous = sys.getrecursionlimit()
    try:
        stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    except (OSError, ValueError):
        stack = -1
    if stack <= 0 or stack == resource.RLIM_INFINITY:
        stack = 8 << 20
    # About 800 bytes of C stack per nesting level in the worst case measured
    # (nested instances); keep half the stack for the frames below us.
    safe = max(1000, min(stack // 1600, 50_000))
    if previous <= safe:
        yield
        return
    sys.setrecursionlimit(safe)
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def _snapshot(
    namespace: Mapping[str, Any],
    names: Iterable[str] | None,
    max_variable_bytes: int | None,
    skip: Mapping[str, str],
    progress: Callable[[str], None] | None,
    stop_on: tuple[type[BaseException], ...],
    memory_left: Callable[[], int | None] | None,
) -> Snapshot:
    names = list(namespace) if names is None else list(names)
    # id of each top-level object -> (its first name, that name's position)
    first_name: dict[int, tuple[str, int]] = {}
    for position, name in enumerate(names):
        first_name.setdefault(id(namespace[name]), (name, position))
    containers = {oid: ref for oid, ref in first_name.items() if type(namespace[ref[0]]) in _CONTAINERS}
    share_all = len(containers) > _MAX_CONTAINERS_WATCHED
    watch = _ContainerWatch(namespace, containers) if containers and not share_all else None

    variables: list[Variable] = []
    skipped: list[Skipped] = []
    for name in names:
        value = namespace[name]
        tname = type_name(value)
        owner, position = first_name[id(value)]
        if name in skip:
            skipped.append(Skipped(name, tname, skip[name]))
            continue
        if owner != name:
            variables.append(Variable(name, tname, "alias", target=owner))
            continue
        if type(value) is NotRestored:
            variables.append(Variable(name, value.type, value.entry.get("kind", "pickle"), stored=value.entry))
            continue
        if isinstance(value, types.ModuleType):
            if sys.modules.get(value.__name__) is value:
                variables.append(Variable(name, tname, "module", target=value.__name__))
            else:
                skipped.append(Skipped(name, tname, "module cannot be imported again by its name"))
            continue
        if progress is not None:
            progress(name)
        sharing = share_all
        while True:
            buf = _Output(max_variable_bytes, memory_left)
            buffers: list[memoryview] = []
            if sharing:
                pickler: _Pickler = _SharingPickler(buf, first_name, buffers, containers)
            else:
                pickler = _Pickler(buf, first_name, buffers)
            pickler.current = id(value)
            pickler.position = position
            before = watch.counts() if watch is not None and not sharing else []
            try:
                pickler.dump(value)
                again = bool(before) and watch.met_earlier(position, before)  # type: ignore[union-attr]
            except TooLarge as exc:
                skipped.append(Skipped(name, tname, str(exc)))
                break
            except RecursionError:
                skipped.append(Skipped(name, tname, "nested too deeply to pickle (recursion limit)"))
                break
            except (KeyboardInterrupt, *stop_on):  # type: ignore[misc]  # a tuple of exception types
                raise
            except BaseException as exc:  # any failure of any object's pickling hooks, SystemExit too
                skipped.append(Skipped(name, tname, _reason(exc)))
                break
            finally:
                # Let go of every object the memo holds now: the pickler sits in
                # a cycle with its buffer callback and is only freed by gc.
                pickler.clear_memo()
            if not again:
                variables.append(Variable(name, tname, "pickle", payload=buf.getvalue(), buffers=buffers))
                break
            sharing = True  # it holds an earlier variable's list or dict: keep them one object
    return Snapshot(variables, skipped)


# --- restore ------------------------------------------------------------------

_active_loader: Loader | None = None


def variable(name: str) -> Any:
    """Another variable of the same checkpoint, met inside this one (resolved while a :class:`Loader` runs)."""
    if _active_loader is None:
        raise pickle.UnpicklingError(f"reference to variable {name!r} outside a restore")
    return _active_loader.get(name)


# How checkpoints written by 0.1 (schema 1) name the functions above: never remove.
_loads_dill = load_dill
_import_module = import_module
_variable_ref = variable


class _MissingVariable(Exception):
    pass


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, str):
            raise pickle.UnpicklingError("unsupported persistent id")
        return variable(pid)


class Loader:
    """Unpickles stored variables on demand, each exactly once.

    ``entries`` maps a variable name to ``(kind, target, read)`` where ``read()``
    returns ``(payload, buffers)`` for kind ``"pickle"``.  Data handed to this
    class must already be verified: unpickling runs code.  ``python`` maps a
    name to the version of the Python that pickled it (``"3.11.7"``), where
    known: notebook code in it loads only on that minor version.
    """

    def __init__(
        self,
        entries: Mapping[str, tuple[str, str, Callable[[], tuple[bytes, list[Any]]]]],
        python: Mapping[str, str | None] | None = None,
    ):
        self._entries = entries
        self._python = python or {}
        self._values: dict[str, Any] = {}
        self._failed: dict[str, str] = {}
        self._loading: set[str] = set()
        #: the variables being unpickled, innermost last
        self._unpickling: list[str] = []

    def python_of_current(self) -> str | None:
        """The Python version that pickled the variable being unpickled now, if known."""
        if not self._unpickling:
            return None
        version = self._python.get(self._unpickling[-1])
        return version if isinstance(version, str) else None

    def get(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        if name in self._failed:
            raise _MissingVariable(f"depends on {name!r}, which was not restored")
        if name in self._loading:
            raise _MissingVariable(f"circular reference through {name!r}")
        if name not in self._entries:
            raise _MissingVariable(f"depends on {name!r}, which was not saved")
        self._loading.add(name)
        try:
            kind, target, read = self._entries[name]
            if kind == "module":
                value = importlib.import_module(target)
            elif kind == "alias":
                value = self.get(target)
            else:
                payload, buffers = read()
                self._unpickling.append(name)
                try:
                    value = _Unpickler(io.BytesIO(payload), buffers=buffers).load()
                finally:
                    self._unpickling.pop()
        except _MissingVariable as exc:
            self._failed[name] = str(exc)
            raise
        except RecursionError:
            self._failed[name] = "nested too deeply to unpickle (recursion limit)"
            raise _MissingVariable(f"depends on {name!r}, which was not restored") from None
        except Exception as exc:
            self._failed[name] = _reason(exc)
            raise _MissingVariable(f"depends on {name!r}, which was not restored") from None
        finally:
            self._loading.discard(name)
        self._values[name] = value
        return value

    def load_all(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Load every entry: ``(values, {name: reason})`` for those that failed."""
        global _active_loader
        previous, _active_loader = _active_loader, self
        try:
            for name in self._entries:
                try:
                    self.get(name)
                except _MissingVariable as exc:
                    self._failed.setdefault(name, str(exc))
        finally:
            _active_loader = previous
        return dict(self._values), dict(self._failed)
