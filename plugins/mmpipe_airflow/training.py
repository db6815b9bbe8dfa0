"""Launch ``mmpipe train`` for one candidate, as a local process or as a GPU pod.

The DAG wires, these operators declare where the work runs, and the container (or the local
process) does the work: both backends run the same CLI and return the JSON it writes to
``--xcom-file``, so a DAG switches backend (:func:`training_operator`) without changing anything
downstream. The pod backend *is* a KubernetesPodOperator, so the Task Runner executes it directly.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException
from kubernetes.client import models as k8s

if TYPE_CHECKING:
    from airflow.sdk.bases.operator import OperatorPartial

    from mmpipe.config import Settings

#: Where the KubernetesPodOperator's xcom sidecar reads the task's return value.
POD_XCOM_FILE = Path("/airflow/xcom/return.json")
GPU_RESOURCE = "nvidia.com/gpu"
_TAIL_LINES = 20


def dns_label(text: str, max_len: int = 63) -> str:
    """``text`` as an RFC 1123 label (lowercase alphanumerics and '-'), for pod names."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower())[:max_len].strip("-")
    if not label:
        raise AirflowException(f"cannot derive a Kubernetes name from {text!r}")
    return label


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value (alphanumerics, '-', '_', '.'; at most 63)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")


def checked_candidate(candidate: Any) -> dict:
    """``candidate`` if it names a backbone and itself; checked once rendered, since it may come from XCom."""
    c = candidate
    if not (isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("name", "backbone"))):
        raise AirflowException(f"candidate must be a dict with string 'name' and 'backbone', got {c!r}")
    return c


def train_cli_args(plan_uri: str, candidate: Any, run_id: str, xcom_file: Path) -> list[str]:
    """The ``mmpipe`` arguments both backends run (compact, key-sorted candidate JSON)."""
    spec = json.dumps(checked_candidate(candidate), sort_keys=True, separators=(",", ":"))
    return ["train", "--plan", plan_uri, "--candidate", spec, "--run-id", run_id,
            "--xcom-file", str(xcom_file)]  # fmt: skip


class TrainCandidateOperator(BaseOperator):
    """Train one candidate in a local process; returns the CLI's result JSON.

    Mappable: ``TrainCandidateOperator.partial(task_id="train").expand_kwargs([{"plan_uri": ..., "candidate": ...}])``.
    """

    template_fields = ("plan_uri", "candidate", "run_id")

    def __init__(
        self, *, plan_uri: str, candidate: dict, run_id: str = "{{ run_id }}", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri, self.candidate, self.run_id = plan_uri, candidate, run_id
        self._proc: subprocess.Popen | None = None

    def local_command(self, xcom_file: Path) -> list[str]:
        """The CLI in this interpreter, so the local backend trains with the worker's own environment."""
        return [
            sys.executable,
            "-m",
            "mmpipe",
            *train_cli_args(self.plan_uri, self.candidate, self.run_id, xcom_file),
        ]

    def execute(self, context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="mmpipe-train-") as tmp:
            xcom_file = Path(tmp) / "return.json"
            command = self.local_command(xcom_file)
            self.log.info("Running %s", shlex.join(command))
            tail: deque[str] = deque(maxlen=_TAIL_LINES)
            # stderr folded into stdout keeps the log in order; the tail goes into the failure message.
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            )
            with self._proc as proc:
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    self.log.info("%s", tail[-1])
            if proc.returncode != 0:
                raise AirflowException(
                    f"mmpipe train exited with code {proc.returncode}; last output:\n" + "\n".join(tail)
                )
            try:
                return json.loads(xcom_file.read_text())
            except (OSError, ValueError) as exc:
                raise AirflowException(f"mmpipe train succeeded but wrote no JSON result: {exc}") from exc

    def on_kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


