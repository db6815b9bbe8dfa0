"""Launch ``mmpipe train`` for one candidate, as a local process or as a GPU pod.

The DAG wires, these operators declare where the work runs, and the container (or the local
process) does the work: both backends run the same CLI and return the JSON it writes to
``--xcom-file``, so a DAG switches backend (:func:`training_operator`) without changing anything
downstream. The pod backend (:mod:`mmpipe_airflow.pod`) *is* a KubernetesPodOperator, so the Task Runner
executes it directly.
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
    from airflow.sdk.bases.operator import OperatorPartial

    from mmpipe.config import Settings

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


def training_operator(settings: Settings, **kwargs: Any) -> OperatorPartial:
    """The mappable training task for ``settings.training_backend``; ``.expand_kwargs`` it with
    ``{"plan_uri": ..., "candidate": ...}`` dicts. ``kwargs`` go to ``.partial`` (task_id, pools, ...).

    One local process at a time shares the worker's cores; pods run side by side. The Kubernetes
    provider is imported only for that backend, keeping it out of every local DAG parse.
    """
    if settings.training_backend == "local":
        return TrainCandidateOperator.partial(**{"max_active_tis_per_dagrun": 1, **kwargs})
    if settings.training_backend != "kubernetes":
        raise ValueError(
            f"training_backend must be 'local' or 'kubernetes', got {settings.training_backend!r}"
        )
    from mmpipe_airflow.pod import TrainCandidatePodOperator

    return TrainCandidatePodOperator.partial(
        namespace=settings.k8s_namespace,
        image=settings.k8s_trainer_image,
        gpu_count=settings.k8s_gpu_count,
        service_account=settings.k8s_service_account,
        **{"max_active_tis_per_dagrun": 8, **kwargs},
    )
