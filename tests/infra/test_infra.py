"""Validation of the cluster and deployment definitions: ray_cluster.yaml and infra/.

Each file is checked with the validator of the system that will read it, where one runs
offline: Ray's cluster-config schema and defaults for ray_cluster.yaml, botocore's EC2 model
for its node configs, Ray Serve's own config schema and application builder for the Serve
config, the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail)
for the Kubernetes objects and for the pod templates inside the KubeRay resources, MLflow's
own CLI parser for the tracking server's command line. KubeRay publishes no schema package
on PyPI, so the RayJob/RayService fields outside the pod templates are checked structurally
against the fields of KubeRay's ray.io/v1 Go types. Finally, the versions pinned in the
images are compared with pyproject.toml, so that the cluster never runs other versions
than the ones the tests ran.

Nothing here starts Ray, a container or a network connection.
"""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_VERSION = "1.33.0"  # a Kubernetes release current EKS/GKE clusters run; the schemas are strict

RAY_IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-(?P<platform>gpu|cu\d+)$")


# ------------------------------------------------------------------ helpers

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _pyproject_pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def _exact_version(req: Requirement) -> str:
    (spec,) = list(req.specifier)
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def _requirements_file(path: Path) -> dict[str, Requirement]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {Requirement(ln).name.lower(): Requirement(ln) for ln in lines if ln}


def _kuberay_pods(resource: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group of a RayJob/RayService."""
    spec = resource["spec"]
    cluster = spec["rayClusterSpec"] if resource["kind"] == "RayJob" else spec["rayClusterConfig"]
    pods = [("head", cluster["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def _cluster(resource: dict) -> dict:
    return resource["spec"]["rayClusterSpec" if resource["kind"] == "RayJob" else "rayClusterConfig"]


def _quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity ("7", "500m", 8) as a number."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


RAYJOB = INFRA / "rayjob-igpt.yaml"
RAYSERVICE = INFRA / "rayservice.yaml"
ALL_YAML = [ROOT / "ray_cluster.yaml", *sorted(INFRA.glob("*.yaml"))]


# ------------------------------------------------------------------ every file parses

@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected YAML mappings"


def test_infra_holds_no_secret_values():
    # Keys live in Kubernetes Secrets created by hand (infra/namespace.yaml says how); a Secret
    # object with data in git would publish them.
    for path in INFRA.glob("*.yaml"):
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{path.name} defines a Secret: create it with kubectl instead"
    text = "\n".join(p.read_text() for p in [*ALL_YAML, INFRA / "Dockerfile", INFRA / "mlflow.Dockerfile"])
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is written in the infra files"
    assert not re.search(r"postgres(ql)?://[^:\s]+:[^<@\s]+@", text), "a database password is written in the infra files"


# ------------------------------------------------------------------ ray_cluster.yaml

@pytest.fixture(scope="module")
def cluster_config():
    """ray_cluster.yaml as `ray up` sees it before it talks to AWS: merged with Ray's AWS
    defaults and normalised by Ray's prepare_config (reads files only, no AWS call)."""
    from ray.autoscaler._private.util import prepare_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    return raw, prepare_config(copy.deepcopy(raw))


def test_ray_cluster_config_passes_rays_own_validation(cluster_config):
    from ray.autoscaler._private.util import validate_config

    _, prepared = cluster_config
    validate_config(prepared)  # ray-schema.json + head type + sum(min_workers) <= max_workers


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_worker=4), "jsonschema"),                                   # a misspelt top-level key
    (lambda c: c["available_node_types"]["cpu_decode"].update(min_workers=100), ValueError),  # min > global max
    (lambda c: c["available_node_types"]["gpu_latent"]["resources"].update(GPU=0.5), "jsonschema"),
], ids=["unknown-key", "min-over-max", "fractional-resource"])
def test_ray_validation_is_not_vacuous(cluster_config, break_it, error):
    # The same validation rejects broken variants of the same file: the pass above means something.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = copy.deepcopy(cluster_config[0])
    break_it(raw)
    with pytest.raises(jsonschema.ValidationError if error == "jsonschema" else error):
        validate_config(prepare_config(raw))


