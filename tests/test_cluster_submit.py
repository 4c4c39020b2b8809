"""`embedctl submit` and `embedctl jobs` against a real Ray head on loopback (the Jobs API).

One head per module, started with `ray start --head --block` in its own process group, its own
--temp-dir and free ports, bound to 127.0.0.1: it never touches the session's other local Ray
(no `ray stop`, which would kill every Ray on the machine). Teardown SIGKILLs that process
group (Ray's processes ignore SIGTERM) and anything else whose command line names our temp dir.

The unit tests at the top need no cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine import OFFLINE_ENV
from engine.cli import cluster as cl
from engine.cli.app import cli
from engine.core.errors import ConfigError, EmbedctlError
from tests.conftest import REPO, free_port

VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_parse_summary_takes_the_last_marker_line() -> None:
    logs = "\n".join([
        "starting",
        'EMBEDCTL_SUMMARY {"rows": 1}',
        "(MapWorker pid=12) EMBEDCTL_SUMMARY is a word in a worker log",
        'EMBEDCTL_SUMMARY {"rows": 2, "status": "succeeded"}',
        "2026-11-27 INFO worker shut down",
    ])
    assert cl.parse_summary(logs) == {"rows": 2, "status": "succeeded"}
    assert cl.parse_summary("no summary here\n") is None


def test_parse_summary_rejects_a_malformed_line() -> None:
    with pytest.raises(EmbedctlError, match="malformed summary"):
        cl.parse_summary("EMBEDCTL_SUMMARY {not json")
    with pytest.raises(EmbedctlError, match="not a JSON object"):
        cl.parse_summary("EMBEDCTL_SUMMARY [1, 2]")


def test_job_names_and_addresses() -> None:
    assert cl.job_script("build-index") == "jobs/build_index.py"
    assert cl.job_script("mine_negatives") == "jobs/mine_negatives.py"
    with pytest.raises(ConfigError, match="unknown job"):
        cl.job_script("train")
    assert cl.normalize_address("head:8265/") == "http://head:8265"
    assert cl.normalize_address("https://ray.example.com") == "https://ray.example.com"
    with pytest.raises(ConfigError, match="Ray Client address"):
        cl.normalize_address("ray://head:10001")
    assert cl.parse_env_pairs(["A=1", "B_C=x=y"]) == {"A": "1", "B_C": "x=y"}
    with pytest.raises(ConfigError):
        cl.parse_env_pairs(["novalue"])


def test_runtime_env_precedence_and_staging(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("corpus: s3://bucket/corpus\n")
    staged = tmp_path / "staged"
    staged.mkdir()
    rel = cl.stage_working_dir(config, staged)
    assert rel == "embedctl-config/job.yaml"
    assert (staged / rel).read_text() == config.read_text()
    assert (staged / "engine" / "cli" / "app.py").exists() and (staged / "jobs" / "__init__.py").exists()
    assert not list(staged.rglob("__pycache__"))

    base = cl.load_runtime_env_file(str(REPO / "cluster" / "runtime_env.yaml"))
    assert base["working_dir"] == str(Path.cwd().resolve())  # relative to where the command runs
    env = cl.build_runtime_env(str(staged), base, {"TOKENIZERS_PARALLELISM": "true"})
    assert env["working_dir"] == str(staged)
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "true"  # --env wins over every default
    assert ".venv/" in env["excludes"] and "tests/" in env["excludes"]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it

    with pytest.raises(ConfigError, match="outside the working dir"):
        cl.config_inside(config, staged)


def test_submit_dry_run_prints_what_would_be_submitted(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("corpus: s3://bucket/corpus\nstore: s3://bucket/store\n")
    result = CliRunner().invoke(cli, ["submit", "build-index", "--address", "head:8265", "--config", str(config),
                                      "--dry-run", "--env", "EMBEDCTL_S3_ENDPOINT_URL=http://s3.internal"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["entrypoint"] == "python jobs/build_index.py --config embedctl-config/job.yaml"
    assert out["address"] == "http://head:8265"
    assert out["runtime_env"]["env_vars"]["EMBEDCTL_S3_ENDPOINT_URL"] == "http://s3.internal"
    assert out["metadata"]["embedctl_job"] == "build-index"


def test_submit_check_runs_the_drivers_dry_run_first(tmp_path: Path) -> None:
    if not (REPO / "jobs" / "embed.py").exists():
        pytest.skip("jobs/embed.py does not exist yet (the embed job driver)")
    good = tmp_path / "good.yaml"
    good.write_text("corpus: s3://bucket/corpus\nstore: s3://bucket/store\nmodel: hash:16\n")
    result = CliRunner().invoke(cli, ["submit", "embed", "--config", str(good), "--check", "--dry-run"])
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: s3://bucket/corpus\nstore: s3://bucket/store\nchunk_tokenz: 5\n")
    result = CliRunner().invoke(cli, ["submit", "embed", "--config", str(bad), "--check", "--dry-run"])
    assert isinstance(result.exception, ConfigError)
    assert "chunk_tokenz" in str(result.exception)  # the driver's own message, before any upload


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("corpus: x\n")
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(cli, ["jobs", "list", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code != 0
    assert isinstance(result.exception, EmbedctlError)
    assert "cannot reach the Ray Jobs API" in str(result.exception)


class _JobsApi:
    """The Jobs API's HTTP protocol on loopback (http.server in a thread): version check, package
    upload, and ``POST /api/jobs/`` answered from ``answers`` in order (``"no-agent"``: the 500 a head
    gives while no node's job agent is up; ``"bad"``: another 500; ``"ok"``: the job is accepted).
    ``GET /api/jobs...`` (list, status, logs) fails: ``jobs_get="500"`` answers 500, ``"drop"`` closes
    the connection without an answer (a head that went away after the version check); ``"running"``:
    job ``ectl-run`` runs, but its log websocket is refused (a head going away while it is followed)."""

    def __init__(self, answers: list[str], jobs_get: str = "500") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import ray

        api = self
        self.answers, self.posted = list(answers), []  # posted: each submission's submission_id

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/api/jobs/ectl-run") and jobs_get == "running":
                    if self.path.endswith("/logs/tail"):  # the log websocket: the head went away
                        self._send(503, b"dashboard shutting down", "text/plain")
                    else:  # the job exists and runs
                        self._send(200, json.dumps({"type": "SUBMISSION", "submission_id": "ectl-run",
                                                    "status": "RUNNING", "entrypoint": "python jobs/embed.py"}).encode())
                elif self.path.startswith("/api/jobs") and jobs_get == "drop":
                    self.close_connection = True  # no status line at all: the client sees the peer go away
                elif self.path.startswith("/api/jobs"):  # list, status, logs: this head's job table is broken
                    self._send(500, b"GCS unavailable: job table lookup timed out", "text/plain")
                elif self.path == "/api/version":
                    self._send(200, json.dumps({"version": "4", "ray_version": ray.__version__,
                                                "ray_commit": "loopback", "session_name": "loopback"}).encode())
                else:  # /api/packages/...: not uploaded yet
                    self._send(404, b"not found", "text/plain")

            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(200, b"")

            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                api.posted.append(req.get("submission_id"))
                answer = api.answers.pop(0) if api.answers else "no-agent"
                if answer == "ok":
                    self._send(200, json.dumps({"submission_id": req.get("submission_id"), "job_id": None}).encode())
                elif answer == "no-agent":
                    self._send(500, b"No available agent to submit job, please try again later.", "text/plain")
                else:
                    self._send(500, b"runtime_env: unknown field 'workingdir'", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> _JobsApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url)


def test_submit_waits_for_a_job_agent_and_resubmits_the_same_id() -> None:
    """Right after a head starts, its Jobs API refuses jobs until a node's agent is up: submit waits."""
    with _JobsApi(["no-agent", "no-agent", "ok"]) as api:
        cl.submit_job(api.client(), api.url, wait_for_agent_s=30, entrypoint="python jobs/embed.py",
                      submission_id="ectl-agent-late")
    assert api.posted == ["ectl-agent-late"] * 3  # the refused tries created nothing: same id again


def test_submit_gives_up_on_a_head_without_agents_and_says_what_to_check(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("corpus: in-memory\n")
    with _JobsApi([]) as api:  # never an agent
        t0 = time.monotonic()
        with pytest.raises(EmbedctlError, match="had no agent to run jobs for 1 s: is a node up"):
            cl.submit_job(api.client(), api.url, wait_for_agent_s=1, entrypoint="x", submission_id="ectl-no-agent")
        assert time.monotonic() - t0 < 10
        # the whole command (config staged, package uploaded over the same protocol): one line, no traceback
        code, out, err = _invoke(["submit", "embed", "--address", api.url, "--config", str(config), "--no-wait"],
                                 env={"EMBEDCTL_SUBMIT_AGENT_WAIT_S": "1"})
    assert code == 1 and out == ""
    assert "had no agent to run jobs" in err and "Traceback" not in err


def test_submit_other_refusals_are_one_clear_error_at_once() -> None:
    with _JobsApi(["bad"]) as api, pytest.raises(EmbedctlError, match="refused the job: .*unknown field 'workingdir'"):
        cl.submit_job(api.client(), api.url, wait_for_agent_s=30, entrypoint="x", submission_id="ectl-bad")
    assert api.posted == ["ectl-bad"]  # not retried


@pytest.mark.parametrize("args", [["jobs", "list"], ["jobs", "status", "ectl-x"], ["jobs", "logs", "ectl-x"],
                                  ["jobs", "stop", "ectl-x"]])
def test_jobs_commands_turn_a_failing_jobs_api_into_one_line(args: list[str]) -> None:
    with _JobsApi([]) as api:
        result = CliRunner().invoke(cli, [*args, "--address", api.url])
    assert result.exit_code != 0
    assert isinstance(result.exception, EmbedctlError)
    msg = str(result.exception)  # a 500 is not "no such job"
    assert f"the Ray Jobs API at {api.url} failed" in msg and "job table lookup timed out" in msg, msg


@pytest.mark.parametrize("jobs_get", ["500", "drop"])
def test_a_failing_jobs_api_is_one_line_from_the_command_not_a_traceback(jobs_get: str) -> None:
    with _JobsApi([], jobs_get=jobs_get) as api:
        code, out, err = _invoke(["jobs", "status", "ectl-x", "--address", api.url])
    assert code == 1 and out == ""
    assert f"the Ray Jobs API at {api.url} failed" in err and "Traceback" not in err, err


def test_following_logs_of_a_head_that_goes_away_is_one_line() -> None:
    with _JobsApi([], jobs_get="running") as api:
        code, out, err = _invoke(["jobs", "logs", "ectl-run", "--follow", "--address", api.url])
    assert code == 1 and out == ""
    assert f"the Ray Jobs API at {api.url} failed" in err and "503" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# A real head on loopback
# ---------------------------------------------------------------------------------------------


def _ray_env() -> dict[str, str]:
    """The CLI's environment; the head's lacks the engine's offline switches (``_head_env``)."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **OFFLINE_ENV)
    # The job's `python` must be this venv's, as it is the image's on a real cluster.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _head_env() -> dict[str, str]:
    """A cluster image that knows nothing of the engine: its workers get the offline switches from the
    engine's import or from the job's runtime_env, never from the raylet."""
    return {k: v for k, v in _ray_env().items() if k not in OFFLINE_ENV}


def _kill_processes_naming(marker: str) -> None:
    """SIGKILL every process of ours whose command line contains ``marker`` (our temp dir)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head(ray_head_addresses: tuple[str, str]) -> str:
    """The dashboard URL (the Jobs API) of the module's Ray head."""
    return ray_head_addresses[0]


@pytest.fixture(scope="module")
def ray_head_addresses():
    """A Ray head with the Jobs API on 127.0.0.1; yields (dashboard URL, GCS address for ``ray.init``)."""
    ray_exe = VENV_BIN / "ray"
    if not ray_exe.exists():
        pytest.skip(f"{ray_exe} not found (install ray[default])")
    # A short path: Ray's unix sockets live under it (the limit is 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ectl-head-", dir="/tmp")
    ports = {name: free_port() for name in ("gcs", "dash", "client", "agent_http", "agent_grpc", "metrics",
                                           "renv", "node_manager", "object_manager")}
    cmd = [str(ray_exe), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
           "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dash']}",
           f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
           f"--runtime-env-agent-port={ports['renv']}", f"--node-manager-port={ports['node_manager']}",
           f"--object-manager-port={ports['object_manager']}", f"--temp-dir={temp_dir}",
           "--object-store-memory=268435456"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=_head_env(), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=temp_dir)
    url = f"http://127.0.0.1:{ports['dash']}"

    def teardown() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its processes ignore SIGTERM
        except ProcessLookupError:
            pass
        _kill_processes_naming(temp_dir)
        proc.wait(timeout=30)
        time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)

    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-3000:]
                teardown()
                pytest.fail(f"the Ray head did not come up:\n{output}")
            time.sleep(0.3)
    try:
        yield url, f"127.0.0.1:{ports['gcs']}"
    finally:
        teardown()


