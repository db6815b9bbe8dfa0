"""The training launcher and its deployment files, checked offline.

The pod is rendered by the real KubernetesPodOperator (the pod backend is one) and validated against the
Kubernetes OpenAPI schema bundled with kubernetes-validate; the local backend runs the real
``python -m mmpipe train``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import structlog
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.execution_time.task_runner import _run_execute_callable
from airflow.serialization.serialized_objects import DagSerialization
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from mmpipe.config import Settings

ROOT = Path(__file__).resolve().parents[2]

from mmpipe_airflow.pod import TrainCandidatePodOperator  # noqa: E402
from mmpipe_airflow.training import TrainCandidateOperator, training_operator  # noqa: E402

K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
PLAN = "s3://mmpipe/plans/2026-11-23/plan.json"
RUN_ID = "scheduled__2026-11-23T00:00:00+00:00"
CANDIDATE = {
    "name": "resnet18-f50", "backbone": "resnet18", "freeze_ratio": 0.5, "init": "pretrained",
    "channel_mode": "replicate", "image_size": 64, "epochs": 2, "batch_size": 16, "lr": 0.001,
    "lr_finetune": 0.0001,
}  # fmt: skip
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def k8s_operator(**overrides) -> TrainCandidatePodOperator:
    kwargs = {"plan_uri": PLAN, "candidate": CANDIDATE, "run_id": RUN_ID}
    return TrainCandidatePodOperator(task_id="train", **{**kwargs, **overrides})


def as_dict(op: KubernetesPodOperator, context: dict | None = None) -> dict:
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context=context, dry_run=True))


def render_pod(**overrides) -> dict:
    return as_dict(k8s_operator(**overrides))


def trainer(pod: dict) -> dict:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return container


def settings_field(env_name: str) -> str:
    assert env_name.startswith("MMPIPE_"), env_name
    return env_name.removeprefix("MMPIPE_").lower()


def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- the pod ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("gpu_count", [1, 0])
def test_rendered_pod_is_valid_kubernetes(version, gpu_count):
    kubernetes_validate.validate(render_pod(gpu_count=gpu_count), version, strict=True)


def test_pod_requests_a_gpu_on_a_gpu_node():
    pod = render_pod(gpu_count=2)
    resources = trainer(pod)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]


def test_cpu_only_pod_asks_for_no_gpu_and_no_gpu_node():
    pod = render_pod(gpu_count=0)
    assert "nvidia.com/gpu" not in trainer(pod)["resources"]["limits"]
    assert not pod["spec"].get("nodeSelector")
    assert not pod["spec"].get("tolerations")


def test_explicit_node_selector_and_tolerations_win():
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    pod = render_pod(node_selector={"pool": "a100"}, tolerations=tolerations)
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
    assert pod["spec"]["tolerations"] == tolerations


def test_pod_command_is_exactly_the_train_cli():
    container = trainer(render_pod())
    command = container["command"] + container.get("args", [])
    assert command == [
        "mmpipe", "train", "--plan", PLAN, "--candidate", command[5], "--run-id", RUN_ID,
        "--xcom-file", "/airflow/xcom/return.json",
    ]  # fmt: skip
    assert json.loads(command[5]) == CANDIDATE


def test_pod_identity_settings_and_housekeeping():
    pod = render_pod()
    spec, container = pod["spec"], trainer(pod)
    assert container["envFrom"] == [{"secretRef": {"name": "mmpipe-settings"}}]
    assert spec["serviceAccountName"] == "mmpipe-trainer"
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # The xcom sidecar exists, so the CLI's return.json becomes the task's XCom.
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])
    labels = pod["metadata"]["labels"]
    assert {k: labels[k] for k in ("app", "component", "backbone")} == {
        "app": "mmpipe", "component": "trainer", "backbone": "resnet18"
    }  # fmt: skip
    assert pod["metadata"]["namespace"] == "mmpipe"


def test_pod_launch_options():
    pod_op = k8s_operator()
    assert pod_op.do_xcom_push is True
    assert pod_op.on_finish_action.value == "delete_succeeded_pod"
    assert pod_op.deferrable is False
    assert pod_op.startup_timeout_seconds == 900


def test_no_secret_values_reach_the_pod_spec(monkeypatch):
    sentinels = {
        "MMPIPE_S3_SECRET_ACCESS_KEY": "sentinel-s3-secret-7f3a",
        "MMPIPE_DATABASE_URL": "postgresql://mmpipe:sentinel-db-pw-91c2@db/mmpipe",
        "MMPIPE_PSEUDONYM_SALT": "sentinel-salt-44be",
    }
    for name, value in sentinels.items():
        monkeypatch.setenv(name, value)
    pod = render_pod()
    text = json.dumps(pod)
    assert not [v for v in sentinels.values() if v in text]
    assert not trainer(pod).get("env"), "settings must come from the Secret, not literal env values"


def test_pod_names_and_labels_are_dns_safe():
    candidate = {
        "name": "ResNet18 / Freeze 50% (ImageNet) " + "x" * 80,
        "backbone": "vit_base_patch16_224.augreg_in21k",
    }
    pod = render_pod(candidate=candidate)
    name = pod["metadata"]["name"]
    assert name.startswith("train-resnet18-freeze-50-imagenet")
    assert DNS_LABEL.match(name) and len(name) <= 63, name
    for key in ("backbone", "candidate"):
        value = pod["metadata"]["labels"][key]
        assert LABEL_VALUE.match(value) and len(value) <= 63, value
    assert pod["metadata"]["labels"]["backbone"] == "vit_base_patch16_224.augreg_in21k"


@pytest.mark.parametrize(
    "candidate",
    [{"name": "r18"}, {"backbone": "resnet18"}, ["resnet18"], {"name": 3, "backbone": "resnet18"}],
)
def test_malformed_candidate_is_rejected_clearly(candidate):
    with pytest.raises(AirflowException, match="candidate must be a dict"):
        k8s_operator(candidate=candidate).build_pod_request_obj(context=None, dry_run=True)
    with pytest.raises(AirflowException, match="candidate must be a dict"):
        TrainCandidateOperator(task_id="t", plan_uri=PLAN, candidate=candidate).local_command(Path("/x.json"))


def test_unknown_backend_and_negative_gpus_fail_at_parse_time():
    with pytest.raises(ValueError, match="training_backend"):
        training_operator(Settings.model_construct(training_backend="gpu"), task_id="train")
    with pytest.raises(ValueError, match="gpu_count"):
        k8s_operator(gpu_count=-1)


def test_pod_operator_defaults_match_settings_defaults():
    op = k8s_operator()
    fields = Settings.model_fields
    assert op.namespace == fields["k8s_namespace"].default
    assert op.image == fields["k8s_trainer_image"].default
    assert op.gpu_count == fields["k8s_gpu_count"].default
    assert op.service_account_name == fields["k8s_service_account"].default


@pytest.fixture
def refusing_api_server(tmp_path, monkeypatch):
    """A loopback stand-in for the Kubernetes API: lists no pods, records and refuses (403) pod creations."""
    requests: list[tuple[str, str, dict | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            requests.append(("GET", self.path, None))
            self.reply(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(("POST", self.path, body))
            self.reply(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                             "reason": "Forbidden", "message": "refused by the test"})  # fmt: skip

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "test", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        })
    )  # fmt: skip
    connection = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(connection))
    yield requests
    server.shutdown()


def execute_context() -> dict:
    ti = SimpleNamespace(dag_id="mmpipe_train", task_id="train", map_index=1, try_number=1)
    ti.xcom_push = lambda **kwargs: None
    return {"ti": ti, "run_id": RUN_ID, "dag": SimpleNamespace()}


def test_kubernetes_execute_submits_the_declared_pod(refusing_api_server):
    op = k8s_operator()
    expected = render_pod()
    with pytest.raises(ApiException) as excinfo:
        _run_execute_callable(execute_context(), op.execute, op)  # as the Task Runner calls it
    assert excinfo.value.status == 403
    posts = [(path, body) for method, path, body in refusing_api_server if method == "POST"]
    assert [path for path, _ in posts] == ["/api/v1/namespaces/mmpipe/pods"]
    submitted = posts[0][1]
    assert trainer(submitted) == trainer(expected)
    assert submitted["spec"]["nodeSelector"] == expected["spec"]["nodeSelector"]
    assert submitted["metadata"]["labels"]["map_index"] == "1"  # each mapped candidate's pod is findable
    kubernetes_validate.validate(submitted, K8S_VERSIONS[0], strict=True)


def test_the_task_runner_runs_the_pod_operator_itself(refusing_api_server):
    """No nested operator: Airflow 3.3 warns about (and will refuse) an execute() the Task Runner did not
    call. The same capture sees that warning when execute() is called directly, so it is live."""
    mapped = training_operator(Settings(training_backend="kubernetes"), task_id="train").expand_kwargs(
        [{"plan_uri": PLAN, "candidate": CANDIDATE}]
    )
    op = mapped.unmap({"plan_uri": PLAN, "candidate": CANDIDATE, "run_id": RUN_ID})
    assert isinstance(op, KubernetesPodOperator)
    nested = "cannot be called outside of the Task Runner"
    for run, warned in ((lambda: _run_execute_callable(execute_context(), op.execute, op), False),
                        (lambda: op.execute(execute_context()), True)):  # fmt: skip
        with structlog.testing.capture_logs() as logs, pytest.raises(ApiException):
            run()
        assert any(nested in entry["event"] for entry in logs) is warned
    assert len([r for r in refusing_api_server if r[0] == "POST"]) == 2


# --- Airflow integration: templating and dynamic task mapping ------------------------------------


def test_template_fields_render_plan_candidate_and_run_id():
    def templated(operator_class):
        candidate = {"name": "{{ params.name }}", "backbone": "r18"}
        return operator_class(task_id="train", plan_uri="{{ params.plan }}", candidate=candidate)

    local, pod_op = templated(TrainCandidateOperator), templated(TrainCandidatePodOperator)
    for op in (local, pod_op):
        op.render_template_fields({"run_id": RUN_ID, "params": {"plan": PLAN, "name": "r18-f50"}})
    expected = ["train", "--plan", PLAN, "--candidate", '{"backbone":"r18","name":"r18-f50"}', "--run-id", RUN_ID]  # fmt: skip
    assert local.local_command(Path("/x.json"))[3:10] == expected
    container = trainer(as_dict(pod_op))
    assert (container["command"] + container["args"])[1:8] == expected


def test_expand_kwargs_maps_one_pod_per_candidate():
    """The DAG's wiring, rendered as Airflow renders a mapped task: unmap, then template the unmapped task."""
    candidates = [CANDIDATE, {**CANDIDATE, "name": "densenet121-f0", "backbone": "densenet121"}]
    settings = Settings(training_backend="kubernetes", k8s_namespace="ml", k8s_trainer_image="reg/trainer:7",
                        k8s_gpu_count=2, k8s_service_account="trainer-sa")  # fmt: skip
    with DAG("launcher_mapping", schedule=None) as dag:
        mapped = training_operator(settings, task_id="train").expand_kwargs(
            [{"plan_uri": PLAN, "candidate": c} for c in candidates]
        )
    pods = []
    for map_index in range(len(candidates)):
        ti = SimpleNamespace(dag_id=dag.dag_id, task_id="train", map_index=map_index, try_number=1)
        context = {"ti": ti, "run_id": RUN_ID, "dag": dag, "dag_run": SimpleNamespace(conf={})}
        mapped.render_template_fields(context)
        assert isinstance(context["task"], TrainCandidatePodOperator)
        pods.append(as_dict(context["task"], context))
    for pod, candidate in zip(pods, candidates, strict=True):
        args = trainer(pod)["args"]
        assert pod["metadata"]["name"].startswith(f"train-{candidate['name']}-")
        assert json.loads(args[args.index("--candidate") + 1]) == candidate
        assert args[args.index("--run-id") + 1] == RUN_ID  # the default "{{ run_id }}", rendered
        assert pod["metadata"]["labels"]["candidate"] == candidate["name"]
        assert pod["metadata"]["namespace"] == "ml" and trainer(pod)["image"] == "reg/trainer:7"
        assert trainer(pod)["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert pod["spec"]["serviceAccountName"] == "trainer-sa"
    assert [p["metadata"]["labels"]["map_index"] for p in pods] == ["0", "1"]


def test_local_backend_maps_to_the_local_operator():
    with DAG("launcher_local", schedule=None):
        mapped = training_operator(Settings(training_backend="local"), task_id="train").expand_kwargs(
            [{"plan_uri": PLAN, "candidate": CANDIDATE}]
        )
    op = mapped.unmap({"plan_uri": PLAN, "candidate": CANDIDATE, "run_id": RUN_ID})
    assert type(op) is TrainCandidateOperator


@pytest.mark.parametrize(
    ("backend", "operator_class", "concurrency"),
    [("local", TrainCandidateOperator, 1), ("kubernetes", TrainCandidatePodOperator, 8)],
)
def test_retrain_dag_trains_on_the_configured_backend(monkeypatch, backend, operator_class, concurrency):
    monkeypatch.setenv("MMPIPE_TRAINING_BACKEND", backend)
    monkeypatch.setenv("MMPIPE_K8S_GPU_COUNT", "2")
    bag = DagBag(dag_folder=str(ROOT / "dags" / "mmpipe_retrain.py"))
    assert bag.import_errors == {}
    dag = bag.dags["mmpipe_retrain"]
    train = dag.get_task("train")
    assert train.operator_class is operator_class
    assert train.max_active_tis_per_dagrun == concurrency
    assert train.downstream_task_ids == {"evaluate"}
    assert ("gpu_count" in train.partial_kwargs) is (backend == "kubernetes")
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag)).get_task("train")
    assert serialized.operator_class["task_type"] == operator_class.__name__


