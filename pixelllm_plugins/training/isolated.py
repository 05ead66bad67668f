"""Fine-tuning in a fresh Python process, for callers on a thread other than the main one.

torch's CPU kernels run on GNU OpenMP thread pools, one per thread that calls them, and idle pool threads
stop spinning and sleep as soon as a process holds more of them than it has cores. A server whose request
threads ran inference holds such pools, so a fine-tune on yet another thread keeps waking sleeping helpers
between its many small kernels: measured on a 2-core Xeon, the training of a round of 32 corrections took
53 s on the Label Studio backend's training thread and 35 s alone. A fresh process has one pool; starting
it costs a few seconds. The child is ``python -m pixelllm_plugins.training.isolated`` (not a
``multiprocessing`` spawn, which re-runs the parent's main script and fails for ``python -`` or
notebooks); it gets its arguments as JSON and writes its result or error to a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .. import errors


def finetune_isolated(from_model: str | Path, data_dir: str | Path, out_adapter: str | Path, *,
                      isolate: bool | None = None, **kwargs) -> Path:
    """:func:`finetune`, in a fresh process when ``isolate`` is true (``None``: when called off the main
    thread). The keyword arguments must be JSON values or paths. Errors come back as the project exception
    the child raised, with its message."""
    from .finetune import finetune  # looked up now (tests replace it)

    if isolate is None:
        isolate = threading.current_thread() is not threading.main_thread()
    if not isolate:
        return finetune(from_model, data_dir, out_adapter, **kwargs)
    with tempfile.TemporaryDirectory(prefix="pixelllm-finetune-") as tmp:
        result_file = Path(tmp) / "result.json"
        request = {"args": [str(from_model), str(data_dir), str(out_adapter)], "kwargs": kwargs,
                   "result": str(result_file)}
        proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request, default=str), text=True,
                              stdout=subprocess.DEVNULL, check=False)
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            raise errors.TrainingError(f"the fine-tuning process ended (exit code {proc.returncode}) without a "
                                       "result; its error output above says why") from None
    if "error" in result:
        kind = getattr(errors, result["error"], None)
        if isinstance(kind, type) and issubclass(kind, errors.PixelLLMError):
            raise kind(result["message"])
        raise errors.TrainingError(f"fine-tuning failed: {result['error']}: {result['message']}")
    return Path(result["adapter"])


def main() -> int:
    from .finetune import finetune

    request = json.loads(sys.stdin.read())
    result_file = Path(request["result"])
    try:
        adapter = finetune(*request["args"], **request["kwargs"])
        result = {"adapter": str(adapter)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        result = {"error": type(exc).__name__, "message": str(exc)}
    result_file.write_text(json.dumps(result))
    return 0 if "adapter" in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
