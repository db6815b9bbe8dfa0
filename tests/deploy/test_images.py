"""The Airflow and trainer images, checked offline (no Docker engine here): both install the wheel built
from this checkout, pinned by constraints.txt; the trainer runs on a CUDA runtime base with CUDA torch
wheels (a CPU variant by build args) as a numeric non-root user; the build context sends what the
COPY lines need. That the wheel itself migrates is proven by test_wheel.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
IMAGES = ["airflow.Dockerfile", "trainer.Dockerfile"]


def dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def instructions(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def sent(name: str, path: str) -> bool:
    """Whether ``<name>.dockerignore`` (``*`` then ``!`` exceptions) sends ``path`` to the build."""
    included = False
    for pattern in (DOCKER / f"{name}.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            included = negate
    return included


def pins(requirements: list[str]) -> dict[str, str]:
    """``name==version`` lines by normalised name (PEP 503)."""
    return {
        re.sub(r"[-_.]+", "-", r.split("==")[0]).lower(): r.split("==")[1] for r in requirements if "==" in r
    }


@pytest.mark.parametrize("name", IMAGES)
def test_image_installs_the_built_wheel_with_the_constraints(name):
    steps = instructions(dockerfile(name))
    builds = [s for s in steps if s.startswith("RUN pip wheel")]
    assert builds and "--no-deps" in builds[0] and builds[0].endswith(" .")
    (install,) = [s for s in steps if s.startswith("RUN") and "pip install" in s]
    assert "-c /opt/mmpipe/constraints.txt" in install
    assert re.search(r"/opt/mmpipe/dist/mmpipe-\*\.whl", install)
    assert "COPY --from=wheel" in " ".join(steps)
    assert any(s.startswith("COPY") and "constraints.txt /opt/mmpipe/constraints.txt" in s for s in steps)
    assert not any(re.search(r"pip install .*(/opt/mmpipe(\s|$)|\s\.(\s|$))", s) for s in steps), (
        "no source install"
    )


@pytest.mark.parametrize("name", IMAGES)
def test_build_context_sends_what_the_copies_need(name):
    for step in instructions(dockerfile(name)):
        if step.startswith("COPY") and "--from=" not in step:
            sources = [s for s in step.split()[1:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert sent(name, source), f"{name}.dockerignore leaves out {source}"
    assert not sent(name, "tests") and not sent(name, ".mmpipe")


def test_constraints_pin_every_dependency_as_pyproject_does():
    """The images install with -c constraints.txt: it must pin exactly what the project declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pins(
        project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    )
    constraints = pins((ROOT / "constraints.txt").read_text().split())
    assert {name: constraints.get(name) for name in declared} == declared


def test_airflow_image_is_the_pinned_airflow():
    import airflow

    values = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    assert re.search(
        rf"^FROM apache/airflow:{re.escape(airflow.__version__)}-python3\.11$", dockerfile(IMAGES[0]), re.M
    )
    assert values["airflowVersion"] == airflow.__version__
    install = next(s for s in instructions(dockerfile(IMAGES[0])) if "pip install" in s)
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install and '"$1[airflow]"' in install


def test_trainer_is_cuda_by_default_with_a_cpu_variant():
    text = dockerfile(IMAGES[1])
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+", base), base
    (index,) = re.findall(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M)
    cuda = re.search(r"/whl/cu(\d+)$", index)
    assert cuda, index
    assert cuda.group(1) == "".join(re.match(r"nvidia/cuda:(\d+)\.(\d+)", base).groups())  # same CUDA
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in text
    assert "python3.11 -m venv" in text  # the project's Python on the CUDA base
    cpu = (
        "--build-arg BASE_IMAGE=ubuntu:22.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    )
    assert cpu in text and cpu in (ROOT / "docs" / "operations.md").read_text()


def test_trainer_runs_mmpipe_as_a_numeric_non_root_user():
    text = dockerfile(IMAGES[1])
    # runAsNonRoot in the pod can only be verified by the kubelet against a numeric, non-zero USER.
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user)
    assert re.search(r'^ENTRYPOINT \["mmpipe"\]$', text, re.M)


def test_cluster_init_job_runs_mmpipe_init_from_the_trainer_image_with_the_settings():
    (job,) = yaml.safe_load_all((ROOT / "infra" / "k8s" / "init-job.yaml").read_text())
    values = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    trainer_image = {e["name"]: e["value"] for e in values["env"]}["MMPIPE_K8S_TRAINER_IMAGE"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == trainer_image  # its ENTRYPOINT is mmpipe
    assert container["args"] == ["init"] and "command" not in container
    assert container["envFrom"] == [{"secretRef": {"name": "mmpipe-settings"}}]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
