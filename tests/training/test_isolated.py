"""A fine-tune called off the main thread runs in a fresh process (``training.isolated``): its adapter comes
back, and so do its errors, as the project exception the child raised."""

from __future__ import annotations

import threading

import pytest

import pixelllm_plugins.training.finetune as finetune_module
from pixelllm_plugins.errors import PixelLLMError, TrainingError
from pixelllm_plugins.training.isolated import finetune_isolated


def _on_a_thread(fn, *args, **kwargs):
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def in_process_calls(monkeypatch):
    """Replace this process's ``finetune``: a child process imports the real one."""
    calls = []
    monkeypatch.setattr(finetune_module, "finetune", lambda *a, **k: calls.append((a, k)) or a[2])
    return calls


def test_off_the_main_thread_the_adapter_is_trained_by_a_child_process(tiny_base, tiny_data, tmp_path,
                                                                        in_process_calls):
    out = _on_a_thread(finetune_isolated, tiny_base, tiny_data, tmp_path / "adapter", steps=2, batch_size=2,
                       progress=False, work_dir=tmp_path / "run", lr_multipliers={"point_head.": 0.1})
    assert out == tmp_path / "adapter" and in_process_calls == []
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_on_the_main_thread_or_when_asked_it_trains_in_this_process(tmp_path, in_process_calls):
    assert finetune_isolated("BASE", tmp_path, tmp_path / "a", steps=3) == tmp_path / "a"
    assert _on_a_thread(finetune_isolated, "BASE", tmp_path, tmp_path / "b", isolate=False) == tmp_path / "b"
    assert [a for a, _ in in_process_calls] == [("BASE", tmp_path, tmp_path / "a"), ("BASE", tmp_path, tmp_path / "b")]


def test_the_childs_project_errors_come_back_with_their_message(tmp_path, in_process_calls):
    with pytest.raises(TrainingError, match="^fine-tuning needs a trained checkpoint folder"):
        _on_a_thread(finetune_isolated, tmp_path / "missing", tmp_path, tmp_path / "adapter", steps=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="^cannot start from .* is missing config.json"):
        finetune_isolated(tmp_path / "empty", tmp_path, tmp_path / "adapter", steps=2, isolate=True)
    assert in_process_calls == []


def test_other_errors_of_the_child_become_training_errors(tiny_base, tmp_path):
    with pytest.raises(TrainingError, match="^finetune failed: TypeError: .*not iterable") as info:
        finetune_isolated(tiny_base, tmp_path, tmp_path / "adapter", isolate=True, new_words=5)
    assert isinstance(info.value, PixelLLMError)


def test_a_round_result_comes_back_whole_from_its_dict():
    from pixelllm_plugins.training.corrections import RoundResult, plan_round

    result = RoundResult(adapter="a", accepted=False, gate="rejected", plan=plan_round(32),
                         train={"images": 120, "refer": 130, "regions": 140}, holdout={"images": 8},
                         replay_images=96, new_words=["pentagon"], new_word_offsets={"pentagon": 0.78},
                         new_score=0.5, current_score=0.625, reason="worse on the held-out corrections")
    assert RoundResult.from_dict(result.to_dict()) == result


def test_a_round_with_a_trainer_or_evaluator_of_the_callers_stays_in_this_process(tmp_path, monkeypatch):
    """Callables cannot travel to a child: with either one given the round runs here, on any thread."""
    import pixelllm_plugins.training.corrections as corrections
    import pixelllm_plugins.training.isolated as isolated
    from pixelllm_plugins.training.isolated import correction_round_isolated

    def no_child(*args, **kwargs):
        raise AssertionError("the round went to a child process")

    calls = []
    monkeypatch.setattr(isolated, "run_in_child", no_child)
    monkeypatch.setattr(corrections, "run_correction_round", lambda *a, **k: calls.append(k) or "result")
    trainer, evaluator = object(), object()
    assert _on_a_thread(correction_round_isolated, "BASE", tmp_path, tmp_path / "a", trainer=trainer) == "result"
    assert _on_a_thread(correction_round_isolated, "BASE", tmp_path, tmp_path / "b", evaluator=evaluator,
                        seed=3) == "result"
    assert [(k["trainer"], k["evaluator"]) for k in calls] == [(trainer, None), (None, evaluator)]
    assert calls[1]["seed"] == 3
