"""The recipes of cluster/ parse and agree with each other, with the specs and with this install.

No cluster is started here (tests/test_e2e_cluster.py does that): KubeRay manifests, the
cluster-launcher YAML and the MLflow recipes are read as YAML and cross-checked: Ray and MLflow
versions, images, GPU requests against rayStartParams, the RayJob's entrypoint against the CLI
and search_spaces/, the specs' resources against the worker groups that must run them, shared
storage and token authentication everywhere.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import ray
import yaml

from simpo_sweep.cli import _parser as cli_parser
from simpo_sweep.spec.loading import load_spec
from simpo_sweep.spec.models import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SEARCH_SPACES = ROOT / "search_spaces"
KUBERAY = CLUSTER / "kuberay"
RAY_VERSION = "2.60.0"
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
SHARED_MOUNT = "/mnt/shared"
SHARED_CLAIM = "simpo-shared"
TOKEN_SECRET = "simpo-sweep-ray-token"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _mlflow_service_uri() -> str:
    """http://<service>.<namespace>.svc.cluster.local:<port> of cluster/mlflow/kubernetes.yaml."""
    service = next(
        doc
        for doc in _documents(CLUSTER / "mlflow" / "kubernetes.yaml")
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "mlflow"
    )
    port = service["spec"]["ports"][0]["port"]
    return f"http://mlflow.{service['metadata']['namespace']}.svc.cluster.local:{port}"


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_containers(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, its rayStartParams, the Ray container) for the head and every worker group."""
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster["workerGroupSpecs"]]
    return [
        (name, group.get("rayStartParams", {}), group["template"]["spec"]["containers"][0])
        for name, group in groups
    ]


def _pod_volumes(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in group["template"]["spec"].get("volumes", [])}


KUBERAY_DOCS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"]


@pytest.fixture(scope="module", params=KUBERAY_DOCS, ids=lambda path: path.name)
def kuberay(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    kind = "RayCluster" if path.name == "raycluster.yaml" else "RayJob"
    return _one(path, kind)


def test_every_yaml_under_cluster_parses() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {path.relative_to(CLUSTER).as_posix() for path in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/shared-storage.yaml",
        "launcher/gpu-cluster.yaml",
        "mlflow/kubernetes.yaml",
    }
    for path in files:
        assert _documents(path), f"{path} holds no YAML document"


def test_installed_ray_is_the_version_the_recipes_pin() -> None:
    assert ray.__version__ == RAY_VERSION


def test_kuberay_versions_and_images_agree(kuberay: dict[str, Any]) -> None:
    assert kuberay["apiVersion"] == "ray.io/v1"
    cluster = _cluster_spec(kuberay)
    assert cluster["rayVersion"] == RAY_VERSION == ray.__version__
    for name, _, container in _ray_containers(cluster):
        image = container["image"]
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-gpu", image)
        assert match, f"{name}: unexpected image {image}"
        assert match.group(1) == cluster["rayVersion"], f"{name}: {image} vs rayVersion"
        # Jobs ship this client's simpo_sweep package: same Python minor on both sides.
        assert match.group(2) == PYTHON_TAG, f"{name}: {image} vs this Python ({PYTHON_TAG})"
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base and base.group(1) == _ray_containers(cluster)[0][2]["image"]
    assert f"ray[default,train,tune]=={RAY_VERSION}" in dockerfile


def test_kuberay_token_auth_is_on(kuberay: dict[str, Any]) -> None:
    auth = _cluster_spec(kuberay)["authOptions"]
    assert auth["mode"] == "token"
    assert auth["secretName"] == TOKEN_SECRET
    path = KUBERAY / ("raycluster.yaml" if kuberay["kind"] == "RayCluster" else "rayjob.yaml")
    # The header tells how to create that Secret with the key KubeRay reads.
    assert f"create secret generic {TOKEN_SECRET}" in path.read_text()
    assert "--from-literal=auth_token=" in path.read_text()


def test_kuberay_head_runs_no_trials(kuberay: dict[str, Any]) -> None:
    _, params, container = _ray_containers(_cluster_spec(kuberay))[0]
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    ports = {port["containerPort"] for port in container["ports"]}
    assert {6379, 8265} <= ports
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_kuberay_gpu_workers_request_what_ray_advertises(kuberay: dict[str, Any]) -> None:
    cluster = _cluster_spec(kuberay)
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        name = group["groupName"]
        container = group["template"]["spec"]["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus >= 1, name
        assert int(requests["nvidia.com/gpu"]) == gpus, f"{name}: GPU requests != limits"
        assert int(group["rayStartParams"]["num-gpus"]) == gpus, f"{name}: num-gpus != limits"
        assert requests["cpu"] == limits["cpu"], f"{name}: CPU requests != limits"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), name


def test_kuberay_install_fails_the_pod_and_keeps_ray(kuberay: dict[str, Any]) -> None:
    for name, _, container in _ray_containers(_cluster_spec(kuberay)):
        command = " ".join(container.get("command", []))
        if not command:
            continue  # an image with simpo-sweep baked in
        # KubeRay runs `<command> && ulimit ...; ray start`: without `|| exit 1` a failed install
        # would still start a Ray node that lacks the package.
        assert "pip install" in command and command.rstrip().endswith("|| exit 1"), name
        assert f"ray[default,train,tune]=={RAY_VERSION}" in command, name
        env = {item["name"]: item for item in container["env"]}
        assert "SIMPO_SWEEP_PIP_SPEC" in env, name


def test_kuberay_every_node_mounts_the_shared_volume(kuberay: dict[str, Any]) -> None:
    cluster = _cluster_spec(kuberay)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert SHARED_MOUNT in mounts, container["name"]
        volume = _pod_volumes(group)[mounts[SHARED_MOUNT]]
        assert volume["persistentVolumeClaim"]["claimName"] == SHARED_CLAIM
    claim = _one(KUBERAY / "shared-storage.yaml", "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == SHARED_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_mlflow_uri_is_the_mlflow_service(kuberay: dict[str, Any]) -> None:
    uri = _mlflow_service_uri()
    for name, _, container in _ray_containers(_cluster_spec(kuberay)):
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == uri, name
        # Secrets come from Secrets, never as literal values.
        assert "HF_TOKEN" not in env or env["HF_TOKEN"] is None, name


# ---- RayJob: the entrypoint is a real simpo-sweep command on a real spec ---------------------


def _rayjob() -> dict[str, Any]:
    return _one(KUBERAY / "rayjob.yaml", "RayJob")


def _entrypoint_spec(rayjob: dict[str, Any]) -> tuple[list[str], SweepSpec, Path]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "simpo-sweep", argv
    args = cli_parser().parse_args(argv[1:])  # exits (fails the test) on a bad command line
    assert args.command == "run"
    assert args.address == "auto"
    mounted = Path(args.spec)
    # The spec comes from search_spaces/ through the ConfigMap mounted on the head.
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert str(mounted.parent) in mounts, f"{mounted.parent} is not mounted on the head"
    volume = _pod_volumes(head)[mounts[str(mounted.parent)]]
    configmap = volume["configMap"]["name"]
    text = (KUBERAY / "rayjob.yaml").read_text()
    assert f"create configmap {configmap} --from-file=search_spaces/" in text
    local = SEARCH_SPACES / mounted.name
    assert local.is_file(), f"{local} does not exist"
    return args.overrides, load_spec(local, args.overrides), local


def test_rayjob_entrypoint_runs_a_search_spaces_spec() -> None:
    rayjob = _rayjob()
    _, spec, _ = _entrypoint_spec(rayjob)
    assert spec.storage.path.startswith(SHARED_MOUNT + "/")
    assert spec.storage.shared_filesystem is True
    assert spec.tracking.tracking_uri == _mlflow_service_uri()
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    # The driver fits on the head, which advertises no CPU.
    head_cpus = float(
        rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]
    )
    assert float(rayjob["spec"].get("entrypointNumCpus", 0)) <= head_cpus


def _group_capacity(group: dict[str, Any]) -> tuple[float, float, int]:
    """(CPUs, GPUs) Ray advertises on one pod of the group, and its maxReplicas."""
    container = group["template"]["spec"]["containers"][0]
    params = group.get("rayStartParams", {})
    cpus = float(params.get("num-cpus", container["resources"]["limits"]["cpu"]))
    gpus = float(params.get("num-gpus", container["resources"]["limits"].get("nvidia.com/gpu", 0)))
    return cpus, gpus, int(group["maxReplicas"])


def _fits(spec: SweepSpec, group: dict[str, Any]) -> bool:
    """Whether one trial of `spec` can be placed on the group's pods."""
    resources = spec.resources
    cpus, gpus, replicas = _group_capacity(group)
    if resources.num_workers == 1:
        return resources.cpus_per_worker <= cpus and resources.gpus_per_worker <= gpus
    by_cpu = math.floor(cpus / resources.cpus_per_worker)
    by_gpu = math.floor(gpus / resources.gpus_per_worker) if resources.gpus_per_worker else by_cpu
    per_pod = min(by_cpu, by_gpu)
    return per_pod >= 1 and per_pod * replicas >= resources.num_workers


