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
import enum
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
    #: variables saved together (they share objects): where this one's pickle lies in
    #: the group's stream, its own part of it, and (on the first) every member's name
    span: tuple[int, int] | None = None
    part: bytes | None = None
    members: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes this variable takes in the store (before deduplication)."""
        if self.stored is not None:
            return int(self.stored.get("size", 0))
        own = self.part if self.part is not None else self.payload
        return len(own) + sum(b.nbytes for b in self.buffers)


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


def ndarray_view(root: Any, start: int, shape: tuple, strides: tuple, dtype: Any, writeable: bool) -> Any:
    """A numpy array that views ``root`` (as it did when saved), not a copy of its data."""
    import numpy

    view = numpy.ndarray(shape, dtype, buffer=root, offset=start, strides=strides)
    if not writeable:
        view.flags.writeable = False
    return view


def torch_tensor(data: Any, offset: int, shape: tuple, strides: tuple, dtype: Any, requires_grad: bool) -> Any:
    """A torch tensor over ``data``, the bytes of its storage as a numpy array (one array for
    every tensor saved over that storage, so they share memory again), as it was saved."""
    import torch

    storage = torch.from_numpy(data).untyped_storage()
    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, strides)
    return tensor.requires_grad_() if requires_grad else tensor


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
    """The C pickler, handing only what it cannot do by reference to :mod:`.notebook_code`.

    While pickling it notes every object whose identity matters (see
    :func:`_kind_of`) in ``owners``, so objects met by two variables
    are found; ``views`` (ids of arrays shared as a whole) makes an array
    that views one of them pickle as a view of it, not as a copy.
    """

    def __init__(
        self,
        file: _Output,
        top_level: Mapping[int, tuple[str, int]],
        buffers: list[memoryview],
        owners: _Owners | None = None,
        views: set[int] | frozenset[int] = frozenset(),
        kinds: dict[type, int] | None = None,
    ):
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self._file = file
        self._top_level = top_level
        #: the out-of-band buffers taken, in pickle order
        self.taken = buffers
        self._owners = owners
        self._views = views
        self._kinds = {} if kinds is None else kinds
        #: in a group: one storage object per torch storage met (by its address)
        self._storages: dict[Any, Any] = {}
        self.current: int = 0

    def _take_buffer(self, buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # keep small buffers in-band
        self.taken.append(view)
        self._file.out_of_band += view.nbytes
        self._file.check()
        return False

    def reducer_override(self, obj: Any) -> Any:
        # Only called for objects that are not builtin containers or atoms, so
        # plain data keeps the C pickler's speed; one dict lookup sorts the rest.
        kind = self._kinds.get(type(obj))
        if kind is None:
            kind = self._kinds[type(obj)] = _kind_of(obj)
        if kind == _IDENTITY:
            owners = self._owners
            if owners is not None:  # inline: called for every instance pickled
                first = owners.first.get(id(obj))
                if first is None:
                    if len(owners.held) < _MAX_TRACKED:
                        owners.first[id(obj)] = owners.index
                        owners.held.append(obj)
                elif first != owners.index:
                    owners.links.add((first, owners.index))
            return NotImplemented
        if kind == _VALUE:
            return NotImplemented
        if kind == _CODE:
            ref = self._top_level.get(id(obj))
            if ref is not None and id(obj) != self.current:
                return variable, (ref[0],)  # one class object for every variable's instances
            if notebook_code.defined_in_notebook(obj):
                return load_notebook_code, (notebook_code.dumps(obj),)
            return NotImplemented
        if kind == _MODULE:
            return import_module, (obj.__name__,)
        if kind == _TENSOR:
            return self._tensor(obj)
        numpy = sys.modules["numpy"]  # an array: numpy is imported
        if self._file.limit is not None:
            # numpy's __reduce__ copies a memmap or a non-contiguous array
            # whole before the pickler sees a byte: refuse it before that.
            self._file.out_of_band += obj.nbytes
            try:
                self._file.check()
            finally:
                self._file.out_of_band -= obj.nbytes
        root = _array_root(obj, numpy)
        if self._owners is not None:
            self._owners.meet_array(obj, root)
        if root is not obj and id(root) in self._views:
            return _as_view_of(obj, root, numpy)
        return NotImplemented

    def _tensor(self, tensor: Any) -> Any:
        # torch pickles each tensor with a copy of its storage, so two tensors sharing one
        # (a view, a state_dict and its model) come back apart.  Note the storage as what
        # is shared; in a group, pickle one storage object per storage (the memo then keeps
        # it one) and each tensor as a view into it.
        if not (tensor.layout == sys.modules["torch"].strided and tensor.device.type == "cpu"):
            return NotImplemented
        if tensor.requires_grad and not tensor.is_leaf:
            return NotImplemented  # torch refuses these with its own message
        storage = tensor.untyped_storage()
        key = ("torch storage", storage.data_ptr())
        if self._owners is not None:
            self._owners.meet_storage(key, storage)
            return NotImplemented
        if not self._views or "numpy" not in sys.modules:
            return NotImplemented
        data = self._storages.get(key)
        if data is None:
            # The storage's bytes as one numpy array: pickled out-of-band like any array.
            torch = sys.modules["torch"]
            data = self._storages[key] = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        shape, strides = tuple(tensor.shape), tuple(tensor.stride())
        return torch_tensor, (data, tensor.storage_offset(), shape, strides, tensor.dtype, tensor.requires_grad)


# What reducer_override does with an object, decided once per type.
_IDENTITY, _VALUE, _CODE, _MODULE, _ARRAY, _TENSOR = range(6)


def _kind_of(obj: Any) -> int:
    if isinstance(obj, notebook_code.CODE_TYPES):
        return _CODE
    if isinstance(obj, types.ModuleType):
        return _MODULE
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return _ARRAY
    torch = sys.modules.get("torch")
    if torch is not None and type(obj) is getattr(torch, "Tensor", None):
        return _TENSOR
    # Immutable values (an enum member, a dtype, a date, a sympy expression) may be
    # copies after a restore: their identity carries no meaning, and linking every
    # variable that mentions ``float64`` would save them all as one.
    if isinstance(obj, enum.Enum) or (type(obj).__eq__ is not object.__eq__ and _hashable(obj)):
        return _VALUE
    return _IDENTITY


def _array_root(array: Any, numpy: Any) -> Any:
    """The array at the end of ``array``'s chain of bases (itself if it owns its data)."""
    root = array
    while isinstance(root.base, numpy.ndarray):
        root = root.base
    return root


