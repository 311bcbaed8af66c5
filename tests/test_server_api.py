"""The Jupyter Server API under /api/durable/ (issue 12), through a real jupyter_server.

One server for the module (its own root, store and key); each test opens its own
notebook as JupyterLab does (POST /api/sessions with the durable-python3 kernel),
runs cells through the kernel's connection file, and calls the API with the
server's token, as JupyterLab's panel or curl would.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from durable_kernel.checkpoints.location import key_path, open_store
from durable_kernel.checkpoints.manifest import fingerprint
from server_support import JupyterServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server-api")
    root = base / "root"
    root.mkdir()
    dirs = {"JUPYTER_DATA_DIR": str(base / "jupyter-data"), "DURABLE_KERNEL_DIR": str(base / "store")}
    env = {**os.environ, **dirs, "JUPYTER_RUNTIME_DIR": str(base / "runtime")}
    env.pop("DURABLE_KERNEL_SESSION", None)
    env.pop("JPY_SESSION_NAME", None)
    srv = JupyterServer(root, env, base / "server.log")
    srv.dirs = dirs
    srv.base = base
    yield srv
    srv.stop()


class Notebook:
    """A notebook opened in the server (a session and its durable kernel), with a client to run cells."""

    def __init__(self, server: JupyterServer, path: str):
        self.server, self.path = server, path
        self.identity = str(server.root / path)
        server.new_notebook(path)
        self.open()

    def open(self) -> None:
        self.session = self.server.open_notebook(self.path)
        self.kernel_id = self.session["kernel"]["id"]
        self.client = self.server.client(self.kernel_id)

    def run(self, code: str) -> str:
        """Run a cell and wait until its checkpoint is committed; its stdout."""
        out = self.client.run(code)
        assert not out["error"], out
        self.saved()
        return out["stdout"]

    def saved(self) -> None:
        """Wait for the kernel's checkpoints in flight (a silent request: it makes no checkpoint itself)."""
        reply = self.client.kc.execute_interactive(
            "assert get_ipython().kernel.wait_for_checkpoint(60)", silent=True, timeout=90, output_hook=lambda m: None
        )
        assert reply["content"]["status"] == "ok", reply["content"]

    def close(self) -> None:
        self.client.close()
        self.server.close(self.session)

    def store(self):
        return open_store(environ=self.server.dirs).notebook(self.identity)

    def api(self, method: str = "GET", sub: str = "", body=None, query: str = "", token: bool = True):
        url = f"durable/notebooks/{urllib.parse.quote(self.path)}{sub}{query}"
        return self.server.request(method, url, body, token=token)


@pytest.fixture(scope="module")
def history(server):
    """A notebook with four checkpoints: x added, y added, x changed, then y removed and z added
    (and a generator, which cannot be saved)."""
    nb = Notebook(server, "history.ipynb")
    nb.run("x = 1")
    nb.run("y = [1, 2]")
    nb.run("x = 2")
    nb.run("del y\nz = 'zed'\ngen = (i for i in range(3))")
    assert nb.store().checkpoint_ids() == [4, 3, 2, 1]
    return nb


# --- reading -----------------------------------------------------------------------------


def test_listing_gives_every_stored_notebook_as_durable_kernel_list_json_does(server, history):
    status, reply = server.request("GET", "durable/notebooks")
    assert status == 200, reply
    listed = subprocess.run(
        [sys.executable, "-m", "durable_kernel", "list", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **server.dirs},
        timeout=60,
        check=True,
    )
    cli = json.loads(listed.stdout)
    assert reply["store"] == cli["store"]
    mine = {n["identity"]: n for n in reply["notebooks"]}
    theirs = {n["identity"]: n for n in cli["notebooks"]}
    entry = mine[history.identity]
    assert {k: v for k, v in entry.items() if k != "path"} == theirs[history.identity]
    assert entry["path"] == "history.ipynb"
    assert (entry["checkpoints"], entry["newest"], entry["variables"]) == (4, 4, 2)
    assert entry["size"] > 0 and entry["last_used_iso"]


