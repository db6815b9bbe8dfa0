"""Launch ``mmpipe train`` for one candidate, as a local process or as a GPU pod.

The DAG wires, this operator declares where the work runs, and the container (or the local
process) does the work: both backends run the same CLI and return the JSON it writes to
``--xcom-file``, so a DAG switches backend without changing anything downstream.
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

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

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


class TrainCandidateOperator(BaseOperator):
    """Train one candidate (backbone + options) against a training plan; returns the CLI's result JSON.

    Mappable: ``TrainCandidateOperator.partial(task_id="train", plan_uri=...).expand(candidate=[...])``.
    """

    template_fields = ("plan_uri", "candidate", "run_id")

    def __init__(
        self,
        *,
        plan_uri: str,
        candidate: dict,
        run_id: str = "{{ run_id }}",
        backend: str = "local",
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
        super().__init__(**kwargs)
        if backend not in ("local", "kubernetes"):
            raise ValueError(f"backend must be 'local' or 'kubernetes', got {backend!r}")
        if gpu_count < 0:
            raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
        self.plan_uri, self.candidate, self.run_id, self.backend = plan_uri, candidate, run_id, backend
        self.namespace, self.image, self.gpu_count = namespace, image, gpu_count
        self.service_account, self.settings_secret = service_account, settings_secret
        self.node_selector, self.tolerations, self.cpu, self.memory = node_selector, tolerations, cpu, memory
        self._proc: subprocess.Popen | None = None
        self._pod_op: KubernetesPodOperator | None = None

    def _checked_candidate(self) -> dict:
        c = self.candidate
        if not (isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("name", "backbone"))):
            raise AirflowException(f"candidate must be a dict with string 'name' and 'backbone', got {c!r}")
        return c

    def _cli_args(self, xcom_file: Path) -> list[str]:
        candidate = json.dumps(self._checked_candidate(), sort_keys=True, separators=(",", ":"))
        return ["train", "--plan", self.plan_uri, "--candidate", candidate, "--run-id", self.run_id,
                "--xcom-file", str(xcom_file)]  # fmt: skip

    def local_command(self, xcom_file: Path) -> list[str]:
        """The CLI in this interpreter, so the local backend trains with the worker's own environment."""
        return [sys.executable, "-m", "mmpipe", *self._cli_args(xcom_file)]

    def build_pod_operator(self) -> KubernetesPodOperator:
        """Declare the training pod; settings and credentials reach it only through ``settings_secret``."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        candidate = self._checked_candidate()
        gpu = self.gpu_count > 0
        limits = {"memory": self.memory, **({GPU_RESOURCE: str(self.gpu_count)} if gpu else {})}
        node_selector = self.node_selector
        if node_selector is None:
            node_selector = {"nvidia.com/gpu.present": "true"} if gpu else {}
        tolerations = self.tolerations
        if tolerations is None:
            gpu_taint = k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
            tolerations = [gpu_taint] if gpu else []
        labels = {
            "app": "mmpipe",
            "component": "trainer",
            "backbone": label_value(candidate["backbone"]),
            "candidate": label_value(candidate["name"]),
        }
        return KubernetesPodOperator(
            task_id=self.task_id,
            name=f"train-{dns_label(candidate['name'], max_len=40)}",
            namespace=self.namespace,
            image=self.image,
            image_pull_policy="IfNotPresent",
            cmds=["mmpipe", *self._cli_args(POD_XCOM_FILE)],
            labels=labels,
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=self.settings_secret))],
            service_account_name=self.service_account,
            automount_service_account_token=False,  # the trainer never talks to the Kubernetes API
            node_selector=node_selector,
            tolerations=tolerations,
            container_resources=k8s.V1ResourceRequirements(
                requests={"cpu": self.cpu, "memory": self.memory}, limits=limits
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
            deferrable=False,  # deferring would resume on this wrapper, which has no trigger_reentry
        )

    def execute(self, context: Any) -> Any:
        if self.backend == "kubernetes":
            self._pod_op = self.build_pod_operator()
            return self._pod_op.execute(context)
        return self._run_local()

    def _run_local(self) -> Any:
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
        if self._pod_op is not None:
            self._pod_op.on_kill()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
