"""What each cell read and bound, read from its source: who made a variable, and how to make it again.

A checkpoint records, for each cell run since the kernel started (and the
cells of the checkpoint it restored), its source, the notebook names it read
before binding them, the names it bound, whether it succeeded and how long it
took.  The kernel uses that to say which cell made a variable that could not
be saved, and ``%checkpoint recompute`` to re-run the cells that rebuild it.

Names are found statically (Python's ``ast``): assignments, ``del``,
imports, ``def``/``class``, ``for``/``with``/``except`` targets, walrus,
``global`` statements inside functions.  A name bound dynamically
(``globals()['x'] = 1``, ``exec``) is not seen; IPython magics and shell
escapes are read through IPython's own transformation to Python first.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

_BUILTINS = frozenset(dir(builtins))


@dataclass
class CellRecord:
    """One executed cell, as a checkpoint records it."""

    execution_count: int
    source: str
    #: notebook names the cell used before (or without) binding them
    reads: list[str] = field(default_factory=list)
    #: names the cell bound (or deleted)
    binds: list[str] = field(default_factory=list)
    ok: bool = True
    seconds: float = 0.0
    #: run by an earlier kernel (its In [n] is that kernel's count); not stored: every
    #: record a kernel restores is an earlier kernel's
    earlier: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["earlier"]
        return data

    @classmethod
    def from_json(cls, data: Any) -> CellRecord | None:
        """A record read back from a manifest, or None if it is not one."""
        if not isinstance(data, dict):
            return None
        try:
            record = cls(
                execution_count=int(data["execution_count"]),
                source=str(data["source"]),
                reads=[str(n) for n in data.get("reads", [])],
                binds=[str(n) for n in data.get("binds", [])],
                ok=bool(data.get("ok", True)),
                seconds=float(data.get("seconds", 0.0)),
                earlier=True,
            )
        except (KeyError, TypeError, ValueError):
            return None
        return record


def names_of(python_source: str) -> tuple[list[str], list[str]] | None:
    """``(reads, binds)`` of a cell's Python source, or None if it does not parse."""
    try:
        tree = ast.parse(python_source)
    except (SyntaxError, ValueError):
        return None
    finder = _Names()
    for statement in tree.body:
        finder.visit(statement)
    reads = [n for n in dict.fromkeys(finder.reads) if n not in _BUILTINS]
    return reads, list(dict.fromkeys(finder.binds))


class _Names(ast.NodeVisitor):
    """Module-level reads and binds, in order; a read after the cell bound the name is not an input."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.binds: list[str] = []
        self._bound: set[str] = set()

    def _read(self, name: str) -> None:
        if name not in self._bound:
            self.reads.append(name)

    def _bind(self, name: str) -> None:
        self.binds.append(name)
        self._bound.add(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._bind(node.id)
        # del x makes nothing: it is not a cell that makes x

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is read before the targets are bound
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)  # x += 1 reads x first
            self._bind(node.target.id)
        else:
            self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._bind(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)
        # The body runs later, when called: what it reads from the notebook is an input
        # of whoever calls it; names it declares global are bound by a call, so count them.
        body = _Names()
        for statement in node.body:
            body.visit(statement)
        declared = {n for s in ast.walk(node) if isinstance(s, ast.Global) for n in s.names}
        for name in body.binds:
            if name in declared:
                self._bind(name)
        self._bind(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        body = _Names()  # a class body runs now, in its own scope: its free reads are inputs
        for statement in node.body:
            body.visit(statement)
        for name in body.reads:
            self._read(name)
        self._bind(node.name)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        # Its loop variables are its own: only the free names it reads are the cell's.
        inner = _Names()
        for generator in node.generators:
            inner.visit(generator.iter)
            inner.visit(generator.target)
            for condition in generator.ifs:
                inner.visit(condition)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                inner.visit(getattr(node, part))
        for name in inner.reads:
            self._read(name)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for statement in [*node.body, *node.orelse]:
            self.visit(statement)

    visit_AsyncFor = visit_For

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._bind(node.name)
        for statement in node.body:
            self.visit(statement)


def python_of(cell: str, transform: Any = None) -> str:
    """A cell's Python source: IPython's transformation of magics and ``!`` lines when given."""
    if transform is None:
        return cell
    try:
        return str(transform(cell))
    except Exception:  # noqa: BLE001  # a cell IPython itself cannot transform: read as it is
        return cell


def chain_for(
    names: Iterable[str], records: list[CellRecord], available: Iterable[str], makeable: Iterable[str] = ()
) -> tuple[list[CellRecord], dict[str, str]]:
    """The cells to run again, in their order, to make ``names`` from what is ``available``.

    Walks back from each wanted name to the last cell that assigned it, then,
    for each of that cell's inputs that is not available, to the last cell
    before it that assigned that input, which must itself be ``makeable`` (a
    variable that could not be saved; anything else missing was deleted, and
    is not brought back behind the user's back).  Returns ``(cells, missing)``:
    ``missing`` says, for each name that cannot be made, why.
    """
    have = set(available)
    may_make = set(makeable) | set(names)
    chosen: dict[int, CellRecord] = {}
    missing: dict[str, str] = {}

    def maker(name: str, before: int) -> int | None:
        for index in range(before - 1, -1, -1):
            if name in records[index].binds:
                return index
        return None

    def need(name: str, before: int, for_name: str, mine: dict[int, CellRecord]) -> bool:
        index = maker(name, before)
        if index is None:
            missing[for_name] = (
                "no recorded cell made it"
                if name == for_name
                else f"it needs {name}, which no recorded cell made and which is not restored"
            )
            return False
        record = records[index]
        if not record.ok:
            missing[for_name] = f"In [{record.execution_count}], which made {name}, failed when it ran"
            return False
        if index in mine:
            return True
        mine[index] = record
        for read in record.reads:
            if read in have and read not in may_make:
                continue  # restored: used as it is
            if read not in may_make:
                missing[for_name] = f"it needs {read}, which is gone (deleted since)"
                return False
            if not need(read, index, for_name, mine):
                return False
        return True

    for name in names:
        mine: dict[int, CellRecord] = {}
        if need(name, len(records), name, mine):  # a chain that cannot finish runs nothing
            chosen.update(mine)
    return [chosen[i] for i in sorted(chosen)], missing