def test_listing_before_any_kernel_ran_is_empty_not_an_error(tmp_path, monkeypatch):
    """No store and no key yet (what a new user's JupyterLab panel asks first)."""
    from durable_kernel import serverapi

    monkeypatch.setenv("DURABLE_KERNEL_DIR", str(tmp_path / "no-store-yet"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "no-key-yet"))
    assert serverapi.list_notebooks(str(tmp_path)) == {"store": str(tmp_path / "no-store-yet"), "notebooks": []}


def test_detail_lists_each_checkpoint_with_the_names_it_added_removed_and_changed(history):
    status, reply = history.api()
    assert status == 200, reply
    assert reply["identity"] == history.identity and reply["path"] == "history.ipynb"
    assert reply["kernel"] == history.kernel_id
    rows = [(c["id"], c["cell"], c["added"], c["removed"], c["changed"]) for c in reply["checkpoints"]]
    assert rows == [
        (4, "del y", ["z"], ["y"], []),
        (3, "x = 2", [], [], ["x"]),
        (2, "y = [1, 2]", ["y"], [], []),
        (1, "x = 1", ["x"], [], []),
    ]
    counts = [c["execution_count"] for c in reply["checkpoints"]]
    assert counts == sorted(counts, reverse=True) and all(
        c["size"] > 0 and c["created_iso"] for c in reply["checkpoints"]
    )


def test_detail_shows_the_newest_checkpoints_variables_and_what_was_not_saved_with_why(history):
    status, reply = history.api()
    assert status == 200, reply
    newest = reply["checkpoint"]
    assert newest["generation"] == 4
    assert [(v["name"], v["type"], v["kind"]) for v in newest["variables"]] == [
        ("x", "builtins.int", "pickle"),
        ("z", "builtins.str", "pickle"),
    ]
    assert all(v["size"] > 0 for v in newest["variables"])
    (skipped,) = newest["skipped"]
    assert skipped["name"] == "gen" and skipped["type"].endswith("generator") and "pickle" in skipped["reason"]


def test_detail_of_an_older_checkpoint_shows_its_variables(history):
    status, reply = history.api(query="?checkpoint=2")
    assert status == 200, reply
    assert reply["checkpoint"]["generation"] == 2
    assert [v["name"] for v in reply["checkpoint"]["variables"]] == ["x", "y"]


def test_diff_gives_the_names_added_removed_and_changed_between_two_checkpoints(history):
    status, reply = history.api(sub="/diff", query="?a=1&b=4")
    assert status == 200, reply
    assert (reply["a"], reply["b"]) == (1, 4)
    assert (reply["added"], reply["removed"], reply["changed"]) == (["z"], [], ["x"])
    status, reply = history.api(sub="/diff")  # the last two
    assert (status, reply["a"], reply["b"], reply["added"], reply["removed"]) == (200, 3, 4, ["z"], ["y"])


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "sub", "body"),
    [("GET", "", None), ("GET", "/diff", None), ("DELETE", "", None), ("POST", "/restore", {"checkpoint": 1})],
)
def test_an_unknown_notebook_is_404_with_a_json_message(server, method, sub, body):
    status, reply = server.request(method, f"durable/notebooks/never-saved.ipynb{sub}", body)
    assert status == 404, reply
    assert "never-saved.ipynb" in reply["message"] and "Traceback" not in reply["message"]


def test_an_unknown_checkpoint_is_404_and_a_body_without_one_is_400(history):
    status, reply = history.api("POST", "/restore", {"checkpoint": 99})
    assert status == 404 and "no checkpoint 99" in reply["message"] and "kept: 4, 3, 2, 1" in reply["message"]
    status, reply = history.api("POST", "/restore", {"id": 1})
    assert status == 400 and '{"checkpoint": ID}' in reply["message"]
    status, reply = history.api(sub="/diff", query="?a=one")
    assert status == 400 and "a must be a checkpoint id" in reply["message"]


