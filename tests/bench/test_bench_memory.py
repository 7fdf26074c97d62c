import sys

import pytest

from pipeline.bench.bench_memory import peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_sees_a_child_and_a_grandchild_holding_memory():
    # The parent holds 40 MiB, its child 120 MiB: the one-process peak is the child's, the tree's their sum.
    code = ("import subprocess, sys, time; a = bytearray(40 << 20); "
            "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(120 << 20); time.sleep(0.6)'])")  # fmt: skip
    result = peak_rss([sys.executable, "-c", code])
    assert result["exit_code"] == 0 and result["error"] == ""
    one = result["peak_rss_one_process_mib"]
    assert isinstance(one, float) and 120 <= one < 200
    assert 160 <= result["peak_rss_tree_mib"] < 300
