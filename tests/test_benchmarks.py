"""The benchmark tools that compare commits: each side imports its own ``pool``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ab_pool_checkout_imports_the_revisions_pool_not_the_working_tree(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed, only run from the checkout
    try:
        ab_pool = importlib.import_module("benchmarks.ab_pool")
    finally:
        sys.path.remove(str(ROOT))
    tree = ab_pool.checkout("HEAD", tmp_path / "head")
    assert (tree / "pool" / "pool.py").is_file()
    assert (tree / "benchmarks" / "client.py").is_file()
    found = subprocess.run([sys.executable, "-c", "import pool, benchmarks.client; print(pool.__file__)"],
                           cwd=tree, env={"PYTHONPATH": str(tree)}, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert found == str(tree / "pool" / "__init__.py")
    assert not found.startswith(str(ROOT / "pool"))