def _as_view_of(array: Any, root: Any, numpy: Any) -> Any:
    """Reduce ``array`` as a view of ``root``: restored, it looks into the restored root."""
    if not (root.flags.c_contiguous or root.flags.f_contiguous) or array.dtype.hasobject:
        return NotImplemented
    start = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return ndarray_view, (root, start, array.shape, array.strides, array.dtype, bool(array.flags.writeable))


class _Owners:
    """Which variable first met each object whose identity matters, and which variables
    met an object another one met first (``links``): those are saved together."""

    def __init__(self) -> None:
        self.first: dict[Any, int] = {}
        self.links: set[tuple[int, int]] = set()
        #: variables holding two tensors of one storage: pickled again, keeping it one
        self.self_shared: set[int] = set()
        # Keeps every object noted alive until the snapshot ends, so that no id is
        # reused by another object (a temporary made by some __reduce__) meanwhile;
        # an object is noted only while it can be held (see _MAX_TRACKED).
        self.held: list[Any] = []
        #: roots of arrays met as views (root id -> variables), and arrays met whole: a view
        #: of one met whole (or a root viewed from two variables) is saved as a view
        self.viewed: dict[int, set[int]] = {}
        self.whole: set[int] = set()
        #: the position of the variable being pickled
        self.index = 0

    def meet_array(self, array: Any, root: Any) -> None:
        if root is array:
            self.whole.add(id(array))
        else:
            self.viewed.setdefault(id(root), set()).add(self.index)
            self._note(root)
        self._note(array)

    def meet_storage(self, key: Any, storage: Any) -> None:
        if self.first.get(key) == self.index:
            self.self_shared.add(self.index)  # two tensors of this variable share it
        self._note_key(key, storage)

    def _note(self, obj: Any) -> None:
        self._note_key(id(obj), obj)

    def _note_key(self, key: Any, obj: Any) -> None:
        first = self.first.get(key)
        if first is None:
            if len(self.held) < _MAX_TRACKED:
                self.first[key] = self.index
                self.held.append(obj)
        elif first != self.index:
            self.links.add((first, self.index))

    def shared_roots(self) -> set[int]:
        """Arrays whose views must stay views: met whole somewhere, or viewed from two variables."""
        return {root for root, where in self.viewed.items() if root in self.whole or len(where) > 1}


#: Objects tracked at most per snapshot (about 100 bytes each, in the checkpoint process): past
#: it, sharing through objects met later is not seen (they are saved as copies), as before 0.3.
_MAX_TRACKED = 1_000_000


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except Exception:  # noqa: BLE001  # any __hash__ that refuses
        return False
    return True


_CONTAINERS = (list, dict, set, bytearray)