def _invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI in a subprocess (the way a user does) and return (exit code, stdout, stderr)."""
    proc = subprocess.run([str(VENV_BIN / "embedctl"), *args], capture_output=True, text=True,
                          env={**_ray_env(), **(env or {})}, timeout=300, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def _fake_job_dir(tmp_path: Path, body: str) -> Path:
    """A working dir with jobs/embed.py = ``body`` (a stand-in driver), engine/ and a config."""
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    shutil.copytree(REPO / "engine", work / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "jobs" / "embed.py").write_text(textwrap.dedent(body))
    (work / "job.yaml").write_text("corpus: in-memory\nrows: 3\n")
    return work


@pytest.mark.slow
@pytest.mark.ray
def test_submit_follow_list_logs_and_stop(ray_head: str, tmp_path: Path) -> None:
    """The Jobs API round trip with a stand-in driver: summary, failure exit code, list, logs, stop."""
    work = _fake_job_dir(tmp_path, """
        import json, os, sys, time, yaml
        import engine
        cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
        if cfg.get("mode") == "sleep":
            time.sleep(600)
        if cfg.get("mode") == "fail":
            print("EMBEDCTL_SUMMARY " + json.dumps({"status": "failed"}))
            sys.exit(3)
        # the uploaded engine/ (not the installed one) is what the job imports
        assert "_ray_pkg_" in engine.__file__, engine.__file__
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        print("working on", cfg["rows"], "rows")
        print("EMBEDCTL_SUMMARY " + json.dumps({"rows": cfg["rows"], "status": "succeeded"}))
        """)
    code, out, err = _invoke(["submit", "embed", "--address", ray_head, "--config", str(work / "job.yaml"),
                              "--working-dir", str(work), "--submission-id", "ectl-test-ok"])
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "SUCCEEDED" and result["submission_id"] == "ectl-test-ok"
    assert result["summary"] == {"rows": 3, "status": "succeeded"}
    assert "working on 3 rows" in err  # the logs were streamed to stderr

    (work / "fail.yaml").write_text("mode: fail\n")
    code, out, err = _invoke(["submit", "embed", "--address", ray_head, "--config", str(work / "fail.yaml"),
                              "--working-dir", str(work), "--quiet"])
    assert code == 1
    assert json.loads(out)["status"] == "FAILED" and "ended FAILED" in err

    (work / "sleep.yaml").write_text("mode: sleep\n")
    code, out, _ = _invoke(["submit", "embed", "--address", ray_head, "--config", str(work / "sleep.yaml"),
                            "--working-dir", str(work), "--no-wait", "--submission-id", "ectl-test-sleep"])
    assert code == 0 and json.loads(out)["status"] in ("PENDING", "RUNNING")
    code, out, err = _invoke(["jobs", "stop", "ectl-test-sleep", "--address", ray_head, "--wait"])
    assert code == 0, err
    assert json.loads(out)["status"] == "STOPPED"

    code, out, _ = _invoke(["jobs", "list", "--address", ray_head, "--json"])
    listed = {j["submission_id"]: j for j in json.loads(out)["jobs"]}
    assert listed["ectl-test-ok"]["status"] == "SUCCEEDED" and listed["ectl-test-ok"]["job"] == "embed"
    code, out, _ = _invoke(["jobs", "logs", "ectl-test-ok", "--address", ray_head])
    assert code == 0 and "working on 3 rows" in out
    code, out, _ = _invoke(["jobs", "status", "ectl-test-ok", "--address", ray_head])
    assert json.loads(out)["summary"]["rows"] == 3
    code, _, err = _invoke(["jobs", "status", "no-such-job", "--address", ray_head])
    assert code == 4 and "no job 'no-such-job'" in err


@pytest.mark.slow
@pytest.mark.ray
def test_submit_a_tiny_embed_job(ray_head: str, tmp_path: Path) -> None:
    """The real jobs/embed.py, staged from this checkout, on a tiny generated corpus with hash:16."""
    if not (REPO / "jobs" / "embed.py").exists():
        pytest.skip("jobs/embed.py does not exist yet (the embed job driver); this test runs once it lands")
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document {i} about wings, lift and drag at speed {i * 10}" for i in range(12)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(12)], "text": docs,
                             "title": [f"t{i}" for i in range(12)]}), corpus / "part-0.parquet")
    store = tmp_path / "store"
    config = tmp_path / "embed.yaml"
    config.write_text(textwrap.dedent(f"""\
        corpus: {corpus}
        store: {store}
        run_id: cluster-test
        model: "hash:16"
        device: cpu
        chunker: tokens
        chunk_tokens: 32
        chunk_overlap: 4
        """))
    code, out, err = _invoke(["submit", "embed", "--address", ray_head, "--config", str(config), "--quiet"])
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "SUCCEEDED"
    summary = result["summary"]
    assert summary is not None, "jobs/embed.py must print `EMBEDCTL_SUMMARY {json}` as its last stdout line"
    assert summary.get("run_id") == "cluster-test"
    assert (store / "runs" / "cluster-test" / "manifest.json").exists()


_OFFLINE_PROBE = """
import json, os, sys
import ray
from engine.distributed.runtime import init_ray

