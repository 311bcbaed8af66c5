"""Types defined in a notebook's cells come back after SIGKILL, working, with their instances.

A notebook defines enums, dataclasses, a NamedTuple, a class with ``__slots__``,
a nested class, a class whose class-level state changed after its definition,
a subclass of it, a generic class, a ``functools.wraps`` decorator and an
``lru_cache`` function, with instances of each.  Its checkpoint is committed
and the kernel is killed with SIGKILL; a second kernel restores it, saves it
again (so what came back is pickled once more) and is killed too; the third
kernel is the one the tests look at.  Each test checks one behaviour there.

A restored function's ``__globals__`` is the notebook's live namespace (not a
copy of it), so a global assigned after the restore is what it sees.
"""

from __future__ import annotations

import pytest
from conftest import holds, wait_saved

SESSION = "notebook-types.ipynb"

CELLS = [
    "import dataclasses, enum, functools, typing",
    # Enums: an alias, a method reading a global, an IntEnum, a Flag, members with their own __init__.
    "class Color(enum.Enum):\n    RED = 1\n    GREEN = 2\n    CRIMSON = 1\n\n    def describe(self):\n"
    "        return f'{PREFIX}{self.name}'\n\nfav = Color.GREEN",
    "class Level(enum.IntEnum):\n    LOW = 1\n    HIGH = 2\n\nlevel = Level.HIGH",
    "class Perm(enum.Flag):\n    R = 4\n    W = 2\n    X = 1\n\nrw = Perm.R | Perm.W",
    "class Planet(enum.Enum):\n    EARTH = (5.97e24, 6.37e6)\n    MARS = (6.42e23, 3.39e6)\n\n"
    "    def __init__(self, mass, radius):\n        self.mass, self.radius = mass, radius\n\nhome = Planet.EARTH",
    # Dataclasses, plain and frozen.
    "@dataclasses.dataclass\nclass Point:\n    x: int\n    y: int = 0\n"
    "    tags: list = dataclasses.field(default_factory=list)\n\n    def norm2(self):\n"
    "        return self.x ** 2 + self.y ** 2\n\np = Point(3, 4, ['a'])",
    "@dataclasses.dataclass\nclass Line:\n    start: Point\n    end: Point\n\nline = Line(Point(0), Point(1, 1))",
    "@dataclasses.dataclass(frozen=True)\nclass Frozen:\n    x: int\n    y: int = 0\n\nfp = Frozen(1, 2)",
    "class Pair(typing.NamedTuple):\n    left: int\n    right: str = 'r'\n\npair = Pair(1, 'b')",
    "class Slotted:\n    __slots__ = ('a', 'b')\n\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n\nsl = Slotted(1, 2)",
    "class Outer:\n    class Inner:\n        def __init__(self, v):\n            self.v = v\n\n        def twice(self):\n"
    "            return 2 * self.v\n\ninner = Outer.Inner(21)",
    "class Counter:\n    made = 0\n\n    def __init__(self):\n        Counter.made += 1\n\n"
    "c1, c2 = Counter(), Counter()",
    "class Special(Counter):\n    kind = 'special'\n\nsp = Special()\nCounter.made += 10",
    "T = typing.TypeVar('T')\n\nclass Box(typing.Generic[T]):\n    def __init__(self, item: T):\n"
    "        self.item = item\n\nbox = Box[int](5)",
    "def shout(f):\n    @functools.wraps(f)\n    def wrapper(*args, **kwargs):\n        return f(*args, **kwargs).upper()\n"
    "    return wrapper\n\n@shout\ndef greet(name):\n    '''Say hello.'''\n    return f'{PREFIX}hello {name}'",
    "@functools.lru_cache(maxsize=32)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nfib(20)",
    "PREFIX = ''",
]
NAMES = sorted(
    "dataclasses enum functools typing Color fav Level level Perm rw Planet home Point p Line line Frozen fp Pair "
    "pair Slotted sl Outer inner Counter c1 c2 Special sp T Box box shout greet fib PREFIX".split()
)


def run_cells(kernel, cells) -> list:
    outputs = []
    for cell in cells:
        out = kernel.execute(cell)
        assert not out.error, (cell, out.error)
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def restored(kernel_pools):
    """The third kernel of the notebook: its types went through two SIGKILLs and two restores."""
    pool = kernel_pools()
    first = pool.start(session=SESSION)
    run_cells(first, CELLS)
    wait_saved(first)
    first.kill()
    second = pool.start(session=SESSION)
    run_cells(second, ["saved_again = True"])  # every restored type is pickled again
    wait_saved(second)
    second.kill()
    kernel = pool.start(session=SESSION)
    kernel.first_restore_banner = second.banner
    return kernel


