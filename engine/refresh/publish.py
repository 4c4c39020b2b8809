"""The publish step of a refresh: the gates on the built version, then the CAS swap of the alias."""

from __future__ import annotations

from typing import Any

from engine.core.errors import ConflictError
from engine.refresh.diff import RefreshDiff
from engine.refresh.failpoints import stall_point
from engine.refresh.gates import canary_gate
from engine.refresh.state import RunningSession


def gate_and_publish(session: RunningSession, version_id: str, diff: RefreshDiff,
                     gates: dict[str, Any]) -> dict[str, Any]:
    """Run the canary gate beside the recall gate's verdict in ``gates``; publish when every gate passed."""
    st = session.state
    assert st is not None
    rcfg = session.rcfg
    stall_point("gates")
    t = session.clock()
    if rcfg.canary:
        gates["canary"] = canary_gate(session.store, rcfg.index, rcfg.canary, live_version=st.live.version_id,
                                      version_id=version_id, diff=diff, endpoint_url=rcfg.endpoint_url)
    session.timings["gate_seconds"] = session.clock() - t
    failed = [name for name, g in gates.items() if g and not g.get("passed")]
    if failed:
        return {"status": "gate_failed", "reason": f"gate(s) {', '.join(failed)} failed on version {version_id}; "
                f"alias {rcfg.publish_to or rcfg.from_alias!r} left on {st.live.version_id}"}
    if not rcfg.publish_to:
        return {"status": "built", "reason": f"no --publish-to: version {version_id} is built and gated; publish it "
                f"with embedctl publish --index {rcfg.index} --version {version_id} --alias {rcfg.from_alias}"}
    return publish(session, version_id, diff)


def publish(session: RunningSession, version_id: str, diff: RefreshDiff) -> dict[str, Any]:
    """The CAS swap (expecting the alias still on the version we diffed against)."""
    from engine.publish.aliases import publish_version

    st = session.state
    rcfg = session.rcfg
    assert st is not None and rcfg.publish_to
    session.stage("publish")
    stall_point("publish")
    if session.keeper is not None:
        session.keeper.check()  # fencing: a refresh that lost its lease must not publish
    t = session.clock()
    expect = st.live.version_id if rcfg.publish_to == rcfg.from_alias else None
    d = diff.docs
    reason = (f"refresh {st.run_id}: {d['changed']} changed, {d['new']} new, {d['deleted']} deleted docs "
              f"(from {st.live.version_id})")
    try:
        res = publish_version(session.store, rcfg.index, version_id, rcfg.publish_to, expect_current=expect,
                              reason=reason)
    except ConflictError as err:
        session.timings["publish_seconds"] = session.clock() - t
        return {"status": "conflict", "published": False,
                "reason": f"alias {rcfg.publish_to!r} moved while the refresh ran ({err}); version "
                          f"{version_id} is built but not published: rerun the refresh to rebase on the new live "
                          "version, or publish it yourself"}
    session.timings["publish_seconds"] = session.clock() - t
    return {"status": "published", "published": True, "reason": None,
            "publish": {"alias": res.alias, "version": res.version, "generation": res.generation,
                        "previous": res.previous, "changed": res.changed}}