class _ContainerWatch:
    """Tells, after a pickle, which other variables' lists, dicts, sets or bytearrays it met.

    The C pickler never shows builtin containers to Python code (that keeps it
    fast), but its memo holds a reference to every object it pickled: until
    the memo is cleared, a top-level container met inside the variable has one
    more reference than before.  Only containers held by something besides the
    namespace can be met inside another variable, so only those are watched.
    """

    def __init__(self, namespace: Mapping[str, Any], containers: Mapping[int, tuple[str, int]]):
        self.watched = []
        for name, position in containers.values():
            obj = namespace[name]
            # namespace, `obj` and getrefcount's argument: nothing else holds it
            if sys.getrefcount(obj) > 3:
                self.watched.append((obj, position))

    def counts(self) -> list[int]:
        """Reference counts now, taken just before each pickle: buffers kept from earlier
        variables hold references too, so one baseline for the whole snapshot would not do."""
        return [sys.getrefcount(obj) for obj, _ in self.watched]

    def met(self, position: int, before: list[int]) -> list[int]:
        """Positions of the other variables whose container the pickle just made (memo still full) met."""
        return [
            pos
            for (obj, pos), count in zip(self.watched, before, strict=True)
            if pos != position and sys.getrefcount(obj) > count
        ]


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
    watch: _ContainerWatch | None = _ContainerWatch(namespace, containers) if containers else None
    if watch is not None and not watch.watched:
        watch = None
    owners = _Owners()

    # Pass 1: each variable on its own, noting the objects it meets.
    pickling = _Pickling(namespace, names, first_name, max_variable_bytes, memory_left, stop_on)
    entries: dict[int, Variable | Skipped] = {}
    for position, name in enumerate(names):
        value = namespace[name]
        tname = type_name(value)
        owner = first_name[id(value)][0]
        if name in skip:
            entries[position] = Skipped(name, tname, skip[name])
        elif owner != name:
            entries[position] = Variable(name, tname, "alias", target=owner)
        elif type(value) is NotRestored:
            entries[position] = Variable(name, value.type, value.entry.get("kind", "pickle"), stored=value.entry)
        elif isinstance(value, types.ModuleType):
            if sys.modules.get(value.__name__) is value:
                entries[position] = Variable(name, tname, "module", target=value.__name__)
            else:
                entries[position] = Skipped(name, tname, "module cannot be imported again by its name")
        else:
            if progress is not None:
                progress(name)
            owners.index = position
            before = watch.counts() if watch is not None else None
            entries[position] = pickling.one(position, tname, owners, watch, before)

    # Pass 2: variables that share an object are pickled again as one group, in one
    # pickle stream, so the object is one object when they load.
    pickled = {pos for pos, entry in entries.items() if isinstance(entry, Variable) and entry.kind == "pickle"}
    roots = owners.shared_roots()
    groups = _groups(owners.links, pickled)
    grouped = {pos for group in groups for pos in group}
    # A variable holding both an array and a view of it is pickled again on its own, keeping the view.
    groups += [
        [pos]
        for pos in sorted(pickled - grouped)
        if pos in owners.self_shared or any(pos in owners.viewed.get(r, ()) for r in roots)
    ]
    for group in groups:
        if progress is not None:
            progress(names[group[0]])
        # views: never empty in pass 2, so tensors there always share their storages
        for pos, entry in zip(group, pickling.group(group, roots | {0}), strict=True):
            entries[pos] = entry

    variables = [e for _, e in sorted(entries.items()) if isinstance(e, Variable)]
    skipped = [e for _, e in sorted(entries.items()) if isinstance(e, Skipped)]
    return Snapshot(variables, skipped)


