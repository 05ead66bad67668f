"""Add the backend's Basic credentials to a project's training webhook.

Label Studio creates the webhook ``<backend>/webhook`` without headers, so with ``BASIC_AUTH_USER`` set the
annotation events (``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``) get 401 and never reach ``fit``::

    python -m label_studio_backend.webhook_auth --project 3 --backend-url http://10.0.0.5:9090

Uses ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER`` and ``BASIC_AUTH_PASS``.
"""

from __future__ import annotations

import argparse
import sys

from .ls_client import LabelStudioClient
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m label_studio_backend.webhook_auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", required=True, type=int, help="Label Studio project id")
    parser.add_argument("--backend-url", required=True, help="the ML backend URL as entered in Label Studio")
    args = parser.parse_args(argv)
    s = Settings.from_env()
    if not (s.label_studio_url and s.label_studio_api_key and s.basic_auth_user and s.basic_auth_pass):
        print("set LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER and BASIC_AUTH_PASS", file=sys.stderr)
        return 2
    n = LabelStudioClient(s.label_studio_url, s.label_studio_api_key).patch_webhook_auth(
        args.project, args.backend_url, s.basic_auth_user, s.basic_auth_pass)
    print(f"patched {n} webhook(s) of project {args.project}")
    return 0 if n else 1


if __name__ == "__main__":
    raise SystemExit(main())
