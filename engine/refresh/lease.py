"""The refresh lease (one refresh per index at a time) over the one lease helper, engine.core.lease."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from engine.core import layout
from engine.core import lease as leases
from engine.core.errors import ConflictError
from engine.core.lease import Lease, lease_state
from engine.core.storage import Store

log = logging.getLogger(__name__)

LEASE_WHAT = "refresh"


def acquire_lease(store: Store, index: str, *, ttl_s: float, info: dict[str, Any] | None = None,
                  break_lease: bool = False) -> Lease:
    """The refresh lease of ``index`` (one refresh per index at a time); see ``engine.core.lease``."""
    return leases.acquire_lease(store, index, ttl_s=ttl_s, info=info, break_lease=break_lease, what=LEASE_WHAT)


def acquire_lease_waiting(store: Store, index: str, *, ttl_s: float, wait_s: float, info: dict[str, Any],
                          break_lease: bool = False) -> Lease:
    """``acquire_lease``, retried while it is held for up to ``wait_s`` seconds (a retried cluster job)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return acquire_lease(store, index, ttl_s=ttl_s, info=info, break_lease=break_lease)
        except ConflictError:
            if time.monotonic() >= deadline:
                raise
            log.info("refresh lease of %s is held; waiting (up to %.0f s more)", index, deadline - time.monotonic())
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def describe_lease(store: Store, index: str) -> dict[str, Any] | None:
    """Who holds the refresh lease of ``index`` and whether it is stale (None when free): the dry run's view."""
    held = store.get_versioned(layout.lease_key(index, LEASE_WHAT))
    if held is None:
        return None
    doc = json.loads(held.data)
    stale, why = lease_state(doc)
    return {"held_by": doc.get("by"), "run_id": doc.get("run_id"), "stage": doc.get("stage"), "stale": stale,
            "state": why}
