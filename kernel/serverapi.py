"""The Jupyter Server REST API under ``/api/durable/``: the stored notebooks, their checkpoints, restore and clear.

What JupyterLab (or ``curl`` with the server's token) sees of the checkpoint store::

    GET    /api/durable/notebooks                           every stored notebook, as ``durable-kernel list --json``
    GET    /api/durable/notebooks/<path>[?checkpoint=ID]    its checkpoints (what each changed), the newest's variables
    GET    /api/durable/notebooks/<path>/diff[?a=ID&b=ID]   names added, removed and changed from A to B
    DELETE /api/durable/notebooks/<path>                    delete its checkpoints
    POST   /api/durable/notebooks/<path>/restore            {"checkpoint": ID}: back to checkpoint ID

``<path>`` is the notebook's path relative to the server's root, as the contents
API names it; the kernel a session starts for it knows it by its absolute path
(``serverext.os_path``), and so does the store.  A notebook whose last path
segment is ``diff`` or ``restore`` (no extension) has no detail URL: the
sub-resources win.

Replies are JSON; a refusal is ``{"message": ...}`` with its status (400 a bad
request, 404 no such notebook or checkpoint, 409 the store or the kernel is in
the way, 503 the signing key is missing or unusable, 504 the kernel did not
answer), never a traceback.  Authentication and authorization are the
server's own (``@web.authenticated``, ``@authorized``: token or login cookie,
XSRF checks for browser requests, 403 without credentials), on the resource
``contents``; restoring or clearing through a running kernel also needs
``execute`` on ``kernels``, as running a cell does.

The server never unpickles anything: it reads signed manifests (``inventory.py``)
and changes the store as the ``durable-kernel`` command does (``maintenance.py``).
With a durable kernel running for the notebook, restore and clear are run in that
kernel (``%checkpoint restore ID``, ``%checkpoint clear``, as silent requests),
so that it loads the state itself and does not save the old one again afterwards;
without one, a restore makes the chosen checkpoint the newest
(``maintenance.make_newest``), which the next kernel loads.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from durable_kernel.checkpoints import (
    CheckpointError,
    Store,
    disk_usage,
    inventory,
    maintenance,
    printable,
)
from durable_kernel.checkpoints.files import check_private
from durable_kernel.checkpoints.location import key_file_in_use, open_store
from durable_kernel.checkpoints.manifest import diff
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .kernelspec import KERNEL_NAME
from .serverext import api_path, os_path

AUTH_RESOURCE = "contents"
#: Seconds to wait for a running kernel to answer at all, then to finish a restore or clear
#: (which waits for its checkpoint in flight and loads the state).
READY_TIMEOUT = 30.0
RUN_TIMEOUT = 180.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Refused(Exception):
    """A request that gets one JSON message and this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def handlers(base_url: str, root: str) -> list[tuple[str, type, dict[str, Any]]]:
    """Tornado routes of the API, for ``web_app.add_handlers``."""
    base = url_path_join(base_url, "api", "durable", "notebooks")
    path = r"(?P<path>(?:/[^/]+)+)"
    args = {"root": root}
    return [
        (base + r"/?", NotebooksHandler, args),
        (base + path + "/diff", DiffHandler, args),
        (base + path + "/restore", RestoreHandler, args),
        (base + path, NotebookHandler, args),
    ]


# --- reading the store (in a worker thread) ---------------------------------------------


def _store() -> Store:
    """The store and this user's key, or a refusal that says what to do."""
    store = open_store(create_key=False)
    if store.key_problem:
        raise Refused(503, f"{store.key_problem}; no checkpoint can be verified")
    if store.root.exists() and not store.root.is_dir():
        raise Refused(409, f"the checkpoint store {store.root} is not a folder; remove it or set DURABLE_KERNEL_DIR")
    check_private(store.root)  # UnsafeStore: 409, with the chmod to run
    key_file = key_file_in_use()  # None: $DURABLE_KERNEL_KEY holds the key, no file is needed
    if key_file is not None and not key_file.is_file() and store.notebook_dirs():
        raise Refused(
            503,
            f"the signing key {key_file} is missing, so no checkpoint in {store.root} can be verified: put back "
            "the key that signed them ('durable-kernel key import', or set DURABLE_KERNEL_KEY; see the README, "
            "'Moving state to another machine or user'). A kernel started now makes a new key, and these "
            "checkpoints then never load.",
        )
    return store


