"""Which objects of common libraries come back after SIGKILL, checked by what they do.

One test per library: a kernel creates the library's objects in one cell, runs the
checks below once (so a check that fails there is a wrong check, not a finding), its
checkpoint is committed, the kernel is killed with SIGKILL, and a new kernel on the
same notebook runs the same checks in one cell.  A check is behaviour, not repr:
predictions equal, a figure re-rendered, ``is`` kept between variables, a write
through one alias seen through the other, dtype, index and time zone kept.  The
checks compare against the same objects built again (the setup cell run once more
in a scratch namespace, ``E``), so there is one source of truth for each object.

Each test writes its library's rows of the coverage table into README.md (between
the ``coverage-table`` markers) and fails on any row that is not ✓; it also fails
when the table committed in README.md said otherwise (✓ against ✗, or other rows),
so the committed table always tells what the suite finds: rerun, commit README.md.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import user_variables, wait_saved
from durable_kernel.checkpoints.location import open_store

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- coverage-table:start -->"
END = "<!-- coverage-table:end -->"
HEADER = "| library | object | checked after SIGKILL and restart | result |\n|---|---|---|---|"
#: The table as committed (read before any test of this run rewrites it).
README_AT_START = README.read_text(encoding="utf-8")
SESSION = "coverage.ipynb"
#: Row 0 of every library, checked from outside the kernel.
ALL_VARIABLES = ("every variable of the setup cell", "saved and restored (none skipped, none left 'not restored')")


@dataclass(frozen=True)
class Check:
    #: the object, as the table names it
    obj: str
    #: the behaviour checked
    what: str
    #: run in the kernel on a copy of the user namespace (plus ``E``, the objects built again);
    #: raises (an assertion with a message) when the behaviour is not there
    code: str


@dataclass(frozen=True)
class Library:
    name: str
    #: the import that decides whether the row can run, and the distribution whose version is shown
    module: str
    dist: str
    setup: str
    checks: tuple[Check, ...]
    env: dict[str, str] = field(default_factory=dict)
    skip_reason: str = ""


def _code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


LIBRARIES = (
    Library(
        "numpy",
        "numpy",
        "numpy",
        _code("""
            import numpy as np
            base = np.random.default_rng(0).random((400, 500))
            view = base[10:20, ::2]
            rows = base[100:200]
            holder = {"data": base}
            structured = np.array([(1, 2.5, b"ab"), (2, -1.0, b"cd")], dtype=[("id", "<i4"), ("x", "<f8"), ("tag", "S2")])
            dates = np.array(["2024-01-01T00:00", "NaT", "2024-03-01T12:30"], dtype="datetime64[m]")
            masked = np.ma.masked_array([1.0, 2.0, 3.0, 4.0], mask=[False, True, False, True], fill_value=-9.0)
            fortran = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
        """),
        (
            Check(
                "`base`, a 400×500 float64 array",
                "values, dtype and shape equal; writable",
                _code("""
                    assert np.array_equal(base, E.base), "values differ"
                    assert (base.dtype, base.shape) == (np.float64, (400, 500)), (base.dtype, base.shape)
                    assert base.flags.writeable, "read-only"
                """),
            ),
            Check(
                "`view = base[10:20, ::2]` (strided view)",
                "a view of `base` (shares its memory); values equal",
                _code("""
                    assert np.array_equal(view, E.view), "values differ"
                    assert np.shares_memory(view, base), "view holds a copy of its part of base"
                """),
            ),
            Check(
                "`view = base[10:20, ::2]` (strided view)",
                "writing through `view` is seen in `base`, and back",
                _code("""
                    old = base[10, 0]
                    try:
                        view[0, 0] = -1.0
                        assert base[10, 0] == -1.0, "base did not see view[0, 0] = -1: they are two copies"
                        base[10, 2] = -2.0
                        assert view[0, 1] == -2.0, "view did not see base[10, 2] = -2: they are two copies"
                    finally:
                        base[10, 0] = view[0, 0] = old
                        base[10, 2] = view[0, 1] = E.base[10, 2]
                """),
            ),
            Check(
                "`rows = base[100:200]` (contiguous view)",
                "a view of `base`; writing through `rows` is seen in `base`",
                _code("""
                    assert np.array_equal(rows, E.rows), "values differ"
                    assert np.shares_memory(rows, base), "rows holds a copy of its part of base"
                    old = base[100, 0]
                    try:
                        rows[0, 0] = -1.0
                        assert base[100, 0] == -1.0, "base did not see rows[0, 0] = -1"
                    finally:
                        base[100, 0] = rows[0, 0] = old
                """),
            ),
            Check("`holder = {'data': base}`", "`holder['data'] is base`", "assert holder['data'] is base\n"),
            Check(
                "structured array (`id` i4, `x` f8, `tag` S2)",
                "dtype (fields, byte order) and records equal; field access works",
                _code("""
                    assert structured.dtype == E.structured.dtype, structured.dtype
                    assert np.array_equal(structured, E.structured), "records differ"
                    assert structured["x"].tolist() == [2.5, -1.0] and structured[1]["tag"] == b"cd"
                """),
            ),
            Check(
                "`datetime64[m]` array with NaT",
                "unit, NaT and date arithmetic kept",
                _code("""
                    assert dates.dtype == np.dtype("datetime64[m]"), dates.dtype
                    assert np.isnat(dates).tolist() == [False, True, False]
                    assert dates[2] - dates[0] == np.timedelta64(60 * 24 * 60 + 12 * 60 + 30, "m")
                """),
            ),
            Check(
                "masked array",
                "still a `MaskedArray`: mask, fill value and masked sum kept",
                _code("""
                    assert type(masked) is np.ma.MaskedArray, type(masked)
                    assert masked.mask.tolist() == [False, True, False, True] and masked.fill_value == -9.0
                    assert masked.sum() == 4.0 and masked.filled().tolist() == [1.0, -9.0, 3.0, -9.0]
                """),
            ),
            Check(
                "Fortran-ordered int32 array",
                "values and memory order kept",
                "assert np.array_equal(fortran, E.fortran) and fortran.flags.f_contiguous and fortran.dtype == np.int32\n",
            ),
        ),
    ),
    Library(
        "pandas",
        "pandas",
        "pandas",
        _code("""
            import numpy as np
            import pandas as pd
            df = pd.DataFrame({"x": np.arange(20_000, dtype="int64"), "y": np.linspace(0.0, 1.0, 20_000), "s": ["a", "b"] * 10_000})
            col = df["y"]
            cat = pd.Series(pd.Categorical(["lo", "hi", "lo", "mid"], categories=["lo", "mid", "hi"], ordered=True), name="level")
            mi = pd.DataFrame({"v": np.arange(6)}, index=pd.MultiIndex.from_product([["a", "b"], [1, 2, 3]], names=["letter", "num"]))
            stamps = pd.Series(pd.date_range("2024-03-30", periods=48, freq="h", tz="Europe/Berlin"), name="when")
        """),
        (
            Check(
                "`df`, a 20,000-row DataFrame (int, float, str)",
                "equal (values, dtypes, index); `groupby` gives the same result",
                _code("""
                    pd.testing.assert_frame_equal(df, E.df)
                    pd.testing.assert_series_equal(df.groupby("s")["y"].sum(), E.df.groupby("s")["y"].sum())
                """),
            ),
            Check(
                "`col = df['y']` (a column kept in a variable)",
                "equal to `df['y']`, name kept",
                "pd.testing.assert_series_equal(col, E.df['y'])\nassert col.name == 'y'\n",
            ),
            Check(
                "`col = df['y']` (a column kept in a variable)",
                "`col` and `df['y']` are one array in memory, not two copies",
                "assert np.shares_memory(col.to_numpy(), df['y'].to_numpy()), 'col holds its own copy of the column'\n",
            ),
            Check(
                "ordered categorical Series",
                "categories, order and codes kept; ordered comparison works",
                _code("""
                    pd.testing.assert_series_equal(cat, E.cat)
                    assert list(cat.cat.categories) == ["lo", "mid", "hi"] and cat.cat.ordered
                    assert cat.max() == "hi" and (cat > "lo").tolist() == [False, True, False, True]
                """),
            ),
            Check(
                "DataFrame with a MultiIndex",
                "levels and names kept; `.loc[('b', 2)]` and `.xs` work",
                _code("""
                    pd.testing.assert_frame_equal(mi, E.mi)
                    assert mi.index.names == ["letter", "num"]
                    assert mi.loc[("b", 2), "v"] == 4 and mi.xs(3, level="num")["v"].tolist() == [2, 5]
                """),
            ),
            Check(
                "tz-aware datetimes (Europe/Berlin, across a DST change)",
                "dtype with its time zone and unit kept; hourly steps in UTC across the DST change",
                _code("""
                    pd.testing.assert_series_equal(stamps, E.stamps)
                    assert stamps.dtype == E.stamps.dtype and str(stamps.dt.tz) == "Europe/Berlin", stamps.dtype
                    assert (stamps.dt.tz_convert("UTC").diff().dropna() == pd.Timedelta("1h")).all()
                    assert stamps.iloc[0].utcoffset() != stamps.iloc[-1].utcoffset()
                """),
            ),
        ),
    ),
    Library(
        "polars",
        "polars",
        "polars",
        _code("""
            import datetime as dt
            import polars as pl
            start = dt.datetime(2024, 1, 1)
            frame = pl.DataFrame({
                "id": pl.Series(range(50_000), dtype=pl.Int64),
                "name": ["a", "b", None, "d"] * 12_500,
                "when": pl.datetime_range(start, start + dt.timedelta(minutes=49_999), "1m", time_zone="Europe/Berlin", eager=True),
                "kind": pl.Series(["x", "y"] * 25_000, dtype=pl.Categorical),
            })
            ids = frame["id"]
            lazy = frame.lazy().filter(pl.col("id") % 2 == 0).group_by("kind").agg(pl.col("id").sum()).sort("kind")
        """),
        (
            Check(
                "`frame`, a 50,000-row DataFrame (int, str with nulls, tz datetime, categorical)",
                "equal; schema (dtypes, time zone) kept; `filter`/`group_by` give the same result",
                _code("""
                    from polars.testing import assert_frame_equal
                    assert_frame_equal(frame, E.frame)
                    assert frame.schema == E.frame.schema, frame.schema
                    query = lambda f: f.filter(pl.col("name").is_not_null()).group_by("kind").agg(pl.col("id").max()).sort("kind")
                    assert_frame_equal(query(frame), query(E.frame))
                """),
            ),
            Check(
                "`ids = frame['id']` (Series)",
                "equal, name and dtype kept",
                "from polars.testing import assert_series_equal\nassert_series_equal(ids, E.ids)\n",
            ),
            Check(
                "LazyFrame (filter, group_by, sort)",
                "`collect()` gives the same result",
                "from polars.testing import assert_frame_equal\nassert_frame_equal(lazy.collect(), E.lazy.collect())\n",
            ),
        ),
    ),
    Library(
        "pyarrow",
        "pyarrow",
        "pyarrow",
        _code("""
            import numpy as np
            import pyarrow as pa
            import pyarrow.compute as pc
            table = pa.table({
                "a": pa.array(np.arange(100_000, dtype=np.int64)),
                "b": pa.array(["x", None] * 50_000, pa.string()),
                "t": pa.array(np.arange(100_000, dtype=np.int64) * 60_000, pa.timestamp("ms", tz="UTC")),
            }).replace_schema_metadata({"source": "coverage"})
            arr = pa.array([1, None, 3], type=pa.int32())
            dictarr = pa.array(["lo", "hi", "lo"]).dictionary_encode()
            chunked = pa.chunked_array([[1, 2], [3]])
        """),
        (
            Check(
                "`table`, a 100,000-row Table (int64, string with nulls, timestamp[ms, UTC], metadata)",
                "equal with schema and metadata; compute functions give the same results",
                _code("""
                    assert table.equals(E.table, check_metadata=True), "tables differ"
                    assert table.schema.field("t").type == pa.timestamp("ms", tz="UTC") and table.schema.metadata == {b"source": b"coverage"}
                    assert pc.sum(table["a"]).as_py() == 100_000 * 99_999 // 2 and table["b"].null_count == 50_000
                """),
            ),
            Check(
                "`arr`, an int32 Array with a null",
                "equal; type and null kept",
                "assert arr.equals(E.arr) and arr.type == pa.int32() and arr.null_count == 1 and arr.to_pylist() == [1, None, 3]\n",
            ),
            Check(
                "dictionary-encoded Array",
                "still dictionary-encoded; dictionary and indices kept",
                "assert dictarr.equals(E.dictarr) and pa.types.is_dictionary(dictarr.type) and dictarr.dictionary.to_pylist() == ['lo', 'hi']\n",
            ),
            Check(
                "ChunkedArray",
                "equal; chunks kept",
                "assert chunked.equals(E.chunked) and chunked.num_chunks == 2\n",
            ),
        ),
    ),
    Library(
        "scipy.sparse",
        "scipy.sparse",
        "scipy",
        _code("""
            import numpy as np
            import scipy.sparse as sparse
            rng = np.random.default_rng(0)
            csr = sparse.csr_matrix((rng.random(20_000), (rng.integers(0, 2000, 20_000), rng.integers(0, 1000, 20_000))), shape=(2000, 1000))
            coo = sparse.coo_matrix((np.array([1.0, 2.0, 3.0]), (np.array([0, 1, 2]), np.array([2, 0, 1]))), shape=(3, 4))
            csr_arr = sparse.csr_array(np.eye(4) * 2.0)
            vec = np.arange(1000, dtype=np.float64)
        """),
        (
            Check(
                "`csr`, a 2000×1000 csr_matrix (20,000 entries)",
                "still a csr_matrix; equal; `csr @ vec` gives the same result",
                _code("""
                    assert type(csr) is sparse.csr_matrix, type(csr)
                    assert csr.shape == E.csr.shape and csr.nnz == E.csr.nnz and (csr != E.csr).nnz == 0, "entries differ"
                    assert np.array_equal(csr @ vec, E.csr @ E.vec)
                """),
            ),
            Check(
                "`coo`, a coo_matrix",
                "still a coo_matrix; row, col and data kept; converts to csr",
                _code("""
                    assert type(coo) is sparse.coo_matrix, type(coo)
                    assert (coo.row.tolist(), coo.col.tolist(), coo.data.tolist()) == ([0, 1, 2], [2, 0, 1], [1.0, 2.0, 3.0])
                    assert np.array_equal(coo.tocsr().toarray(), E.coo.toarray())
                """),
            ),
            Check(
                "`csr_arr`, a csr_array (the sparse-array API)",
                "still a csr_array; `@` gives the same result",
                _code("""
                    assert type(csr_arr) is sparse.csr_array, type(csr_arr)
                    assert np.array_equal((csr_arr @ csr_arr).toarray(), np.eye(4) * 4.0)
                """),
            ),
        ),
    ),
    Library(
        "scikit-learn",
        "sklearn",
        "scikit-learn",
        _code("""
            from sklearn.datasets import make_classification
            from sklearn.ensemble import RandomForestClassifier
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
            X, y = make_classification(n_samples=400, n_features=8, random_state=0)
            pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y)
            step = pipe[-1]
            forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
        """),
        (
            Check(
                "`pipe`, a fitted Pipeline (StandardScaler, LogisticRegression)",
                "`predict_proba` and `score` equal to the same pipeline fitted again",
                _code("""
                    import numpy as np
                    assert np.array_equal(pipe.predict_proba(X), E.pipe.predict_proba(E.X)), "predictions differ"
                    assert pipe.score(X, y) == E.pipe.score(E.X, E.y)
                """),
            ),
            Check(
                "`step = pipe[-1]`",
                "`pipe[-1] is step`",
                "assert pipe[-1] is step, 'pipe[-1] is another LogisticRegression than step'\n",
            ),
            Check(
                "`step = pipe[-1]`",
                "`step.set_params(C=0.5)` is seen in `pipe`",
                _code("""
                    try:
                        step.set_params(C=0.5)
                        seen = pipe.get_params()["logisticregression__C"]
                        assert seen == 0.5, f"pipe still has C={seen}: step is a copy"
                    finally:
                        step.set_params(C=1.0)
                        pipe[-1].set_params(C=1.0)
                """),
            ),
            Check(
                "`forest`, a fitted RandomForestClassifier",
                "`predict_proba` equal to the same forest fitted again",
                "import numpy as np\nassert np.array_equal(forest.predict_proba(X), E.forest.predict_proba(E.X)), 'predictions differ'\n",
            ),
        ),
    ),
    Library(
        "matplotlib",
        "matplotlib",
        "matplotlib",
        _code("""
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
            (line,) = ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label="squares")
            ax.set_title("before")
            ax.legend(loc="upper left")
        """),
        (
            Check(
                "`fig, ax = plt.subplots()` (Agg backend)",
                "`fig.axes[0] is ax` and `ax.figure is fig`",
                _code("""
                    assert fig.axes[0] is ax, "fig.axes[0] is another Axes than ax"
                    assert ax.figure is fig, "ax.figure is another Figure than fig"
                """),
            ),
            Check(
                "`fig, ax = plt.subplots()` (Agg backend)",
                "`ax.set_title('after')` changes `fig`",
                _code("""
                    try:
                        ax.set_title("after")
                        seen = fig.axes[0].get_title()
                        assert seen == "after", f"fig's axes are still titled {seen!r}: ax is a copy"
                    finally:
                        ax.set_title("before")
                        fig.axes[0].set_title("before")
                """),
            ),
            Check(
                "`(line,) = ax.plot(...)`",
                "`ax.lines[0] is line`; data kept",
                "assert line.get_ydata().tolist() == [0, 1, 4, 9]\nassert ax.lines[0] is line, 'ax.lines[0] is another Line2D than line'\n",
            ),
            Check(
                "`fig`",
                "`savefig` works: a PNG of the same size, the same pixels as the figure drawn again",
                _code("""
                    import io
                    import numpy as np
                    def png(figure):
                        out = io.BytesIO()
                        figure.savefig(out, format="png")
                        return out.getvalue()
                    got, want = png(fig), png(E.fig)
                    size = lambda data: (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
                    assert size(got) == size(want) == (400, 300), (size(got), size(want))
                    assert np.array_equal(plt.imread(io.BytesIO(got)), plt.imread(io.BytesIO(want))), "pixels differ"
                """),
            ),
            Check(
                "`fig`",
                "pyplot still manages it: `plt.figure(fig.number) is fig`",
                "assert plt.figure(fig.number) is fig, 'plt.figure(fig.number) is another figure'\n",
            ),
        ),
        env={"MPLBACKEND": "Agg"},
    ),
    Library(
        "xarray",
        "xarray",
        "xarray",
        _code("""
            import numpy as np
            import pandas as pd
            import xarray as xr
            temp = xr.DataArray(
                np.random.default_rng(0).random((3, 100, 50)),
                dims=("time", "y", "x"),
                coords={"time": pd.date_range("2024-01-01", periods=3), "x": np.arange(50) * 0.5},
                name="temp",
                attrs={"units": "K"},
            )
            ds = xr.Dataset({"temp": temp, "rain": ("time", [0.1, 0.0, 2.5])}, attrs={"title": "coverage"})
        """),
        (
            Check(
                "`temp`, a 3×100×50 DataArray (time coordinate, attrs)",
                "identical (values, coords, name, attrs); `.sel` and `.mean` give the same results",
                _code("""
                    xr.testing.assert_identical(temp, E.temp)
                    xr.testing.assert_identical(temp.sel(time="2024-01-02").mean("x"), E.temp.sel(time="2024-01-02").mean("x"))
                """),
            ),
            Check(
                "`ds`, a Dataset holding `temp`",
                "identical; `ds.rain.sum()` and `ds.attrs` kept",
                "xr.testing.assert_identical(ds, E.ds)\nassert float(ds.rain.sum()) == 2.6 and ds.attrs == {'title': 'coverage'}\n",
            ),
            Check(
                "`ds`, a Dataset holding `temp`",
                "`ds['temp']` and `temp` are one array: writing `temp` is seen in `ds`",
                _code("""
                    old = float(temp[0, 0, 0])
                    try:
                        temp[0, 0, 0] = -1.0
                        assert float(ds["temp"][0, 0, 0]) == -1.0, "ds['temp'] did not see temp[0, 0, 0] = -1: two copies"
                    finally:
                        temp[0, 0, 0] = old
                        ds["temp"][0, 0, 0] = old
                """),
            ),
        ),
    ),
    Library(
        "sympy",
        "sympy",
        "sympy",
        _code("""
            import sympy
            x, y = sympy.symbols("x y", real=True)
            f = sympy.Function("f")
            expr = sympy.sin(x) ** 2 + sympy.cos(x) ** 2 + x * y
            ode = sympy.Eq(f(x).diff(x), f(x))
            m = sympy.Matrix([[x, 1], [0, y]])
        """),
        (
            Check(
                "`expr = sin(x)**2 + cos(x)**2 + x*y`",
                "equal to the expression built again; `simplify` gives `x*y + 1`; `lambdify` evaluates it",
                _code("""
                    assert expr == E.expr, expr
                    assert sympy.simplify(expr) == x * y + 1
                    assert abs(sympy.lambdify((x, y), expr)(0.3, 2.0) - 1.6) < 1e-12
                """),
            ),
            Check(
                "symbols `x, y` (real=True)",
                "assumptions kept; the `x` inside `expr` is `x`",
                "assert x.is_real is True and x == sympy.Symbol('x', real=True)\nassert any(s is x for s in expr.free_symbols)\n",
            ),
            Check(
                "`f = Function('f')`, an ODE `Eq(f(x).diff(x), f(x))`",
                "`dsolve` solves it",
                "assert sympy.dsolve(ode) == sympy.Eq(f(x), sympy.Symbol('C1') * sympy.exp(x)), sympy.dsolve(ode)\n",
            ),
            Check(
                "symbolic Matrix",
                "`det` and `inv` work",
                "assert m.det() == x * y and sympy.simplify(m * m.inv()) == sympy.eye(2)\n",
            ),
        ),
    ),
    Library(
        "networkx",
        "networkx",
        "networkx",
        _code("""
            import networkx as nx
            G = nx.karate_club_graph()
            D = nx.DiGraph(name="chain")
            D.add_weighted_edges_from([("a", "b", 2.0), ("b", "c", 1.5), ("a", "c", 5.0)])
            M = nx.MultiGraph([(1, 2), (1, 2), (2, 3)])
            sub = G.subgraph([0, 1, 2, 3])
        """),
        (
            Check(
                "`G`, the karate club Graph (node and edge attributes)",
                "same nodes, edges and attributes; `pagerank` equal",
                _code("""
                    assert nx.utils.graphs_equal(G, E.G), "graphs differ"
                    assert G.nodes[0]["club"] == "Mr. Hi" and G.edges[0, 1]["weight"] == E.G.edges[0, 1]["weight"]
                    assert nx.pagerank(G) == nx.pagerank(E.G)
                """),
            ),
            Check(
                "`D`, a weighted DiGraph",
                "graph name kept; weighted `shortest_path` works",
                "assert type(D) is nx.DiGraph and D.graph['name'] == 'chain'\nassert nx.shortest_path(D, 'a', 'c', weight='weight') == ['a', 'b', 'c']\n",
            ),
            Check(
                "`M`, a MultiGraph",
                "parallel edges kept",
                "assert type(M) is nx.MultiGraph and M.number_of_edges(1, 2) == 2 and M.number_of_edges() == 3\n",
            ),
            Check(
                "`sub = G.subgraph([0, 1, 2, 3])` (a view of G)",
                "same edges; still a view of `G`: an edge attribute set in `G` is seen in `sub`",
                _code("""
                    assert nx.utils.graphs_equal(sub, E.sub), "subgraphs differ"
                    try:
                        G.edges[0, 1]["mark"] = True
                        assert sub.edges[0, 1].get("mark") is True, "sub did not see G's new edge attribute: sub holds a copy of G"
                    finally:
                        G.edges[0, 1].pop("mark", None)
                        sub.edges[0, 1].pop("mark", None)
                """),
            ),
        ),
    ),
    Library(
        "Pillow",
        "PIL",
        "pillow",
        _code("""
            import io
            from PIL import Image, ImageDraw
            img = Image.new("RGB", (64, 48), "white")
            ImageDraw.Draw(img).rectangle([8, 8, 40, 30], fill=(255, 0, 0))
            pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
            alpha = img.convert("RGBA")
            alpha.putalpha(128)
            png_bytes = io.BytesIO()
            img.save(png_bytes, format="PNG", dpi=(150, 150))
            opened = Image.open(io.BytesIO(png_bytes.getvalue()))
        """),
        (
            Check(
                "`img`, an RGB Image drawn on",
                "mode, size and pixels equal; draws and saves as PNG",
                _code("""
                    assert (img.mode, img.size) == ("RGB", (64, 48)) and img.tobytes() == E.img.tobytes()
                    assert img.getpixel((10, 10)) == (255, 0, 0)
                    copy = img.copy()
                    ImageDraw.Draw(copy).line([0, 0, 63, 47], fill=(0, 0, 255))
                    out = io.BytesIO()
                    copy.save(out, format="PNG")
                    assert Image.open(io.BytesIO(out.getvalue())).size == (64, 48)
                """),
            ),
            Check(
                "`pal`, a palette (P) Image",
                "mode, palette and indices kept",
                "assert pal.mode == 'P' and pal.getpalette() == E.pal.getpalette() and pal.tobytes() == E.pal.tobytes()\n",
            ),
            Check(
                "`alpha`, an RGBA Image",
                "pixels and alpha kept",
                "assert alpha.mode == 'RGBA' and alpha.tobytes() == E.alpha.tobytes() and alpha.getpixel((0, 0))[3] == 128\n",
            ),
            Check(
                "`opened = Image.open(...)` of PNG bytes (not yet loaded)",
                "size, pixels and `info['dpi']` kept; `convert` and `save` work",
                _code("""
                    assert opened.size == (64, 48) and opened.tobytes() == E.img.tobytes(), "pixels differ"
                    assert round(opened.info["dpi"][0]) == 150, opened.info
                    opened.convert("L").save(io.BytesIO(), format="PNG")
                """),
            ),
        ),
    ),
    Library(
        "PyTorch",
        "torch",
        "torch",
        _code("""
            import torch
            torch.manual_seed(0)
            t = torch.randn(300, 200)
            half = t[:150]
            counts = torch.arange(10, dtype=torch.int16)
            w = torch.ones(3, requires_grad=True)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
            sd = model.state_dict()
            inputs = torch.randn(5, 8)
        """),
        (
            Check(
                "`t`, a 300×200 float32 CPU tensor; `counts`, int16",
                "values, dtype and shape equal",
                "assert torch.equal(t, E.t) and t.dtype == torch.float32\nassert torch.equal(counts, E.counts) and counts.dtype == torch.int16\n",
            ),
            Check(
                "`half = t[:150]` (a view of `t`)",
                "same storage as `t`: writing `t` is seen in `half`",
                _code("""
                    assert torch.equal(half, E.half), "values differ"
                    old = float(t[0, 0])
                    try:
                        t[0, 0] = -1.0
                        assert float(half[0, 0]) == -1.0, "half did not see t[0, 0] = -1: two copies"
                    finally:
                        t[0, 0] = old
                        half[0, 0] = old
                """),
            ),
            Check(
                "`w = torch.ones(3, requires_grad=True)`",
                "`requires_grad` kept; `backward` fills `w.grad`",
                _code("""
                    assert w.requires_grad and w.is_leaf
                    try:
                        (w * 2).sum().backward()
                        assert w.grad.tolist() == [2.0, 2.0, 2.0], w.grad
                    finally:
                        w.grad = None
                """),
            ),
            Check(
                "`model`, a small nn.Sequential in eval mode",
                "outputs equal to the same model built again (same seed); eval mode kept",
                _code("""
                    with torch.no_grad():
                        assert torch.equal(model(inputs), E.model(E.inputs)), "outputs differ"
                    assert model.training is False
                """),
            ),
            Check(
                "`sd = model.state_dict()`",
                "equal; loading it into a new model gives equal outputs",
                _code("""
                    assert sd.keys() == E.sd.keys() and all(torch.equal(sd[k], E.sd[k]) for k in sd)
                    new = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
                    new.load_state_dict(sd)
                    with torch.no_grad():
                        assert torch.equal(new(inputs), E.model(E.inputs)), "outputs differ"
                """),
            ),
            Check(
                "`sd = model.state_dict()`",
                "`sd`'s tensors are the model's parameters: an in-place change to the model is seen in `sd`",
                _code("""
                    old = float(model[0].weight[0, 0])
                    try:
                        with torch.no_grad():
                            model[0].weight[0, 0] = -1.0
                        assert float(sd["0.weight"][0, 0]) == -1.0, "sd did not see the change to model[0].weight: two copies"
                    finally:
                        with torch.no_grad():
                            model[0].weight[0, 0] = old
                            sd["0.weight"][0, 0] = old
                """),
            ),
        ),
        env={"OMP_NUM_THREADS": "1"},
        skip_reason="torch is not installed: the coverage-libs extra installs it on Python 3.11 only (torch==2.13.0)",
    ),
)


# --- the checks run in the kernel -------------------------------------------------------

#: Runs in the kernel, in a namespace of its own (nothing is added to the user's):
#: ``ipython``, ``setup`` and ``checks`` ([key, code] pairs) are given; prints one JSON
#: object, check key -> "ok" or the reason it failed.
RUNNER = _code("""
    import json, traceback, types

    def describe(error, filename, code):
        line = ""
        for frame in traceback.extract_tb(error.__traceback__):
            if frame.filename == filename and frame.lineno:
                line = code.splitlines()[frame.lineno - 1].strip()
        message = " ".join(str(error).split())
        if isinstance(error, AssertionError):
            return message or f"`{line}` is false"
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        return f"{text} (at `{line}`)" if line else text

    def run():
        scratch = {}
        try:
            exec(compile(setup, "<setup>", "exec"), scratch)
        except Exception as error:
            reason = "building the objects again failed: " + describe(error, "<setup>", setup)
            return {key: reason for key, _ in checks}
        namespace = dict(ipython.user_ns)
        namespace["E"] = types.SimpleNamespace(**scratch)
        results = {}
        for key, code in checks:
            try:
                exec(compile(code, "<check>", "exec"), dict(namespace))
                results[key] = "ok"
            except Exception as error:
                results[key] = describe(error, "<check>", code)
        return results

    print(json.dumps(run()))
""")


def run_checks(kernel, library: Library) -> dict[str, str]:
    checks = [[str(i), check.code] for i, check in enumerate(library.checks)]
    cell = f"exec({RUNNER!r}, {{'ipython': get_ipython(), 'setup': {library.setup!r}, 'checks': {checks!r}}})"
    out = kernel.execute(cell, timeout=300)
    assert not out.error, out.error
    return json.loads(out.stdout.strip().splitlines()[-1])


NOT_RESTORED = (
    "{n: repr(v) for n, v in get_ipython().user_ns.items() if type(v).__name__ == 'NotRestored'"
    " and type(v).__module__.startswith('durable_kernel')}"
)


def variables_reason(before: list[str], skipped: dict[str, str], after: list[str], not_restored: dict) -> str:
    """Why not every variable came back ("ok" when all did)."""
    problems = [f"not saved: {name} ({reason})" for name, reason in sorted(skipped.items())]
    problems += [f"not restored: {text}" for text in sorted(not_restored.values())]
    missing = sorted(set(before) - set(after) - set(skipped))
    if missing:
        problems.append(f"missing after the restart: {', '.join(missing)}")
    return "; ".join(problems) or "ok"


# --- the table in README.md ---------------------------------------------------------------


def cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def library_rows(library: Library, version: str, results: list[tuple[str, str, str]]) -> list[str]:
    name = f"{library.name} {version}"
    return [
        f"| {name} | {cell(obj)} | {cell(what)} | {'✓' if result == 'ok' else '✗ ' + cell(result)} |"
        for obj, what, result in results
    ]


def table_rows(readme: str) -> list[str]:
    if START not in readme or END not in readme:
        return []
    inside = readme.split(START, 1)[1].split(END, 1)[0]
    return [line for line in inside.splitlines() if line.startswith("| ") and not line.startswith("| library |")]


def row_library(row: str) -> str:
    first = row[2:].split(" | ", 1)[0]
    return next((lib.name for lib in LIBRARIES if first == lib.name or first.startswith(lib.name + " ")), "")


def row_key(row: str) -> tuple[str, str, str, str]:
    """What a committed row must match: library, object, check, ✓ or ✗ (not versions or reasons)."""
    cells = row[2:-2].split(" | ")
    return (row_library(row), cells[1], cells[2], cells[3][:1])


def write_rows(library: Library, rows: list[str]) -> None:
    """Replace this library's rows of README.md's table (kept in the order of LIBRARIES)."""
    with open(README, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        assert START in text and END in text, f"README.md has no {START} ... {END} section"
        by_library: dict[str, list[str]] = {}
        for row in table_rows(text):
            by_library.setdefault(row_library(row), []).append(row)
        by_library[library.name] = rows
        body = [row for lib in LIBRARIES for row in by_library.get(lib.name, [])]
        table = "\n".join([HEADER, *body])
        new = text.split(START, 1)[0] + START + "\n" + table + "\n" + END + text.split(END, 1)[1]
        if new != text:
            f.seek(0)
            f.write(new)
            f.truncate()


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES, ids=[lib.name for lib in LIBRARIES])
def test_library_objects_come_back_working_after_sigkill(library: Library, start_kernel, jupyter_dirs):
    if importlib.util.find_spec(library.module.split(".")[0]) is None:
        pytest.skip(library.skip_reason or f"{library.dist} is not installed (pip install '.[coverage-libs]')")
    version = importlib.metadata.version(library.dist)

    before = start_kernel(session=SESSION, env=library.env)
    out = before.execute(library.setup, timeout=300)
    assert not out.error, f"the setup cell failed: {out.error}"
    names_before = user_variables(before)
    control = run_checks(before, library)
    wrong = {library.checks[int(k)].what: reason for k, reason in control.items() if reason != "ok"}
    assert not wrong, f"checks that fail before any restart (the check is wrong, not the kernel): {wrong}"
    wait_saved(before)
    notebook = open_store(environ=jupyter_dirs).notebook(SESSION)
    manifest = notebook.read_manifest(notebook.checkpoint_ids()[0])
    skipped = {s["name"]: s["reason"] for s in manifest.data.get("skipped", [])}
    before.kill()

    after = start_kernel(session=SESSION, env=library.env)
    not_restored = eval(after.value(NOT_RESTORED))  # a dict of str literals
    names_after = user_variables(after)
    results = run_checks(after, library)

    table = [(*ALL_VARIABLES, variables_reason(names_before, skipped, names_after, not_restored))]
    table += [(check.obj, check.what, results[str(i)]) for i, check in enumerate(library.checks)]
    rows = library_rows(library, version, table)
    write_rows(library, rows)

    failed = [f"{obj}: {what}: {result}" for obj, what, result in table if result != "ok"]
    committed = [row_key(row) for row in table_rows(README_AT_START) if row_library(row) == library.name]
    stale = committed != [row_key(row) for row in rows]
    assert not failed, f"{len(failed)} of {len(table)} checks fail after SIGKILL and restart:\n" + "\n".join(failed)
    assert not stale, (
        "README.md's coverage table said otherwise for this library; it is rewritten now: commit README.md"
    )


def test_readme_table_has_a_row_for_every_check():
    """The committed table lists exactly the checks of this file, in order (no kernel needed)."""
    committed = [row_key(row)[:3] for row in table_rows(README_AT_START)]
    expected = [
        (lib.name, cell(obj), cell(what))
        for lib in LIBRARIES
        for obj, what in [ALL_VARIABLES, *((c.obj, c.what) for c in lib.checks)]
    ]
    assert committed == expected, "README.md's coverage table is out of date: run tests/test_library_coverage.py"
