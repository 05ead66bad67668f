"""``python -m pixelllm_plugins.integrations.fiftyone install-plugin|install-zoo [--dir D] [--copy]``."""

from .install import main

raise SystemExit(main())