def _notebook(store: Store, identity: str, path: str):
    """The notebook's store, with at least one checkpoint (else 404)."""
    nb = store.notebook(identity)
    nb.check_safe()
    if not nb.checkpoint_ids():
        raise Refused(404, f"no checkpoints for {path!r} (looked for {printable(identity, 300)} in {store.root})")
    return nb


def _checkpoint_id(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise Refused(400, f"{what} must be a checkpoint id (a number), not {text!r}")
    return int(text)


def _kept(nb: Any, gen: int, path: str):
    """Checkpoint ``gen`` of ``nb``, verified (404 if it is not kept, 409 if it does not verify)."""
    kept = nb.checkpoint_ids()
    if gen not in kept:
        raise Refused(404, f"no checkpoint {gen} for {path!r}; kept: {', '.join(map(str, kept))}")
    return nb.read_manifest(gen)


def list_notebooks(root: str) -> dict[str, Any]:
    store = _store()
    return {
        "store": str(store.root),
        "notebooks": [{**info.to_json(), "path": api_path(root, info.identity)} for info in inventory.notebooks(store)],
    }


def notebook_detail(root: str, path: str, shown: int | None) -> dict[str, Any]:
    identity = os_path(root, path)
    store = _store()
    nb = _notebook(store, identity, path)
    manifests, problems = inventory.readable(nb)
    if shown is not None:
        chosen = _kept(nb, shown, path)
    else:
        chosen = manifests[0] if manifests else None
    return {
        "path": path,
        "identity": identity,
        "folder": str(nb.dir),
        "size": disk_usage(nb.dir),
        "generations": nb.checkpoint_ids(),
        "checkpoints": [kept.to_json() for kept in inventory.history(manifests)],
        "checkpoint": inventory.checkpoint_json(chosen) if chosen is not None else None,
        "problems": problems,
    }


def notebook_diff(root: str, path: str, a: int | None, b: int | None) -> dict[str, Any]:
    nb = _notebook(_store(), os_path(root, path), path)
    if a is None and b is not None:
        raise Refused(400, "give a (the older checkpoint) with b, or neither (the last two)")
    if a is None:
        manifests, _ = inventory.readable(nb)
        if len(manifests) < 2:
            raise Refused(404, f"{path!r} has fewer than two readable checkpoints to compare")
        old, new = manifests[1], manifests[0]
    else:
        old = _kept(nb, a, path)
        new = _kept(nb, b, path) if b is not None else inventory.readable(nb)[0][0]
    added, removed, changed = diff(old.data, new.data)
    return {
        "path": path,
        "a": old.generation,
        "b": new.generation,
        "added": added,
        "removed": removed,
        "changed": changed,
    }


def clear_stored(root: str, path: str) -> dict[str, Any]:
    nb = _notebook(_store(), os_path(root, path), path)
    count = len(nb.checkpoint_ids())
    freed = maintenance.clear_notebook(nb)
    return {"path": path, "cleared": count, "freed": freed, "kernel": None, "message": f"Removed {count} checkpoints."}


def make_newest(root: str, path: str, gen: int) -> dict[str, Any]:
    nb = _notebook(_store(), os_path(root, path), path)
    before = nb.checkpoint_ids()[0]
    _kept(nb, gen, path)
    new = maintenance.make_newest(nb, gen)
    if new == gen:
        message = f"Checkpoint {gen} already is the newest: the next kernel started for {path} loads it."
    else:
        message = (
            f"Checkpoint {gen} is now checkpoint {new}, which the next kernel started for {path} loads; "
            f"checkpoint {before}, the newest until now, is kept (restore it to undo)."
        )
    return {"path": path, "restored": gen, "checkpoint": new, "kernel": None, "message": message}


# --- handlers ----------------------------------------------------------------------------


class DurableHandler(APIHandler):
    """What every handler of the API shares: the server root, one way to answer and to refuse."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, root: str) -> None:
        self.root = root

    async def answer(self, work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Run ``work`` and reply with its JSON, or with one message and the right status."""
        try:
            reply = await work()
            status = 200
        except Refused as exc:
            status, reply = exc.status, {"message": exc.message}
        except CheckpointError as exc:  # an unsafe store, a checkpoint that does not verify, a saver still running
            status, reply = 409, {"message": str(exc)}
        except Exception:
            self.log.exception("durable-kernel: %s %s failed", self.request.method, self.request.path)
            status, reply = 500, {"message": "durable-kernel: unexpected error; the server log has the details"}
        if status >= 400:
            self.log.warning("durable-kernel: %s %s: %s %s", self.request.method, self.request.path, status, reply)
        self.set_status(status)
        self.finish(json.dumps(reply))

    def in_thread(self, function: Callable[..., dict[str, Any]], *args: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
        """``work`` for :meth:`answer` that reads or changes the store off the server's event loop."""
        return lambda: asyncio.to_thread(function, self.root, *args)

    def notebook_path(self, path: str) -> str:
        path = path.strip("/")
        if any(part in (".", "..") for part in path.split("/")):
            raise Refused(404, f"no such notebook: {path!r}")
        return path

    # --- the kernel running a notebook, if any -------------------------------------------

    async def running_kernel(self, path: str) -> tuple[str, Any] | None:
        """``(kernel id, kernel manager)`` of a live durable kernel of a session open on ``path``."""
        identity = os_path(self.root, path)
        for session in await ensure_async(self.session_manager.list_sessions()):
            kernel = session.get("kernel") or {}
            if not kernel.get("id") or os_path(self.root, session.get("path") or "") != identity:
                continue
            if not await self.is_durable(kernel.get("name") or ""):
                continue
            try:
                km = self.kernel_manager.get_kernel(kernel["id"])
            except KeyError:
                continue
            if getattr(km, "execution_state", "") == "dead" or not await ensure_async(km.is_alive()):
                continue
            return kernel["id"], km
        return None

    async def is_durable(self, name: str) -> bool:
        """Is kernelspec ``name`` a durable kernel (ours, installed under any name)?"""
        if name == KERNEL_NAME:
            return True
        try:
            spec = await ensure_async(self.kernel_spec_manager.get_kernel_spec(name))
        except Exception:  # a spec removed since the kernel started: not one we can tell
            return False
        return "durable_kernel" in list(getattr(spec, "argv", []) or [])

    async def through_kernel(self, path: str, kernel_id: str, km: Any, line: str) -> str:
        """Run ``%checkpoint <line>`` in the notebook's running kernel as a silent request; its output."""
        authorized = await ensure_async(self.authorizer.is_authorized(self, self.current_user, "execute", "kernels"))
        if not authorized:
            raise Refused(403, f"a kernel runs for {path!r}, and this user may not execute code in kernels")
        if getattr(km, "execution_state", "") == "busy":
            raise Refused(
                409,
                f"the kernel of {path!r} is busy running a cell; try again when it is idle (or interrupt it)",
            )
        client = km.client()
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        try:
            try:
                await client.wait_for_ready(timeout=READY_TIMEOUT)
            except RuntimeError as exc:
                raise Refused(504, f"the kernel of {path!r} did not answer: {exc}") from None
            expected = os_path(self.root, path)
            where = await self._kernel_identity(client)
            if where is not None and where != expected:
                raise Refused(
                    409,
                    f"the kernel running {path!r} saves its state as {printable(where, 300)} (the notebook was "
                    "renamed while it ran): restart the kernel (Kernel > Restart), then try again",
                )
            out: list[str] = []

            def collect(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])

            try:
                reply = await client.execute_interactive(
                    f"%checkpoint {line}",
                    silent=True,
                    store_history=False,
                    allow_stdin=False,
                    stop_on_error=False,
                    timeout=RUN_TIMEOUT,
                    output_hook=collect,
                )
            except TimeoutError:
                raise Refused(
                    504,
                    f"the kernel of {path!r} did not finish '%checkpoint {line}' within {RUN_TIMEOUT:g} s; it may "
                    "still do it: look at the notebook's checkpoints again in a moment",
                ) from None
        finally:
            client.stop_channels()
        content = reply.get("content", {})
        text = _ANSI.sub("", "".join(out)).strip()
        if content.get("status") != "ok":
            raise Refused(409, _ANSI.sub("", str(content.get("evalue") or content.get("ename") or "failed")))
        return text

    async def _kernel_identity(self, client: Any) -> str | None:
        """The notebook identity the kernel saves under (None if it cannot tell: checkpoints off)."""
        expression = "get_ipython().kernel.identity if get_ipython().kernel.notebook is not None else None"
        try:
            reply = await client.execute_interactive(
                "",
                silent=True,
                store_history=False,
                user_expressions={"identity": expression},
                allow_stdin=False,
                stop_on_error=False,
                timeout=READY_TIMEOUT,
                output_hook=lambda msg: None,
            )
            value = reply["content"]["user_expressions"]["identity"]["data"]["text/plain"]
            found = ast.literal_eval(value)
        except TimeoutError:
            raise Refused(504, f"the kernel did not answer within {READY_TIMEOUT:g} s") from None
        except (KeyError, TypeError, ValueError, SyntaxError):
            return None
        return found if isinstance(found, str) else None


class NotebooksHandler(DurableHandler):
    """``GET /api/durable/notebooks``: every stored notebook, most recently used first."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.answer(self.in_thread(list_notebooks))


class NotebookHandler(DurableHandler):
    """``GET``: one notebook's checkpoints and the newest's variables; ``DELETE``: clear them."""

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        async def work() -> dict[str, Any]:
            name = self.notebook_path(path)
            shown = _checkpoint_id(self.get_argument("checkpoint", None), "checkpoint")
            reply = await asyncio.to_thread(notebook_detail, self.root, name, shown)
            running = await self.running_kernel(name)
            return {**reply, "kernel": running[0] if running else None}

        await self.answer(work)

    @web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        async def work() -> dict[str, Any]:
            name = self.notebook_path(path)
            running = await self.running_kernel(name)
            if running is None:
                return await asyncio.to_thread(clear_stored, self.root, name)
            nb = await asyncio.to_thread(lambda: _notebook(_store(), os_path(self.root, name), name))
            count, before = len(nb.checkpoint_ids()), await asyncio.to_thread(disk_usage, nb.dir)
            message = await self.through_kernel(name, *running, "clear")
            freed = max(before - await asyncio.to_thread(disk_usage, nb.dir), 0)
            return {"path": name, "cleared": count, "freed": freed, "kernel": running[0], "message": message}

        await self.answer(work)


class DiffHandler(DurableHandler):
    """``GET ...?a=ID&b=ID``: names added, removed and changed from checkpoint A to B
    (default: B the newest; neither: the last two)."""

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        async def work() -> dict[str, Any]:
            name = self.notebook_path(path)
            a = _checkpoint_id(self.get_argument("a", None), "a")
            b = _checkpoint_id(self.get_argument("b", None), "b")
            return await asyncio.to_thread(notebook_diff, self.root, name, a, b)

        await self.answer(work)


class RestoreHandler(DurableHandler):
    """``POST {"checkpoint": ID}``: into the running kernel, or as what the next kernel loads."""

    @web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        async def work() -> dict[str, Any]:
            name = self.notebook_path(path)
            gen = self._requested()
            running = await self.running_kernel(name)
            if running is None:
                return await asyncio.to_thread(make_newest, self.root, name, gen)
            # Checked here too, so that a wrong id is a 404 like without a kernel.
            await asyncio.to_thread(lambda: _kept(_notebook(_store(), os_path(self.root, name), name), gen, name))
            message = await self.through_kernel(name, *running, f"restore {gen}")
            nb = await asyncio.to_thread(lambda: _store().notebook(os_path(self.root, name)))
            newest = nb.checkpoint_ids()
            return {
                "path": name,
                "restored": gen,
                "checkpoint": newest[0] if newest else None,
                "kernel": running[0],
                "message": message,
            }

        await self.answer(work)

    def _requested(self) -> int:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            raise Refused(400, 'the body must be JSON: {"checkpoint": ID}') from None
        gen = body.get("checkpoint") if isinstance(body, dict) else None
        if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
            raise Refused(400, 'the body must name a checkpoint: {"checkpoint": ID}, ID a number')
        return gen
