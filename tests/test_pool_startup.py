"""What importing the library costs every process that sends."""

import subprocess
import sys


def test_importing_pool_does_not_load_importlib_metadata_until_the_version_is_asked() -> None:
    # importlib.metadata is ~20 ms of CPU at import; only __version__ needs it.
    code = ("import sys, pool; loaded = 'importlib.metadata' in sys.modules; "
            "version = pool.__version__; from pool import __version__; "
            "print(loaded, version == __version__ == pool.__version__ != '', 'importlib.metadata' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True", "True"]