init_ray(sys.argv[1])

@ray.remote
def probe():
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
    before = {k: os.environ.get(k) for k in names}
    import engine  # what unpickling any engine function in a worker does first
    from huggingface_hub import constants
    return {"before": before, "after": {k: os.environ.get(k) for k in names},
            "hub_offline": constants.HF_HUB_OFFLINE}

print(json.dumps({"job_runtime_env": ray.get_runtime_context().runtime_env, "worker": ray.get(probe.remote())}))
"""


def _probe_offline(gcs: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _OFFLINE_PROBE, gcs], env=env, capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_command_on_a_running_ray_sends_no_runtime_env_and_its_workers_stay_offline(
        ray_head_addresses: tuple[str, str]) -> None:
    """On a head whose raylet lacks the offline switches, a driver that connects by address sends no job
    runtime_env (each one costs the job fresh workers), and its workers are offline once they import
    the engine, before any Hugging Face import. A value the user exported still travels, and wins."""
    _, gcs = ray_head_addresses
    default = _probe_offline(gcs, _ray_env())
    assert default["job_runtime_env"] == {}
    assert default["worker"]["before"] == {k: None for k in OFFLINE_ENV}  # the raylet gave them nothing
    assert default["worker"]["after"] == OFFLINE_ENV
    assert default["worker"]["hub_offline"] is True

    online = _probe_offline(gcs, {**_ray_env(), "HF_HUB_OFFLINE": "0"})
    assert online["job_runtime_env"].get("env_vars") == {"HF_HUB_OFFLINE": "0"}
    assert online["worker"]["after"]["HF_HUB_OFFLINE"] == "0"
    assert online["worker"]["hub_offline"] is False


def test_embed_on_a_running_ray_whose_workers_lack_the_offline_switches(
        ray_head_addresses: tuple[str, str], tmp_path: Path) -> None:
    """`embedctl embed --address` with the default model on that head: the job's actors load the model
    offline with no runtime_env, and the run commits every document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, gcs = ray_head_addresses
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document {i} about wings, lift and drag at speed {i * 10}" for i in range(40)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(40)], "text": docs}), corpus / "part-0.parquet")
    store = tmp_path / "store"
    code, out, err = _invoke(["embed", "--corpus", str(corpus), "--store", str(store), "--address", gcs, "--json"])
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert result["status"] == "succeeded" and result["counts"]["accepted"] == 40, result
    vectors = pq.read_table(str(store / "runs" / result["run_id"] / "embeddings"))
    assert sorted(set(vectors.column("doc_id").to_pylist())) == sorted(f"d{i}" for i in range(40))