# --- the local backend ----------------------------------------------------------------------------


def test_local_command_runs_the_cli_in_this_interpreter(tmp_path):
    xcom = tmp_path / "return.json"
    op = TrainCandidateOperator(task_id="train", plan_uri=PLAN, candidate=CANDIDATE, run_id=RUN_ID)
    command = op.local_command(xcom)
    assert command[:4] == [sys.executable, "-m", "mmpipe", "train"]
    assert command[4:] == [
        "--plan",
        PLAN,
        "--candidate",
        command[7],
        "--run-id",
        RUN_ID,
        "--xcom-file",
        str(xcom),
    ]
    assert json.loads(command[7]) == CANDIDATE


def test_local_execute_surfaces_the_cli_failure(tmp_path):
    """A plan that cannot exist makes the real CLI fail (or, before the CLI is written, Python does);
    either way the task must fail with the subprocess's own last words in the exception."""
    op = TrainCandidateOperator(
        task_id="train", plan_uri="file:///nonexistent/mmpipe/plan.json", candidate=CANDIDATE, run_id=RUN_ID
    )
    reference = subprocess.run(
        op.local_command(tmp_path / "ref.json"), capture_output=True, text=True, timeout=120
    )
    assert reference.returncode != 0
    last_stderr_line = reference.stderr.strip().splitlines()[-1]
    with pytest.raises(AirflowException) as excinfo:
        op.execute(context={})
    message = str(excinfo.value)
    assert f"exited with code {reference.returncode}" in message
    assert last_stderr_line in message