def _groups(links: set[tuple[int, int]], pickled: set[int]) -> list[list[int]]:
    """Connected sets of more than one variable (positions, in namespace order)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in links:
        if a in pickled and b in pickled:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    return [sorted(set(group) | {root}) for root, group in sorted(members.items())]


class _Pickling:
    """One snapshot's pickling: a variable on its own (pass 1), or a group as one stream (pass 2)."""

    def __init__(
        self,
        namespace: Mapping[str, Any],
        names: list[str],
        first_name: Mapping[int, tuple[str, int]],
        max_variable_bytes: int | None,
        memory_left: Callable[[], int | None] | None,
        stop_on: tuple[type[BaseException], ...],
    ):
        self.namespace, self.names, self.first_name = namespace, names, first_name
        self.limit, self.memory_left, self.stop_on = max_variable_bytes, memory_left, stop_on
        self.kinds: dict[type, int] = {}

    def one(
        self, position: int, tname: str, owners: _Owners, watch: _ContainerWatch | None, before: list[int] | None
    ) -> Variable | Skipped:
        """Pickle one variable, noting in ``owners`` what it shares with others."""
        name = self.names[position]
        buf = _Output(self.limit, self.memory_left)
        pickler = _Pickler(buf, self.first_name, [], owners, frozenset(), self.kinds)
        value = self.namespace[name]
        pickler.current = id(value)
        try:
            pickler.dump(value)
            if watch is not None and before is not None:
                # The memo is still full: containers it holds have one more reference.
                owners.links.update((other, position) for other in watch.met(position, before))
        except (KeyboardInterrupt, *self.stop_on):  # type: ignore[misc]  # a tuple of exception types
            raise
        except BaseException as exc:  # any failure of any object's pickling hooks, SystemExit too
            return Skipped(name, tname, _failure(exc))
        finally:
            # Let go of every object the memo holds now: the pickler sits in
            # a cycle with its buffer callback and is only freed by gc.
            pickler.clear_memo()
        return Variable(name, tname, "pickle", payload=buf.getvalue(), buffers=pickler.taken)

    def group(self, group: list[int], views: set[int]) -> list[Variable | Skipped]:
        """Pickle the variables at positions ``group`` into one stream (one memo: what they share
        stays shared); a failure skips them all, with the reason."""
        buf = _Output(self.limit, self.memory_left)
        pickler = _Pickler(buf, self.first_name, [], None, views, self.kinds)
        spans: list[tuple[int, int, list[memoryview]]] = []
        names = [self.names[pos] for pos in group]
        tnames = [type_name(self.namespace[name]) for name in names]
        try:
            for name in names:
                value = self.namespace[name]
                pickler.current = id(value)
                start, taken = buf.tell(), len(pickler.taken)
                pickler.dump(value)
                spans.append((start, buf.tell(), pickler.taken[taken:]))
        except (KeyboardInterrupt, *self.stop_on):  # type: ignore[misc]  # a tuple of exception types
            raise
        except BaseException as exc:  # any failure of any object's pickling hooks, SystemExit too
            failed = _failure(exc)
            if len(group) > 1:
                failed += f" (saved together with {', '.join(names[1:])})"
            return [Skipped(name, t, failed) for name, t in zip(names, tnames, strict=True)]
        finally:
            pickler.clear_memo()
        payload = buf.getvalue()
        if len(group) == 1:
            return [Variable(names[0], tnames[0], "pickle", payload=payload, buffers=spans[0][2])]
        return [
            Variable(
                name,
                tname,
                "pickle" if i == 0 else "member",
                payload=payload if i == 0 else b"",
                buffers=taken,
                target="" if i == 0 else names[0],
                span=(start, end),
                part=payload[start:end],
                members=names if i == 0 else [],
            )
            for i, (name, tname, (start, end, taken)) in enumerate(zip(names, tnames, spans, strict=True))
        ]


def _failure(exc: BaseException) -> str:
    """Why a variable could not be pickled, in words."""
    if isinstance(exc, TooLarge):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply to pickle (recursion limit)"
    return _reason(exc)


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
        groups: Mapping[str, list[str]] | None = None,
    ):
        self._entries = entries
        self._python = python or {}
        #: first variable of a group -> every member, in stream order (kind "member": target is the first)
        self._groups = groups or {}
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
            elif kind == "member":
                self._load_group(target)
                value = self._values[name]
            elif name in self._groups:
                self._load_group(name)
                value = self._values[name]
            else:
                payload, buffers = read()
                self._unpickling.append(name)
                try:
                    value = _Unpickler(io.BytesIO(payload), buffers=buffers).load()
                finally:
                    self._unpickling.pop()
        except _MissingVariable as exc:
            self._fail(name, str(exc))
            raise
        except RecursionError:
            self._fail(name, "nested too deeply to unpickle (recursion limit)")
            raise _MissingVariable(f"depends on {name!r}, which was not restored") from None
        except Exception as exc:
            self._fail(name, _reason(exc))
            raise _MissingVariable(f"depends on {name!r}, which was not restored") from None
        finally:
            self._loading.discard(name)
        self._values[name] = value
        return value

    def _fail(self, name: str, reason: str) -> None:
        """``name`` failed; so did everything saved in one stream with it."""
        kind, target, _ = self._entries[name]
        first = target if kind == "member" else name
        for member in self._groups.get(first, [name]):
            self._failed.setdefault(member, reason)

    def _load_group(self, first: str) -> None:
        """Unpickle a group's stream, one member after another with one memo; on failure
        every member fails with the same reason."""
        members = self._groups.get(first, [first])
        if all(m in self._values for m in members):
            return
        self._loading.update(members)
        unpickler = None
        try:
            payload, buffers = self._entries[first][2]()
            unpickler = _Unpickler(io.BytesIO(payload), buffers=buffers)
            for member in members:
                self._unpickling.append(member)
                try:
                    self._values[member] = unpickler.load()
                finally:
                    self._unpickling.pop()
        except Exception:
            for member in members:
                self._values.pop(member, None)
            raise
        finally:
            self._loading.difference_update(members)

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
