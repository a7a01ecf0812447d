"""Suite-wide settings: Ray stays on loopback, the model cache lives in a per-run directory."""
import os
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("CFAUDIT_CACHE", tempfile.mkdtemp(prefix="cfaudit-test-cache-"))

import torch  # noqa: E402

# One intra-op thread: on a loaded 2-core machine more threads oversubscribe it (10x slower seen).
torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures.zoo", "tests.fixtures.s3", "tests.fixtures.ray"]
