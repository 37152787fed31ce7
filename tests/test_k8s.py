"""The Kubernetes manifests, validated offline (no cluster, no Ray started).

- every YAML file parses; every kustomization names files that exist; no manifest is orphaned;
- the overlays are rendered here (resources, namespace, JSON6902 patches: the only kustomize features
  the manifests use; any other key fails this test) and every patch must hit its target; they are
  also rendered by the real `kubectl kustomize` (skipped, saying why, without kubectl), which must
  produce exactly the same objects, and those objects pass the same schema checks;
- the RayService (base, dev, prod) validates against KubeRay v1.7.0's CRD schema, with unknown fields
  rejected as the API server does for `kubectl apply` (strict field validation);
- core objects (Service, PodDisruptionBudget, PersistentVolumeClaim, ConfigMap, Job, Namespace, and the
  RayService's pod templates as Pods) validate strictly against the Kubernetes JSON schemas shipped by
  kubernetes-validate, for the oldest and newest Kubernetes we claim;
- the PodMonitor (no offline schema exists) is checked field by field;
- serveConfigV2 is exactly what k8s/render.py makes of serve/configs/local.yaml, passes Ray's Serve
  schema with unknown keys rejected at every level, and its args pass serve.config.AppSettings;
- every container has a pinned image, requests and limits, and probes; readiness is /readyz;
- names that cross objects agree: ports, selectors, the volume, the bundle path, the Ray version;
- hardening (on the test's rendering, which the `kubectl kustomize` check pins to kubectl's): the
  NetworkPolicies allow exactly the documented source -> port matrix, the serving workers egress only to
  Ray pods and DNS, the head and the weights Job never to the metadata service (evaluated here with
  NetworkPolicy semantics), the autoscaler (the Kubernetes token) shares no writable volume with the
  application but /tmp/ray and reads no profile, every container runs non-root
  with a read-only root filesystem, no capabilities, RuntimeDefault seccomp and writable emptyDirs
  where Ray writes, no pod automounts a ServiceAccount token (the autoscaler alone gets one), no
  Service carries Ray's dashboard, GCS or client port, prod turns Ray's token auth on.
"""

from __future__ import annotations

import json
import ast
import copy
import os
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve.config import AppSettings, unknown_keys, validate_serve_config
from tests.helpers import RAYS_OWN_METRICS, REPO, check_rorem_selectors, load_script, named_values

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

K8S = REPO / "k8s"
CRD_PATH = REPO.parent / "shared" / "schemas" / "ray.io_rayservices.yaml"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes docs/kubernetes.md claims, and the newest schema
OVERLAYS = ("dev", "prod")
SERVE_CONFIG = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
HTTP_PORT = SERVE_CONFIG["http_options"]["port"]
GRPC_PORT = SERVE_CONFIG["grpc_options"]["port"]
KUBERAY_POD_LABELS = {"ray.io/node-type", "ray.io/cluster", "ray.io/group", "ray.io/serve", "ray.io/is-ray-node"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}


render = load_script("k8s/render.py")


# --------------------------------------------------------------------------------------------------
# a kustomize subset, enough for these manifests (and strict about anything beyond it)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _matches(obj: dict, target: dict) -> bool:
    group, version = _group_version(obj["apiVersion"])
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def build(folder: Path) -> list[dict]:
    """`kustomize build folder` for resources + namespace + JSON6902 patches."""
    import jsonpatch

    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{folder}: {unsupported} is not rendered by this test; extend build() first"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml: resource {entry} does not exist"
        objects += build(path) if path.is_dir() else copy.deepcopy(_documents(path))
    for patch in kustomization.get("patches", []):
        assert set(patch) <= {"path", "patch", "target"} and "target" in patch, f"{folder}: {patch}"
        ops = (
            yaml.safe_load((folder / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
        )
        assert isinstance(ops, list), f"{folder}: only JSON6902 patches (a list of ops) are used"
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        assert hits, f"{folder}: patch {patch.get('path')} matches no object ({patch['target']})"
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], ops)  # raises on a path that is not there
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"{folder}: duplicate objects {keys}"
    return objects


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def built(overlay: str) -> list[dict]:
    return build(K8S / "overlays" / overlay)


def base_rayservice() -> dict:
    return _documents(K8S / "base" / "rayservice.yaml")[0]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def workers(rayservice: dict) -> dict:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) == 1, "one worker group"
    return groups[0]


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def labels_match(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and expression["key"] not in labels:
            return False
        if operator == "DoesNotExist" and expression["key"] in labels:
            return False
    return True


def all_objects() -> dict[str, list[dict]]:
    return {overlay: built(overlay) for overlay in OVERLAYS}


# --------------------------------------------------------------------------------------------------
# files and kustomizations


def test_every_yaml_file_parses_and_every_manifest_is_used():
    used: set[Path] = {K8S / "serve-overrides.yaml"}
    for kustomization in K8S.rglob("kustomization.yaml"):
        used.add(kustomization)
        data = yaml.safe_load(kustomization.read_text())
        assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and data["kind"] == "Kustomization"
        for entry in data.get("resources", []):
            path = (kustomization.parent / entry).resolve()
            assert path.exists(), f"{kustomization}: {entry} does not exist"
            used.add(path)
        for patch in data.get("patches", []):
            if "path" in patch:
                path = (kustomization.parent / patch["path"]).resolve()
                assert path.is_file(), f"{kustomization}: patch {patch['path']} does not exist"
                used.add(path)
    for path in sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs, f"{path} is empty"
        assert path.resolve() in used, f"{path.relative_to(REPO)} is referenced by no kustomization"
    for overlay in OVERLAYS:
        for obj in built(overlay):
            assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"]["name"]


def test_overlays_hold_the_expected_objects():
    expected_common = {
        ("Namespace", None), ("RayService", "rorem"), ("Service", "rorem-grpc"),
        ("PodDisruptionBudget", "rorem-workers"), ("PodDisruptionBudget", "rorem-head"),
        ("NetworkPolicy", "rorem-default-deny-ingress"), ("NetworkPolicy", "rorem-ray-internal"),
        ("NetworkPolicy", "rorem-from-kuberay-operator"), ("NetworkPolicy", "rorem-serving"),
        ("NetworkPolicy", "rorem-metrics"), ("NetworkPolicy", "rorem-worker-egress"),
        ("NetworkPolicy", "rorem-head-egress"),
    }  # fmt: skip
    weights = {("PersistentVolumeClaim", "rorem-models"), ("ConfigMap", "rorem-weights-sources"),
               ("Job", "rorem-fetch-weights"), ("NetworkPolicy", "rorem-weights-egress")}  # fmt: skip
    monitoring = {("PodMonitor", "rorem"), ("PrometheusRule", "rorem")}
    for overlay, extra in (("dev", set()), ("prod", weights | monitoring)):
        objects = built(overlay)
        kinds = {(o["kind"], None if o["kind"] == "Namespace" else o["metadata"]["name"]) for o in objects}
        assert kinds == expected_common | extra, f"{overlay}: {sorted(kinds, key=str)}"
        namespace = find(objects, "Namespace")["metadata"]["name"]
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace}
    assert find(built("dev"), "Namespace")["metadata"]["name"] != find(built("prod"), "Namespace")["metadata"]["name"]


def test_a_patch_that_misses_its_target_fails_the_build(tmp_path):
    """Guard for build(): a stale patch path must not pass silently."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [svc.yaml]\n")
    (tmp_path / "base" / "svc.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\npatches:\n  - path: p.yaml\n    target: {version: v1, kind: Service, name: s}\n"
    )
    (tmp_path / "p.yaml").write_text("- {op: remove, path: /spec/ports}\n")
    with pytest.raises(Exception, match="ports|remove|nonexistent|not"):
        build(tmp_path)


# --------------------------------------------------------------------------------------------------
# the RayService against KubeRay's CRD


def strict_schema(schema):
    """The API server rejects unknown fields under strict field validation (kubectl's default); the
    CRD's schema does not say so itself: close every object schema that lists its properties."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict_schema(value) for key, value in schema.items()}
    if (
        isinstance(schema.get("properties"), dict)
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def rayservice_validator():
    if not CRD_PATH.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {CRD_PATH} (a shared/ checkout beside the repo)")
    import jsonschema

    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: libyaml, 5x
    assert crd["spec"]["names"]["kind"] == "RayService" and crd["spec"]["group"] == "ray.io"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_the_rayservice_validates_against_the_kuberay_crd(rayservice_validator):
    for name, rayservice in [("base", base_rayservice())] + [(o, find(built(o), "RayService")) for o in OVERLAYS]:
        assert rayservice["apiVersion"] == "ray.io/v1"
        errors = _errors(rayservice_validator, rayservice)
        assert not errors, f"{name}: {errors}"


def test_the_crd_check_rejects_unknown_and_mistyped_fields(rayservice_validator):
    typo = copy.deepcopy(base_rayservice())
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in _errors(rayservice_validator, typo))
    mistyped = copy.deepcopy(base_rayservice())
    mistyped["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert _errors(rayservice_validator, mistyped)
    missing = copy.deepcopy(base_rayservice())
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in _errors(rayservice_validator, missing))


# --------------------------------------------------------------------------------------------------
# core objects against the Kubernetes schemas


def _kubernetes_validate():
    return pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate (dev extra) is not installed")


def core_objects(objects: list[dict]) -> list[dict]:
    """The objects with a Kubernetes schema, plus the RayService's pod templates and serve Service."""
    core = [o for o in objects if o["apiVersion"] in ("v1", "batch/v1", "policy/v1", "apps/v1", "networking.k8s.io/v1")]
    for rayservice in (o for o in objects if o["kind"] == "RayService"):
        for name, template in pod_templates(rayservice).items():
            metadata = {"name": f"rorem-{name}", **template.get("metadata", {})}
            core.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
        serve_service = rayservice["spec"]["serveService"]
        core.append({"apiVersion": "v1", "kind": "Service", **serve_service})
    return core


def _validate_core_objects(objects_by_overlay: dict[str, list[dict]], version: str) -> None:
    utils = _kubernetes_validate()
    for overlay, objects in objects_by_overlay.items():
        for obj in core_objects(objects):
            try:
                utils.validate(obj, version, strict=True)
            except utils.ValidationError as exc:
                where = "/".join(map(str, exc.path))
                pytest.fail(f"{overlay} {obj['kind']}/{obj['metadata']['name']} ({version}): {where}: {exc.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_strictly_against_the_kubernetes_schemas(version):
    _validate_core_objects(all_objects(), version)


def test_the_kubernetes_schema_check_is_strict():
    utils = _kubernetes_validate()
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
               "spec": {"ports": [{"port": 9000, "target_port": 9000}]}}  # fmt: skip
    with pytest.raises(utils.ValidationError):
        utils.validate(service, K8S_VERSIONS[0], strict=True)


def test_the_podmonitor_scrapes_rays_metrics_port_on_every_ray_pod():
    objects = built("prod")
    monitor = find(objects, "PodMonitor", "rorem")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    for expression in spec["selector"].get("matchExpressions", []):
        assert expression["operator"] in ("In", "NotIn", "Exists", "DoesNotExist")
    allowed = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings", "honorLabels"}
    relabel_keys = {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator", "modulus"}
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= allowed, set(endpoint) - allowed
        assert endpoint["path"] == "/metrics" and re.fullmatch(r"\d+[sm]", endpoint["interval"])
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= relabel_keys and re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", relabel["targetLabel"])
    rayservice = find(objects, "RayService")
    for name, template in pod_templates(rayservice).items():
        assert labels_match(spec["selector"], template["metadata"]["labels"]), f"{name} pods are not scraped"
        container = template["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for endpoint in endpoints:
            assert endpoint["port"] in ports, f"{name}: no container port named {endpoint['port']}"
        group = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"] if name == "head" else workers(rayservice)
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]), "Ray exports on that port"


# the counters whose series start at their first event (docs/api.md "Metrics"): `increase` alone never sees it
RARE_EVENT_COUNTERS = (
    "rorem_retained_total", "rorem_auth_keys_file_errors_total", "rorem_quota_ledger_errors_total",
    "rorem_live_settings_refused_total", "rorem_feedback_total", "rorem_proxy_refusals_total",
    "rorem_proxy_answers_for_ray_total",
)  # fmt: skip


def test_the_alert_rules_parse_read_what_the_service_exports_and_say_what_to_do():
    """An alert whose expression Prometheus refuses, or that reads a misspelt metric or outcome, never fires: each
    parses (promql-parser), reads metrics the service or Ray exports with values they take, waits a valid `for`,
    has a severity and says what happened and what to do; a rare event's alert also fires on its first event."""
    import promql_parser

    from serve import metrics

    rule = find(built("prod"), "PrometheusRule", "rorem")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    rules = [entry for group in rule["spec"]["groups"] for entry in group["rules"]]
    assert len({entry["alert"] for entry in rules}) == len(rules) >= 5
    for entry in rules:
        assert set(entry) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, entry["alert"]
        assert entry["labels"]["severity"] in ("warning", "critical")
        assert set(entry["annotations"]) == {"summary", "description"}
        if "for" in entry:
            promql_parser.parse_duration(entry["for"])
        check_rorem_selectors(entry["expr"], others=RAYS_OWN_METRICS)
        rare = [name for name in RARE_EVENT_COUNTERS if f"increase(ray_{name}" in entry["expr"]]  # alerting on one
        if rare:
            assert " unless " in entry["expr"] and " offset " in entry["expr"], f"{entry['alert']}: no first event"
    documented = (REPO / "docs" / "kubernetes.md").read_text()
    undocumented = [entry["alert"] for entry in rules if f"| `{entry['alert']}` |" not in documented]
    assert undocumented == [], "each alert is in docs/kubernetes.md's Alerts table"
    read = " ".join(entry["expr"] for entry in rules)
    assert "over_quota" in metrics.OUTCOMES and "over_quota" not in read, "a key past its quota is no fault of ours"


# --------------------------------------------------------------------------------------------------
# serveConfigV2: one source of truth
# --------------------------------------------------------------------------------------------------
# serveConfigV2: one source of truth


def test_serve_config_v2_is_the_rendering_of_the_local_serve_config(capsys):
    assert base_rayservice()["spec"]["serveConfigV2"] == render.render_text("gpu")
    assert find(built("prod"), "RayService")["spec"]["serveConfigV2"] == render.render_text("gpu")
    assert find(built("dev"), "RayService")["spec"]["serveConfigV2"] == render.render_text("cpu")
    for path, text in render.expected_files().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run `python k8s/render.py --write`"
    assert render.main(["--check"]) == 0
    assert capsys.readouterr().out.startswith("up to date: k8s/base/rayservice.yaml"), "--check says it passed"


def test_every_serve_config_registers_the_project_servicer():
    """serve.grpc_servicer's deserializer answers bytes that do not parse with a problem; the generated stubs'
    raise inside grpcio (UNKNOWN)."""
    from serve.grpc_servicer import SERVICER_FUNCTION

    configs = [SERVE_CONFIG] + [serve_config(find(built(overlay), "RayService")) for overlay in OVERLAYS]
    for config in configs:
        assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]