def test_ray_cluster_node_configs_are_valid_ec2_run_instances_requests(cluster_config):
    # Ray passes node_config to EC2 RunInstances (plus MinCount/MaxCount/tags); botocore's bundled
    # service model is the API's own input schema, so a misspelt field or a wrong spot option fails
    # here instead of at launch.
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in cluster_config[1]["available_node_types"].items():
        request = dict(node_type["node_config"], MinCount=1, MaxCount=1)
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        bad = _enum_violations(request, shape)
        assert not bad, f"{name}: values outside the EC2 API's enums: {bad}"


def _enum_violations(value, shape, path="") -> list[str]:
    """botocore's client-side validation checks types and field names but not enum values (the
    server does); walk the same model for those, e.g. MarketType, InstanceType, VolumeType."""
    if shape.type_name == "structure":
        return [v for k, sub in value.items() for v in _enum_violations(sub, shape.members[k], f"{path}.{k}")]
    if shape.type_name == "list":
        return [v for i, sub in enumerate(value) for v in _enum_violations(sub, shape.member, f"{path}[{i}]")]
    if shape.type_name == "string" and shape.enum and value not in shape.enum:
        return [f"{path.lstrip('.')}={value!r}"]
    return []


def test_ray_cluster_has_the_node_types_the_pipeline_needs(cluster_config):
    raw, prepared = cluster_config
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0, "the head must schedule no work"

    def spot(t):
        return t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"

    cpu_workers = [t for n, t in types.items() if n != prepared["head_node_type"] and not t["resources"].get("GPU")]
    gpu1 = [t for t in types.values() if t["resources"].get("GPU") == 1]
    gpu8 = [t for t in types.values() if t["resources"].get("GPU") == 8]
    assert cpu_workers and all(spot(t) for t in cpu_workers), "CPU decode workers, on spot"
    assert gpu1 and all(spot(t) for t in gpu1), "1-GPU latent encoder workers, on spot"
    assert {t["node_config"]["InstanceType"] for t in gpu8} & {"p4de.24xlarge", "p5.48xlarge"}
    assert not any(spot(t) for t in gpu8), "multi-node training workers stay on-demand"
    # The 7b training config must fit on the largest training type at its max size.
    scaling = yaml.safe_load((ROOT / "configs" / "igpt_7b.yaml").read_text())["scaling"]
    assert max(t["max_workers"] * 8 for t in gpu8) >= scaling["num_workers"]
    assert 0 < raw["idle_timeout_minutes"] <= 30


