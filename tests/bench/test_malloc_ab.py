import re

import pytest

from train.bench import malloc_ab


@pytest.mark.slow
def test_ab_runs_every_arm_in_its_own_process_and_prints_ratios(capsys):
    malloc_ab.main(["--models", "mobilenet_v3_small", "--batch", "2", "--steps", "1", "--rounds", "2", "--threads", "1"])
    out = capsys.readouterr().out
    arms = ["default", "tuned"] + (["tcmalloc"] if malloc_ab.TCMALLOC.exists() else [])
    # ABAB: the second round runs the arms in reverse order.
    rounds = re.findall(r"round (\d) (\w+):", out)
    assert rounds == [("0", a) for a in arms] + [("1", a) for a in reversed(arms)]
    assert "glibc M_MMAP_THRESHOLD" in out  # the tuned arm really ran the tuning
    assert re.search(r"default: median [\d.]+ img/s, \d+ minor faults/step, x1\.00 vs default", out)
    for arm in arms[1:]:
        assert re.search(rf"{arm}: median [\d.]+ img/s, \d+ minor faults/step, x[\d.]+ vs default", out)