def test_serve_config_v2_passes_rays_schema_strictly_and_our_settings():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema


    for overlay in OVERLAYS:
        config = serve_config(find(built(overlay), "RayService"))
        ServeDeploySchema.model_validate(config)
        assert unknown_keys(ServeDeploySchema, config) == [], overlay
        for app in config["applications"]:
            AppSettings.model_validate(app["args"])
            for deployment in app["deployments"]:
                if "autoscaling_config" in deployment:
                    AutoscalingConfig.model_validate(deployment["autoscaling_config"])
                    assert unknown_keys(AutoscalingConfig, deployment["autoscaling_config"]) == []


def test_the_strict_serve_check_finds_unknown_keys_at_every_level():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = render.render_config("gpu")
    app = config["applications"][0]
    app["deployments"][1]["max_ongoing_request"] = 4
    app["deployments"][1]["ray_actor_options"]["num_gpu"] = 1
    config["http_options"]["hots"] = "0.0.0.0"
    config["grpc_option"] = {}
    ServeDeploySchema.model_validate(config)  # Ray alone lets all of these through
    assert sorted(unknown_keys(ServeDeploySchema, config)) == [
        "applications[0].deployments[1].max_ongoing_request",
        "applications[0].deployments[1].ray_actor_options.num_gpu",
        "grpc_option",
        "http_options.hots",
    ]
    with pytest.raises(ValueError, match="max_ongoing_request"):
        validate_serve_config(config)
    bad_autoscaling = render.render_config("gpu")
    bad_autoscaling["applications"][0]["deployments"][1]["autoscaling_config"]["max_replica"] = 3
    with pytest.raises(ValueError, match="max_replica"):
        validate_serve_config(bad_autoscaling)
    bad_args = render.render_config("gpu")
    bad_args["applications"][0]["args"]["engine"]["devise"] = "cuda"
    with pytest.raises(ValidationError, match="devise"):
        validate_serve_config(bad_args)


def _edited_local_yaml(edit) -> str:
    config = yaml.safe_load(render.SOURCE.read_text())
    edit(config["applications"][0])
    return yaml.safe_dump(config)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (_edited_local_yaml(lambda app: app["deployments"][1]["ray_actor_options"].update(num_gpus=0)),
         "Remover is set to engine.device: cuda and gets no GPU (its ray_actor_options.num_gpus is 0 or unset)"),
        (_edited_local_yaml(lambda app: app["args"].update(batching={"max_batch_sz": 8})),
         "batching.max_batch_sz: Extra inputs are not permitted"),
        ("applications: [\n", "line 2, column 1: "),
    ],
    ids=["cuda-without-a-gpu", "unknown-arg", "broken-yaml"],
)  # fmt: skip
def test_an_invalid_local_config_fails_the_rendering_in_one_line(tmp_path, monkeypatch, capsys, text, said):
    """A Remover on cuda given no GPU rendered (the CLI's check was its own), and failed in the cluster; an invalid
    local.yaml printed a pydantic traceback."""
    source = tmp_path / "local.yaml"
    source.write_text(text)
    monkeypatch.setattr(render, "SOURCE", source)
    assert render.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("cannot render local.yaml with serve-overrides.yaml: ") and said in err
    assert len(err.splitlines()) == 1


def test_the_override_merge_rules():
    base = {"a": {"b": 1, "c": 2}, "items": [{"name": "x", "n": 1}, {"name": "y", "n": 2}], "keep": [1, 2]}
    merged = render.merge(base, {"a": {"b": None, "d": 4}, "items": [{"name": "y", "n": 3}], "keep": [3]})
    assert merged == {"a": {"c": 2, "d": 4}, "items": [{"name": "x", "n": 1}, {"name": "y", "n": 3}], "keep": [3]}
    assert base["a"] == {"b": 1, "c": 2}, "the source is not modified"
    with pytest.raises(render.RenderError, match="'z'"):
        render.merge(base, {"items": [{"name": "z"}]})


def test_the_ray_containers_carry_the_environment_derived_from_their_serve_config():
    """Exactly serve.proxy_limits.proxy_env of the rendered config (the proxies' limits; the keys file while
    auth is on): prod (gpu, keys on) and dev (cpu, keys off, so its proxies name no keys file)."""
    from serve.config import ImagingSettings, OverloadSettings
    from serve.proxy_limits import (
        GRPC_MESSAGE_ENV,
        PROXY_DRAINING_ENV,
        PROXY_ENV_NAMES,
        grpc_max_message_bytes,
        http_max_body_bytes,
        proxy_env,
    )  # fmt: skip
    from serve.proxy_middleware import ROUTES_ENV

    for target, overlay in (("gpu", "prod"), ("cpu", "dev")):
        expected = proxy_env(render.render_config(target))
        assert render.proxy_environment(target) == expected
        cluster = find(built(overlay), "RayService")["spec"]["rayClusterConfig"]
        containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
        containers += [group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]]
        for container in containers:
            env = {e["name"]: e.get("value") for e in container.get("env", []) if e["name"] in PROXY_ENV_NAMES}
            assert env == expected, (overlay, container["name"])
            for route in json.loads(env[ROUTES_ENV]).values():
                if "keys_file" in route:
                    mounts = [m["mountPath"] for m in container["volumeMounts"]]
                    assert any(route["keys_file"].startswith(path + "/") for path in mounts), "its proxy reads the file"
        keyed = ["keys_file" in route for route in json.loads(expected[ROUTES_ENV]).values()]
        assert keyed == [target == "gpu"], "one application; auth is on in the gpu target only"
    expected = render.proxy_environment("gpu")
    (route,) = json.loads(expected[ROUTES_ENV]).values()
    assert int(expected[GRPC_MESSAGE_ENV]) == grpc_max_message_bytes(ImagingSettings())  # local.yaml's imaging
    assert route["limit"] == http_max_body_bytes(ImagingSettings())
    assert route["timeout_s"] == OverloadSettings().body_timeout_s
    assert float(expected[PROXY_DRAINING_ENV]) >= route["timeout_s"], "a draining proxy outlives a body"


def test_the_ray_containers_hide_the_gpus_from_replicas_given_none():
    """As `python -m serve run` does: Ray 2.60 leaves CUDA visible to a replica at num_gpus 0, so a model deployment
    moved to the CPU that way would load on the pod's GPU anyway."""
    from serve.cli import HIDE_GPUS_FROM_CPU_REPLICAS_ENV

    for overlay in ("prod", "dev"):
        cluster = find(built(overlay), "RayService")["spec"]["rayClusterConfig"]
        containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
        containers += [group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]]
        for container in containers:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert HIDE_GPUS_FROM_CPU_REPLICAS_ENV.items() <= env.items(), (overlay, container["name"])


def test_rendering_the_env_replaces_only_what_proxy_env_sets():
    """A name proxy_env does not set (here the gRPC limit) leaves the manifest; other entries of the list, and lists
    without the proxy middleware (the init container's), stay as they are."""
    snippet = (
        "      env:\n"
        '        - {name: OTHER, value: "1"}\n'
        '        - {name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, value: "7"}\n'
        '        - {name: ROREM_PROXY_ROUTES, value: "{}"}\n'
        '        - {name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, value: "x"}\n'
        "      ports: []\n"
        "      env:\n"
        '        - {name: ROREM_PROXY_ROUTES, value: "kept: no middleware here"}\n'
    )
    rendered = render.splice_env(snippet, {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "y", "ROREM_PROXY_ROUTES": "5"})
    assert rendered == (
        "      env:\n"
        '        - {name: OTHER, value: "1"}\n'
        '        - {name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, value: "y"}\n'
        '        - {name: ROREM_PROXY_ROUTES, value: "5"}\n'
        "      ports: []\n"
        "      env:\n"
        '        - {name: ROREM_PROXY_ROUTES, value: "kept: no middleware here"}\n'
    )
    with pytest.raises(render.RenderError):
        render.splice_env("      env:\n        - {name: OTHER, value: \"1\"}\n", {})