def test_every_notebook_type_and_instance_comes_back_after_sigkill(restored):
    for banner in (restored.first_restore_banner, restored.banner):
        assert "not restored" not in banner, banner
    assert f"restored {len(NAMES)} variables" in restored.first_restore_banner
    assert f"restored {len(NAMES) + 1} variables" in restored.banner


def test_enum_member_is_the_member_of_the_restored_enum(restored):
    holds(restored, "fav is Color.GREEN and Color(2) is fav and Color['GREEN'] is fav")


def test_enum_iterates_in_definition_order_and_keeps_its_aliases(restored):
    holds(restored, "[m.name for m in Color] == ['RED', 'GREEN'] and Color.CRIMSON is Color.RED")
    holds(restored, "list(Color.__members__) == ['RED', 'GREEN', 'CRIMSON']")


def test_enum_methods_and_member_attributes_come_back(restored):
    holds(restored, "fav.describe() == 'GREEN' and home is Planet.EARTH and home.mass == 5.97e24")
    holds(restored, "Planet((6.42e23, 3.39e6)) is Planet.MARS and Planet.MARS.radius == 3.39e6")


def test_int_enum_members_are_still_ints(restored):
    holds(restored, "level is Level.HIGH and level == 2 and isinstance(level, int) and Level(1) is Level.LOW")


def test_flag_combinations_are_the_restored_flags(restored):
    holds(restored, "rw is Perm.R | Perm.W and Perm(6) is rw and Perm.R in rw and Perm.X not in rw")
    holds(restored, "[m.name for m in Perm] == ['R', 'W', 'X'] and ~rw is Perm.X")


def test_dataclass_keeps_its_fields_defaults_and_equality(restored):
    holds(restored, "[f.name for f in dataclasses.fields(Point)] == ['x', 'y', 'tags']")
    holds(restored, "p == Point(3, 4, ['a']) and dataclasses.replace(p, y=0) == Point(3, 0, ['a'])")
    holds(restored, "Point(1).tags == [] and Point(1).tags is not Point(1).tags and p.norm2() == 25")
    holds(restored, "dataclasses.fields(p)[1].default == 0 and dataclasses.fields(p)[0].default is dataclasses.MISSING")


def test_dataclass_field_typed_with_a_notebook_class_names_the_restored_class(restored):
    holds(restored, "dataclasses.fields(Line)[0].type is Point and type(line.start) is Point and line.end.y == 1")


def test_frozen_dataclass_stays_frozen_and_hashable(restored):
    holds(restored, "fp == Frozen(1, 2) and hash(fp) == hash(Frozen(1, 2)) and {fp: 1}[Frozen(1, 2)] == 1")
    holds(restored, "dataclasses.replace(fp, x=5) == Frozen(5, 2)")
    out = restored.execute("fp.x = 9")
    assert out.error_name == "FrozenInstanceError", out.error


def test_namedtuple_keeps_its_fields_and_defaults(restored):
    holds(restored, "pair == Pair(1, 'b') and pair == (1, 'b') and Pair._fields == ('left', 'right')")
    holds(restored, "Pair(2).right == 'r' and pair._replace(left=3) == Pair(3, 'b')")
    holds(restored, "pair._asdict() == {'left': 1, 'right': 'b'} and Pair._make([4, 'x']).left == 4")


def test_class_with_slots_keeps_its_slots(restored):
    holds(restored, "(sl.a, sl.b) == (1, 2) and Slotted.__slots__ == ('a', 'b') and not hasattr(sl, '__dict__')")
    out = restored.execute("Slotted(3, 4).c = 5")
    assert out.error_name == "AttributeError", out.error


def test_instance_of_a_nested_class_is_an_instance_of_the_restored_nested_class(restored):
    holds(restored, "type(inner) is Outer.Inner and inner.twice() == 42 and Outer.Inner(1).twice() == 2")
    holds(restored, "Outer.Inner.__qualname__ == 'Outer.Inner'")


def test_class_level_state_changed_after_the_definition_keeps_its_value(restored):
    holds(restored, "Counter.made == 13")
    holds(restored, "Counter() is not None and Counter.made == 14")


