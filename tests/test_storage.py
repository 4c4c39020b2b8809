"""Storage: the same semantics on local disk and S3 (a real moto server on loopback), plus the
S3 hardening (retries, multipart, verified uploads, conditional-write probe, redaction)
exercised through a fault-injecting proxy in front of that server."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from engine.core.errors import ConflictError, IntegrityError, NotFoundError, StorageError
from engine.core.storage import (
    LocalStore,
    MiB,
    RedactingFilter,
    S3Store,
    open_store,
    probe_conditional_writes,
    redact,
    require_conditional_writes,
    sha256_bytes,
)
from tests.s3_faults import Fault, S3FaultProxy

SECRET = "testing-secret-value"  # the conftest's AWS_SECRET_ACCESS_KEY for the moto server
KEY_ID = "testing-key-id"


# --------------------------------------------------------------------------------------------
# same suite on both backends
# --------------------------------------------------------------------------------------------


def test_roundtrip_list_and_delete(any_store_uri):
    store = open_store(any_store_uri)
    store.write_bytes("a/b/c.bin", b"one")
    store.write_json("a/x.json", {"k": 1})
    store.write_bytes("ab/c", b"no prefix match")
    assert store.read_bytes("a/b/c.bin") == b"one"
    assert store.read_json("a/x.json") == {"k": 1}
    assert store.list("a") == ["a/b/c.bin", "a/x.json"]
    assert store.list("a/x.json") == ["a/x.json"]
    infos = store.list_info("a")
    assert [(i.key, i.size) for i in infos] == [("a/b/c.bin", 3), ("a/x.json", len(store.read_bytes("a/x.json")))]
    assert all(abs(i.mtime - time.time()) < 120 for i in infos)
    assert store.exists("a/b/c.bin") and not store.exists("a/b/none")
    assert store.size("a/b/c.bin") == 3
    assert store.sha256("a/b/c.bin") == sha256_bytes(b"one")
    with pytest.raises(NotFoundError):
        store.read_bytes("a/missing")
    assert store.delete_prefix("a") == 2
    assert store.list("a") == [] and store.list() == ["ab/c"]


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "s3://other-bucket/k", "a\\b", ""])
def test_keys_that_escape_the_store_are_refused(any_store_uri, bad):
    store = open_store(any_store_uri)
    with pytest.raises(IntegrityError):
        store.write_bytes(bad, b"x")


def test_upload_file_returns_verified_sha256(any_store_uri, tmp_path):
    store = open_store(any_store_uri)
    data = os.urandom(100_000)
    src = tmp_path / "shard.bin"
    src.write_bytes(data)
    assert store.upload_file("v/shard.bin", src) == sha256_bytes(data)
    assert store.read_bytes("v/shard.bin") == data
    # A caller that knows the checksum the file must have is told when it does not.
    with pytest.raises(IntegrityError, match="expected"):
        store.upload_file("v/other.bin", src, sha256="0" * 64)


def test_compare_and_swap(any_store_uri):
    store = open_store(any_store_uri)
    e1 = store.put_if_absent("p.json", b"1")
    with pytest.raises(ConflictError):
        store.put_if_absent("p.json", b"2")
    current = store.get_versioned("p.json")
    assert current is not None and current.data == b"1" and current.etag == e1
    e2 = store.put_if_match("p.json", b"2", e1)
    with pytest.raises(ConflictError):
        store.put_if_match("p.json", b"3", e1)  # stale
    with pytest.raises(ConflictError):
        store.delete_if_match("p.json", e1)
    store.delete_if_match("p.json", e2)
    assert store.get_versioned("p.json") is None


def test_sixteen_racing_creators_one_winner(any_store_uri):
    store = open_store(any_store_uri)
    wins, conflicts = [], []
    barrier = threading.Barrier(16)

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.put_if_absent("race.json", f"writer {i}".encode())
            wins.append(i)
        except ConflictError:
            conflicts.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 15
    assert store.read_bytes("race.json") == f"writer {wins[0]}".encode()


def test_probe_passes_on_both_backends(any_store_uri):
    store = open_store(any_store_uri)
    report = probe_conditional_writes(store)
    assert report.ok, report.problems
    assert report.if_none_match and report.if_match
    assert store.list() == []  # the probe cleans up after itself
    assert require_conditional_writes(store).ok


def test_local_delete_prefix_removes_directories(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.write_bytes("v/1/a", b"x")
    store.put_if_absent("v/1/p.json", b"y")  # leaves a lock file beside it
    store.delete_prefix("v/1")
    assert not (tmp_path / "s" / "v" / "1").exists()


# --------------------------------------------------------------------------------------------
# S3 hardening through a real endpoint (and a fault proxy in front of it)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def proxy(s3_endpoint):
    with S3FaultProxy(s3_endpoint) as p:
        yield p


def _proxied(bucket_uri: str, proxy: S3FaultProxy, **kw) -> S3Store:
    return S3Store(bucket_uri + "/store", endpoint_url=proxy.url, **kw)


@pytest.mark.s3
def test_multipart_upload_is_verified_part_by_part(s3_bucket, proxy, tmp_path):
    store = _proxied(s3_bucket, proxy, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = os.urandom(11 * MiB + 123)  # 3 parts: 5 + 5 + 1 MiB
    src = tmp_path / "big.faiss"
    src.write_bytes(data)
    assert store.upload_file("big.faiss", src) == sha256_bytes(data)
    parts = [path for method, path, status in proxy.log if method == "PUT" and "partNumber=" in path]
    assert len(parts) == 3
    assert any(method == "POST" and "uploads" in path for method, path, _ in proxy.log)
    assert store.sha256("big.faiss") == sha256_bytes(data)
    # One part answered 503 once: the part is retried and the upload still verifies.
    proxy.add(Fault(method="PUT", path_re=r"partNumber=2", status=503, code="SlowDown"))
    assert store.upload_file("big2.faiss", src) == sha256_bytes(data)
    assert proxy.injected == 1


@pytest.mark.s3
def test_upload_detects_bytes_damaged_by_the_store(s3_bucket, proxy, tmp_path):
    store = _proxied(s3_bucket, proxy)
    src = tmp_path / "shard.bin"
    src.write_bytes(os.urandom(50_000))
    # The proxy flips a byte and drops the checksum headers, so the endpoint keeps bad bytes
    # and reports no SHA-256: the read-back comparison must catch it.
    proxy.add(Fault(method="PUT", action="corrupt"))
    with pytest.raises(IntegrityError, match="corrupt"):
        store.upload_file("shard.bin", src)


@pytest.mark.s3
@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (502, "BadGateway")])
def test_throttling_and_5xx_are_retried_with_backoff(s3_bucket, proxy, status, code):
    store = _proxied(s3_bucket, proxy)
    proxy.add(Fault(method="PUT", status=status, code=code, times=2))
    proxy.add(Fault(method="GET", status=status, code=code, times=2))
    store.write_bytes("k.json", b"payload")
    assert store.read_bytes("k.json") == b"payload"
    puts = [s for m, p, s in proxy.log if m == "PUT"]
    assert puts == [status, status, 200]
    gets = [s for m, p, s in proxy.log if m == "GET"]
    assert gets == [status, status, 200]


@pytest.mark.s3
def test_retries_give_up_with_a_clear_error(s3_bucket, proxy):
    store = _proxied(s3_bucket, proxy, max_attempts=3)
    proxy.add(Fault(method="PUT", status=503, code="SlowDown", times=10))
    with pytest.raises(StorageError, match="3 attempts") as info:
        store.write_bytes("k.json", b"payload")
    assert [m for m, _, _ in proxy.log].count("PUT") == 3
    assert SECRET not in str(info.value) and KEY_ID not in str(info.value)


@pytest.mark.s3
def test_lost_response_to_a_conditional_write_still_counts_as_ours(s3_bucket, proxy):
    """The first attempt lands, its response is lost, botocore retries, the retry gets 412:
    the store must notice the object holds its own bytes and report success, not a conflict."""
    store = _proxied(s3_bucket, proxy)
    proxy.add(Fault(method="PUT", action="drop"))
    etag = store.put_if_absent("alias.json", b'{"nonce": "a"}')
    assert [s for m, _, s in proxy.log if m == "PUT"] == [-1, 412]
    proxy.add(Fault(method="PUT", action="drop"))
    etag2 = store.put_if_match("alias.json", b'{"nonce": "b"}', etag)
    assert store.get_versioned("alias.json").etag == etag2
    # ...but somebody else's bytes are still a conflict.
    with pytest.raises(ConflictError):
        store.put_if_absent("alias.json", b'{"nonce": "c"}')


@pytest.mark.s3
def test_probe_detects_an_endpoint_that_ignores_conditional_writes(s3_bucket, proxy):
    store = _proxied(s3_bucket, proxy)
    assert probe_conditional_writes(store).ok
    proxy.strip_conditionals = True  # now it behaves like a store that ignores If-None-Match/If-Match
    report = probe_conditional_writes(store)
    assert not report.ok
    assert not report.if_none_match and not report.if_match
    assert any("If-None-Match" in p for p in report.problems)
    with pytest.raises(StorageError, match="Refusing to publish"):
        require_conditional_writes(store, refresh=True)


@pytest.mark.s3
def test_errors_name_the_bucket_never_the_credentials(s3_endpoint):
    store = open_store("s3://no-such-bucket-xyz/p", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError) as info:
        store.write_bytes("k", b"x")
    assert "no-such-bucket-xyz" in str(info.value)
    dead = open_store("s3://b/p", endpoint_url="http://user:pw-secret-1234@127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError) as info:
        dead.read_bytes("k")
    for text in (SECRET, KEY_ID, "pw-secret-1234"):
        assert text not in str(info.value)
    with pytest.raises(StorageError, match="never inside the URI"):
        open_store("s3://AKIAXXXX:secretvalue@bucket/p")


def test_redaction_of_messages_and_log_records(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-456")
    text = ("failed with very-secret-value-123 at http://u:p@host/x "
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/2026/s3, Signature=abcdef "
            "X-Amz-Security-Token: session-token-value-456")
    clean = redact(text)
    for leaked in ("very-secret-value-123", "session-token-value-456", "u:p@", "AKIAEXAMPLE", "abcdef"):
        assert leaked not in clean
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", ("very-secret-value-123",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "key ***"