def test_the_kubernetes_serve_configs_differ_from_local_only_as_documented():
    gpu, cpu = render.render_config("gpu"), render.render_config("cpu")
    for config in (gpu, cpu):
        assert config["http_options"]["host"] == "0.0.0.0"
        assert config["http_options"]["port"] == HTTP_PORT and config["grpc_options"] == SERVE_CONFIG["grpc_options"]
        assert config["applications"][0]["import_path"] == SERVE_CONFIG["applications"][0]["import_path"]
    deployments = {d["name"]: d for d in gpu["applications"][0]["deployments"]}
    for name in ("Ingress", "Remover", "Scorer"):
        assert "num_replicas" not in deployments[name] and deployments[name]["autoscaling_config"]["min_replicas"] >= 1
    assert deployments["Remover"]["ray_actor_options"]["num_gpus"] == 1
    assert deployments["Scorer"]["ray_actor_options"]["num_gpus"] == 1
    assert gpu["applications"][0]["args"]["engine"]["device"] == "cuda"
    cpu_app = cpu["applications"][0]
    assert all((d.get("ray_actor_options") or {}).get("num_gpus", 0) == 0 for d in cpu_app["deployments"])
    assert cpu_app["args"]["bundle"].get("path") is None and "authors" not in cpu_app["args"]["bundle"], "tiny bundle"
    # what is not overridden is local.yaml's
    from serve.config import AppSettings, with_live

    def effective(app: dict) -> AppSettings:
        """The settings a deployment runs with: the args, then each deployment's user_config (the live knobs)."""
        settings = AppSettings.model_validate(app["args"])
        for deployment in app.get("deployments", []):
            if deployment.get("user_config") is not None:
                settings = with_live(settings, deployment["name"], deployment["user_config"])
        return settings

    apps = (SERVE_CONFIG["applications"][0], gpu["applications"][0], cpu_app)
    local, on_gpu, on_cpu = (effective(app) for app in apps)
    assert all(d.get("user_config") for d in gpu["applications"][0]["deployments"]), "the live knobs are user_config"
    for key in ("imaging", "gate", "request_timeout_s"):
        assert getattr(on_gpu, key) == getattr(local, key) == getattr(on_cpu, key)
    for batching in ("batch_sizes", "batch_waits"):
        assert getattr(on_gpu, batching)() == getattr(local, batching)() == getattr(on_cpu, batching)()


# --------------------------------------------------------------------------------------------------
# containers: images, resources, probes


def containers(objects: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for obj in objects:
        if obj["kind"] == "RayService":
            for name, template in pod_templates(obj).items():
                found += [(f"RayService/{name}", c) for c in template["spec"]["containers"]]
                found += [(f"RayService/{name}/init", c) for c in template["spec"].get("initContainers", [])]
        elif obj["kind"] == "Job":
            found += [(f"Job/{obj['metadata']['name']}", c) for c in obj["spec"]["template"]["spec"]["containers"]]
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Pod"):
            raise AssertionError(f"unexpected workload {obj['kind']}: add it to this test")
    return found


def test_every_container_has_a_pinned_image_requests_limits_and_probes():
    for overlay in OVERLAYS:
        objects = built(overlay)
        for where, container in containers(objects):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), (
                f"{where}: unpinned {image}"
            )
            assert not image.endswith(":latest"), f"{where}: {image}"
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{overlay} {where}: {kind} {resources.get(kind)}"
            assert (
                resources["requests"]["memory"] == resources["limits"]["memory"] or "Job" in where or "init" in where
            ), f"{where}: memory request = limit (Ray sizes its object store from the limit)"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            if where.startswith("Job/") or where.endswith("/init"):
                continue  # run-to-completion containers (init containers may not even have probes)
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{overlay} {where}: no {probe}"
        autoscaler = find(objects, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])