def test_subclass_of_a_notebook_class_is_a_subclass_of_the_restored_class(restored):
    holds(restored, "issubclass(Special, Counter) and Special.__bases__ == (Counter,) and Special.kind == 'special'")
    holds(restored, "isinstance(sp, Counter) and type(sp) is Special")


def test_generic_class_keeps_its_type_variable(restored):
    holds(restored, "Box.__parameters__ == (T,) and Box.__orig_bases__ == (typing.Generic[T],) and box.item == 5")
    holds(restored, "box.__orig_class__ == Box[int] and typing.get_args(box.__orig_class__) == (int,)")


def test_wraps_decorated_function_keeps_its_wrapper_and_wrapped_function(restored):
    holds(restored, "greet('bob') == 'HELLO BOB' and greet.__wrapped__('bob') == 'hello bob'")
    holds(restored, "greet.__name__ == 'greet' and greet.__doc__ == 'Say hello.' and greet.__wrapped__ is not greet")
    holds(restored, "shout(str.lower)('ABC') == 'ABC'")


def test_lru_cache_function_works_with_a_working_cache(restored):
    holds(restored, "fib(30) == 832040 and fib.cache_info().maxsize == 32 and fib.cache_info().hits > 0")
    holds(restored, "fib.cache_clear() is None and fib.cache_info().currsize == 0 and fib.__wrapped__(10) == 55")


def test_restored_instances_are_instances_of_the_restored_classes(restored):
    pairs = "(fav, Color), (level, Level), (rw, Perm), (home, Planet), (p, Point), (fp, Frozen), (pair, Pair), "
    pairs += (
        "(line, Line), (sl, Slotted), (inner, Outer.Inner), (c1, Counter), (c2, Counter), (sp, Special), (box, Box)"
    )
    holds(restored, f"all(type(v) is c and isinstance(v, c) for v, c in [{pairs}])")


def test_restored_functions_see_globals_assigned_after_the_restore(restored):
    holds(restored, "greet.__globals__ is globals() and fib.__wrapped__.__globals__ is globals()")
    holds(restored, "Color.describe.__globals__ is globals() and Point.norm2.__globals__ is globals()")
    out = restored.execute("PREFIX = '> '")
    assert not out.error, out.error
    try:
        holds(restored, "greet('bob') == '> HELLO BOB' and fav.describe() == '> GREEN'")
    finally:
        restored.execute("PREFIX = ''")


# --- what the user sees while these are saved ----------------------------------------------------


#: Run first by the foreground kernel: what durable-kernel logs about pickling, kept in a list.
CAPTURE_LOG = """import logging
logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger('durable_kernel.checkpoints.notebook_code').addHandler(handler)
logging.getLogger('durable_kernel.checkpoints.notebook_code').setLevel(logging.INFO)
del handler  # a lock: not a variable to save"""

#: Objects whose pickling warns: inside a notebook class (pickled by value) and as a variable of their own.
NOISY = """import warnings
class Noisy:
    def __reduce__(self):
        warnings.warn('noisy to pickle')
        return (Noisy, ())
class Holder:
    item = Noisy()
noisy = Noisy()"""


def test_warnings_while_saving_go_to_the_log_never_into_a_cell(start_kernel, tmp_path):
    """Saved in the foreground (as when there is no memory to fork), in the cell's own process:
    whatever a pickler warns is logged by durable-kernel, never written into the cell being run."""
    config = tmp_path / "jupyter-config"
    config.mkdir()
    (config / "ipython_kernel_config.py").write_text("c.DurableKernel.background = False\n")
    env = {"JUPYTER_CONFIG_DIR": str(config), "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_CONFIG_PATH": None}
    kernel = start_kernel(session="warnings.ipynb", env=env)
    holds(kernel, "get_ipython().kernel.background is False")
    cells = [CAPTURE_LOG, *CELLS, NOISY, "x = 1", "%checkpoint save"]
    outputs = run_cells(kernel, cells)
    for cell, out in zip(cells, outputs, strict=True):
        assert "warn" not in out.stderr.lower() and "noisy" not in out.stderr, (cell, out.stderr)
    assert "Saved checkpoint" in outputs[-1].stdout, outputs[-1].stdout
    status = kernel.execute("%checkpoint")
    assert "Not saved" not in status.stdout, status.stdout  # every variable was pickled, in this very process
    holds(kernel, "any('UserWarning noisy to pickle' in line for line in logged)")
