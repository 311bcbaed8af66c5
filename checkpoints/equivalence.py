"""Whether two pickles hold the same value, when their bytes differ for reasons that are not the value's.

Pickling the same value in two processes does not always give the same bytes:

- a set (or frozenset) of strings is written in iteration order, which follows
  each process's string hashes (randomized per process);
- a pickle records which objects are shared, immutable ones too: a string met
  twice is written once if it is one object (``table = {'rows': rows}``: the
  key and the name of the variable it refers to are one interned string in the
  process that ran the cell, two strings after a restore), and a class compiled
  in a cell shares one ``co_names`` tuple between its methods where the same
  class rebuilt by a restore has one tuple per method.

Without help, a variable restored and left alone would look changed at the next
checkpoint (``%checkpoint list`` showing ``~Point``) and be written again.  This
module reads two pickles *symbolically* (``pickletools``: nothing is imported,
called or unpickled, so it is safe on any bytes) into object trees and compares
them with set items unordered and immutable objects (str, bytes, numbers,
tuples, frozensets) compared by content wherever they are shared; objects that
can change (lists, dicts, sets, instances, functions, classes) keep their
sharing, which a restore reproduces and the user may rely on.  Notebook code
passed to ``load_dill`` or ``load_notebook_code`` is read the same way, inside.  Any doubt (a pickle
that does not parse, one too large or too deep) means "not the same".
"""

from __future__ import annotations

import hashlib
import pickletools
from typing import Any

#: Pickles larger than this are not compared (reading one symbolically takes about 0.6 s per MiB).
MAX_BYTES = 64 * 1024
#: Objects visited per comparison before giving up (shared immutables are expanded each time met).
_BUDGET = 200_000

_SERIALIZE = "durable_kernel.checkpoints.serialize"
_NOTEBOOK_CODE = "durable_kernel.checkpoints.notebook_code"
#: How 0.1 named what stored pickles call (serialize.py keeps these aliases forever): the same functions.
_ALIASES = {"_loads_dill": "load_dill", "_import_module": "import_module", "_variable_ref": "variable"}


class _NotComparable(Exception):
    pass


class _Node:
    """An object built by the pickle: its kind, its parts, whether it can change, whether its parts are unordered."""

    __slots__ = ("kind", "items", "mutable", "unordered")

    def __init__(self, kind: str, items: list[Any], mutable: bool, unordered: bool = False):
        self.kind = kind
        self.items = items
        self.mutable = mutable
        self.unordered = unordered


_MARK = object()