class TrainCandidatePodOperator(KubernetesPodOperator):
    """Train one candidate in a GPU pod running ``mmpipe train``; returns the CLI's result JSON via XCom.

    Settings and credentials reach the pod only through the ``settings_secret`` Secret. Mappable like
    :class:`TrainCandidateOperator`. The pod's arguments, name and candidate labels are derived in
    :meth:`build_pod_request_obj`, i.e. from the rendered (or XCom-mapped) candidate, never Jinja-rendered
    themselves: candidate JSON is data, not a template.
    """

    template_fields = (*KubernetesPodOperator.template_fields, "plan_uri", "candidate", "run_id")

    def __init__(
        self,
        *,
        plan_uri: str,
        candidate: dict,
        run_id: str = "{{ run_id }}",
        namespace: str = "mmpipe",
        image: str = "mmpipe-trainer:latest",
        gpu_count: int = 1,
        service_account: str = "mmpipe-trainer",
        settings_secret: str = "mmpipe-settings",
        node_selector: dict[str, str] | None = None,
        tolerations: list | None = None,
        cpu: str = "4",
        memory: str = "16Gi",
        **kwargs: Any,
    ) -> None:
        if gpu_count < 0:
            raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
        gpu = gpu_count > 0
        if node_selector is None:
            node_selector = {"nvidia.com/gpu.present": "true"} if gpu else {}
        if tolerations is None:
            gpu_taint = k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
            tolerations = [gpu_taint] if gpu else []
        limits = {"memory": memory, **({GPU_RESOURCE: str(gpu_count)} if gpu else {})}
        super().__init__(
            namespace=namespace,
            image=image,
            image_pull_policy="IfNotPresent",
            cmds=["mmpipe"],
            labels={"app": "mmpipe", "component": "trainer"},
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings_secret))],
            service_account_name=service_account,
            automount_service_account_token=False,  # the trainer never talks to the Kubernetes API
            node_selector=node_selector,
            tolerations=tolerations,
            container_resources=k8s.V1ResourceRequirements(
                requests={"cpu": cpu, "memory": memory}, limits=limits
            ),
            # PyTorch data-loader workers exchange batches through /dev/shm; the runtime default is 64 MiB.
            volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory"))],
            volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
            container_security_context=k8s.V1SecurityContext(
                run_as_non_root=True,
                allow_privilege_escalation=False,
                capabilities=k8s.V1Capabilities(drop=["ALL"]),
            ),
            do_xcom_push=True,
            on_finish_action="delete_succeeded_pod",  # keep failed pods for `kubectl logs/describe`
            startup_timeout_seconds=900,  # a GPU node pool may have to scale up first
            deferrable=False,  # the worker follows the pod, streaming its training log into the task log
            **kwargs,
        )
        self.plan_uri, self.candidate, self.run_id = plan_uri, candidate, run_id
        self.gpu_count, self.settings_secret = gpu_count, settings_secret

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """The declared pod, with the candidate's command, name and labels.

        ``execute`` calls this after template rendering and before anything looks the pod up by its labels.
        """
        candidate = checked_candidate(self.candidate)
        self.arguments = train_cli_args(self.plan_uri, candidate, self.run_id, POD_XCOM_FILE)
        self.name = f"train-{dns_label(candidate['name'], max_len=40)}"  # + an 8-character random suffix
        self.labels = {
            **self.labels,
            "backbone": label_value(candidate["backbone"]),
            "candidate": label_value(candidate["name"]),
        }
        return super().build_pod_request_obj(context, dry_run=dry_run)


def training_operator(settings: Settings, **kwargs: Any) -> OperatorPartial:
    """The mappable training task for ``settings.training_backend``; ``.expand_kwargs`` it with
    ``{"plan_uri": ..., "candidate": ...}`` dicts. ``kwargs`` go to ``.partial`` (task_id, pools, ...)."""
    if settings.training_backend == "local":
        return TrainCandidateOperator.partial(**kwargs)
    if settings.training_backend == "kubernetes":
        return TrainCandidatePodOperator.partial(
            namespace=settings.k8s_namespace,
            image=settings.k8s_trainer_image,
            gpu_count=settings.k8s_gpu_count,
            service_account=settings.k8s_service_account,
            **kwargs,
        )
    raise ValueError(f"training_backend must be 'local' or 'kubernetes', got {settings.training_backend!r}")
