"""Publish, rollback, status and gc: the same suite on local disk and on a real S3 endpoint
(moto server on loopback), plus the CLI verbs and crash safety with real process deaths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.app import cli
from engine.core import layout
from engine.core.errors import ConfigError, ConflictError, IntegrityError, NotFoundError, StorageError
from engine.core.storage import Store, join, open_store
from engine.index.verify import verify_version
from engine.publish.aliases import alias_history, publish_version, read_alias, rollback_alias, route_bucket
from engine.publish.gc import gc_index
from engine.publish.status import index_status
from tests.s3_faults import S3FaultProxy
from tests.version_utils import Versions, versions_in

IDX = "docs"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(any_store_uri) -> Store:
    return open_store(any_store_uri)


@pytest.fixture
def v(store) -> Versions:
    """Real index versions built on demand: v["v1"] is the id of a version built for name v1."""
    return Versions(store, IDX)


# --------------------------------------------------------------------------------------------
# publish and history
# --------------------------------------------------------------------------------------------


def test_publish_swaps_and_records_history(store, v):
    r1 = publish_version(store, IDX, v["v1"], "live", reason="first")
    assert (r1.changed, r1.generation, r1.version, r1.previous) == (True, 1, v["v1"], None)
    r2 = publish_version(store, IDX, v["v2"], "live", expect_current=v["v1"], reason="refresh", by="alice@ci")
    assert (r2.generation, r2.version, r2.previous) == (2, v["v2"], v["v1"])
    state = read_alias(store, IDX, "live")
    assert state.version == v["v2"] and state.generation == 2 and state.weighted is None
    doc = store.read_json(layout.alias_key(IDX, "live"))
    assert doc["version"] == v["v2"] and doc["generation"] == 2 and doc["weighted"] is None
    history = alias_history(store, IDX, "live")
    assert [(h["generation"], h["from"], h["to"], h["action"]) for h in history] == \
        [(1, None, v["v1"], "publish"), (2, v["v1"], v["v2"], "publish")]
    assert history[1]["by"] == "alice@ci" and history[1]["why"] == "refresh" and history[1]["when"]
    assert store.exists(layout.alias_history_key(IDX, "live", 2))


def test_republishing_the_live_version_changes_nothing(store, v):
    publish_version(store, IDX, v["v1"])
    again = publish_version(store, IDX, v["v1"])
    assert not again.changed and again.generation == 1
    assert len(alias_history(store, IDX, "live")) == 1


def test_expect_current_mismatch_is_a_conflict(store, v):
    publish_version(store, IDX, v["v1"])
    with pytest.raises(ConflictError, match="not the expected v0"):
        publish_version(store, IDX, v["v2"], expect_current="v0")
    assert read_alias(store, IDX).version == v["v1"]


def test_two_racing_publishers_exactly_one_wins(any_store_uri):
    """Both publishers read generation 1, verify, then swap at the same moment."""
    setup = open_store(any_store_uri)
    v = Versions(setup, IDX)
    publish_version(setup, IDX, v["v1"])
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def verify_then_wait(store: Store, index: str, version: str) -> dict:
        manifest = verify_version(store, index, version)
        barrier.wait(timeout=30)  # both have read the alias and verified: now race the swap
        return manifest

    def publisher(version: str) -> None:
        store = open_store(any_store_uri)  # its own client, as another process would have
        try:
            outcome[version] = publish_version(store, IDX, version, verifier=verify_then_wait)
        except ConflictError as err:
            outcome[version] = err

    threads = [threading.Thread(target=publisher, args=(v[n],)) for n in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = [o for o in outcome.values() if isinstance(o, ConflictError)]
    wins = [o for o in outcome.values() if not isinstance(o, Exception)]
    assert len(wins) == 1 and len(errors) == 1
    winner = wins[0].version
    loser = ({v["v2"], v["v3"]} - {winner}).pop()
    message = str(errors[0])
    assert loser in message and winner in message and "nothing was changed" in message
    assert read_alias(setup, IDX).version == winner
    history = alias_history(setup, IDX, "live")
    assert [h["generation"] for h in history] == [1, 2]
    assert history[1]["to"] == winner and history[1]["from"] == v["v1"]


# --------------------------------------------------------------------------------------------
# refusing broken versions
# --------------------------------------------------------------------------------------------


def damage(store: Store, v: Versions, name: str, how: str) -> None:
    """Damage a version in one of the ways a publish (and a searcher) must refuse."""
    shard = v.artifact(name, ".faiss")
    mkey = layout.version_manifest_key(IDX, v[name])
    if how == "corrupt":
        data = bytearray(store.read_bytes(shard))
        data[len(data) // 2] ^= 0xFF  # same size, different bytes
        store.write_bytes(shard, bytes(data))
    elif how == "truncated":
        store.write_bytes(shard, store.read_bytes(shard)[:-7])
    elif how == "missing":
        store.delete(shard)
    elif how == "no-manifest":
        store.delete(mkey)
    else:  # a manifest key pointing outside the version prefix
        manifest = store.read_json(mkey)
        manifest["artifacts"][0]["key"] = how
        store.write_json(mkey, manifest)


BREAKS = ["corrupt", "truncated", "missing", "no-manifest", "../v1/shards/shard-00000.faiss",
          "../../other/versions/x/manifest.json", "/etc/passwd", "s3://another-bucket/x.bin", "shards/../../../v1/x"]


@pytest.mark.parametrize("how", BREAKS)
def test_publish_refuses_a_broken_version(store, v, how):
    publish_version(store, IDX, v["v1"])
    damage(store, v, "v2", how)
    with pytest.raises((IntegrityError, NotFoundError)):
        publish_version(store, IDX, v["v2"])
    assert read_alias(store, IDX).version == v["v1"]
    assert len(alias_history(store, IDX, "live")) == 1


def test_weighted_publish_verifies_both_versions(store, v):
    publish_version(store, IDX, v["v1"])
    v["v2"]
    damage(store, v, "v1", "corrupt")
    with pytest.raises(IntegrityError):
        publish_version(store, IDX, v["v2"], weighted={"green_weight": 10})


# --------------------------------------------------------------------------------------------
# rollback
# --------------------------------------------------------------------------------------------


def test_rollback_previous_named_and_refusals(store, v):
    with pytest.raises(NotFoundError):
        rollback_alias(store, IDX)  # no alias yet
    publish_version(store, IDX, v["v1"])
    with pytest.raises(NotFoundError, match="no previous version"):
        rollback_alias(store, IDX)
    publish_version(store, IDX, v["v2"])
    publish_version(store, IDX, v["v3"])
    r = rollback_alias(store, IDX, reason="bad canary")
    assert (r.action, r.version, r.previous, r.generation) == ("rollback", v["v2"], v["v3"], 4)
    r = rollback_alias(store, IDX)  # undo the undo
    assert r.version == v["v3"] and r.generation == 5
    r = rollback_alias(store, IDX, to=v["v1"])
    assert r.version == v["v1"] and r.generation == 6
    with pytest.raises(NotFoundError, match="never appears in the history"):
        rollback_alias(store, IDX, to="v9")
    history = alias_history(store, IDX, "live")
    assert [(h["from"], h["to"], h["action"]) for h in history] == [
        (None, v["v1"], "publish"), (v["v1"], v["v2"], "publish"), (v["v2"], v["v3"], "publish"),
        (v["v3"], v["v2"], "rollback"), (v["v2"], v["v3"], "rollback"), (v["v3"], v["v1"], "rollback")]
    assert history[3]["why"] == "bad canary"
    # A version named in the history but since damaged is refused like a publish.
    damage(store, v, "v2", "missing")
    with pytest.raises(IntegrityError):
        rollback_alias(store, IDX, to=v["v2"])
    assert read_alias(store, IDX).version == v["v1"]


# --------------------------------------------------------------------------------------------
# weighted (blue/green) aliases
# --------------------------------------------------------------------------------------------


def test_weighted_rollout_routing_is_sticky_and_monotone(store, v):
    v1, v2 = v["v1"], v["v2"]
    publish_version(store, IDX, v1)
    r = publish_version(store, IDX, v2, weighted={"green_weight": 20}, reason="canary 20%")
    assert r.version == v1 and r.weighted == {"blue": v1, "green": v2, "green_weight": 20}
    state = read_alias(store, IDX)
    doc = store.read_json(layout.alias_key(IDX, "live"))
    assert doc["version"] == v1 and doc["weighted"] == {"blue": v1, "green": v2, "green_weight": 20}
    keys = [f"user-{i}" for i in range(4000)]
    at20 = {k: state.target.route(IDX, k) for k in keys}
    share = Counter(at20.values())[v2] / len(keys)
    assert 0.17 < share < 0.23
    assert all(state.target.route(IDX, k) == at20[k] for k in keys[:200])  # sticky
    publish_version(store, IDX, v2, weighted={"green_weight": 50}, expect_current=v1)
    target50 = read_alias(store, IDX).target
    at50 = {k: target50.route(IDX, k) for k in keys[:500]}
    assert all(at50[k] == v2 for k in keys[:500] if at20[k] == v2)  # raising the weight only adds green keys
    assert all(0 <= route_bucket(IDX, k) < 100 for k in keys[:50])
    # Abort one step: back to 20%; then cut over to v2.
    rb = rollback_alias(store, IDX)
    assert rb.weighted == {"blue": v1, "green": v2, "green_weight": 20}
    cut = publish_version(store, IDX, v2, reason="cutover")
    assert cut.version == v2 and cut.weighted is None
    history = alias_history(store, IDX, "live")
    assert history[1]["to_weighted"] == {"blue": v1, "green": v2, "green_weight": 20}
    assert history[-1]["from_weighted"] == {"blue": v1, "green": v2, "green_weight": 20}


def test_weighted_needs_two_versions_and_a_valid_weight(store, v):
    with pytest.raises(ConfigError, match="needs a blue"):
        publish_version(store, IDX, v["v1"], weighted={"green_weight": 10})
    publish_version(store, IDX, v["v1"])
    with pytest.raises(ConfigError, match="two different"):
        publish_version(store, IDX, v["v1"], weighted={"green_weight": 10})
    with pytest.raises(ConfigError, match="percentage"):
        publish_version(store, IDX, v["v2"], weighted={"green_weight": 120})
    r = publish_version(store, IDX, v["v3"], weighted={"blue": v["v2"], "green_weight": 5})
    assert r.weighted == {"blue": v["v2"], "green": v["v3"], "green_weight": 5}


# --------------------------------------------------------------------------------------------
# status and gc
# --------------------------------------------------------------------------------------------


def test_status_lists_versions_aliases_weights_history(store, v):
    for n in ("v1", "v2", "v3", "v4"):
        v[n]
    store.delete(layout.version_manifest_key(IDX, v["v4"]))  # an upload that never finished
    publish_version(store, IDX, v["v1"])
    publish_version(store, IDX, v["v2"], weighted={"green_weight": 5})
    publish_version(store, IDX, v["v3"], "staging")
    st = index_status(store, IDX)
    rows = {r["version"]: r for r in st["versions"]}
    assert set(rows) == {v["v1"], v["v2"], v["v3"], v["v4"]}
    assert rows[v["v1"]]["aliases"] == ["live"] and rows[v["v2"]]["aliases"] == ["live"]
    assert rows[v["v3"]]["aliases"] == ["staging"] and rows[v["v4"]]["complete"] is False
    assert rows[v["v1"]]["model"] == "hash:16" and rows[v["v1"]]["dim"] == 16
    live = st["aliases"]["live"]
    assert live["weighted"] == {"blue": v["v1"], "green": v["v2"], "green_weight": 5} and live["generation"] == 2
    assert [h["generation"] for h in live["history"]] == [2, 1]  # newest first
    with pytest.raises(NotFoundError):
        index_status(store, "no-such-index")


def test_gc_keeps_what_aliases_and_retained_history_can_reach(store, v):
    for n in ("v1", "v2", "v3", "v4", "v5", "v6"):
        v[n]
    for n in ("v1", "v2", "v3", "v4"):
        publish_version(store, IDX, v[n])
    store.delete(layout.version_manifest_key(IDX, v["v6"]))  # a fresh, unfinished upload
    dry = gc_index(store, IDX, keep=1, dry_run=True)
    # keep=1: generation 4 (v3 -> v4) is retained, so v3 and v4 stay; v5 and v6 were never
    # published and are younger than the grace period.
    assert {r["version"] for r in dry.deleted} == {v["v1"], v["v2"]}
    assert versions_in(store, IDX) == set(v.values())  # a dry run deletes nothing
    before = set(store.list(join(layout.index_prefix(IDX), "aliases")))
    rep = gc_index(store, IDX, keep=1, grace_s=0)
    assert {r["version"] for r in rep.deleted} == {v["v1"], v["v2"], v["v5"], v["v6"]}
    assert versions_in(store, IDX) == {v["v3"], v["v4"]}
    assert set(store.list(join(layout.index_prefix(IDX), "aliases"))) == before  # aliases, history untouched
    rollback_alias(store, IDX)  # the retained record still works
    with pytest.raises(NotFoundError):
        rollback_alias(store, IDX, to=v["v1"])  # its version is gone: refused, alias unchanged
    assert read_alias(store, IDX).version == v["v3"]


def test_gc_keeps_both_versions_of_a_weighted_alias(store, v):
    publish_version(store, IDX, v["v1"])
    publish_version(store, IDX, v["v2"])
    publish_version(store, IDX, v["v3"], weighted={"green_weight": 10})  # blue v2, green v3
    rep = gc_index(store, IDX, keep=0, grace_s=0)
    assert [r["version"] for r in rep.deleted] == [v["v1"]]
    assert versions_in(store, IDX) == {v["v2"], v["v3"]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        from engine.core.errors import EmbedctlError

        if isinstance(result.exception, EmbedctlError):
            return result.exception.exit_code, result.stdout, str(result.exception)
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_verbs(any_store_uri):
    store = open_store(any_store_uri)
    v = Versions(store, IDX)
    v1, v2, v3 = v["v1"], v["v2"], v["v3"]
    base = ["--store", any_store_uri, "--index", IDX]
    code, out, _ = run_cli("publish", *base, "--version", v1, "--json")
    assert code == 0 and json.loads(out)["generation"] == 1
    code, out, _ = run_cli("publish", *base, "--version", v2, "--reason", "nightly")
    assert code == 0 and f"{v1} -> {v2}" in out
    code, _, err = run_cli("publish", *base, "--version", v3, "--expect-current", v1)
    assert code == ConflictError.exit_code and f"not the expected {v1}" in err
    code, out, _ = run_cli("publish", *base, "--version", v3, "--green-weight", "25")
    assert code == 0 and "25" in out
    code, out, _ = run_cli("status", *base, "--json")
    st = json.loads(out)
    assert st["aliases"]["live"]["weighted"]["green"] == v3
    code, out, _ = run_cli("status", *base)
    assert code == 0 and f"live -> {v2} (75%) + {v3} (25%)" in out and "nightly" in out
    code, out, _ = run_cli("rollback", *base, "--json")
    assert code == 0 and json.loads(out)["version"] == v2 and json.loads(out)["weighted"] is None
    code, out, _ = run_cli("rollback", *base, "--to", v1)
    assert code == 0 and f"{v2} -> {v1}" in out
    code, out, _ = run_cli("gc", *base, "--keep", "0", "--dry-run", "--grace", "0")
    assert code == 0 and f"would delete {v2}" in out and f"would delete {v3}" in out
    assert versions_in(store, IDX) == {v1, v2, v3}
    code, out, _ = run_cli("gc", *base, "--keep", "0", "--grace", "0", "--json")
    assert {r["version"] for r in json.loads(out)["deleted"]} == {v2, v3}
    code, out, _ = run_cli("doctor", "--store", any_store_uri, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def embedctl(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "engine.cli.app", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"embedctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


# --------------------------------------------------------------------------------------------
# crash safety (real process deaths at each step) and gc of the leftovers
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["publish.after-artifacts", "publish.before-swap", "publish.after-swap"])
def test_crash_during_publish_leaves_a_complete_alias(any_store_uri, tmp_path, failpoint):
    build = open_store(tmp_path / "build")  # versions are built locally, published with --from
    v = Versions(build, IDX)
    store = open_store(any_store_uri)
    base = ["--store", any_store_uri, "--index", IDX, "--from", str(tmp_path / "build")]
    embedctl("publish", *base, "--version", v["v1"], check=True)
    proc = embedctl("publish", *base, "--version", v["v2"], env={"EMBEDCTL_FAILPOINT": failpoint})
    assert proc.returncode == 97, proc.stderr  # died at the failpoint
    assert v["v2"] in versions_in(store, IDX)  # its shards were uploaded
    state = read_alias(store, IDX)
    if failpoint == "publish.after-swap":
        # The swap happened, its history record did not: the alias is on v2 (complete,
        # verified), and the next reader repairs the record byte-for-byte.
        assert state.version == v["v2"]
        assert not store.exists(layout.alias_history_key(IDX, "live", 2))
        assert [h["to"] for h in index_status(store, IDX)["aliases"]["live"]["history"]] == [v["v2"], v["v1"]]
    else:
        assert state.version == v["v1"] and state.generation == 1
        verify_version(store, IDX, v["v1"])  # the old version is complete and intact
    # The next publish succeeds.
    embedctl("publish", *base, "--version", v["v3"], check=True)
    assert read_alias(store, IDX).version == v["v3"]
    history = alias_history(store, IDX, "live")
    assert [h["generation"] for h in history] == list(range(1, len(history) + 1))
    # gc removes what the crash left (v2's upload, when it was never published).
    rep = gc_index(store, IDX, keep=1, grace_s=0)
    if failpoint == "publish.after-swap":
        assert [r["version"] for r in rep.deleted] == [v["v1"]]
        assert versions_in(store, IDX) == {v["v2"], v["v3"]}
    else:
        assert [r["version"] for r in rep.deleted] == [v["v2"]]
        assert versions_in(store, IDX) == {v["v1"], v["v3"]}


def test_publish_from_another_store_uploads_then_swaps(any_store_uri, tmp_path):
    build = open_store(tmp_path / "build")
    v = Versions(build, IDX)
    store = open_store(any_store_uri)
    res = publish_version(store, IDX, v["v1"], source=build)
    assert res.changed
    mkey = layout.version_manifest_key(IDX, v["v1"])
    assert store.read_bytes(mkey) == build.read_bytes(mkey)
    verify_version(store, IDX, v["v1"])
    # Same id, different content: versions are immutable.
    manifest = build.read_json(mkey)
    manifest["created_at"] = "2000-01-01T00:00:00Z"
    build.write_json(mkey, manifest)
    with pytest.raises(IntegrityError, match="immutable"):
        publish_version(store, IDX, v["v1"], source=build)


# --------------------------------------------------------------------------------------------
# S3 specifics: conditional writes must be enforced; credentials never leak
# --------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_publish_refuses_an_endpoint_that_ignores_conditional_writes(s3_endpoint, s3_bucket):
    with S3FaultProxy(s3_endpoint) as proxy:
        proxy.strip_conditionals = True
        store = open_store(s3_bucket + "/p", endpoint_url=proxy.url)
        vid = Versions(store, IDX)["v1"]
        with pytest.raises(StorageError, match="Refusing to publish"):
            publish_version(store, IDX, vid)
        assert read_alias(store, IDX, missing_ok=True) is None
        proc = embedctl("publish", "--store", s3_bucket + "/p", "--endpoint-url", proxy.url, "--index", IDX,
                        "--version", vid)
        assert proc.returncode == StorageError.exit_code and "conditional writes" in proc.stderr
        proc = embedctl("doctor", "--store", s3_bucket + "/p", "--endpoint-url", proxy.url)
        assert proc.returncode == 8 and "If-None-Match" in proc.stdout


@pytest.mark.s3
@pytest.mark.slow
def test_credentials_never_appear_in_logs_manifests_or_errors(s3_endpoint, s3_bucket, tmp_path):
    secret = "SeCrEt-" + os.urandom(8).hex()
    key_id = "AKIA" + os.urandom(6).hex().upper()
    token = "ToKeN-" + os.urandom(12).hex()
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token,
           "EMBEDCTL_S3_ENDPOINT_URL": s3_endpoint}
    v = Versions(open_store(tmp_path / "build"), IDX)
    uri = s3_bucket + "/emb"
    outputs = []
    base = ["--store", uri, "--index", IDX]
    for args in (["publish", *base, "--from", str(tmp_path / "build"), "--version", v["v1"]],
                 ["publish", *base, "--from", str(tmp_path / "build"), "--version", v["v2"], "--reason", "r"],
                 ["rollback", *base], ["status", *base, "--json"], ["gc", *base, "--keep", "0", "--dry-run"],
                 ["doctor", "--store", uri],
                 ["publish", *base, "--version", "nope"],  # an error path
                 ["status", "--store", "s3://no-such-bucket-zz/x", "--index", IDX]):  # another
        proc = embedctl("-vv", *args, env=env)
        outputs.append(proc.stdout + proc.stderr)
    assert "DEBUG" in "".join(outputs)  # the logs really were verbose
    assert any("does not exist" in o or "not found" in o for o in outputs)
    # The endpoint URL with userinfo in it is redacted too.
    proc = embedctl("-vv", "status", *base, "--endpoint-url", f"http://{key_id}:{secret}@127.0.0.1:9", env=env)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode != 0
    store = open_store(uri, endpoint_url=s3_endpoint)
    stored = [store.read_bytes(k).decode(errors="replace") for k in store.list() if k.endswith(".json")]
    assert len(stored) >= 5  # manifests, alias, history
    for text in outputs + stored:
        for value in (secret, key_id, token):
            assert value not in text


def test_gc_grace_follows_a_running_build(tmp_path):
    """A never-published version is kept while its files, or the builder's state folder that
    names it, changed within the grace period; after that it is an orphan."""
    store = open_store(tmp_path / "store")
    v = Versions(store, IDX)
    publish_version(store, IDX, v["v1"])
    vid = v["v2"]  # built, never published
    old = time.time() - 7200
    for key in store.list(layout.version_prefix(IDX, vid)):
        os.utime(store.local_path(key), (old, old))
    builds = join(layout.index_prefix(IDX), "builds")
    state_keys = [k for k in store.list(builds) if k.endswith("state.json") and store.read_json(k)["version_id"] == vid]
    assert state_keys  # engine.index.build keeps its state there
    # The build folder was touched recently (a shard marker just landed): kept.
    rep = gc_index(store, IDX, keep=0, dry_run=True)
    assert [k["version"] for k in rep.kept if "never published" in k["why"]] == [vid]
    for key in store.list(state_keys[0].rsplit("/", 1)[0]):
        os.utime(store.local_path(key), (old, old))
    rep = gc_index(store, IDX, keep=0)
    assert [r["version"] for r in rep.deleted] == [vid]
    assert versions_in(store, IDX) == {v["v1"]}