_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STRS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_BYTES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_PY2_STRS = {"STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


def same_value(old: bytes, new: bytes) -> bool:
    """True if the pickles ``old`` and ``new`` certainly build equal values (see the module's docstring)."""
    if old == new:
        return True
    if len(old) > MAX_BYTES or len(new) > MAX_BYTES or abs(len(old) - len(new)) > 64 + len(new) // 8:
        return False  # too big to read, or too different in size to be the same value
    try:
        old_ops, new_ops = _ops(old), _ops(new)
        # Most changed values change a number or a string somewhere: then the (cheaper) sets of
        # those differ; only if they do not are the trees built and compared.
        if _atoms(old_ops) != _atoms(new_ops):
            return False
        return _digest(_parse(old_ops, 0)) == _digest(_parse(new_ops, 0))
    except (_NotComparable, RecursionError):
        return False


def _ops(payload: bytes) -> list[tuple[Any, Any, Any]]:
    try:
        ops = list(pickletools.genops(payload))
    except Exception as exc:  # any malformed pickle
        raise _NotComparable(str(exc)) from None
    if len(ops) > _BUDGET:
        raise _NotComparable("too many objects")
    return ops


def _atoms(ops: list[tuple[Any, Any, Any]]) -> set[tuple[str, Any]]:
    """The distinct numbers and strings a pickle holds (not inside nested notebook code): equal values
    hold the same ones, however they are shared."""
    found = set()
    for opcode, arg, _ in ops:
        name = opcode.name
        if name in _STRS:
            found.add(("str", _ALIASES.get(arg, arg)))
        elif name in _INTS:
            found.add(("bool" if isinstance(arg, bool) else "int", arg))
        elif name in ("FLOAT", "BINFLOAT"):
            found.add(("float", repr(arg)))
    return found


def _parse(ops: list[tuple[Any, Any, Any]], depth: int) -> Any:
    """The object tree a pickle builds, without building anything."""
    if depth > 3:
        raise _NotComparable("notebook code nested too deeply")
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    buffers = 0
    effects: list[Any] = []

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise _NotComparable("no mark")

    def pop() -> Any:
        if not stack:
            raise _NotComparable("stack underflow")
        return stack.pop()

    def top() -> Any:
        if not stack:
            raise _NotComparable("stack underflow")
        return stack[-1]

    def extend(target: Any, op: str, values: list[Any]) -> None:
        if not isinstance(target, _Node):
            raise _NotComparable(f"{op} on an atom")
        if target.kind in ("list", "dict", "set") and op in ("append", "setitem", "additem"):
            target.items.extend(values)
        else:
            target.items.append(("op", op))
            target.items.extend(values)

    for opcode, arg, _ in ops:
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            break
        if name == "MARK":
            stack.append(_MARK)
        elif name == "POP":
            # What is popped was built for its effect: a state setter's call (protocol 5 reduce,
            # how notebook_code sets a class's attributes), whose arguments are part of the value.
            effects.append(pop())
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(top())
        elif name in _PUTS:
            if not isinstance(arg, int):
                raise _NotComparable("bad memo index")
            memo[arg] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name in _GETS:
            if not isinstance(arg, int) or arg not in memo:
                raise _NotComparable("memo miss")
            stack.append(memo[arg])
        elif name == "NONE":
            stack.append(("none",))
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(("bool", name == "NEWTRUE"))
        elif name in _INTS:
            stack.append(("bool" if isinstance(arg, bool) else "int", arg))
        elif name in ("FLOAT", "BINFLOAT"):
            stack.append(("float", repr(arg)))
        elif name in _STRS:
            stack.append(("str", arg))
        elif name in _BYTES:
            stack.append(("bytes", arg))
        elif name in _PY2_STRS:
            stack.append(("py2str", arg))
        elif name == "BYTEARRAY8":
            stack.append(_Node("bytearray", [("bytes", arg)], mutable=True))
        elif name == "NEXT_BUFFER":
            stack.append(("buffer", buffers))
            buffers += 1
        elif name == "READONLY_BUFFER":
            stack.append(_Node("readonly", [pop()], mutable=False))
        elif name == "EMPTY_LIST":
            stack.append(_Node("list", [], mutable=True))
        elif name == "EMPTY_DICT":
            stack.append(_Node("dict", [], mutable=True))
        elif name == "EMPTY_SET":
            stack.append(_Node("set", [], mutable=True, unordered=True))
        elif name == "EMPTY_TUPLE":
            stack.append(_Node("tuple", [], mutable=False))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [pop() for _ in range(n)][::-1]
            stack.append(_Node("tuple", items, mutable=False))
        elif name == "TUPLE":
            stack.append(_Node("tuple", pop_mark(), mutable=False))
        elif name == "LIST":
            stack.append(_Node("list", pop_mark(), mutable=True))
        elif name == "DICT":
            items = pop_mark()
            stack.append(_Node("dict", _pairs(items), mutable=True))
        elif name == "FROZENSET":
            stack.append(_Node("frozenset", pop_mark(), mutable=False, unordered=True))
        elif name == "APPEND":
            item = pop()
            extend(top(), "append", [item])
        elif name == "APPENDS":
            items = pop_mark()
            extend(top(), "append", items)
        elif name == "SETITEM":
            value = pop()
            key = pop()
            extend(top(), "setitem", [_Node("pair", [key, value], mutable=False)])
        elif name == "SETITEMS":
            items = pop_mark()
            extend(top(), "setitem", _pairs(items))
        elif name == "ADDITEMS":
            items = pop_mark()
            extend(top(), "additem", items)
        elif name == "BUILD":
            state = pop()
            extend(top(), "build", [state])
        elif name == "GLOBAL":
            module, _, qualname = str(arg).partition(" ")
            stack.append(_global(module, qualname))
        elif name == "STACK_GLOBAL":
            qualname = pop()
            module = pop()
            if not (isinstance(module, tuple) and isinstance(qualname, tuple) and module[0] == qualname[0] == "str"):
                raise _NotComparable("STACK_GLOBAL of non-strings")
            stack.append(_global(module[1], qualname[1]))
        elif name == "REDUCE":
            args = pop()
            func = pop()
            stack.append(_reduce(func, args, depth))
        elif name == "NEWOBJ":
            args = pop()
            cls = pop()
            stack.append(_Node("newobj", [cls, args], mutable=True))
        elif name == "NEWOBJ_EX":
            kwargs = pop()
            args = pop()
            cls = pop()
            stack.append(_Node("newobj", [cls, args, kwargs], mutable=True))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise _NotComparable("OBJ without a class")
            stack.append(_Node("obj", items, mutable=True))
        elif name == "INST":
            module, _, qualname = str(arg).partition(" ")
            stack.append(_Node("obj", [_global(module, qualname), *pop_mark()], mutable=True))
        elif name == "PERSID":
            stack.append(("persid", arg))
        elif name == "BINPERSID":
            stack.append(_Node("persid", [pop()], mutable=False))
        elif name in ("EXT1", "EXT2", "EXT4"):
            stack.append(("ext", arg))
        else:
            raise _NotComparable(f"opcode {name}")
    if len(stack) != 1:
        raise _NotComparable("not one object")
    if effects:
        return _Node("effects", [stack[0], *effects], mutable=False)
    return stack[0]


def _global(module: Any, qualname: Any) -> tuple[str, Any, Any]:
    if module == _SERIALIZE:
        qualname = _ALIASES.get(qualname, qualname)
    return ("global", module, qualname)


def _pairs(items: list[Any]) -> list[Any]:
    if len(items) % 2:
        raise _NotComparable("odd number of dict items")
    return [_Node("pair", [items[i], items[i + 1]], mutable=False) for i in range(0, len(items), 2)]


def _reduce(func: Any, args: Any, depth: int) -> _Node:
    """A call; notebook code handed to ``load_dill`` or ``load_notebook_code`` is read as the pickle it is."""
    if (
        isinstance(func, tuple)
        and func[0] == "global"
        and (func[1], func[2]) in ((_SERIALIZE, "load_dill"), (_SERIALIZE, "load_notebook_code"))
        and isinstance(args, _Node)
        and args.kind == "tuple"
        and len(args.items) == 1
        and isinstance(args.items[0], tuple)
        and args.items[0][0] == "bytes"
    ):
        return _Node("reduce", [func, _parse(_ops(args.items[0][1]), depth + 1)], mutable=True)
    if (
        isinstance(func, tuple)
        and func[0] == "global"
        and (func[1], func[2]) == (_NOTEBOOK_CODE, "set_class_state")
        and isinstance(args, _Node)
        and len(args.items) == 2
        and isinstance(args.items[1], _Node)
    ):
        # A class's attributes are set one by one after its skeleton is made, so a restored class
        # lists them in another order (``__doc__`` first): their order is not part of the value.
        for pair in args.items[1].items:
            if isinstance(pair, _Node) and pair.kind == "pair" and pair.items[0] == ("str", "attributes"):
                if isinstance(pair.items[1], _Node) and pair.items[1].kind == "dict":
                    pair.items[1].unordered = True
    return _Node("reduce", [func, args], mutable=True)


def _digest(root: Any) -> bytes:
    """A digest of the tree: immutables by content, changeable objects by first-met order (their sharing)."""
    visits = [0]
    pure: dict[int, bytes] = {}  # id -> digest, for immutable subtrees without changeable objects

    def walk(item: Any, numbering: dict[int, int], depth: int) -> tuple[bytes, bool]:
        visits[0] += 1
        if visits[0] > _BUDGET or depth > 500:
            raise _NotComparable("too many objects")
        if not isinstance(item, _Node):
            return hashlib.blake2b(repr(item).encode("utf-8", "surrogatepass"), digest_size=16).digest(), True
        if item.mutable:
            seen = numbering.get(id(item))
            if seen is not None:
                return hashlib.blake2b(b"ref %d" % seen, digest_size=16).digest(), False
            numbering[id(item)] = len(numbering)
        elif id(item) in pure:
            return pure[id(item)], True
        if item.unordered:
            # Each item on its own (the order they are met in is the process's): sharing
            # between a set's items and the rest is not compared.
            parts = sorted(walk(child, {}, depth + 1)[0] for child in item.items)
            clean = False
        else:
            parts = []
            clean = not item.mutable
            for child in item.items:
                part, child_clean = walk(child, numbering, depth + 1)
                parts.append(part)
                clean = clean and child_clean
        h = hashlib.blake2b(digest_size=16)
        h.update(item.kind.encode() + (b" mutable" if item.mutable else b""))
        for part in parts:
            h.update(part)
        result = h.digest()
        if clean:
            pure[id(item)] = result
        return result, clean

    return walk(root, {}, 0)[0]