def test_readiness_of_serving_pods_is_their_proxys_health_and_the_applications_readyz():
    """/readyz alone kept a worker ready while Ray drained its proxy (no replica left on it after a scale-down):
    a draining proxy answers 503 only on /-/healthz, serves /readyz to the end, then goes, and the pod stayed in
    the Services, its port refusing connections, until three probes failed (KubeRay's own probe asks /-/healthz)."""
    from serve.health import READYZ_MAX_WAIT_S

    said = " ".join((K8S / "base" / "rayservice.yaml").read_text().split())
    assert f"(/readyz waits up to {READYZ_MAX_WAIT_S:g} s for Serve's state and the model replicas)" in said
    for overlay in OVERLAYS:
        rayservice = find(built(overlay), "RayService")
        container = workers(rayservice)["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == HTTP_PORT
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        asked = re.findall(r"open\('http://127\.0\.0\.1:(\d+)(/[^']*)', timeout=(\d+)\)", command[2])
        assert [(int(port), path) for port, path, _ in asked] == [(HTTP_PORT, "/-/healthz"), (HTTP_PORT, "/readyz")]
        healthz_s, readyz_s = (float(timeout) for _, _, timeout in asked)
        assert readyz_s > READYZ_MAX_WAIT_S, f"/readyz waits up to {READYZ_MAX_WAIT_S:g} s"
        assert container["readinessProbe"]["timeoutSeconds"] > healthz_s + readyz_s, "the probe outlasts its calls"
        for name, template in pod_templates(rayservice).items():
            live = template["spec"]["containers"][0]["livenessProbe"]["httpGet"]
            assert (live["path"], live["port"]) == ("/api/healthz", 52365), f"{name}: Ray's node health"


def test_images_are_consistent_per_overlay():
    for overlay, flavour in (("dev", "-cpu"), ("prod", "-cuda12")):
        images = {c["image"] for _, c in containers(built(overlay))}
        assert len(images) == 1, f"{overlay}: head, workers (and the weights Job) run one image: {images}"
        assert flavour in images.pop()


# --------------------------------------------------------------------------------------------------
# GPUs, scheduling and scaling


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_gpu_workers_and_a_cpu_head():
    rayservice = find(built("prod"), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert not any("gpu" in key for kind in ("requests", "limits") for key in head_container["resources"][kind])
    assert not head["template"]["spec"].get("tolerations") and head["rayStartParams"]["num-cpus"] == "0"
    group = workers(rayservice)
    spec = group["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    dev = find(built("dev"), "RayService")
    dev_spec = workers(dev)["template"]["spec"]
    assert not dev_spec.get("tolerations") and not dev_spec.get("nodeSelector")
    # no weights volume (nor API keys): only the scratch emptyDirs of the read-only root filesystem
    assert all(set(v) == {"name", "emptyDir"} for v in dev_spec.get("volumes", [])), dev_spec.get("volumes")
    assert not any(m["mountPath"].startswith("/models") for m in dev_spec["containers"][0].get("volumeMounts", []))
    assert not dev_spec.get("initContainers"), "the dev workers wait for no weights"
    assert not any("gpu" in k for kind in ("requests", "limits") for k in dev_spec["containers"][0]["resources"][kind])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_spread_over_nodes_and_the_head_keeps_off_gpu_nodes(overlay):
    """Two GPU workers on one node fail together; a head on an untainted GPU node takes a worker's CPU and memory."""
    rayservice = find(built(overlay), "RayService")
    spec = workers(rayservice)["template"]["spec"]
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway", "a single-node pool must still schedule every worker"
    worker_labels = workers(rayservice)["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= worker_labels.items()
    assert spread["matchLabelKeys"] == ["ray.io/cluster"]
    head_spec = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (preference,) = head_spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    (gpu_label,) = workers(find(built("prod"), "RayService"))["template"]["spec"]["nodeSelector"]
    assert preference["preference"]["matchExpressions"] == [{"key": gpu_label, "operator": "DoesNotExist"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_stopped_worker_drains_its_longest_request_within_its_grace_period(overlay):
    """Ray drained a pod that got SIGTERM for its default 30 s, then killed it: the 120 s grace period went
    unused and requests still in flight (a 60 s body, then up to the proxy's 180 s) died with the pod."""
    from serve.proxy_limits import NODE_DRAIN_ENV, PROXY_DRAINING_ENV

    rayservice = find(built(overlay), "RayService")
    config = serve_config(rayservice)
    apps = [AppSettings.model_validate(app.get("args") or {}) for app in config["applications"]]
    body_s = max(app.overload.body_timeout_s for app in apps)
    request_s = config["http_options"]["request_timeout_s"]
    spec = workers(rayservice)["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    drain_s = float(env[NODE_DRAIN_ENV])
    assert drain_s >= body_s + request_s and drain_s >= float(env[PROXY_DRAINING_ENV])
    assert spec.get("terminationGracePeriodSeconds", 30) >= drain_s + 20, "Ray stops its processes after the drain"
    guide = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    assert f"`request_timeout_s` ({body_s:g} + {request_s:g} = {drain_s:g} s;" in guide, "kubernetes.md's drain time"
    grace_s = spec["terminationGracePeriodSeconds"]
    assert f"`terminationGracePeriodSeconds` ({grace_s} s)" in guide, "kubernetes.md's grace period"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_stopped_head_gets_the_grace_period_of_the_workers(overlay):
    """The head drains as the workers do (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 240 s, in its env too), but its pod
    had Kubernetes' default 30 s: the kubelet killed the head's processes mid-drain (its Serve controller and proxy)."""
    from serve.proxy_limits import NODE_DRAIN_ENV

    rayservice = find(built(overlay), "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    drain_s = float(env[NODE_DRAIN_ENV])
    worker_grace_s = workers(rayservice)["template"]["spec"]["terminationGracePeriodSeconds"]
    assert head.get("terminationGracePeriodSeconds", 30) == worker_grace_s, "the head's grace is the workers'"
    assert head["terminationGracePeriodSeconds"] >= drain_s + 20, "Ray stops its processes after the drain"
    guide = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    assert f"the head's too ({worker_grace_s} s)" in guide, "kubernetes.md says the head has the same grace period"


def test_the_gpu_workers_are_guaranteed_qos():
    """Kubernetes counts init containers: one with limits above its requests made the GPU pods Burstable."""
    spec = workers(find(built("prod"), "RayService"))["template"]["spec"]
    for container in spec["containers"] + spec.get("initContainers", []):
        resources = container["resources"]
        for name in ("cpu", "memory"):
            assert resources["requests"][name] == resources["limits"][name], (container["name"], name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_group_bounds_fit_serve_autoscaling(overlay):
    """Ray's autoscaler adds workers when Serve wants replicas: the group must hold Serve's minimum
    replicas at minReplicas and its maximum at maxReplicas (the head takes none: num-cpus 0)."""
    rayservice = find(built(overlay), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = workers(rayservice)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits.get("nvidia.com/gpu", 0)), _cpus(limits["cpu"])
    need = {"min": [0.0, 0.0], "max": [0.0, 0.0]}
    for deployment in serve_config(rayservice)["applications"][0]["deployments"]:
        options = deployment.get("ray_actor_options") or {}
        scaling = deployment.get("autoscaling_config") or {}
        for bound, replicas in (("min", scaling.get("min_replicas")), ("max", scaling.get("max_replicas"))):
            count = replicas if replicas is not None else deployment.get("num_replicas", 1)
            need[bound][0] += count * options.get("num_gpus", 0)
            need[bound][1] += count * options.get("num_cpus", 1)
    for bound, nodes in (("min", group["minReplicas"]), ("max", group["maxReplicas"])):
        assert need[bound][0] <= nodes * gpus, f"{overlay}: {bound} replicas need {need[bound][0]} GPUs"
        assert need[bound][1] <= nodes * (cpus - 0.5), f"{overlay}: {bound} replicas need {need[bound][1]} CPUs"


# --------------------------------------------------------------------------------------------------
# names that cross objects


def test_services_and_the_pdb_select_the_serving_workers():
    for overlay in OVERLAYS:
        objects = built(overlay)
        rayservice = find(objects, "RayService")
        worker_template = workers(rayservice)["template"]
        worker_labels = {**worker_template["metadata"]["labels"], "ray.io/node-type": "worker"}
        head_labels = {**rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"],
                       "ray.io/node-type": "head"}  # fmt: skip
        ports = {p["name"]: p["containerPort"] for p in worker_template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == HTTP_PORT and ports["grpc"] == GRPC_PORT

        grpc = find(objects, "Service", "rorem-grpc")
        selector = grpc["spec"]["selector"]
        assert set(selector) - set(worker_template["metadata"]["labels"]) <= KUBERAY_POD_LABELS
        assert labels_match({"matchLabels": selector}, worker_labels)
        assert not labels_match({"matchLabels": selector}, head_labels)
        (port,) = grpc["spec"]["ports"]
        assert port["port"] == GRPC_PORT and ports[port["targetPort"]] == GRPC_PORT

        http = rayservice["spec"]["serveService"]
        assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True
        assert [(p["name"], p["port"]) for p in http["spec"]["ports"]] == [("serve", HTTP_PORT)]

        pdb = find(objects, "PodDisruptionBudget", "rorem-workers")
        assert labels_match(pdb["spec"]["selector"], worker_labels)
        assert not labels_match(pdb["spec"]["selector"], head_labels)
        assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"



def test_without_keys_the_dev_service_answers_its_own_names_and_a_port_forward():
    """Keys off (the dev overlay): the keyed routes answer only the Host names in auth.allowed_hosts (DNS
    rebinding), which must be the HTTP Service's in-cluster names in the overlay's namespace, and localhost."""
    from serve.auth import LOOPBACK_HOSTS
    from serve.config import AppSettings

    objects = built("dev")
    rayservice = find(objects, "RayService")
    service, namespace = rayservice["spec"]["serveService"]["metadata"]["name"], rayservice["metadata"]["namespace"]
    auth = AppSettings.model_validate(render.render_config("cpu")["applications"][0]["args"]).auth
    assert not auth.enabled
    names = [f"{service}.{namespace}.svc.cluster.local", f"{service}.{namespace}.svc", f"{service}.{namespace}", service]
    assert set(auth.allowed_hosts) == {*LOOPBACK_HOSTS, *names}
    gpu = AppSettings.model_validate(render.render_config("gpu")["applications"][0]["args"]).auth
    assert gpu.enabled and gpu.allowed_hosts is None, "with keys, any Host (an Ingress, a load balancer)"

def _assert_the_wait_for_the_bundle_ends(wait):
    """It waited without end, saying nothing, when the weights Job could not run (its sources still naming
    @COMMIT, say): now it fails after ROREM_BUNDLE_WAIT_S, naming the Job, and passes once the manifest is there."""
    import tempfile

    env = {e["name"]: e["value"] for e in wait["env"]}
    assert float(env["ROREM_BUNDLE_WAIT_S"]) >= 3600, "the first import of the weights takes a while"
    with tempfile.TemporaryDirectory() as bundle:
        run = {**os.environ, "ROREM_BUNDLE": bundle, "ROREM_BUNDLE_WAIT_S": "0.3"}
        script = [sys.executable, "-c", wait["args"][0]]
        failed = subprocess.run(script, env=run, capture_output=True, text=True, timeout=30)
        assert failed.returncode == 1 and "job/rorem-fetch-weights" in failed.stderr, failed.stderr
        (Path(bundle) / "manifest.json").write_text("{}")
        passed = subprocess.run(script, env=run, capture_output=True, text=True, timeout=30)
        assert passed.returncode == 0, passed.stderr


def _assert_api_keys_come_from_the_secret(rayservice, spec):
    auth = serve_config(rayservice)["applications"][0]["args"]["auth"]
    (keys,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == keys["name"]]
    assert auth["enabled"] is True and mount["readOnly"] is True
    assert auth["keys_file"].startswith(mount["mountPath"].rstrip("/") + "/"), "the keys file lies on the Secret volume"


def test_the_weights_volume_job_and_bundle_path_agree():
    objects = built("prod")
    rayservice = find(objects, "RayService")
    bundle_path = serve_config(rayservice)["applications"][0]["args"]["bundle"]["path"]
    spec = workers(rayservice)["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert bundle_path.startswith(mount["mountPath"].rstrip("/") + "/"), "the bundle lies on the weights volume"
    (wait,) = spec["initContainers"]
    assert {e["name"]: e["value"] for e in wait["env"]}["ROREM_BUNDLE"] == bundle_path, (
        "the worker waits for the bundle"
    )
    assert wait["volumeMounts"] == [mount] and "ROREM_BUNDLE" in wait["args"][0]
    compile(wait["args"][0], "wait-for-bundle", "exec")
    _assert_the_wait_for_the_bundle_ends(wait)
    _assert_api_keys_come_from_the_secret(rayservice, spec)
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = find(objects, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"] or "ReadOnlyMany" in pvc["spec"]["accessModes"]

    job = find(objects, "Job", "rorem-fetch-weights")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == [claim]
    assert all("persistentVolumeClaim" in v or set(v) == {"name", "emptyDir"} for v in pod["volumes"]), pod["volumes"]
    (container,) = pod["containers"]
    assert (
        not container["volumeMounts"][0].get("readOnly")
        and container["volumeMounts"][0]["mountPath"] == mount["mountPath"]
    )
    assert "nvidia.com/gpu" not in container["resources"]["limits"], "importing needs no GPU"
    configmap = find(objects, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])
    environment = {**configmap["data"], **{e["name"]: e.get("value") for e in container["env"]}}
    assert environment["ROREM_BUNDLE"] == bundle_path
    assert environment["HF_HOME"].startswith(mount["mountPath"]), "the download cache persists on the volume"
    assert environment["HF_HUB_OFFLINE"] == "0"
    _assert_weight_sources_exist(environment, mount["mountPath"].rstrip("/") + "/")

    # the inline script: valid Python, names that exist in the project, environment it is given
    assert container["command"] == ["python3", "-c"]
    script = ast.parse(container["args"][0])
    defined = {}
    for module in ("engines/authors_layout.py", "engines/bundle.py", "engines/errors.py"):
        tree = ast.parse((REPO / module).read_text())
        defined[module[:-3].replace("/", ".")] = tree
    for node in ast.walk(script):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("engines"):
            tree = defined[node.module]
            names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            names |= {
                t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
            }
            for alias in node.names:
                assert alias.name in names, f"{node.module} has no {alias.name}"
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            assert node.slice.value in environment, f"the Job reads ${node.slice.value}, which it is not given"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.get":
            assert node.args[0].value in environment, f"the Job reads ${node.args[0].value}, which it is not given"
    layout = next(
        n for n in defined["engines.authors_layout"].body if isinstance(n, ast.ClassDef) and n.name == "AuthorsLayout"
    )
    fields = {n.target.id for n in layout.body if isinstance(n, ast.AnnAssign)}
    importer = next(
        n for n in defined["engines.authors_layout"].body
        if isinstance(n, ast.FunctionDef) and n.name == "import_authors_layout"
    )  # fmt: skip
    parameters = {a.arg for a in importer.args.args + importer.args.kwonlyargs}
    for call in (n for n in ast.walk(script) if isinstance(n, ast.Call)):
        target = ast.unparse(call.func)
        if target == "AuthorsLayout":
            assert {k.arg for k in call.keywords} <= fields
        if target == "import_authors_layout":
            assert {k.arg for k in call.keywords} <= parameters
            assert any(k.arg == "require_pinned" and k.value.value is True for k in call.keywords), (
                "the Job imports hub pieces only at a named commit"
            )


def test_the_weights_job_checks_the_drive_pieces_sha256_sums_before_the_import():
    """The pieces copied from Google Drive (no published checksum) were imported as found: with
    ROREM_LCM_LORA_SHA256 / ROREM_DISCRIMINATOR_SHA256 set, the Job checks them first and fails on a mismatch."""
    objects = built("prod")
    (container,) = find(objects, "Job", "rorem-fetch-weights")["spec"]["template"]["spec"]["containers"]
    sources = find(objects, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    module = ast.parse((REPO / "engines" / "authors_layout.py").read_text())  # without torch and diffusers
    (drive,) = [ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "DRIVE_FOLDERS" for t in n.targets)]  # fmt: skip
    script = ast.parse(container["args"][0])
    (guarded,) = [n for n in ast.walk(script) if isinstance(n, ast.Try)]
    assert [ast.unparse(h.type) for h in guarded.handlers] == ["BundleError"], "a mismatch fails the Job, in one line"
    calls = [n.value for n in guarded.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert [ast.unparse(c.func) for c in calls] == ["verify_sha256_lists", "import_authors_layout"], "checked first"
    checked = {ast.literal_eval(k): ast.unparse(v) for k, v in zip(calls[0].args[1].keys, calls[0].args[1].values)}
    assert set(checked) == set(drive), "every piece that is on Google Drive only"
    for field, read in checked.items():
        key = f"ROREM_{field.upper()}_SHA256"
        assert read == f"os.environ.get('{key}', '')" and sources[key] == "", f"{key}: optional, empty by default"


def _assert_weight_sources_exist(environment: dict, volume: str) -> None:
    """Hub references name only what the authors publish there; the Drive-only pieces lie on the volume."""
    from engines.hub_refs import ROREM_PIPELINE, SDXL_INPAINTING_PIPELINE, discriminator_trunk_problem

    module = ast.parse((REPO / "engines" / "authors_layout.py").read_text())  # without torch and diffusers
    published = {
        t.id: ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign) for t in n.targets
        if isinstance(t, ast.Name) and t.id == "DRIVE_FOLDERS"
    }  # fmt: skip
    pipelines = {ROREM_PIPELINE, SDXL_INPAINTING_PIPELINE}
    on_the_hub = pipelines | {f"{pipeline}/unet" for pipeline in pipelines}  # what these two repos hold
    for field in ("base", "unet", "lcm_lora", "discriminator", "discriminator_unet"):
        key = f"ROREM_{field.upper()}"
        value = environment[key]
        assert not value or value.startswith(("hf:", volume)), f"{key}: hf:OWNER/NAME[/PATH] or a volume path"
        if value.startswith("hf:"):
            assert value.count("@") == 1, f"{key}={value}: hf:OWNER/NAME@COMMIT[/PATH], the commit to import"
            where = re.sub(r"@[^/]*", "", value)
            assert where in on_the_hub, f"{key}={value} is not a hub location known to exist ({on_the_hub})"
            assert field not in published["DRIVE_FOLDERS"], f"{key}: on Google Drive only, expect it on the volume"
    # what the prod Serve config needs: the 4-step LoRA and the discriminator for its Scorer
    assert environment["ROREM_LCM_LORA"] and environment["ROREM_DISCRIMINATOR"]
    if not environment["ROREM_UNET"]:
        assert environment["ROREM_BASE"].partition("@")[0] == ROREM_PIPELINE, "only its unet/ is RORem's"
    trunk = (environment["ROREM_BASE"], environment["ROREM_DISCRIMINATOR"], environment["ROREM_DISCRIMINATOR_UNET"])
    assert discriminator_trunk_problem(*trunk) is None, "the discriminator needs the SDXL-inpainting UNet"


def test_ray_version_and_python_packages_match_the_image():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["optional-dependencies"]["serve"] if d.startswith("ray"))
    version = re.search(r"==([\d.]+)", ray_pin)[1]
    for overlay in OVERLAYS:
        assert find(built(overlay), "RayService")["spec"]["rayClusterConfig"]["rayVersion"] == version
    import_path = SERVE_CONFIG["applications"][0]["import_path"].split(":")[0]
    assert (REPO / (import_path.replace(".", "/") + ".py")).is_file()
    for servicer in SERVE_CONFIG["grpc_options"]["grpc_servicer_functions"]:
        module, _, function = servicer.rpartition(".")
        assert f"def {function}(" in (REPO / (module.replace(".", "/") + ".py")).read_text()


def test_the_deploy_guide_names_what_exists():
    guide = (REPO / "docs" / "kubernetes.md").read_text()
    for command in ("kubectl apply -k k8s/overlays/prod", "kubectl apply -k k8s/overlays/dev", "python k8s/render.py"):
        assert command in guide, command
    for path in set(re.findall(r"\b(k8s/[\w./-]*[\w/])", guide)):
        assert (REPO / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"
    for overlay in OVERLAYS:
        for obj in built(overlay):
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["name"] in guide, f"{obj['kind']} {obj['metadata']['name']} is not documented"


# --------------------------------------------------------------------------------------------------
# the real kustomize: `kubectl kustomize`, as `kubectl apply -k` renders the overlays

KUBECTL = shutil.which("kubectl")
RAY_CONTROL_PORTS = {6379: "GCS", 8265: "dashboard (job API)", 10001: "Ray Client"}
OPERATOR_NAMESPACE = "kuberay-system"  # docs/kubernetes.md installs the operator's Helm release there
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def kubectl_kustomize(folder: Path) -> list[dict]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {folder.relative_to(REPO)}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.fixture(scope="module")
def kustomized() -> dict[str, list[dict]]:
    """Each overlay as `kubectl kustomize` renders it (kubectl's built-in kustomize)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: the overlays are not rendered by the real kustomize here")
    return {overlay: kubectl_kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Each overlay as build() renders it: what the hardening checks read, with or without kubectl
    (test_kubectl_kustomize_renders_exactly_what_the_test_renders pins it to kubectl's rendering)."""
    return all_objects()


def _key(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def test_kubectl_kustomize_renders_exactly_what_the_test_renders(kustomized):
    """The checks above run on build(); this pins build() to what kubectl apply -k really sends."""
    for overlay, objects in kustomized.items():
        real = {_key(o): o for o in objects}
        ours = {_key(o): o for o in built(overlay)}
        assert len(real) == len(objects), f"{overlay}: duplicate objects from kubectl kustomize"
        assert set(real) == set(ours), f"{overlay}: {set(real) ^ set(ours)}"
        for key, obj in real.items():
            assert obj == ours[key], f"{overlay} {key}: kubectl kustomize renders it differently"


def test_kustomized_rayservice_validates_against_the_kuberay_crd(kustomized, rayservice_validator):
    for overlay, objects in kustomized.items():
        errors = _errors(rayservice_validator, find(objects, "RayService"))
        assert not errors, f"{overlay}: {errors}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomized_core_objects_validate_strictly_against_the_kubernetes_schemas(kustomized, version):
    _validate_core_objects(kustomized, version)


# --------------------------------------------------------------------------------------------------
# NetworkPolicies, evaluated: who reaches which port


def _pod_labels(rayservice: dict, node: str) -> dict[str, str]:
    """A Ray pod's labels as KubeRay sets them: the template's plus its own (ray.io/cluster is the
    generated RayCluster name)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    template = cluster["headGroupSpec"]["template"] if node == "head" else workers(rayservice)["template"]
    group = "headgroup" if node == "head" else workers(rayservice)["groupName"]
    kuberay = {"ray.io/cluster": "rorem-raycluster-x7k2p", "ray.io/node-type": node, "ray.io/group": group,
               "ray.io/is-ray-node": "yes", "app.kubernetes.io/created-by": "kuberay-operator"}  # fmt: skip
    return {**kuberay, **template["metadata"]["labels"]}


def _peer_matches(peer: dict, policy_namespace: str, endpoint: dict) -> bool:
    """Does a policy's from/to peer name this endpoint: a pod (namespace, labels) or an address outside the
    pod network ({"ip": ...}), which only an ipBlock names."""
    if "ip" in endpoint:
        block = peer.get("ipBlock")
        address = ipaddress.ip_address(endpoint["ip"])
        return (
            bool(block)
            and address in ipaddress.ip_network(block["cidr"])
            and not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
        )
    if "ipBlock" in peer:
        return False  # pods are named by selectors here
    if "namespaceSelector" in peer:
        namespace_ok = labels_match(peer["namespaceSelector"], endpoint["namespace_labels"])
    else:
        namespace_ok = endpoint["namespace"] == policy_namespace
    return namespace_ok and ("podSelector" not in peer or labels_match(peer["podSelector"], endpoint["labels"]))


def _port_matches(rule_port: dict, port: int, protocol: str = "TCP") -> bool:
    assert isinstance(rule_port.get("port"), int), f"numeric ports only (a named port depends on the pod): {rule_port}"
    assert rule_port.get("protocol", "TCP") in ("TCP", "UDP")
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    return rule_port["port"] <= port <= rule_port.get("endPort", rule_port["port"])


def _rules_allow(policy: dict, direction: str, peer_key: str, endpoint: dict, port: int, protocol: str) -> bool:
    for rule in policy["spec"].get(direction, []):
        peers, ports = rule.get(peer_key), rule.get("ports")
        if peers and not any(_peer_matches(p, policy["metadata"]["namespace"], endpoint) for p in peers):
            continue
        if ports and not any(_port_matches(p, port, protocol) for p in ports):
            continue
        return True
    return False


def ingress_allowed(policies: list[dict], destination: dict[str, str], source: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics for ingress (additive; a pod no policy selects is open)."""
    selecting = [
        p for p in policies if "Ingress" in _policy_types(p) and labels_match(p["spec"]["podSelector"], destination)
    ]  # fmt: skip
    return not selecting or any(_rules_allow(p, "ingress", "from", source, port, "TCP") for p in selecting)


def _policy_types(policy: dict) -> list[str]:
    """As the API server defaults them: Ingress always, Egress when the policy has egress rules."""
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def egress_allowed(policies: list[dict], source: dict[str, str], destination: dict, port: int, protocol: str) -> bool:
    """The same for egress: may a pod of the policies' namespace with labels `source` connect out."""
    selecting = [p for p in policies if "Egress" in _policy_types(p) and labels_match(p["spec"]["podSelector"], source)]
    return not selecting or any(_rules_allow(p, "egress", "to", destination, port, protocol) for p in selecting)


def _source(namespace: str, labels: dict | None = None, namespace_labels: dict | None = None) -> dict:
    return {"namespace": namespace, "labels": labels or {},
            "namespace_labels": {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_documented_matrix(rendered, overlay):
    objects = rendered[overlay]
    namespace = find(objects, "Namespace")["metadata"]["name"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert all(p["metadata"]["namespace"] == namespace for p in policies)
    default_deny = find(objects, "NetworkPolicy", "rorem-default-deny-ingress")["spec"]
    assert default_deny["podSelector"] == {} and default_deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in default_deny, "the default policy allows nothing"

    rayservice = find(objects, "RayService")
    head, worker = _pod_labels(rayservice, "head"), _pod_labels(rayservice, "worker")
    head_ports = {p["name"]: p["containerPort"] for p in rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
                  ["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
    worker_ports = {p["name"]: p["containerPort"] for p in workers(rayservice)["template"]["spec"]["containers"][0]["ports"]}
    serving = [worker_ports["serve"], worker_ports["grpc"]]
    metrics = head_ports["metrics"]
    assert worker_ports["metrics"] == metrics and serving == [HTTP_PORT, GRPC_PORT]
    dashboard, gcs = head_ports["dashboard"], head_ports["gcs-server"]
    internal = [gcs, dashboard, 10001, 52365, 8076, 10002, 19999]  # GCS, dashboard, client, agent, object manager, workers
    job = {"app.kubernetes.io/name": "rorem", "app.kubernetes.io/component": "weights", "batch.kubernetes.io/job-name": "x"}
    other_cluster = {**worker, "ray.io/cluster": "rorem-raycluster-new42"}  # the other side of a blue/green upgrade

    ingress_controller = _source("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, {"rorem/client": "true"})
    stranger = _source("default", {"app": "anything"})
    operator = _source(OPERATOR_NAMESPACE, OPERATOR_POD_LABELS)
    operator_lookalike = _source("default", OPERATOR_POD_LABELS)
    prometheus = _source("monitoring", {"app.kubernetes.io/name": "prometheus"})
    same_namespace_pod = _source(namespace, {"app": "debug"})
    matrix = [
        # source, destination labels, ports, allowed
        (ingress_controller, worker, serving, True),
        (ingress_controller, worker, [metrics, *internal], False),
        (ingress_controller, head, [*serving, metrics, *internal], False),
        (stranger, worker, serving, overlay == "dev"),  # dev: the service from every namespace
        (stranger, worker, [metrics, *internal], False),
        (stranger, head, [*serving, metrics, *internal], False),
        (operator, head, [dashboard], True),
        (operator, head, [gcs, 10001, metrics, 52365, *serving], False),
        (operator, worker, internal, False),
        (operator, worker, serving, overlay == "dev"),
        (operator_lookalike, head, [dashboard], False),
        (prometheus, head, [metrics], True),
        (prometheus, worker, [metrics], True),
        (prometheus, head, [dashboard, gcs, *serving], False),
        (prometheus, worker, internal, False),
        (prometheus, worker, serving, overlay == "dev"),
        (_source(namespace, worker), head, [*internal, metrics], True),  # Ray's own traffic
        (_source(namespace, head), worker, [*internal, *serving, 45678], True),
        (_source(namespace, worker), worker, [*internal, 45678], True),
        (_source(namespace, other_cluster), head, [gcs], True),
        (_source(namespace, job), head, [gcs, dashboard, metrics], False),
        (_source(namespace, job), worker, internal, False),
        (_source(namespace, job), worker, serving, overlay == "dev"),
        (same_namespace_pod, head, [gcs, dashboard, 10001], False),
        (same_namespace_pod, worker, serving, overlay == "dev"),
        (same_namespace_pod, worker, [metrics, *internal], False),
        (_source(namespace, worker), job, [80, 8000], False),  # the weights Job accepts nothing
        (_source("elsewhere", worker), head, [gcs, dashboard], False),  # Ray labels in another namespace
    ]
    for source, destination, ports, allowed in matrix:
        for port in ports:
            assert ingress_allowed(policies, destination, source, port) is allowed, (
                f"{overlay}: {source['namespace']} {source['labels']} -> {destination.get('app.kubernetes.io/component')}"
                f":{port} should be {'allowed' if allowed else 'denied'}"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_workers_reach_only_ray_pods_and_the_cluster_dns(rendered, overlay):
    """A decoder exploit on a serving worker finds no way out: no internet, no Kubernetes API, no other pod."""
    objects = rendered[overlay]
    namespace = find(objects, "Namespace")["metadata"]["name"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    rayservice = find(objects, "RayService")
    head, worker = _pod_labels(rayservice, "head"), _pod_labels(rayservice, "worker")
    other_cluster = {**worker, "ray.io/cluster": "rorem-raycluster-new42"}
    job = {"app.kubernetes.io/name": "rorem", "app.kubernetes.io/component": "weights", "batch.kubernetes.io/job-name": "x"}
    dns = _source("kube-system", {"k8s-app": "kube-dns"})
    outside = {name: {"ip": ip} for name, ip in (("hub", "18.239.50.1"), ("api", "10.96.0.1"), ("resolver", "8.8.8.8"))}
    metadata, node_local_dns = {"ip": "169.254.169.254"}, {"ip": "169.254.20.10"}
    any_port = [443, 80, 53, 6379, 8265, 45678]
    matrix = [
        # source labels, destination, ports, protocol, allowed
        (worker, _source(namespace, head), [6379, 8265, 10001, 52365, 45678], "TCP", True),
        (worker, _source(namespace, worker), [8076, 10002, 19999, HTTP_PORT, 45678], "TCP", True),
        (worker, _source(namespace, other_cluster), [6379], "TCP", True),
        (worker, dns, [53], "UDP", True),
        (worker, dns, [53], "TCP", True),
        (worker, dns, [80, 443, 9153], "TCP", False),
        (worker, _source("kube-system", {"k8s-app": "metrics-server"}), [53, 443], "TCP", False),
        (worker, _source("kube-system", {"k8s-app": "metrics-server"}), [53], "UDP", False),
        (worker, _source("elsewhere", {"k8s-app": "kube-dns"}), [53], "UDP", False),  # kube-dns lookalike
        (worker, _source(namespace, job), any_port, "TCP", False),
        (worker, _source(namespace, {"app": "debug"}), any_port, "TCP", False),
        (worker, _source("elsewhere", worker), [6379, 8265], "TCP", False),  # Ray labels in another namespace
        *[(worker, address, any_port, "TCP", False) for address in outside.values()],
        *[(worker, address, [53, 123], "UDP", False) for address in outside.values()],
        (worker, metadata, [80, 443, 8080, 8775], "TCP", False),  # the metadata service: credentials
        *[(worker, address, [53], protocol, True) for address in (metadata, node_local_dns) for protocol in ("UDP", "TCP")],
        (worker, node_local_dns, [80, 8080, 9253], "TCP", False),
    ]
    for source, destination, ports, protocol, allowed in matrix:
        for port in ports:
            assert egress_allowed(policies, source, destination, port, protocol) is allowed, (
                f"{overlay}: {source.get('app.kubernetes.io/component')} -> {destination.get('ip') or destination['labels']}"
                f":{port}/{protocol} should be {'allowed' if allowed else 'denied'}"
            )
    egress = find(objects, "NetworkPolicy", "rorem-worker-egress")["spec"]
    assert egress["podSelector"] == find(objects, "NetworkPolicy", "rorem-serving")["spec"]["podSelector"], (
        "the pods that take uploads are the pods whose egress is closed"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_head_and_the_weights_job_reach_what_they_need_and_not_the_metadata_service(rendered, overlay):
    """The head's autoscaler calls the Kubernetes API and the Job downloads from the hub, so their egress was left
    open: code on the head (any Ray task can run there) or in the Job could read the node's cloud credentials
    from the metadata service at 169.254.169.254."""
    objects = rendered[overlay]
    namespace = find(objects, "Namespace")["metadata"]["name"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    rayservice = find(objects, "RayService")
    head, worker = _pod_labels(rayservice, "head"), _pod_labels(rayservice, "worker")
    dns = _source("kube-system", {"k8s-app": "kube-dns"})
    api_service, control_plane = {"ip": "10.96.0.1"}, {"ip": "172.18.0.2"}  # the `kubernetes` Service, its endpoint
    hub, metadata, node_local_dns = {"ip": "18.239.50.1"}, {"ip": "169.254.169.254"}, {"ip": "169.254.20.10"}
    matrix = [
        # source labels, destination, ports, protocol, allowed
        (head, _source(namespace, worker), [6379, 8076, 10002, 19999, HTTP_PORT, 45678], "TCP", True),
        (head, _source(namespace, head), [6379, 8265, 52365], "TCP", True),
        (head, dns, [53], "UDP", True),
        (head, node_local_dns, [53], "UDP", True),
        (head, api_service, [443], "TCP", True),
        (head, control_plane, [443, 6443, 8443], "TCP", True),  # 8443: minikube's
        (head, metadata, [80, 443, 6443, 8443, 8080], "TCP", False),  # the node's cloud credentials
        (head, hub, [80, 22, 5432], "TCP", False),
        (head, _source(namespace, {"app": "debug"}), [80, 5432, 8000], "TCP", False),
    ]
    job_pods = [o for o in objects if o["kind"] == "Job"]
    if job_pods:  # the prod overlay includes k8s/weights
        (job_pod,) = job_pods
        job = {**job_pod["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": "x"}
        matrix += [
            (job, hub, [443], "TCP", True),
            (job, dns, [53], "UDP", True),
            (job, dns, [53], "TCP", True),
            (job, metadata, [80, 443, 8080], "TCP", False),
            (job, hub, [80, 22], "TCP", False),
            (job, _source(namespace, head), [6379, 8265, 10001], "TCP", False),
            (job, _source(namespace, worker), [HTTP_PORT, GRPC_PORT, 8080], "TCP", False),
        ]
    for source, destination, ports, protocol, allowed in matrix:
        for port in ports:
            to = destination.get("ip") or destination["labels"]
            assert egress_allowed(policies, source, destination, port, protocol) is allowed, (
                f"{overlay}: {source.get('app.kubernetes.io/component')} -> {to}:{port}/{protocol} should be "
                f"{'allowed' if allowed else 'denied'}"
            )
    assert overlay == "dev" or job_pods, "prod runs the weights Job"


def test_the_serving_policy_selects_the_services_endpoints_and_the_ray_policies_every_ray_pod(rendered):
    for overlay, objects in rendered.items():
        rayservice = find(objects, "RayService")
        head, worker = _pod_labels(rayservice, "head"), _pod_labels(rayservice, "worker")
        serving = find(objects, "NetworkPolicy", "rorem-serving")["spec"]["podSelector"]
        grpc_selector = {"matchLabels": find(objects, "Service", "rorem-grpc")["spec"]["selector"]}
        assert labels_match(serving, worker) and labels_match(grpc_selector, worker) and not labels_match(serving, head)
        for name in ("rorem-ray-internal", "rorem-metrics"):
            selector = find(objects, "NetworkPolicy", name)["spec"]["podSelector"]
            assert labels_match(selector, head) and labels_match(selector, worker), f"{overlay} {name}"
            assert {"key": "ray.io/cluster", "operator": "Exists"} in selector["matchExpressions"], (
                "select by the ray.io/cluster label KubeRay sets (its value changes at each upgrade)"
            )
        operator = find(objects, "NetworkPolicy", "rorem-from-kuberay-operator")["spec"]
        assert labels_match(operator["podSelector"], head) and not labels_match(operator["podSelector"], worker)
        assert [p["port"] for rule in operator["ingress"] for p in rule["ports"]] == [8265]
        if overlay == "prod":  # the PodMonitor's Prometheus is allowed on the port the PodMonitor scrapes
            (endpoint,) = find(objects, "PodMonitor", "rorem")["spec"]["podMetricsEndpoints"]
            metrics = find(objects, "NetworkPolicy", "rorem-metrics")["spec"]["ingress"][0]["ports"][0]["port"]
            head_ports = {p["name"]: p["containerPort"] for p in rayservice["spec"]["rayClusterConfig"]
                          ["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
            assert head_ports[endpoint["port"]] == metrics


# --------------------------------------------------------------------------------------------------
# pods: security contexts, writable paths, ServiceAccount tokens


def _image_user() -> tuple[int, str]:
    dockerfile = (REPO / "Dockerfile").read_text()
    uids = set(re.findall(r"useradd --uid (\d+)[^\n]* (\w+)\s*\\?\n", dockerfile))
    assert len(uids) == 1, f"one service user in every stage of the Dockerfile: {uids}"
    ((uid, name),) = uids
    assert re.findall(r"^USER (\S+)", dockerfile, re.M) and all(
        u.split(":")[0] in (uid, name) for u in re.findall(r"^USER (\S+)", dockerfile, re.M)
    )
    return int(uid), name


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    specs = {}
    for obj in objects:
        if obj["kind"] == "RayService":
            specs |= {f"RayService/{name}": t["spec"] for name, t in pod_templates(obj).items()}
        elif obj["kind"] == "Job":
            specs[f"Job/{obj['metadata']['name']}"] = obj["spec"]["template"]["spec"]
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Pod", "CronJob", "ReplicaSet"):
            raise AssertionError(f"unexpected workload {obj['kind']}: add it to this test")
    return specs


def all_containers(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container, init containers and the autoscaler sidecar
    (built by KubeRay from autoscalerOptions) included."""
    found = []
    for where, spec in pod_specs(objects).items():
        for kind in ("initContainers", "containers"):
            found += [(f"{where}/{c['name']}", c, spec) for c in spec.get(kind, [])]
    for obj in objects:
        cluster = obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else None
        if cluster and cluster.get("enableInTreeAutoscaling"):
            autoscaler = {"name": "autoscaler", **cluster["autoscalerOptions"]}
            found.append(("RayService/head/autoscaler", autoscaler, cluster["headGroupSpec"]["template"]["spec"]))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_locked_down(rendered, overlay):
    uid, user = _image_user()
    home = f"/home/{user}"
    objects = rendered[overlay]
    for where, spec in pod_specs(objects).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid and pod["runAsGroup"] == uid, where
        assert pod["fsGroup"] == uid and pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
    checked = 0
    for where, container, spec in all_containers(objects):
        context = container["securityContext"]
        effective = {**spec["securityContext"], **context}
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where
        assert effective["runAsNonRoot"] is True and effective.get("runAsUser", uid) == uid, where
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not context.get("privileged"), where
        checked += 1
    assert checked == {"dev": 3, "prod": 5}[overlay], "head, autoscaler, workers (prod: and their init container, the Job)"

    # writable paths of the read-only root filesystem: emptyDirs where Ray, Python and the engines write
    cluster = find(objects, "RayService")["spec"]["rayClusterConfig"]
    for where, container, spec in all_containers(objects):
        if where.endswith("/wait-for-bundle"):
            continue  # reads one file, writes nothing
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        needed = ["/tmp", home] + ([] if where.startswith("Job/") or where.endswith("/autoscaler") else ["/tmp/ray"])
        for path in needed:
            assert path in mounts, f"{overlay} {where}: nothing writable at {path}"
            assert set(volumes[mounts[path]]) == {"name", "emptyDir"}, f"{overlay} {where}: {path} is not an emptyDir"
        if where.startswith("RayService/"):
            assert "emptyDir" in volumes.get("ray-logs", {}) and mounts.get("/tmp/ray", "ray-logs") == "ray-logs", (
                "the head's /tmp/ray is the volume KubeRay also mounts into the autoscaler: it must be named ray-logs"
            )
    assert cluster["headGroupSpec"]["rayStartParams"].get("plasma-directory") is None, "KubeRay's /dev/shm emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_scratch_volume_is_bounded(rendered, overlay):
    """Logs and spilled objects grow with traffic: an emptyDir without a sizeLimit can fill the node's disk and
    get other tenants' pods evicted; with one, the kubelet evicts only the pod that outgrew it."""
    scratch = {
        f"{where}/{volume['name']}": volume["emptyDir"]
        for where, spec in pod_specs(rendered[overlay]).items()
        for volume in spec.get("volumes", [])
        if "emptyDir" in volume
    }
    assert len(scratch) == {"dev": 8, "prod": 10}[overlay], sorted(scratch)
    unbounded = [name for name, volume in scratch.items() if "sizeLimit" not in volume]
    assert unbounded == [], f"{overlay}: emptyDirs without a sizeLimit"


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity) -> int:
    """A Kubernetes storage quantity (`2Gi`, `500M`, `1024`) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(quantity))
    assert match, f"unexpected storage quantity {quantity!r}"
    number, unit = match.groups()
    return int(float(number) * (_BINARY.get(unit) or _DECIMAL.get(unit) or 1))


def test_storage_quantities_parse():
    assert _bytes("2Gi") == 2 * 2**30 and _bytes("512Mi") == 2**29 and _bytes("1G") == 10**9 and _bytes(1024) == 1024
    with pytest.raises(AssertionError):
        _bytes("2 GB")


EPHEMERAL_MARGIN = 2 * 2**30  # at least this much beyond a pod's emptyDirs: container logs and writable layers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_declares_ephemeral_storage_covering_its_pods_scratch_volumes(overlay):
    """The kubelet evicts a pod whose disk use (emptyDirs, container logs, writable layers) passes the sum of its
    containers' ephemeral-storage limits, and the scheduler places a pod only where its requests fit. Without them
    a node's disk is overcommitted blindly: every container declares both, and each pod's limits cover its disk
    emptyDirs' sizeLimits (the largest they may hold before the kubelet evicts the pod for them) plus a margin."""
    by_pod: dict[str, list[tuple[str, dict]]] = {}
    for where, container, spec in all_containers(built(overlay)):
        resources = container.get("resources", {})
        request = resources.get("requests", {}).get("ephemeral-storage")
        limit = resources.get("limits", {}).get("ephemeral-storage")
        assert request is not None and limit is not None, f"{overlay} {where}: no ephemeral-storage request and limit"
        assert 0 < _bytes(request) <= _bytes(limit), f"{overlay} {where}: request {request} > limit {limit}"
        pod = where.rsplit("/", 1)[0]
        by_pod.setdefault(pod, []).append((container["name"], container))
    specs = pod_specs(built(overlay))
    assert set(by_pod) == set(specs), (sorted(by_pod), sorted(specs))
    for pod, spec in specs.items():
        scratch = sum(
            _bytes(v["emptyDir"]["sizeLimit"])
            for v in spec.get("volumes", [])
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"  # a tmpfs counts against memory
        )
        init = {c["name"] for c in spec.get("initContainers", [])}
        limits = {name: _bytes(c["resources"]["limits"]["ephemeral-storage"]) for name, c in by_pod[pod]}
        # the pod's effective limit: its containers' sum (the autoscaler sidecar included), or an init container's
        effective = max([sum(v for name, v in limits.items() if name not in init)] + [limits[n] for n in init])
        assert effective >= scratch + EPHEMERAL_MARGIN, (
            f"{overlay} {pod}: ephemeral-storage limits {effective / 2**30:g}Gi do not cover its emptyDirs "
            f"({scratch / 2**30:g}Gi) plus {EPHEMERAL_MARGIN / 2**30:g}Gi for logs and writable layers"
        )


def test_every_pdb_is_one_kubernetes_can_sync_for_pods_a_raycluster_owns():
    """KubeRay's RayCluster has no scale subresource, so the disruption controller can compute a budget for its
    pods only from an integer minAvailable: a maxUnavailable or a percentage fails to sync and allows no eviction
    at all, which hung every drain of a GPU node (ray-project/kuberay#2662)."""
    for overlay in OVERLAYS:
        for pdb in (o for o in built(overlay) if o["kind"] == "PodDisruptionBudget"):
            spec = pdb["spec"]
            assert "maxUnavailable" not in spec and isinstance(spec.get("minAvailable"), int), f"{overlay}: {spec}"


def test_the_ingress_body_size_the_docs_suggest_takes_the_largest_body_the_proxy_takes():
    """A JSON request carries the upload in base64: an ingress limit at the upload size answers its own 413 to
    uploads the service would take."""
    from serve.config import AppSettings
    from serve.uploads import largest_json_body

    (size,) = re.findall(r"proxy-body-size: (\d+)m", (REPO / "docs" / "kubernetes.md").read_text())
    assert int(size) * 2**20 >= largest_json_body(AppSettings().imaging.max_upload_bytes)


def test_a_pdb_holds_the_head_in_place():
    """Without GCS fault tolerance a new head kills the workers (Serve redeploys, GPU models reload): a voluntary
    eviction of the head must wait for a planned move (docs/kubernetes.md, "Node maintenance")."""
    for overlay in OVERLAYS:
        objects = built(overlay)
        rayservice = find(objects, "RayService")
        head, worker = _pod_labels(rayservice, "head"), _pod_labels(rayservice, "worker")
        # the template's own labels alone select it (KubeRay's ray.io/cluster changes at each blue/green upgrade)
        template = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
        pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
        on_head = [p for p in pdbs if labels_match(p["spec"]["selector"], head)]
        assert [p["metadata"]["name"] for p in on_head] == ["rorem-head"], f"{overlay}: {on_head}"
        (pdb,) = on_head
        assert labels_match(pdb["spec"]["selector"], template), f"{overlay}: selects on labels KubeRay sets"
        assert not labels_match(pdb["spec"]["selector"], worker), f"{overlay}: the head PDB selects workers"
        assert pdb["spec"]["minAvailable"] == 1, pdb["spec"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", "a head that is not ready never blocks a drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_automounts_a_service_account_token_and_only_the_autoscaler_gets_one(rendered, overlay):
    objects = rendered[overlay]
    for where, spec in pod_specs(objects).items():
        assert spec.get("automountServiceAccountToken") is False, f"{overlay} {where}: a token is mounted"
    cluster = find(objects, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    token_volumes = {
        v["name"] for v in head.get("volumes", [])
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }  # fmt: skip
    for where, container, spec in all_containers(objects):
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        if where == "RayService/head/autoscaler":
            assert cluster["enableInTreeAutoscaling"] is True
            (mount,) = [m for m in container["volumeMounts"] if m["name"] in token_volumes]
            assert mount["mountPath"] == SA_TOKEN_DIR and mount["readOnly"] is True
            (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
            sources = volume["projected"]["sources"]
            assert any(s.get("serviceAccountToken", {}).get("path") == "token" for s in sources)
            assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in sources), "ca.crt"
            assert any(i["path"] == "namespace" for s in sources for i in s.get("downwardAPI", {}).get("items", []))
        else:
            assert not mounted & token_volumes, f"{overlay} {where}: mounts the ServiceAccount token"
            assert all(not m["mountPath"].startswith("/var/run/secrets/kubernetes.io") for m in container.get("volumeMounts", []))
    if not cluster.get("enableInTreeAutoscaling"):
        assert not token_volumes, "without the autoscaler no container needs the Kubernetes API"


RAY_LOGS_MOUNT = {"name": "ray-logs", "mountPath": "/tmp/ray"}  # KubeRay mounts the head's /tmp/ray into the autoscaler
READ_ONLY_SOURCES = ("secret", "configMap", "projected", "downwardAPI")  # Kubernetes mounts these read-only


def _writable_volumes(container: dict, spec: dict) -> set[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {
        m["name"] for m in container.get("volumeMounts", [])
        if not m.get("readOnly") and not any(k in volumes[m["name"]] for k in READ_ONLY_SOURCES)
    }  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_with_the_kubernetes_token_runs_nothing_another_container_can_write(rendered, overlay):
    """The autoscaler (the Kubernetes token, a Role that patches pods) mounted ray-head's own HOME and /tmp: a
    ~/.profile or a ~/.local/.../*.pth planted by code in the application ran in the autoscaler at its next start.
    It shares only /tmp/ray, which KubeRay mounts into both (the autoscaler's logs and events for the dashboard)."""
    cluster = find(rendered[overlay], "RayService")["spec"]["rayClusterConfig"]
    by_pod: dict[str, list[tuple[str, dict, dict]]] = {}
    for where, container, spec in all_containers(rendered[overlay]):
        if where == "RayService/head/autoscaler":
            container = {**container, "volumeMounts": [*container["volumeMounts"], RAY_LOGS_MOUNT]}
        by_pod.setdefault(where.rsplit("/", 1)[0], []).append((where, container, spec))
    holders = []
    for pod, members in by_pod.items():
        for where, container, spec in members:
            tokens = {
                v["name"] for v in spec.get("volumes", [])
                if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
            }  # fmt: skip
            if not tokens & {m["name"] for m in container.get("volumeMounts", [])}:
                continue
            holders.append(where)
            mine = _writable_volumes(container, spec)
            for other, other_container, _ in members:
                if other != where:
                    shared = mine & _writable_volumes(other_container, spec)
                    assert shared <= {"ray-logs"}, f"{overlay}: {where} and {other} both write {sorted(shared)}"
    assert holders == ["RayService/head/autoscaler"], holders
    options = cluster["autoscalerOptions"]
    env = {e["name"]: e.get("value") for e in options.get("env", [])}
    assert env.get("PYTHONNOUSERSITE") == "1", "no ~/.local site-packages (a planted .pth) in the autoscaler"
    assert options.get("command") == ["/bin/bash", "-c", "--"], "KubeRay's command without -l: no ~/.profile read"
    assert "args" not in options, "KubeRay's own args (ray kuberay-autoscaler ...) run unchanged"
    assert "BASH_ENV" not in env and "ENV" not in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_carries_rays_dashboard_gcs_or_client_port(rendered, overlay):
    objects = rendered[overlay]
    rayservice = find(objects, "RayService")
    services = [o for o in objects if o["kind"] == "Service"]
    services.append({"kind": "Service", **rayservice["spec"]["serveService"]})
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", f"{service['metadata']['name']} is exposed"
        for port in service["spec"]["ports"]:
            for number in (port["port"], port.get("targetPort")):
                assert number not in RAY_CONTROL_PORTS, f"{service['metadata']['name']}: {RAY_CONTROL_PORTS[number]}"
    # KubeRay copies the head container's ports into its head Service: only GCS (the workers join
    # through it), the dashboard (the operator) and metrics; not the Ray Client port.
    cluster = rayservice["spec"]["rayClusterConfig"]
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "metrics": 8080}
    assert not cluster.get("headServiceAnnotations") and "headService" not in cluster["headGroupSpec"]
    for where, container, _ in all_containers(objects):
        if "worker" in where:
            assert not {p["containerPort"] for p in container.get("ports", [])} & set(RAY_CONTROL_PORTS), where
    start = cluster["headGroupSpec"]["rayStartParams"]
    assert start["dashboard-host"] == "0.0.0.0", "bound deliberately: the operator reaches it over the pod network"
    assert "ray-client-server-port" not in start


def test_prod_turns_rays_token_auth_on_from_a_secret(rendered):
    rayservice = find(rendered["prod"], "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    auth = cluster["authOptions"]
    assert auth == {"mode": "token", "secretName": "rorem-ray-auth-token"}
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0), "Ray token auth needs Ray 2.52+"
    assert not any(o["kind"] == "Secret" for o in rendered["prod"]), "no secret is committed"
    create = (
        f"kubectl -n {find(rendered['prod'], 'Namespace')['metadata']['name']} create secret generic "
        f'{auth["secretName"]} --from-literal=auth_token="$(openssl rand -hex 32)"'
    )  # the key KubeRay reads (auth_token), a random value never typed into a shell's history
    assert create in (REPO / "docs" / "kubernetes.md").read_text(), "the guide's Deploy creates the Secret"
    assert create in (K8S / "overlays" / "prod" / "ray-auth.yaml").read_text()
    for name, template in pod_templates(rayservice).items():  # KubeRay injects these; none set by hand
        for container in template["spec"]["containers"]:
            assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, name
        # the probes stay on Ray's unauthenticated health endpoints or the Serve proxy
        probe = template["spec"]["containers"][0]["livenessProbe"]["httpGet"]
        assert probe["path"] == "/api/healthz"


def test_the_crd_check_catches_a_wrong_auth_mode(rendered, rayservice_validator):
    for overlay, objects in rendered.items():
        rayservice = find(objects, "RayService")
        assert not _errors(rayservice_validator, rayservice), overlay
        mistyped = copy.deepcopy(rayservice)
        mistyped["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"
        assert _errors(rayservice_validator, mistyped), f"{overlay}: the CRD check catches a wrong auth mode"


def test_dev_turns_rays_token_auth_on_with_a_token_kuberay_generates(rendered):
    """Dev relied on its NetworkPolicies alone, on clusters (minikube, kind) whose default CNI ignores them: the
    dashboard's job API was open to every pod. A generated token needs no Secret to create before the apply."""
    rayservice = find(rendered["dev"], "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}, "no secretName: no manual step"
    assert not any(o["kind"] == "Secret" for o in rendered["dev"]), "no secret is committed"
    guide = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    namespace = find(rendered["dev"], "Namespace")["metadata"]["name"]
    # the generated Secret is named after the RayCluster, which changes at each upgrade
    active = "{.status.activeServiceStatus.rayClusterName}"
    cluster = f"kubectl -n {namespace} get rayservice rorem -o jsonpath='{active}'"
    read = f"""kubectl -n {namespace} get secret "$cluster" -o jsonpath='{{.data.auth_token}}' | base64 -d"""
    assert f"cluster=$({cluster}) {read}" in guide, "the guide says how to read dev's token"


def test_no_documented_secret_puts_its_value_on_the_command_line():
    """`--from-literal=HF_TOKEN=hf_...` leaves the token in the shell's history (and in `ps` while it runs)."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(K8S.rglob("*.yaml"))]:
        for line in doc.read_text().splitlines():
            for value in re.findall(r"--from-literal=\w+=(\S+)", line):
                where = doc.relative_to(REPO)
                assert value.startswith('"$('), f"{where}: a value typed on the command line: {line.strip()}"
    guide = (REPO / "docs" / "kubernetes.md").read_text()
    assert "create secret generic rorem-hf-token --from-file=HF_TOKEN=" in guide


def test_the_weights_job_has_a_deadline_the_guide_gives():
    """A download that hangs (a stalled connection, a hub outage) kept the Job running, its retries included, with
    no end: activeDeadlineSeconds fails it, and the workers' wait for the bundle says where to look."""
    job = find(built("prod"), "Job", "rorem-fetch-weights")
    deadline = job["spec"].get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and 3600 <= deadline <= 86400, deadline
    assert deadline < job["spec"]["ttlSecondsAfterFinished"], "the failed Job stays for its logs"
    guide = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    assert f"`activeDeadlineSeconds` ({deadline} s: {deadline / 3600:g} h)" in guide


def test_the_operations_summary_names_the_budgets_and_policies():
    """docs/operations.md said "a PodDisruptionBudget" where there are two, and named no NetworkPolicy."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text[text.index("## Deploy on Kubernetes") :]
    section = section[: section.find("\n## ", 1)]
    for obj in built("prod"):
        if obj["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            assert obj["metadata"]["name"] in section, f"operations.md: {obj['kind']} {obj['metadata']['name']}"


def test_namespaces_enforce_the_restricted_pod_security_standard(rendered):
    for overlay, objects in rendered.items():
        labels = find(objects, "Namespace")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", overlay


def _quantity(value) -> float:
    """A CPU or memory quantity (`500m`, `2`, `512Mi`, `4Gi`) as a number: CPUs, or GiB."""
    text = str(value)
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    return _bytes(text) / 2**30 if text[-2:] in _BINARY else float(text)


def _pod_requests(spec: dict, name: str) -> float:
    """A pod's request as the scheduler counts it: its containers' sum, or an init container's if larger."""
    running = sum(_quantity(c["resources"]["requests"][name]) for c in spec["containers"])
    return max([running] + [_quantity(c["resources"]["requests"][name]) for c in spec.get("initContainers", [])])


def test_the_deploy_guide_gives_the_manifests_values():
    """docs/kubernetes.md restated the worker group's bounds, the autoscaler's idle time, the upgrade's deletion
    delay, the bundle wait, the dev overlay's requests and the ephemeral-storage margin by hand."""

    guide = (REPO / "docs" / "kubernetes.md").read_text()
    rayservice = find(built("prod"), "RayService")
    group = workers(rayservice)
    init = group["template"]["spec"]["initContainers"]
    wait = next(e for c in init for e in c["env"] if e["name"] == "ROREM_BUNDLE_WAIT_S")
    named = {
        "minReplicas": group["minReplicas"],
        "maxReplicas": group["maxReplicas"],
        "idleTimeoutSeconds": rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"],
        "rayClusterDeletionDelaySeconds": rayservice["spec"]["rayClusterDeletionDelaySeconds"],
        "ROREM_BUNDLE_WAIT_S": float(wait["value"]),
    }
    said = {}
    for name, value, passage in named_values(guide):
        if name in named:
            assert value == named[name], f"kubernetes.md: {name} is {named[name]} in prod: {passage!r}"
            said[name] = value
    assert set(said) == set(named), f"not found beside its value: {sorted(set(named) - set(said))}"
    assert f"`ROREM_BUNDLE_WAIT_S` ({float(wait['value']):g} s: {float(wait['value']) / 3600:g} h)" in guide

    dev = find(built("dev"), "RayService")
    cluster, group = dev["spec"]["rayClusterConfig"], workers(dev)
    head = {name: _pod_requests(cluster["headGroupSpec"]["template"]["spec"], name)
            + _quantity(cluster["autoscalerOptions"]["resources"]["requests"][name]) for name in ("cpu", "memory")}
    worker = {name: _pod_requests(group["template"]["spec"], name) for name in ("cpu", "memory")}
    first, most = (
        f"{head['cpu'] + n * worker['cpu']:g} CPUs and {head['memory'] + n * worker['memory']:g} GiB"
        for n in (group["minReplicas"], group["maxReplicas"])
    )  # fmt: skip
    text = " ".join(guide.split())
    assert f"the requests come to {first}, {most} when the autoscaler adds the second worker" in text
    assert group["maxReplicas"] == group["minReplicas"] + 1, "'the second worker'"
    cpus, memory = (int(n) for n in re.search(r"minikube start --cpus (\d+) --memory (\d+)g", text).groups())
    most_cpus, most_memory = (head[name] + group["maxReplicas"] * worker[name] for name in ("cpu", "memory"))
    assert cpus >= most_cpus + 1 and memory >= most_memory, "the cluster it recommends holds the second worker"
    operations = " ".join((REPO / "docs" / "operations.md").read_text().split())
    assert f"kind / minikube with {cpus} CPUs, {memory} GiB" in operations, "one recommended size"

    margin = f"{EPHEMERAL_MARGIN // 2**30}Gi"
    assert f"their sizeLimits plus {margin} for logs and writes" in text
    margins = re.findall(r"(?:sizeLimits|emptyDirs) plus (\d+)Gi", text)
    assert len(margins) >= 3 and set(margins) == {margin.removesuffix("Gi")}, margins
    limits = {where: _bytes(c["resources"]["limits"]["ephemeral-storage"]) // 2**30
              for overlay in OVERLAYS for where, c, _ in all_containers(built(overlay))}  # fmt: skip
    written = {
        "GPU worker": limits["RayService/gpu-workers/ray-worker"],
        "head": limits["RayService/head/ray-head"],
        "CPU worker": limits["RayService/cpu-workers/ray-worker"],
        "weights Job": limits["Job/rorem-fetch-weights/fetch"],
    }
    for who, limit in written.items():
        total, terms = re.search(rf"{who} (\d+)Gi \((\d+(?: \+ \d+)+)\)", text).groups()
        terms = [int(term) for term in terms.split(" + ")]
        assert int(total) == limit == sum(terms), f"kubernetes.md: the {who}'s limit is {limit}Gi: {total} {terms}"
        assert terms[-1] == EPHEMERAL_MARGIN // 2**30, f"kubernetes.md: the {who}'s margin"


def test_the_deploy_guide_s_weights_table_names_every_source_the_job_reads_with_its_default():
    """The table left out ROREM_PROMPT and ROREM_IMPORT_DTYPE, which k8s/weights/sources.yaml sets for the Job."""
    objects = built("prod")
    job = find(objects, "Job", "rorem-fetch-weights")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (source,) = container["envFrom"]
    sources = find(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    read = set(re.findall(r"os\.environ(?:\.get\(|\[)\"(ROREM_[A-Z_]+)\"", " ".join(container["args"])))
    assert read and read <= set(sources), f"the Job reads {sorted(read - set(sources))} that no source sets"
    guide = (REPO / "docs" / "kubernetes.md").read_text()
    table = guide[guide.index("| key | default | |") :].split("\n\n", 1)[0].splitlines()[2:]
    rows = {m[1]: m[2] for m in (re.match(r"\| `(\w+)` \| ([^|]+?) \|", row) for row in table)}
    assert set(rows) == set(sources), f"kubernetes.md's weights table: {sorted(set(rows) ^ set(sources))}"
    for key, value in sources.items():
        assert rows[key] == (f"`{value}`" if value else "empty"), f"kubernetes.md: {key} is {value!r} in the Job"


def test_the_deploy_guide_gives_prod_s_worker_group_and_replica_bounds():
    """"2 to 8 pods, each 8 CPUs, 48 GiB", "1 to 6" Removers, "1 to 2" Scorers and "2 to 24" Ingresses restated the
    prod RayService and its Serve config by hand."""
    rayservice = find(built("prod"), "RayService")
    group = workers(rayservice)
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    text = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    cpus, memory = _quantity(requests["cpu"]), _quantity(requests["memory"])
    pods = f"{group['minReplicas']} to {group['maxReplicas']} pods, each {cpus:g} CPUs, {memory:g} GiB"
    assert f"The `{group['groupName']}` group ({pods}," in text
    bounds = {
        d["name"]: f"{d['autoscaling_config']['min_replicas']} to {d['autoscaling_config']['max_replicas']}"
        for d in serve_config(rayservice)["applications"][0]["deployments"]
    }
    assert f"`Remover` (1 GPU, {bounds['Remover']} replicas), `Scorer` (1 GPU, {bounds['Scorer']})" in text
    assert f"`Ingress` (1 CPU, {bounds['Ingress']})" in text
    assert f"{bounds['Remover']} Remover, {bounds['Scorer']} Scorer, {bounds['Ingress']} Ingress replicas" in text
