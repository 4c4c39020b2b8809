"""Offline checks of the search deployment files: k8s/rayservice.search.yaml against the vendored
RayService schema (strict where it models; the cluster and pod templates through the RayCluster and
Kubernetes schemas), its serveConfigV2 against Ray Serve's own config schema and in step with
cluster/serve.yaml, and the Ray version and image it pins."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.test_k8s import CLUSTER_DIR, K8S_DIR, dockerfile_ray_version, load_docs, validate_object

RAYSERVICE = K8S_DIR / "rayservice.search.yaml"


def rayservice() -> dict[str, Any]:
    (doc,) = load_docs(RAYSERVICE)
    return doc


def serve_schema(doc: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(doc)


def test_rayservice_validates_and_the_schema_is_strict() -> None:
    doc = rayservice()
    validate_object(doc)

    def broken(mutate) -> dict[str, Any]:
        d = json.loads(json.dumps(doc))
        mutate(d)
        return d

    cases = {
        "unknown spec field": lambda d: d["spec"].__setitem__("serveConfig", "x"),
        "no serve config": lambda d: d["spec"].pop("serveConfigV2"),
        "no cluster": lambda d: d["spec"].pop("rayClusterConfig"),
        "serve config not a string": lambda d: d["spec"].__setitem__("serveConfigV2", {"applications": []}),
        "bad upgrade strategy": lambda d: d["spec"].__setitem__("upgradeStrategy", {"type": "BlueGreen"}),
        "unknown worker group field": lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("gpus", 1),
        "unknown container field": lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolice", "Always"),
        "bad serve Service": lambda d: d["spec"].__setitem__("serveService", {"spec": {"type": "Magic", "ports": "x"}}),
        "wrong kind": lambda d: d.__setitem__("kind", "RayServe"),
    }
    for what, mutate in cases.items():
        with pytest.raises(AssertionError):
            validate_object(broken(mutate))
            pytest.fail(f"the schema accepted a RayService with {what}")


def test_rayservice_pins_the_image_and_its_ray() -> None:
    spec = rayservice()["spec"]["rayClusterConfig"]
    ray_version = dockerfile_ray_version()
    assert spec["rayVersion"] == ray_version
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"].endswith(f"-ray{ray_version}")
        assert any(p["containerPort"] == 8000 for p in container["ports"]), "Serve's HTTP port on every pod"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_serve_config_is_valid_and_matches_cluster_serve_yaml() -> None:
    from engine.serve.ray_app import build_app

    in_k8s = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    in_cluster = yaml.safe_load((CLUSTER_DIR / "serve.yaml").read_text())
    for doc in (in_k8s, in_cluster):
        (app,) = serve_schema(doc).applications
        build_app(dict(app.args))  # the args are ServeConfig keys, all known, all valid
    (k8s_app,), (cluster_app,) = in_k8s["applications"], in_cluster["applications"]
    for key in ("name", "route_prefix", "import_path", "runtime_env"):
        assert k8s_app[key] == cluster_app[key], key
    assert set(k8s_app["args"]) == set(cluster_app["args"])
    assert in_k8s["http_options"]["port"] == 8000
