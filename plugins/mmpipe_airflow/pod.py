"""The Kubernetes backend of training: a GPU pod that runs the same ``mmpipe train`` CLI.

Kept apart from :mod:`mmpipe_airflow.training` so that parsing a DAG on the local backend never
imports the Kubernetes provider and client (about 0.7 s and 2,000 modules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from mmpipe_airflow.training import checked_candidate, dns_label, label_value, train_cli_args

#: Where the KubernetesPodOperator's xcom sidecar reads the task's return value.
POD_XCOM_FILE = Path("/airflow/xcom/return.json")
GPU_RESOURCE = "nvidia.com/gpu"


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
