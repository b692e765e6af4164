"""Test session settings: a private data cache and no Flower telemetry or update checks."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("SIMLAB_CACHE", tempfile.mkdtemp(prefix="simlab-test-cache-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
