"""Jupyter Server extension: a notebook's checkpoints follow it when the server renames or moves it,
and the REST API under ``/api/durable/`` (``serverapi.py``) shows, restores and clears them.

JupyterLab renames through the server's contents API (``Untitled.ipynb`` on its
first save, the file browser's rename and drag-and-drop moves), and the server
emits a contents event for each.  A kernel started afterwards for the new path
(after a shutdown, or on another day) must find the state saved under the old
one: this listener moves it, as ``durable-kernel mv`` would.  A rename while a
kernel runs is also handled by the kernel itself at its next restart (it finds
the state its own session saved under the old name).

Enabled by installing the package (``etc/jupyter/jupyter_server_config.d``).
The store is the kernel's default one, or ``$DURABLE_KERNEL_DIR``.  The server
never unpickles anything: moving reads and re-signs manifests only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

CONTENTS_EVENTS = "https://events.jupyter.org/jupyter_server/contents_service/v1"

log = logging.getLogger(__name__)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "durable_kernel.serverext"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .serverapi import handlers

    root = os.path.abspath(os.path.expanduser(serverapp.contents_manager.root_dir))

    async def on_contents_event(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        if data.get("action") != "rename" or not data.get("source_path") or not data.get("path"):
            return
        old, new = os_path(root, data["source_path"]), os_path(root, data["path"])
        try:
            await asyncio.to_thread(follow_rename, old, new)
        except Exception:  # never break the server's rename
            serverapp.log.exception("durable-kernel: moving the saved state of %s to %s failed", old, new)

    serverapp.event_logger.add_listener(schema_id=CONTENTS_EVENTS, listener=on_contents_event)
    serverapp.web_app.add_handlers(".*$", handlers(serverapp.base_url, root))
    serverapp.log.info("durable-kernel: saved state follows notebooks renamed or moved in %s", root)
    serverapp.log.info("durable-kernel: checkpoints API at %sapi/durable/notebooks", serverapp.base_url)


def os_path(root: str, api_path: str) -> str:
    """The path a kernel for this notebook gets as its identity (jupyter_server's JPY_SESSION_NAME)."""
    parts = [p for p in api_path.strip("/").split("/") if p]
    return os.path.join(root, *parts)


def api_path(root: str, identity: str | None) -> str | None:
    """The contents-API path of a stored identity under ``root``; None for one elsewhere."""
    if not identity or not os.path.isabs(identity):
        return None
    prefix = root.rstrip(os.sep) + os.sep
    if not identity.startswith(prefix):
        return None
    return "/".join(identity[len(prefix) :].split(os.sep))


def follow_rename(old: str, new: str) -> list[str]:
    """Move the saved state of notebook ``old`` (or of every notebook under folder ``old``)
    to its new path; returns the identities moved."""
    from durable_kernel.checkpoints import inventory, maintenance
    from durable_kernel.checkpoints.location import open_store

    store = open_store(create_key=False)
    if store.key_problem or not store.root.is_dir():
        return []
    moved = []
    prefix = old.rstrip(os.sep) + os.sep
    for stored in inventory.newest_checkpoints(store):
        if stored.identity == old:
            target = new
        elif stored.identity.startswith(prefix):
            target = os.path.join(new, stored.identity[len(prefix) :])
        else:
            continue
        maintenance.move(store, inventory.notebook_at(store, stored.folder, stored.identity), target)
        log.info("durable-kernel: saved state of %s moved to %s", stored.identity, target)
        moved.append(stored.identity)
    return moved
