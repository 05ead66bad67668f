"""Fine-tuning and correction rounds in a fresh Python process, for callers on a thread other than the main
one.

torch's CPU kernels run on GNU OpenMP thread pools, one per thread that calls them, and idle pool threads
stop spinning and sleep as soon as a process holds more of them than it has cores. A server whose request
threads ran inference holds such pools, so a fine-tune on yet another thread keeps waking sleeping helpers
between its many small kernels: measured on a 2-core Xeon, the training of a round of 32 corrections took
53 s on the Label Studio backend's training thread and 35 s alone; and the pools a training thread leaves
behind slow the server's inference in turn. A fresh process has one pool; starting it costs a few seconds.
The child is ``python -m pixelllm_plugins.training.isolated`` (not a ``multiprocessing`` spawn, which
re-runs the parent's main script and fails for ``python -`` or notebooks); it gets its arguments as JSON
and writes its result or error to a file.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .. import errors

_TASKS = {"finetune": ("pixelllm_plugins.training.finetune", "finetune"),
          "round": ("pixelllm_plugins.training.corrections", "run_correction_round")}


def _function(task: str):
    module, name = _TASKS[task]
    return getattr(importlib.import_module(module), name)  # looked up now (tests replace it)


def _off_main_thread() -> bool:
    return threading.current_thread() is not threading.main_thread()


def run_in_child(task: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``task`` (``finetune`` or ``round``) with these arguments (JSON values or paths) in a child
    process; returns its result as JSON (a path as a string, a round as ``RoundResult.to_dict()``). Errors
    come back as the project exception the child raised, with its message."""
    with tempfile.TemporaryDirectory(prefix="pixelllm-train-") as tmp:
        result_file = Path(tmp) / "result.json"
        request = {"task": task, "args": [str(a) if isinstance(a, Path) else a for a in args], "kwargs": kwargs,
                   "result": str(result_file)}
        proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request, default=str), text=True,
                              stdout=subprocess.DEVNULL, check=False)
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            raise errors.TrainingError(f"the training process ended (exit code {proc.returncode}) without a "
                                       "result; its error output above says why") from None
    if "error" in result:
        kind = getattr(errors, result["error"], None)
        if isinstance(kind, type) and issubclass(kind, errors.PixelLLMError):
            raise kind(result["message"])
        raise errors.TrainingError(f"{task} failed: {result['error']}: {result['message']}")
    return result["value"]


def _run(task: str, isolate: bool | None, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """(result, whether it came from a child process as JSON): in a child when ``isolate`` is true
    (``None``: when called off the main thread), else here."""
    if _off_main_thread() if isolate is None else isolate:
        return run_in_child(task, *args, **kwargs), True
    return _function(task)(*args, **kwargs), False


def finetune_isolated(from_model: str | Path, data_dir: str | Path, out_adapter: str | Path, *,
                      isolate: bool | None = None, **kwargs) -> Path:
    """``finetune.finetune``, in a fresh process when ``isolate`` is true (``None``: when called off the
    main thread)."""
    value, _ = _run("finetune", isolate, from_model, data_dir, out_adapter, **kwargs)
    return Path(value)


def correction_round_isolated(base: str | Path, examples_dir: str | Path, out_adapter: str | Path, *,
                              isolate: bool | None = None, trainer=None, evaluator=None, **kwargs):
    """``corrections.run_correction_round``, in a fresh process when ``isolate`` is true (``None``: when
    called off the main thread): training, settling and gate alike. A ``trainer`` or ``evaluator`` given
    (Python callables, which a child cannot receive) keeps the round in this process."""
    from .corrections import RoundResult

    if trainer is not None or evaluator is not None:
        isolate = False
        kwargs.update(trainer=trainer, evaluator=evaluator)
    value, from_child = _run("round", isolate, base, examples_dir, out_adapter, **kwargs)
    return RoundResult.from_dict(value) if from_child else value


def main() -> int:
    request = json.loads(sys.stdin.read())
    result_file = Path(request["result"])
    try:
        value = _function(request["task"])(*request["args"], **request["kwargs"])
        result = {"value": value.to_dict() if hasattr(value, "to_dict") else str(value)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        result = {"error": type(exc).__name__, "message": str(exc)}
    result_file.write_text(json.dumps(result, default=str))
    return 0 if "value" in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
