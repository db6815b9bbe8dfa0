"""The scoring pipeline's bounds and choices: decoding runs a bounded window ahead of inference,
reduced precision only where the model card records enough agreement, torch threads are a share,
helper processes yield the CPU to inference."""

from __future__ import annotations

import os
from concurrent.futures import Future

import pytest
import torch

from mmpipe import score
from mmpipe.config import get_settings
from mmpipe.decoding import PROCESS_CHUNK, Chunk, Fetcher, Outcome
from mmpipe.errors import StoreError
from mmpipe.modelcard import ModelCard
from mmpipe.store import ObjectInfo


class CountingFetcher:
    """Stands in for the decode processes: counts objects submitted but not yet consumed."""

    def __init__(self) -> None:
        self.in_flight = self.peak = 0

    def submit(self, objects):
        self.in_flight += len(objects)
        self.peak = max(self.peak, self.in_flight)
        done: Future = Future()
        done.set_result([Outcome(o) for o in objects])
        return [Chunk(list(objects), done, None)]

    def results(self, chunk):
        self.in_flight -= len(chunk.objects)
        return chunk.future.result()


@pytest.mark.parametrize("objects", [10, 1000])
def test_decoding_runs_a_bounded_window_ahead_whatever_the_batch_size(objects) -> None:
    fetcher = CountingFetcher()
    listed = [ObjectInfo(f"k{n}", "e", 1) for n in range(objects)]
    outcomes = score.decoded(fetcher, listed, window=3)
    assert fetcher.in_flight == min(objects, 3 * PROCESS_CHUNK)  # decoding while the model loads
    seen = [o.obj.key for o in outcomes]
    assert seen == [o.key for o in listed]  # every object, in order
    assert fetcher.peak <= 3 * PROCESS_CHUNK


def card(**agreement: float) -> ModelCard:
    return ModelCard(
        model_version="m", backbone="tinycnn", classes=("a", "b"), canonical_size=32, image_size=32,
        channel_mode="replicate", mean=(0.5,) * 3, std=(0.5,) * 3, init="random", weights_fingerprint=None,
        freeze_ratio=0.0, dataset_version="d", plan_uri="", training_run_id="r", best_val_macro_f1=0.0,
        precision_agreement=agreement,
    )  # fmt: skip


def test_reduced_precision_only_with_recorded_agreement_and_hardware(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(score, "cpu_has_bf16", lambda: True)
    assert score.inference_dtype(card(bfloat16=0.999), cpu) == torch.bfloat16
    assert score.inference_dtype(card(bfloat16=0.99), cpu) is None  # below 99.5%: float32
    assert score.inference_dtype(card(), cpu) is None  # never measured: float32
    monkeypatch.setattr(score, "cpu_has_bf16", lambda: False)
    assert score.inference_dtype(card(bfloat16=1.0), cpu) is None  # emulated bf16 is slower


def test_torch_threads_are_the_tasks_share() -> None:
    assert score.torch_threads(get_settings(score_threads=3)) == 3
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= score.torch_threads(get_settings()) <= max(1, cpus // 2)  # decode processes need the rest


class NiceProbe:
    """A store whose every fetch fails naming the niceness of the process that fetched."""

    def fetch(self, key: str):
        raise StoreError(f"niceness {os.nice(0)}")


def test_decode_and_writer_processes_run_below_the_scoring_process() -> None:
    """On a shared core the model's thread is not preempted by the helpers that feed it (what that is
    worth: ``mmpipe bench score``), in the decode pool, in a process isolating one object, and in the
    writers."""
    settings = get_settings(ingest_processes=2)
    own = os.nice(0)
    helper = min(own + score.HELPER_NICE, 19)
    assert own < 19 and helper > own
    objects = [ObjectInfo(f"k{n}", "e", 1) for n in range(3)]
    context = score.decode_context(settings, card())
    with Fetcher(settings, NiceProbe(), context, len(objects), score.HELPER_NICE) as fetcher:
        outcomes = [o for chunk in fetcher.submit(objects) for o in fetcher.results(chunk)]
        outcomes += fetcher.isolated(objects[:1])
    assert [o.errors[0]["error"] for o in outcomes] == [f"niceness {helper}"] * 4
    with score.Writer(settings, NiceProbe(), card()) as writer:
        assert writer.pool.submit(os.nice, 0).result() == helper
    assert os.nice(0) == own  # the scoring process itself keeps its priority