def test_rayjob_trials_fit_its_gpu_workers() -> None:
    rayjob = _rayjob()
    _, spec, _ = _entrypoint_spec(rayjob)
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert spec.resources.gpus_per_worker > 0, "a GPU cluster should run GPU trials"
    assert any(_fits(spec, group) for group in groups), "no worker group can hold one trial"


def test_raycluster_runs_the_specs_its_header_names() -> None:
    text = (KUBERAY / "raycluster.yaml").read_text()
    named = sorted(set(re.findall(r"search_spaces/([\w.-]+\.yaml)", text)))
    assert named, "raycluster.yaml names no spec to submit"
    groups = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    for name in named:
        spec = load_spec(SEARCH_SPACES / name)
        assert any(_fits(spec, group) for group in groups), f"{name} fits no worker group"


def test_every_spec_named_in_cluster_recipes_exists() -> None:
    for path in [*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.sh")]:
        for name in re.findall(r"search_spaces/([\w.-]+\.yaml)", path.read_text()):
            assert (SEARCH_SPACES / name).is_file(), f"{path.name} names missing {name}"


# ---- cluster launcher -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "launcher" / "gpu-cluster.yaml").read_text())


def test_launcher_node_types(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0, "GPU": 0}, "the head must not run trials"
    workers = {name: node for name, node in types.items() if name != head}
    assert workers, "no worker node type"
    gpu_families = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")
    for name, node in workers.items():
        assert node["node_config"]["InstanceType"].startswith(gpu_families), name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= launcher["max_workers"], name
    assert launcher["provider"]["type"] in {"aws", "gcp", "azure"}


def test_launcher_image_and_project_install(launcher: dict[str, Any]) -> None:
    image = launcher["docker"]["image"]
    assert image == f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
    raycluster = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    assert image == _ray_containers(raycluster["spec"])[0][2]["image"]
    mounts = launcher["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local in {".", "./"})
    setup = launcher["setup_commands"]
    assert any("pip install" in cmd and project in cmd for cmd in setup), setup
    assert any(f"ray[default,train,tune]=={RAY_VERSION}" in cmd for cmd in setup), setup
    excluded = set(launcher["rsync_exclude"])
    assert {".venv", ".git", "simpo_runs", "mlruns"} <= excluded
    assert any("__pycache__" in pattern for pattern in excluded)


def test_launcher_token_auth_and_shared_storage(launcher: dict[str, Any]) -> None:
    head_start = " ".join(launcher["head_start_ray_commands"])
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands
    assert "--num-cpus=0" in head_start
    assert "--dashboard-port=8265" in head_start
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    options = " ".join(launcher["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in options
    assert any(SHARED_MOUNT in cmd for cmd in launcher["initialization_commands"])


# ---- MLflow ---------------------------------------------------------------------------------


def _mlflow_server_args() -> tuple[dict[str, Any], str]:
    deployment = next(
        doc
        for doc in _documents(CLUSTER / "mlflow" / "kubernetes.yaml")
        if doc["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return container, " ".join(container.get("args", []))


def test_mlflow_server_recipe() -> None:
    container, args = _mlflow_server_args()
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}"
    dockerfile = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f"FROM {container['image']}" in dockerfile
    assert "--backend-store-uri postgresql://" in args  # a database, not a file store
    assert "--artifacts-destination s3://" in args and "--serve-artifacts" in args
    assert "--app-name basic-auth" in args  # nobody reaches the runs without a password
    env_names = {item["name"] for item in container["env"]}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= env_names
    uri = _mlflow_service_uri()
    port = uri.rsplit(":", 1)[1]
    assert f"--port {port}" in args and "--host 0.0.0.0" in args
    host = uri.split("//", 1)[1]
    allowed = re.search(r'--allowed-hosts "([^"]+)"', args)
    assert allowed, "Ray workers reach the server by its Service name: --allowed-hosts needed"
    names = allowed.group(1).split(",")
    assert host in names and host.rsplit(":", 1)[0] in names
    # The URI names no password; credentials come from Secrets.
    assert not re.search(r"postgresql://[^/\s]*:[^/\s]*@", args)
    for item in container["env"]:
        if any(word in item["name"] for word in ("PASSWORD", "SECRET", "KEY_ID")):
            assert "valueFrom" in item and "value" not in item, item["name"]


def test_published_grid_spec_uses_the_kubernetes_services() -> None:
    spec = load_spec(SEARCH_SPACES / "simpo-published-grid-8b.yaml")
    assert spec.tracking.tracking_uri == _mlflow_service_uri()
    assert spec.storage.path.startswith(SHARED_MOUNT + "/") and spec.storage.shared_filesystem


# ---- scripts --------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["local_cluster.sh", "mlflow/server.sh"])
def test_scripts_are_valid_bash_with_help(script: str) -> None:
    path = CLUSTER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    shown = subprocess.run(
        ["bash", str(path), "--help"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "cluster/" in shown.stdout


def test_local_cluster_refuses_bad_arguments(tmp_path: Path) -> None:
    script = str(CLUSTER / "local_cluster.sh")
    state = ["--state-dir", str(tmp_path)]
    bad = subprocess.run(
        ["bash", script, "start", "--workers", "two", *state], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--workers" in bad.stderr
    missing = subprocess.run(
        ["bash", script, "kill-node", "1", *state], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "no local cluster" in missing.stderr
    stopped = subprocess.run(["bash", script, "stop", *state], capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr  # idempotent: nothing to stop
    status = subprocess.run(["bash", script, "status", *state], capture_output=True, text=True)
    assert status.returncode == 1 and "not running" in status.stdout


def test_readme_explains_every_recipe() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on a cluster", 1)
    assert len(section) == 2, "README.md has no 'Running on a cluster' section"
    body = section[1].split("\n## ", 1)[0]
    for recipe in (
        "cluster/local_cluster.sh",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/kuberay/shared-storage.yaml",
        "cluster/launcher/gpu-cluster.yaml",
        "cluster/mlflow/kubernetes.yaml",
        "cluster/mlflow/server.sh",
        "simpo-sweep submit",
        "RAY_AUTH_TOKEN",
        "shared_filesystem",
    ):
        assert recipe in body, f"README 'Running on a cluster' does not mention {recipe}"