@pytest.mark.parametrize(
    ("method", "sub", "body"),
    [("GET", "", None), ("GET", "/diff", None), ("DELETE", "", None), ("POST", "/restore", {"checkpoint": 1})],
)
def test_a_request_without_the_token_is_refused(server, history, method, sub, body):
    status, _ = server.request("GET", "durable/notebooks", token=False)
    assert status == 403
    status, _ = history.api(method, sub, body, token=False)
    assert status == 403
    assert history.store().checkpoint_ids() == [4, 3, 2, 1]  # nothing was cleared or restored


def test_a_browser_request_with_the_login_cookie_needs_the_xsrf_token(server, history):
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    browser.open(f"{server.url}/login", timeout=30).read()  # the login page sets the _xsrf cookie
    browser.open(f"{server.url}/api/status?token={server.token}", timeout=30).read()  # sets the login cookie
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    url = f"{server.url}/api/durable/notebooks/history.ipynb/restore"

    def post(headers: dict[str, str]) -> int:
        request = urllib.request.Request(url, data=b'{"checkpoint": 99}', method="POST", headers=headers)
        try:
            return browser.open(request, timeout=30).status
        except urllib.error.HTTPError as refused:
            return refused.code

    assert browser.open(f"{server.url}/api/durable/notebooks", timeout=30).status == 200  # the cookie is enough to read
    assert post({"Content-Type": "application/json"}) == 403  # no XSRF token: refused before the handler runs
    assert post({"Content-Type": "application/json", "X-XSRFToken": xsrf}) == 404  # reached it: no checkpoint 99


def test_a_missing_signing_key_is_503_with_what_to_do(server, history):
    key = key_path(server.dirs)
    aside = key.with_name("moved-away")
    key.rename(aside)
    try:
        status, reply = server.request("GET", "durable/notebooks")
    finally:
        aside.rename(key)
    assert status == 503, reply
    assert str(key) in reply["message"] and "put back" in reply["message"]


def test_a_store_others_can_write_to_is_409_with_the_fix(server, history):
    root = Path(server.dirs["DURABLE_KERNEL_DIR"])
    root.chmod(0o770)
    try:
        status, reply = history.api()
    finally:
        root.chmod(0o700)
    assert status == 409, reply
    assert "can be written by other users" in reply["message"] and f"chmod go-w {root}" in reply["message"]


# --- clearing ------------------------------------------------------------------------------


def test_delete_clears_the_checkpoints_of_a_notebook_with_no_kernel(server):
    nb = Notebook(server, "clear-closed.ipynb")
    nb.run("a = 1")
    nb.close()
    status, reply = nb.api("DELETE")
    assert status == 200, reply
    assert (reply["cleared"], reply["kernel"]) == (1, None) and reply["freed"] > 0
    assert nb.store().checkpoint_ids() == []
    assert nb.api()[0] == 404
    assert nb.identity not in [n["identity"] for n in server.request("GET", "durable/notebooks")[1]["notebooks"]]


def test_delete_with_the_kernel_running_clears_through_it_so_it_does_not_save_the_old_state_again(server):
    nb = Notebook(server, "clear-running.ipynb")
    nb.run("a = 1")
    status, reply = nb.api("DELETE")
    assert status == 200, reply
    assert reply["kernel"] == nb.kernel_id and reply["cleared"] == 1 and "Removed 1 checkpoint" in reply["message"]
    assert nb.store().checkpoint_ids() == []
    nb.run("b = 2")
    (newest,) = [nb.store().read_manifest(g) for g in nb.store().checkpoint_ids()]
    assert [v["name"] for v in newest.variables] == ["b"]  # not a: the next start has only what came after


# --- restoring -----------------------------------------------------------------------------


def test_restore_with_the_kernel_running_brings_the_value_back_in_the_kernel(server):
    nb = Notebook(server, "restore-running.ipynb")
    nb.run("v = 'first'")
    nb.run("v = 'second'")
    status, reply = nb.api("POST", "/restore", {"checkpoint": 1})
    assert status == 200, reply
    assert reply["kernel"] == nb.kernel_id and reply["restored"] == 1
    assert "Restored checkpoint 1" in reply["message"]
    assert nb.client.run("print(v)")["stdout"] == "first\n"


