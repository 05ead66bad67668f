"""``python -m label_studio_backend --host 0.0.0.0 --port 9090`` (same as ``pixelllm ls-backend``)."""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m label_studio_backend",
        description="PixelLLM Label Studio ML backend. Configure with environment variables: LABEL_STUDIO_URL, "
                    "LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/BASIC_AUTH_PASS, MODEL_DIR, PIXELLLM_WORKER_URL "
                    "(see label_studio_backend/README.md).")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 in Docker)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="default 9090")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or preset (default: PIXELLLM_MODEL, else the embedded model)")
    parser.add_argument("--model-dir", default=None, help="state, datasets and adapters (default: MODEL_DIR)")
    parser.add_argument("--log-level", default=None, help="default: LOG_LEVEL, else INFO")
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if the backend on --host/--port answers /health (container healthchecks; "
                             "sends BASIC_AUTH_USER/BASIC_AUTH_PASS when set)")
    args = parser.parse_args(argv)
    if args.healthcheck:
        raise SystemExit(healthcheck(args.host, args.port))
    from .server import run

    run(args.host, args.port, log_level=args.log_level, model=args.model, model_dir=args.model_dir)


def healthcheck(host: str, port: int) -> int:
    import base64
    import urllib.request

    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    request = urllib.request.Request(f"http://{host}:{port}/health")
    user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
    if user or password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    main()