# --- deployment files -----------------------------------------------------------------------------

K8S_MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
PLACEHOLDER = "CHANGE_ME"


def manifests() -> list[dict]:
    return [doc for path in K8S_MANIFESTS for doc in yaml_docs(path)]


def test_every_manifest_is_valid_kubernetes():
    assert K8S_MANIFESTS, "infra/k8s/ holds no manifests"
    for version in K8S_VERSIONS:
        for doc in manifests():
            kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_lets_the_worker_launch_pods_and_the_trainer_do_nothing():
    docs = manifests()
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "mmpipe-pod-launcher"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    # What the KubernetesPodOperator calls: create/watch/patch/delete the pod, stream its log,
    # exec into the xcom sidecar, read scheduling events.
    needed = {("pods", v) for v in ("create", "get", "list", "watch", "patch", "delete")}
    needed |= {("pods/log", "get"), ("pods/exec", "create"), ("pods/exec", "get"), ("events", "list")}
    assert needed <= granted
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "mmpipe"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == ["mmpipe-airflow-worker"]
    (trainer_sa,) = [
        d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "mmpipe-trainer"
    ]
    assert trainer_sa["automountServiceAccountToken"] is False
    bound = {
        s["name"] for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d["subjects"]
    }
    assert "mmpipe-trainer" not in bound


def test_settings_secret_example_holds_only_placeholders_for_settings():
    (secret,) = yaml_docs(ROOT / "infra" / "k8s" / "settings-secret.example.yaml")
    assert secret["metadata"]["name"] == k8s_operator().settings_secret
    for name, value in secret["stringData"].items():
        assert settings_field(name) in Settings.model_fields, name
        if re.search(r"SECRET|PASSWORD|SALT|KEY_ID|DATABASE_URL", name):
            assert PLACEHOLDER in value, f"{name} must be a placeholder"


def test_helm_values_run_training_on_kubernetes_with_settings_from_the_secret():
    values = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor")
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"]
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["MMPIPE_TRAINING_BACKEND"] == "kubernetes"
    assert all(settings_field(name) in Settings.model_fields for name in env if name.startswith("MMPIPE_"))
    env_from = yaml.safe_load(values["extraEnvFrom"])
    assert {"secretRef": {"name": "mmpipe-settings"}} in env_from
    worker_sa = values["workers"]["serviceAccount"]
    assert worker_sa == {"create": False, "name": "mmpipe-airflow-worker"}
    assert values["config"]["kubernetes_executor"]["namespace"] == env["MMPIPE_K8S_NAMESPACE"] == "mmpipe"
