"""The cluster verbs: submit a job to a running Ray cluster through the Jobs API; list, follow, stop.

``embedctl submit <job> --address http://HEAD:8265 --config job.yaml`` ships the code of this
package (``engine/`` and ``jobs/``) and the config as the job's working directory, runs
``python jobs/<job>.py --config <config>`` on the cluster, streams its logs to stderr and prints
one JSON object on stdout: the submission id, the final status and the job's own summary.

The summary contract with the job drivers: the last line a driver prints on stdout is
``EMBEDCTL_SUMMARY {json}`` (``SUMMARY_MARKER`` followed by one JSON object); it is read back
from the job's logs. Nothing here imports Ray until a command runs.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from engine import OFFLINE_ENV, __version__
from engine.core.errors import ConfigError, EmbedctlError, NotFoundError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

# The marker a job driver prints before its JSON summary, as the last line of its stdout.
SUMMARY_MARKER = "EMBEDCTL_SUMMARY"

# CLI job name -> driver script in jobs/. Names match the RayJob manifests in k8s/.
JOBS: dict[str, str] = {
    "embed": "embed",
    "build-index": "build_index",
    "publish": "publish",
    "refresh": "refresh",
    "migrate": "migrate",
    "mine-negatives": "mine_negatives",
    "generate-queries": "generate_queries",
    "evaluate": "evaluate",
}

# Where the Jobs API is, in order: the flag, then these variables, then the local default.
ADDRESS_ENVVARS = ["EMBEDCTL_RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Environment every job gets (offline by design); a --runtime-env file or --env may override.
JOB_ENV_VARS: dict[str, str] = {
    **OFFLINE_ENV,
    # The drivers call ray.init(runtime_env={"env_vars": ...}) themselves; without this Ray
    # refuses to start them when the job's runtime env sets any of the same variables.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}

# Never uploaded with a user-chosen --working-dir (a staged copy holds none of these anyway).
UPLOAD_EXCLUDES = [".git/", ".venv/", ".tools/", ".whl/", "build/", "**/__pycache__/", ".pytest_cache/"]

# The staged working directory keeps the config under this folder.
STAGED_CONFIG_DIR = "embedctl-config"

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class JobFailedError(EmbedctlError):
    """A submitted job ended FAILED or STOPPED (its JSON result was printed before this)."""

    exit_code = 1


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a cluster)
# --------------------------------------------------------------------------------------------


def job_script(job: str) -> str:
    """The driver script of a job, relative to the working directory: ``jobs/<name>.py``."""
    name = JOBS.get(job) or (job if job in JOBS.values() else None)
    if name is None:
        raise ConfigError(f"unknown job {job!r}; choose one of: {', '.join(JOBS)}")
    return f"jobs/{name}.py"


def normalize_address(address: str) -> str:
    """The Jobs API URL (``http://HEAD:8265``) from what a user typed (``HEAD:8265`` is accepted)."""
    address = address.strip().rstrip("/")
    if not address:
        raise ConfigError("--address is empty; give the Ray dashboard URL, e.g. http://HEAD:8265")
    if address.startswith("ray://"):
        raise ConfigError(
            f"{address!r} is a Ray Client address; `embedctl submit` talks to the Jobs API on the "
            "dashboard port instead, e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def parse_summary(logs: str) -> dict[str, Any] | None:
    """The JSON object of the last ``EMBEDCTL_SUMMARY {json}`` line in a job's logs (None if none)."""
    for line in reversed(logs.splitlines()):
        stripped = line.strip()
        if not stripped.startswith(SUMMARY_MARKER):
            continue
        payload = stripped[len(SUMMARY_MARKER):].strip()
        try:
            summary = json.loads(payload)
        except json.JSONDecodeError as err:
            raise EmbedctlError(
                f"the job printed a malformed summary line ({err}): {stripped[:200]!r}; "
                "a job driver must print `EMBEDCTL_SUMMARY <one JSON object>` as its last line"
            ) from err
        if not isinstance(summary, dict):
            raise EmbedctlError(f"the job's summary is not a JSON object: {payload[:200]!r}")
        return summary
    return None


def parse_env_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings from ``--env`` as a dict; a malformed pair is a clear error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def load_runtime_env_file(path: str | None) -> dict[str, Any]:
    """A runtime_env YAML (e.g. cluster/runtime_env.yaml) as a dict; ``working_dir`` made absolute."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"runtime env file {path!r} cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"runtime env file {path!r} must hold a mapping (working_dir, env_vars, ...)")
    working_dir = data.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        # Like `ray job submit`, a local working_dir is relative to where the command runs.
        data["working_dir"] = str(Path(working_dir).resolve())
    return data


def source_root() -> Path:
    """The folder holding this installation's ``engine/`` and ``jobs/`` packages."""
    import engine

    return Path(engine.__file__).resolve().parent.parent


def stage_working_dir(config_path: Path, dest: Path, root: Path | None = None) -> str:
    """Copy ``engine/``, ``jobs/`` and the config into ``dest``; return the config's path in it.

    The copy is what the cluster runs, so a job submitted from a checkout runs the checkout's
    code even on a cluster whose image holds an older embedctl.
    """
    root = root or source_root()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("engine", "jobs"):
        if not (root / package).is_dir():
            raise NotFoundError(f"cannot stage the job: {root / package} is missing")
        shutil.copytree(root / package, dest / package, ignore=ignore)
    (dest / STAGED_CONFIG_DIR).mkdir()
    staged = dest / STAGED_CONFIG_DIR / config_path.name
    shutil.copy2(config_path, staged)
    return f"{STAGED_CONFIG_DIR}/{config_path.name}"


def config_inside(config_path: Path, working_dir: Path) -> str:
    """The config's path relative to a user-chosen working dir, which must contain it."""
    try:
        return config_path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise ConfigError(
            f"the config {str(config_path)!r} is outside the working dir {str(working_dir)!r}, so the "
            "cluster could not read it: move it inside, or drop --working-dir (and the runtime env "
            "file's working_dir) to let embedctl stage the code and the config itself"
        ) from None


def build_runtime_env(working_dir: str, base: dict[str, Any], extra_env: dict[str, str]) -> dict[str, Any]:
    """The job's runtime env: ``base`` (a runtime_env file) with our working dir and env vars.

    Precedence of env vars: ours (offline defaults) < the file's < ``--env``.
    """
    env = dict(base)
    env["working_dir"] = working_dir
    env_vars = {**JOB_ENV_VARS, **{str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}, **extra_env}
    env["env_vars"] = env_vars
    excludes = list(base.get("excludes") or [])
    env["excludes"] = excludes + [e for e in UPLOAD_EXCLUDES if e not in excludes]
    return env


def entrypoint_command(job: str, config_relpath: str) -> str:
    """The shell command the cluster runs, relative to the job's working directory."""
    return f"python {job_script(job)} --config {shlex.quote(config_relpath)}"


def new_submission_id(job: str) -> str:
    """A readable, unique submission id: ``embedctl-<job>-<UTC time>-<4 hex>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"embedctl-{job}-{stamp}-{uuid.uuid4().hex[:4]}"


# --------------------------------------------------------------------------------------------
# Talking to the Jobs API
# --------------------------------------------------------------------------------------------


def connect(address: str) -> JobSubmissionClient:
    """A JobSubmissionClient for the dashboard at ``address``, with an actionable error if down."""
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, OSError, RuntimeError) as err:
        raise EmbedctlError(
            f"cannot reach the Ray Jobs API at {url}: {err}. Is the head running and its dashboard "
            "port reachable? (`ray dashboard cluster/ray-cluster.yaml`, or `kubectl port-forward "
            "svc/embedctl-head-svc 8265:8265` for the KubeRay cluster)"
        ) from err


NO_AGENT = "No available agent to submit job"  # the Jobs API's answer while no node's job agent is up yet
AGENT_WAIT_ENV, AGENT_WAIT_S = "EMBEDCTL_SUBMIT_AGENT_WAIT_S", 60.0


def agent_wait_s() -> float:
    """How long ``submit`` waits for a job agent: ``$EMBEDCTL_SUBMIT_AGENT_WAIT_S``, else 60 s."""
    raw = os.environ.get(AGENT_WAIT_ENV, "").strip()
    if not raw:
        return AGENT_WAIT_S
    try:
        wait = float(raw)
        if not wait >= 0:  # negative, or NaN
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{AGENT_WAIT_ENV} must be a number of seconds >= 0, got {raw!r}") from None
    return wait


def submit_job(client: JobSubmissionClient, url: str, wait_for_agent_s: float | None = None, **job: Any) -> None:
    """``client.submit_job(**job)``, waiting up to ``wait_for_agent_s`` (default ``agent_wait_s()``) for a
    job agent: right after a head starts, its dashboard answers before any node's agent has registered,
    and the Jobs API refuses every job ("try again later"). Nothing is created by a refused submission,
    so trying again with the same submission id is safe. Any other refusal is one clear error."""
    if wait_for_agent_s is None:
        wait_for_agent_s = agent_wait_s()
    deadline = time.monotonic() + wait_for_agent_s
    for attempt in itertools.count():
        try:
            client.submit_job(**job)
            return
        except RuntimeError as err:  # the SDK's error for any non-200 answer
            if NO_AGENT not in str(err):
                raise EmbedctlError(f"the Ray Jobs API at {url} refused the job: {err}") from err
            if time.monotonic() >= deadline:
                raise EmbedctlError(
                    f"the Ray Jobs API at {url} had no agent to run jobs for {wait_for_agent_s:g} s: is a node "
                    "up? (`ray status` on the head; a head whose dashboard agent failed says why in "
                    "/tmp/ray/session_latest/logs/dashboard_agent.log)") from err
        if attempt == 0:  # once, so a silent wait is not taken for a hang
            log.warning("the cluster at %s has no job agent up yet (a head that just started); waiting up to %g s",
                        url, wait_for_agent_s)
        time.sleep(min(0.5 * 2**attempt, 4.0))


def jobs_api_errors(command: Callable[..., None]) -> Callable[..., None]:
    """A command whose Jobs API call fails (a non-200 answer, a head that went away mid-command) ends
    with one line naming the address, not a traceback from inside the SDK or requests."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        import aiohttp  # the SDK follows logs over a websocket
        import requests

        try:
            command(*args, **kwargs)
        except (RuntimeError, requests.exceptions.RequestException, aiohttp.ClientError) as err:
            url = normalize_address(kwargs.get("address") or DEFAULT_ADDRESS)
            raise EmbedctlError(f"the Ray Jobs API at {url} failed: {err}. Is the head still up? "
                                "(`ray status` on the head)") from err

    return run


def job_status(client: JobSubmissionClient, submission_id: str) -> str:
    """The job's status as a plain string (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    try:
        status = client.get_job_status(submission_id)
    except RuntimeError as err:
        if "status code 404" not in str(err):
            raise  # the Jobs API failed (jobs_api_errors says so), which is not "no such job"
        raise NotFoundError(f"no job {submission_id!r} on this cluster (`embedctl jobs list` shows them)") from err
    return str(getattr(status, "value", status))


def stream_logs(client: JobSubmissionClient, submission_id: str, out: TextIO) -> None:
    """Copy the job's logs to ``out`` as they arrive, until the job ends."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def wait_until_done(client: JobSubmissionClient, submission_id: str, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status; return it."""
    while True:
        status = job_status(client, submission_id)
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_s)


def job_result(client: JobSubmissionClient, submission_id: str, address: str) -> dict[str, Any]:
    """The JSON result of a job: ids, status, timings and (once it ended) its parsed summary."""
    info = client.get_job_info(submission_id)
    status = str(getattr(info.status, "value", info.status))
    metadata = dict(info.metadata or {})
    summary = parse_summary(client.get_job_logs(submission_id)) if status in TERMINAL_STATUSES else None
    return {
        "submission_id": submission_id,
        "job": metadata.get("embedctl_job"),
        "status": status,
        "address": normalize_address(address),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "start_time": _ms_to_iso(info.start_time),
        "end_time": _ms_to_iso(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "summary": summary,
    }


def _ms_to_iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def dry_run_locally(job: str, config_path: Path, root: Path | None = None) -> dict[str, Any]:
    """Run ``jobs/<job>.py --dry-run --config`` here: the config is checked before any upload."""
    root = root or source_root()
    script = root / job_script(job)
    if not script.exists():
        raise NotFoundError(f"{script} does not exist: this embedctl has no {job!r} job driver yet")
    proc = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--config", str(config_path)],
        capture_output=True, text=True, cwd=root, env={**os.environ, **JOB_ENV_VARS}, timeout=600,
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"`{script.name} --dry-run` rejected {str(config_path)!r} (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"output": proc.stdout.strip()}


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

address_option = click.option(
    "--address",
    envvar=ADDRESS_ENVVARS,
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="The Ray Jobs API (dashboard) URL of the cluster; env EMBEDCTL_RAY_ADDRESS or RAY_API_SERVER_ADDRESS.",
)


@click.command("submit")
@click.argument("job", type=click.Choice(list(JOBS)))
@address_option
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The job's config file (YAML or JSON), the same file `python jobs/<job>.py --config` takes.")
@click.option("--runtime-env", "runtime_env_path", type=click.Path(exists=True, dir_okay=False),
              help="A runtime_env YAML to start from (e.g. cluster/runtime_env.yaml); its working_dir, if any, "
                   "is uploaded as is.")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Upload this folder as the job's working dir (it must contain jobs/ and the config). "
                   "Default: a staged copy of this embedctl's engine/ and jobs/ plus the config.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
              help="An environment variable for the job (repeatable). Never pass secrets: they show in the dashboard.")
@click.option("--submission-id", default=None, help="Default: embedctl-<job>-<UTC time>-<4 hex>.")
@click.option("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver (default 0: it runs on the head).")
@click.option("--check/--no-check", default=False, show_default=True,
              help="Run the job's --dry-run here on the config before submitting.")
@click.option("--dry-run", is_flag=True, help="Print what would be submitted (entrypoint, runtime env) and stop.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the job to its end (or print the submission id and return at once).")
@click.option("-q", "--quiet", is_flag=True, help="Do not stream the job's logs to stderr.")
@jobs_api_errors
def submit(job: str, address: str, config_path: Path, runtime_env_path: str | None, working_dir: Path | None,
           env_pairs: tuple[str, ...], submission_id: str | None, entrypoint_num_cpus: float | None, check: bool,
           dry_run: bool, wait: bool, quiet: bool) -> None:
    """Submit a job to a running Ray cluster, stream its logs, print its JSON summary.

    Stdout gets one JSON object: submission_id, status, timings and ``summary`` (what the job's
    driver reported on its ``EMBEDCTL_SUMMARY`` line). The exit code is 0 only if the job
    SUCCEEDED. Ctrl-C stops following; the job keeps running on the cluster.

    \b
    Examples:
      embedctl submit embed --address http://HEAD:8265 --config job.yaml
      embedctl submit build-index --config index.yaml --no-wait
      embedctl submit embed --config job.yaml --runtime-env cluster/runtime_env.yaml
      embedctl submit refresh --config refresh.yaml --env EMBEDCTL_S3_ENDPOINT_URL=http://minio:9000
    """
    from engine.cli.app import emit_json

    extra_env = parse_env_pairs(env_pairs)
    base_env = load_runtime_env_file(runtime_env_path)
    if working_dir is None and isinstance(base_env.get("working_dir"), str) and "://" not in base_env["working_dir"]:
        working_dir = Path(base_env["working_dir"])
    if check:
        dry_run_locally(job, config_path)

    url = normalize_address(address)
    submission_id = submission_id or new_submission_id(job)
    metadata = {"embedctl_job": job, "embedctl_version": __version__, "embedctl_config": config_path.name}
    with tempfile.TemporaryDirectory(prefix="embedctl-submit-") as staging:
        if working_dir is not None:
            upload_dir = str(working_dir.resolve())
            config_rel = config_inside(config_path, working_dir)
            if not (working_dir / job_script(job)).exists():
                raise NotFoundError(f"{working_dir / job_script(job)} does not exist: the working dir must hold jobs/")
        else:
            upload_dir = staging
            config_rel = stage_working_dir(config_path, Path(staging))
        runtime_env = build_runtime_env(upload_dir, base_env, extra_env)
        entrypoint = entrypoint_command(job, config_rel)
        if dry_run:
            emit_json({"submission_id": submission_id, "job": job, "address": url,
                       "entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata})
            return
        client = connect(address)
        log.info("submitting %s to %s as %s", job, address, submission_id)
        submit_job(client, url, entrypoint=entrypoint, runtime_env=runtime_env,
                   metadata=metadata, submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus)
    click.echo(f"submitted {job} as {submission_id} to {url}", err=True)
    if not wait:
        emit_json({"submission_id": submission_id, "job": job, "status": job_status(client, submission_id),
                   "address": url, "summary": None})
        return
    try:
        if not quiet:
            stream_logs(client, submission_id, sys.stderr)
        wait_until_done(client, submission_id)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; {submission_id} keeps running. Follow it with "
                   f"`embedctl jobs logs {submission_id} --follow`, stop it with "
                   f"`embedctl jobs stop {submission_id}`.", err=True)
        raise
    _finish(client, submission_id, address)


def _finish(client: JobSubmissionClient, submission_id: str, address: str) -> None:
    """Print the job's JSON result; raise if it did not succeed (exit code != 0)."""
    from engine.cli.app import emit_json

    result = job_result(client, submission_id, address)
    emit_json(result)
    if result["status"] != "SUCCEEDED":
        # Ray's message repeats the last 20 kB of logs: its first line says what happened and
        # its last line is usually the driver's error.
        lines = [line for line in (result["message"] or "no message").strip().splitlines() if line.strip()]
        what = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
        raise JobFailedError(
            f"job {submission_id} ended {result['status']}: {what}; "
            f"see `embedctl jobs logs {submission_id} --address {result['address']}`"
        )
    if result["summary"] is None:
        click.echo(f"warning: job {submission_id} succeeded but printed no {SUMMARY_MARKER} line", err=True)


@click.group("jobs")
def jobs_group() -> None:
    """List, follow and stop jobs on a running Ray cluster (the Jobs API).

    \b
    Examples:
      embedctl jobs list --address http://HEAD:8265
      embedctl jobs status embedctl-embed-20261127-120000-ab12
      embedctl jobs logs embedctl-embed-20261127-120000-ab12 --follow
      embedctl jobs stop embedctl-embed-20261127-120000-ab12 --wait
    """


@jobs_group.command("list")
@address_option
@click.option("--all", "show_all", is_flag=True, help="Also list jobs not submitted by embedctl.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout: {\"jobs\": [...]}.")
@jobs_api_errors
def jobs_list(address: str, show_all: bool, as_json: bool) -> None:
    """List the cluster's jobs, newest first."""
    from engine.cli.app import emit_json

    client = connect(address)
    rows = []
    for info in client.list_jobs():
        metadata = dict(info.metadata or {})
        if not show_all and "embedctl_job" not in metadata:
            continue
        rows.append({
            "submission_id": info.submission_id,
            "job": metadata.get("embedctl_job"),
            "status": str(getattr(info.status, "value", info.status)),
            "start_time": _ms_to_iso(info.start_time),
            "end_time": _ms_to_iso(info.end_time),
            "entrypoint": info.entrypoint,
        })
    rows.sort(key=lambda r: r["start_time"] or "", reverse=True)
    if as_json:
        emit_json({"jobs": rows})
        return
    if not rows:
        click.echo("no embedctl jobs on this cluster" + ("" if show_all else " (--all lists every job)"))
        return
    click.echo(f"{'SUBMISSION ID':<44} {'JOB':<15} {'STATUS':<10} START")
    for r in rows:
        click.echo(f"{r['submission_id'] or '-':<44} {r['job'] or '-':<15} {r['status']:<10} {r['start_time'] or '-'}")


@jobs_group.command("status")
@click.argument("submission_id")
@address_option
@jobs_api_errors
def jobs_status(submission_id: str, address: str) -> None:
    """Print a job's JSON result (status, timings, and its summary once it has ended)."""
    from engine.cli.app import emit_json

    client = connect(address)
    job_status(client, submission_id)  # a clear NotFoundError for an unknown id
    emit_json(job_result(client, submission_id, address))


@jobs_group.command("logs")
@click.argument("submission_id")
@address_option
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends.")
@jobs_api_errors
def jobs_logs(submission_id: str, address: str, follow: bool) -> None:
    """Print a job's logs (stdout and stderr of its driver)."""
    client = connect(address)
    job_status(client, submission_id)
    if follow:
        stream_logs(client, submission_id, sys.stdout)
    else:
        click.echo(client.get_job_logs(submission_id), nl=False)


@jobs_group.command("stop")
@click.argument("submission_id")
@address_option
@click.option("--wait", is_flag=True, help="Wait until the job has stopped, then print its JSON result.")
@jobs_api_errors
def jobs_stop(submission_id: str, address: str, wait: bool) -> None:
    """Stop a running job (its actors and tasks are killed; outputs already committed stay)."""
    from engine.cli.app import emit_json

    client = connect(address)
    status = job_status(client, submission_id)
    if status in TERMINAL_STATUSES:
        click.echo(f"{submission_id} already ended {status}", err=True)
    else:
        client.stop_job(submission_id)
        click.echo(f"stop requested for {submission_id}", err=True)
    if wait:
        wait_until_done(client, submission_id)
        emit_json(job_result(client, submission_id, address))
