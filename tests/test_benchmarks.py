"""The benchmark tools that compare commits: each side imports its own ``pool``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str) -> Any:
    """``benchmarks.NAME``, imported from the checkout: benchmarks/ is not installed."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(str(ROOT))


def test_ab_pool_checkout_imports_the_revisions_pool_not_the_working_tree(tmp_path: Path) -> None:
    ab_pool = _benchmark("ab_pool")
    tree = ab_pool.checkout("HEAD", tmp_path / "head")
    assert (tree / "pool" / "pool.py").is_file()
    assert (tree / "benchmarks" / "client.py").is_file()
    # Byte-compiled as an installed package: no run compiles the source inside its timed CPU.
    assert {p.stem for p in (tree / "pool").glob("*.py")} == {
        p.name.split(".")[0] for p in (tree / "pool" / "__pycache__").glob("*.pyc")}
    found = subprocess.run([sys.executable, "-c", "import pool, benchmarks.client; print(pool.__file__)"],
                           cwd=tree, env={"PYTHONPATH": str(tree)}, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert found == str(tree / "pool" / "__init__.py")
    assert not found.startswith(str(ROOT / "pool"))


def test_dkim_benchmark_runs_every_row_and_prints_both_targets() -> None:
    # A smoke run: three `dispatcher run`s of 40 jobs on the aiosmtpd sink when smtp-sink
    # is missing, the two signing rates, both ratios.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.dkim", "--jobs", "40", "--rounds", "1",
                           "--seconds", "0.1", "--sink", "auto"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for row in ("dispatcher run, unsigned", "dispatcher run, rsa-2048", "dispatcher run, ed25519",
                "RSA-2048 signatures/s", "rsa-2048 jobs/s ÷ one core's RSA-2048 signatures/s ≥ 1.25",
                "ed25519 jobs/s ÷ unsigned jobs/s ≥ 0.8"):
        assert row in done.stdout, done.stdout


def test_relay_rows_configs_are_valid_dispatcher_configs(tmp_path: Path) -> None:
    """The relay benchmark's STARTTLS and plain-text configs pass ``dispatcher check-config``."""
    relay = _benchmark("relay")
    ca = tmp_path / "ca.pem"
    relay.tls_main_cf(tmp_path)
    assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
    dispatcher = str(Path(sys.executable).parent / "dispatcher")
    for name, ca_file in (("tls", ca), ("plain", None)):
        config = relay.write_config(tmp_path / f"{name}.yaml", 2525, 4, ca_file)
        done = subprocess.run([dispatcher, "check-config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "start_tls: true" in (tmp_path / "tls.yaml").read_text()
    assert "start_tls: false" in (tmp_path / "plain.yaml").read_text()


def test_a_run_replaces_the_tables_and_keeps_what_was_written_by_hand(tmp_path: Path) -> None:
    runner = _benchmark("runner")
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# old tables\n\n{runner.KEEP_BELOW}\n\n## An analysis\n\nkept\n")
    runner.write_results(results, "# new tables\n")
    assert results.read_text() == f"# new tables\n\n{runner.KEEP_BELOW}\n\n## An analysis\n\nkept\n"
    runner.write_results(tmp_path / "fresh.md", "# tables\n")
    assert (tmp_path / "fresh.md").read_text() == "# tables\n"
    assert runner.KEEP_BELOW in (ROOT / "benchmarks" / "RESULTS.md").read_text()