def test_ray_cluster_installs_the_project_and_sets_auth(cluster_config):
    raw, prepared = cluster_config
    assert raw["file_mounts"] == {"~/dreamllm": "."}, "the working copy goes to ~/dreamllm on every node"
    setup = prepared["setup_commands"]
    assert any("-r ~/dreamllm/infra/requirements-cluster.txt" in c for c in setup)
    assert any("--no-deps" in c and "~/dreamllm" in c for c in setup), "the project itself must not re-resolve torch"
    assert prepared["head_setup_commands"] == setup, "no setup command from Ray's defaults sneaks in"
    for cmd in prepared["head_start_ray_commands"][1:] + prepared["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=" in cmd, f"auth mode must be explicit where Ray starts: {cmd}"


# ------------------------------------------------------------------ Ray Serve config

@pytest.fixture(scope="module")
def serve_configs():
    """infra/serve_config.yaml and the RayService's serveConfigV2, both parsed."""
    service = _one(RAYSERVICE, "RayService")
    return yaml.safe_load((INFRA / "serve_config.yaml").read_text()), yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_serves_the_same_config_as_serve_config_yaml(serve_configs):
    on_ray_up, on_kuberay = serve_configs
    assert on_kuberay == on_ray_up, "infra/rayservice.yaml serveConfigV2 drifted from infra/serve_config.yaml"


def test_serve_config_validates_with_ray_serves_schema(serve_configs):
    from ray.serve.schema import ServeDeploySchema

    for cfg in serve_configs:
        schema = ServeDeploySchema.model_validate(cfg)  # what `serve deploy` and KubeRay submit
        assert [a.import_path for a in schema.applications] == ["dreamllm_platform.serving.app:app_builder"]


def test_serve_application_builds_from_its_args_without_ray(serve_configs):
    # Serve's own path from import_path + args to the application, as its builder task runs it:
    # a wrong import path, an unknown arg or a bad `--set` override fails here.
    import ray
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    was_initialized = ray.is_initialized()
    (app_cfg,) = ServeDeploySchema.model_validate(serve_configs[1]).applications
    builder = import_attr(app_cfg.import_path)
    built = build_app(call_user_app_builder_with_args_if_necessary(builder, app_cfg.args), name=app_cfg.name)
    names = {d.name for d in built.deployments}
    assert {d.name for d in app_cfg.deployments} <= names, f"the config tunes deployments the app lacks: {names}"
    assert built.ingress_deployment_name == "OpenAIIngress"
    assert ray.is_initialized() == was_initialized, "building the app must not start Ray"


def test_rayservice_pods_fit_the_serve_deployments(serve_configs):
    # Every deployment's actor options must fit some worker pod, and the GPU group must be able to
    # grow to the model's max_replicas, or Serve waits forever for a replica that cannot be placed.
    service = _one(RAYSERVICE, "RayService")
    groups = _cluster(service)["workerGroupSpecs"]
    (app,) = serve_configs[1]["applications"]
    for dep in app["deployments"]:
        opts, auto = dep["ray_actor_options"], dep["autoscaling_config"]
        fitting = []
        for g in groups:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            pod_gpus, pod_cpus = _quantity(limits.get("nvidia.com/gpu", 0)), _quantity(limits["cpu"])
            if opts.get("num_gpus", 0) <= pod_gpus and opts.get("num_cpus", 1) <= pod_cpus:
                per_pod = min(pod_cpus // opts.get("num_cpus", 1),
                              pod_gpus // opts["num_gpus"] if opts.get("num_gpus") else float("inf"))
                fitting.append(per_pod * g["maxReplicas"])
        assert fitting, f"no worker group fits {dep['name']} ({opts})"
        assert max(fitting) >= auto["max_replicas"], f"{dep['name']}: max_replicas cannot be placed"


def test_serve_api_key_comes_from_a_mounted_secret(serve_configs):
    (app,) = serve_configs[1]["applications"]
    sets = dict(s.split("=", 1) for s in app["args"]["set"])
    key_file = Path(sets["auth.api_key_file"])
    assert sets.get("auth.require_api_key") == "true", "a missing secret must fail the deployment, not open the API"
    # Any pod may run an ingress replica, so every pod mounts the secret where the config looks.
    for group, pod in _kuberay_pods(_one(RAYSERVICE, "RayService")):
        spec = pod["spec"]
        secrets = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
        served = {Path(m["mountPath"]) / item["path"] for m in mounts for item in secrets[m["name"]]["items"]}
        assert key_file in served, f"{group}: {key_file} is not mounted from a Secret ({served})"
    # On a `ray up` cluster the file is written on the host and its directory mounted into the container.
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert f"-v {key_file.parent}:{key_file.parent}:ro" in cluster["docker"]["run_options"]
    assert any(f"tee {key_file}" in c for c in cluster["initialization_commands"])


# ------------------------------------------------------------------ KubeRay resources
# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go) that these manifests
# may use; a misspelt field would otherwise be dropped silently by the API server's pruning.
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                      "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                      "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                      "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_SPEC_FIELDS = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                          "excludeHeadPodFromServeSvc"}
CLUSTER_FIELDS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                  "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "authOptions"}
HEAD_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                 "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                     "idleTimeoutSeconds", "upscalingMode", "version"}


def _check_cluster_spec(name: str, cluster: dict) -> None:
    assert set(cluster) <= CLUSTER_FIELDS, f"{name}: unknown cluster fields {set(cluster) - CLUSTER_FIELDS}"
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS, f"{name}: unknown head fields {set(head) - HEAD_FIELDS}"
    groups = [("head", head)] + [(g.get("groupName"), g) for g in cluster.get("workerGroupSpecs", [])]
    for group, spec in groups:
        # rayStartParams become `ray start --key=value` flags and must be strings (a YAML 0 is rejected).
        params = spec.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}/{group}: rayStartParams values must be strings"
        assert spec["template"]["spec"]["containers"], f"{name}/{group}: no container"
    for group, spec in groups[1:]:
        assert group and set(spec) <= WORKER_FIELDS, f"{name}/{group}: unknown worker fields {set(spec) - WORKER_FIELDS}"
        assert 0 <= spec["minReplicas"] <= spec.get("replicas", spec["minReplicas"]) <= spec["maxReplicas"]


def test_rayjob_runs_the_igpt_job():
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/igpt.py"] and argv[argv.index("--config") + 1] == "configs/igpt_7b.yaml"
    for rel in (argv[1], argv[argv.index("--config") + 1]):
        assert (ROOT / rel).is_file(), f"the entrypoint names {rel}, which is not in the repository"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir"), "the job needs the code as working dir"
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    _check_cluster_spec("RayJob", spec["rayClusterSpec"])
    # The fixed GPU group must hold the training config's workers.
    scaling = yaml.safe_load((ROOT / argv[argv.index("--config") + 1]).read_text())["scaling"]
    gpus = sum(_quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= scaling["num_workers"], f"{gpus} GPUs for {scaling['num_workers']} training workers"


def test_rayservice_structure():
    service = _one(RAYSERVICE, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS, f"unknown RayService fields {set(spec) - RAYSERVICE_SPEC_FIELDS}"
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string, not a mapping"
    _check_cluster_spec("RayService", spec["rayClusterConfig"])


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_pod_templates_validate_against_kubernetes_schema(path):
    # The bulk of a RayJob/RayService is core/v1 PodTemplateSpecs; wrapped in a PodTemplate they
    # are checked against Kubernetes' own schema, unknown fields included.
    import kubernetes_validate

    resource = next(d for d in _docs(path) if d["apiVersion"] == "ray.io/v1")
    for group, template in _kuberay_pods(resource):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        for c in template["spec"]["containers"]:
            # KubeRay's authOptions sets RAY_AUTH_MODE and RAY_AUTH_TOKEN; a container's own would fight it.
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), f"{path.name}/{group}: auth is authOptions'"


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_clusters_require_rays_token_authentication(path):
    cluster = _cluster(next(d for d in _docs(path) if d["apiVersion"] == "ray.io/v1"))
    assert cluster.get("authOptions") == {"mode": "token"}, f"{path.name}: Ray's ports need token auth"
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), f"{path.name}: token auth needs Ray >= 2.52 (rayVersion {cluster['rayVersion']})"
    assert "KubeRay >= 1.5.1" in path.read_text(), f"{path.name}: say the KubeRay version authOptions needs"


@pytest.mark.parametrize("path", [INFRA / "mlflow.yaml", INFRA / "namespace.yaml", INFRA / "networkpolicy.yaml"],
                         ids=lambda p: p.name)
def test_kubernetes_objects_validate_against_kubernetes_schema(path):
    import kubernetes_validate

    for doc in _docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_network_policy_closes_the_dashboard_and_gcs_to_pods_outside_the_ray_clusters():
    policy = _one(INFRA / "networkpolicy.yaml", "NetworkPolicy")
    ray_pods = {"ray.io/is-ray-node": "yes"}  # the label KubeRay puts on every head and worker pod
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == _one(INFRA / "namespace.yaml", "Namespace")["metadata"]["name"]
    assert spec["podSelector"] == {"matchLabels": ray_pods} and "Ingress" in spec["policyTypes"]
    closed = {6379, 8265, 10001, 52365}  # GCS, dashboard/Jobs API, Ray client, dashboard agent
    open_to_all, rayjob = set(), _one(RAYJOB, "RayJob")["metadata"]["name"]
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if not sources:  # from anywhere: only the API, and only named ports
            assert ports and not ports & closed, f"rule {rule} opens Ray's ports to every pod"
            open_to_all |= ports
        elif not ports:  # every port: only from Ray pods of the namespace
            assert sources == [{"podSelector": {"matchLabels": ray_pods}}], f"rule {rule} opens every port"
        else:  # a named client (the operator, the RayJob submitter) on the ports it needs
            assert all("podSelector" in s for s in sources), f"rule {rule} admits whole namespaces"
            labels = [s["podSelector"]["matchLabels"] for s in sources]
            assert all(lbl.get("app.kubernetes.io/name") == "kuberay-operator"
                       or lbl.get("batch.kubernetes.io/job-name") == rayjob for lbl in labels), rule
    assert open_to_all == {8000}, "the API (and nothing else) is open to the cluster"
    head = next(t for g, t in _kuberay_pods(_one(RAYSERVICE, "RayService")) if g == "head")
    assert {p["containerPort"] for p in head["spec"]["containers"][0]["ports"]} >= {6379, 8265, 8000}


def test_kubernetes_validation_is_not_vacuous():
    import kubernetes_validate

    deployment = _one(INFRA / "mlflow.yaml", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = _one(INFRA / "mlflow.yaml", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["envFromSecret"] = "mlflow-db"  # no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ------------------------------------------------------------------ MLflow server

def test_mlflow_server_is_where_the_7b_configs_track():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = _one(INFRA / "mlflow.yaml", "Deployment"), _one(INFRA / "mlflow.yaml", "Service")
    uri = urlparse(yaml.safe_load((ROOT / "configs" / "igpt_7b.yaml").read_text())["tracking"]["tracking_uri"])
    host = uri.hostname.split(".")
    assert host[0] == service["metadata"]["name"] and host[1] == service["metadata"]["namespace"]
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # MLflow 3 answers 403 to Host headers it does not allow: check with MLflow's own matcher.
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    allowed = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--allowed-hosts="))
    assert is_allowed_host_header([h.strip() for h in allowed.split(",")], uri.netloc)


def test_mlflow_server_command_line_parses_with_mlflows_cli():
    # MLflow's own click command parses the Deployment's command line (no server starts): every
    # option exists, and the backend store URI comes from the Secret through the variable that
    # option reads.
    from mlflow.cli import server

    (container,) = _one(INFRA / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    ctx = server.make_context("server", list(container["args"]))
    assert ctx.params["serve_artifacts"] is True
    assert urlparse(ctx.params["artifacts_destination"]).scheme == "s3"
    store_option = next(p for p in server.params if p.name == "backend_store_uri")
    env = {e["name"]: e for e in container["env"]}
    assert store_option.envvar in env and "secretKeyRef" in env[store_option.envvar]["valueFrom"]
    assert not any("backend-store-uri" in a for a in container["args"]), "the DB URI must not be on the command line"


# ------------------------------------------------------------------ versions: images vs pyproject

def test_cluster_requirements_are_pyprojects_pins_less_torch():
    pins = _pyproject_pins()
    cluster = _requirements_file(INFRA / "requirements-cluster.txt")
    expected = {n: str(r) for n, r in pins.items() if n != "torch"}
    assert {n: str(r) for n, r in cluster.items()} == expected, "infra/requirements-cluster.txt drifted from pyproject.toml"


def test_images_and_clusters_run_the_pinned_versions():
    pins = _pyproject_pins()
    ray_version, torch_version = _exact_version(pins["ray"]), _exact_version(pins["torch"])
    python_ok = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])

    dockerfile = (INFRA / "Dockerfile").read_text()
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    images = [re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1), cluster["docker"]["image"]]
    for image in images:
        m = RAY_IMAGE_RE.match(image)
        assert m, f"{image}: expected a rayproject/ray:<version>-py<XY>-gpu|cuXXX image"
        assert m["ray"] == ray_version, f"{image}: Ray {m['ray']}, pyproject pins {ray_version}"
        assert f"{m['py']}.{m['pyminor']}" in python_ok, f"{image}: Python outside requires-python {python_ok}"

    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_version)}$", dockerfile, re.M), \
        f"infra/Dockerfile must install torch {torch_version}"
    assert "-r /tmp/requirements-cluster.txt" in dockerfile and "--no-deps" in dockerfile
    assert any(f'"torch=={torch_version}"' in c for c in cluster["setup_commands"])

    for path in (RAYJOB, RAYSERVICE):
        resource = next(d for d in _docs(path) if d["apiVersion"] == "ray.io/v1")
        assert _cluster(resource)["rayVersion"] == ray_version, f"{path.name}: rayVersion != pinned Ray"
        pod_images = {c["image"] for _, pod in _kuberay_pods(resource) for c in pod["spec"]["containers"]}
        assert len(pod_images) == 1, f"{path.name}: head and workers must run one image, got {pod_images}"

    mlflow_pins = dict(re.findall(r"\b(mlflow|boto3)==(\S+)", (INFRA / "mlflow.Dockerfile").read_text()))
    assert mlflow_pins == {"mlflow": _exact_version(pins["mlflow"]), "boto3": _exact_version(pins["boto3"])}


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".tmp", "outputs", "mlruns"} <= ignored
