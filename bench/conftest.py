import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    path = _common.write_results()
    if path is not None:
        print(f"\nbenchmark results written to {path}")