def test_restore_with_the_kernel_running_is_saved_at_once_so_a_restart_keeps_it(server):
    nb = Notebook(server, "restore-saved.ipynb")
    nb.run("v = 'first'")
    nb.run("v = 'second'")
    status, reply = nb.api("POST", "/restore", {"checkpoint": 1})
    assert status == 200, reply
    store = nb.store()
    newest = store.read_manifest(store.checkpoint_ids()[0])
    assert reply["checkpoint"] == newest.generation == 3
    assert fingerprint(newest.data) == fingerprint(store.read_manifest(1).data)
    assert newest.data["cell"] == "(restored checkpoint 1)"
    assert 2 in store.checkpoint_ids()  # the state before the restore, for undo


def test_restore_with_no_kernel_makes_the_next_start_load_it_and_keeps_the_one_it_replaced(server):
    nb = Notebook(server, "restore-closed.ipynb")
    nb.run("v = 'first'")
    nb.run("v = 'second'\nw = 'only in 2'")
    nb.close()
    status, reply = nb.api("POST", "/restore", {"checkpoint": 1})
    assert status == 200, reply
    assert (reply["kernel"], reply["restored"], reply["checkpoint"]) == (None, 1, 3)
    status, detail = nb.api()
    rows = [(c["id"], c["cell"], c["added"], c["removed"], c["changed"]) for c in detail["checkpoints"]]
    assert rows[0] == (3, "(restored checkpoint 1)", [], ["w"], ["v"])
    assert [r[0] for r in rows] == [3, 2, 1]  # 2, the state it replaced, is still there for undo
    nb.open()  # the notebook opened again: a new kernel
    out = nb.client.run("print(v, 'w' in dir())")
    assert out["stdout"] == "first False\n", out
    assert "restored 1 variable" in out["stderr"], out


def test_restore_into_a_kernel_that_saves_under_the_old_name_of_a_renamed_notebook_is_409(server):
    nb = Notebook(server, "before-rename.ipynb")
    nb.run("v = 1")
    server.rename(nb.session, "before-rename.ipynb", "after-rename.ipynb")
    nb.path, nb.identity = "after-rename.ipynb", str(server.root / "after-rename.ipynb")
    deadline = time.monotonic() + 60
    while not nb.store().checkpoint_ids():  # the server extension moves the state
        assert time.monotonic() < deadline, "the saved state did not follow the rename"
        time.sleep(0.1)
    status, reply = nb.api("POST", "/restore", {"checkpoint": nb.store().checkpoint_ids()[0]})
    assert status == 409, reply
    assert str(server.root / "before-rename.ipynb") in reply["message"] and "restart the kernel" in reply["message"]


# --- never unpickles -------------------------------------------------------------------------


def test_the_api_reads_a_checkpoint_it_could_not_unpickle_and_never_unpickles_anything(server):
    marker = server.base / "unpickled-by-the-server"
    nb = Notebook(server, "kernel-only-types.ipynb")
    nb.run(
        "import pathlib, sys, tempfile\n"
        "where = tempfile.mkdtemp()\n"
        "pathlib.Path(where, 'kernel_only_mod.py').write_text('class Thing:\\n    pass\\n')\n"
        "sys.path.insert(0, where)\n"
        "import kernel_only_mod\n"
        "thing = kernel_only_mod.Thing()\n"
        "class Trap:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))\n"
        "trap = Trap()\n"
    )
    nb.run("x = 1")
    status, listing = server.request("GET", "durable/notebooks")
    assert status == 200 and nb.identity in [n["identity"] for n in listing["notebooks"]]
    status, detail = nb.api()
    assert status == 200, detail
    types = {v["name"]: v["type"] for v in detail["checkpoint"]["variables"]}
    assert types["thing"] == "kernel_only_mod.Thing" and types["trap"] == "__main__.Trap"
    assert nb.api(sub="/diff")[0] == 200
    nb.close()
    status, reply = nb.api("POST", "/restore", {"checkpoint": 1})  # no kernel: the server itself restores
    assert status == 200, reply
    assert not marker.exists()  # a pickle loaded anywhere in the server would have made it
