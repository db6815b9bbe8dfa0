"""
### mmpipe_retrain — nightly: rebalance, train one candidate per backbone, evaluate, promote

1. `prepare_dataset`: patient-level splits, the frozen test snapshot (set `freeze_test` to freeze a
   new one), dataset-level Great Expectations checks (Data Docs under `reports/validation/`), and a
   versioned, balanced training plan under `plans/` (split ratios, augmentation policies, per-class
   targets, CLAHE and the default channel mode come from `MMPIPE_*` settings).
2. `evaluate_champion`: when the champion has not been measured on the snapshot yet (a new one was
   just frozen), evaluate it there and record why; skipped otherwise.
3. `train`: one mapped task per candidate, each running `mmpipe train` (resumable: a retried task
   carries on from its last epoch's checkpoint) — a local process, or a GPU
   pod via KubernetesPodOperator when `MMPIPE_TRAINING_BACKEND=kubernetes`.
4. `evaluate`: every candidate whose training succeeded, on the frozen test snapshot (metrics, ECE
   before/after temperature, latency, baselines, PNGs, the model card); a failed candidate is
   skipped here and the others still compete.
5. `promote`: the challenger is the succeeded candidate with the best *validation* metric; it becomes
   champion only if it passes the gate on the test snapshot (primary metric vs the champion, margin
   over the thumbnail baseline, per-class recall floors, smoke check through the scoring path); a
   promotion emits the `mmpipe_champion` asset event (which triggers scoring). Rollback and forced
   promotion: the `mmpipe_champion` DAG.

Trigger with Params for backfills and experiments: `candidates` sets every option per candidate
(e.g. EfficientNet-Lite0 pretrained and random side by side); the shared options below it
(init, freeze shares, learning rates, optimizer, scheduler, epochs, input size, bf16, loss, ...)
apply to every candidate that does not set its own. Defaults are the papers' recipe: pretrained,
60% of the blocks frozen at 1e-3, then unfrozen to 30% at 1e-4, Adam, batch 16, 10 epochs, early
stopping on the validation loss. Also: balance target, a new test snapshot.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from mmpipe_airflow.dag_defaults import CHAMPION, dag_defaults, retrain_schedule
from mmpipe_airflow.reports import report_task
from mmpipe_airflow.training import training_operator

from mmpipe.candidate import OPTION_HELP, candidate_schema, option_schema
from mmpipe.candidate import defaults as candidate_defaults
from mmpipe.config import get_settings

BACKBONES = [
    "resnet18",
    "vgg16",
    "googlenet",
    "mobilenetv2",
    "inceptionv3",
    "efficientnet_b0",
    "efficientnet_lite0",
    "densenet121",
    "vit_tiny",
    "tinycnn",
]
settings = get_settings()  # typed env only: no DB or network at parse time
# Shared options: every candidate's unless it sets its own; the defaults are the papers' recipe.
SHARED = {
    name: Param(default, **option_schema(name), description=OPTION_HELP[name])
    for name, default in candidate_defaults().items()
}


@dag(
    dag_id="mmpipe_retrain",
    schedule=retrain_schedule(settings),
    **dag_defaults(__doc__, "training", retries=1, retry_minutes=5),
    params={
        "candidates": Param([], type="array", items=candidate_schema(BACKBONES),
                            description="Candidates with their own options, e.g. [{\"backbone\": \"efficientnet_lite0\", "
                                        "\"init\": \"random\", \"lr\": 0.003}]; empty = one per backbone below"),
        "backbones": Param(["resnet18", "mobilenetv2", "efficientnet_b0"], type="array",
                           items={"type": "string", "enum": BACKBONES},
                           description="One candidate per backbone (when candidates is empty)"),
        **SHARED,
        "balance_target": Param(None, type=["null", "string"],
                                description="'median', 'max', 'min', 'none' or a count; null = MMPIPE_BALANCE_TARGET"),
        "freeze_test": Param(None, type=["null", "string"], description="Name of a NEW test snapshot to freeze"),
    },
)  # fmt: skip
def mmpipe_retrain():
    @task
    def prepare_dataset(params=None, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.prepare_dataset(
            run_id, freeze_test=params["freeze_test"], seed=params["seed"], target=params["balance_target"]
        )

    @task
    def evaluate_champion(prepared: dict, run_id=None) -> dict:
        from mmpipe import evaluate, pipeline

        snapshot = prepared["test_snapshot"]
        frozen = prepared["frozen_now"]
        why = (
            f"snapshot {snapshot} frozen by {run_id}"
            if frozen
            else f"champion not yet measured on {snapshot}"
        )
        result = evaluate.evaluate_champion(*pipeline.connect(), snapshot, reason=why)
        if result is None or not result["evaluated_now"]:
            raise AirflowSkipException(
                "no champion yet" if result is None else "champion already measured here"
            )
        return result

    @task
    def candidates(prepared: dict, params=None) -> list[dict]:
        from mmpipe import pipeline

        shared = {name: params[name] for name in SHARED}
        return [{"plan_uri": prepared["plan_uri"], "candidate": c}
                for c in pipeline.candidates(params["candidates"], params["backbones"], **shared)]  # fmt: skip

    @task(max_active_tis_per_dagrun=2, trigger_rule="all_done")  # runs whatever its training did
    def evaluate(item: dict, prepared: dict, run_id=None) -> dict:
        from mmpipe import pipeline

        name = item["candidate"]["name"]
        result = pipeline.evaluate_candidate(run_id, name, prepared["test_snapshot"])
        if result is None:
            raise AirflowSkipException(f"training of {name} did not succeed: it does not compete")
        return result

    @task(outlets=[CHAMPION], trigger_rule="none_failed")
    def promote(evaluations: list, prepared: dict, run_id=None) -> dict:
        from mmpipe import pipeline

        decision = pipeline.promote_best(
            [e["model_version"] for e in evaluations or [] if e], prepared["test_snapshot"], run_id
        )
        if decision["decision"] != "promoted":
            raise AirflowSkipException(decision["reason"])  # no champion asset event
        return decision

    prepared = prepare_dataset()
    planned = candidates(prepared)
    trained = training_operator(settings, task_id="train").expand_kwargs(planned)
    # Mapped over the candidates, not over train's output: a failed training leaves no gap in the others.
    evaluations = evaluate.partial(prepared=prepared).expand(item=planned)
    trained >> evaluations
    evaluate_champion(prepared) >> promote(evaluations, prepared)
    report_task()


mmpipe_retrain()
