"""The README's DVC remote recipe: outputs pushed from one checkout, pulled by a fresh clone elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.shard_format import read_summary
from tests.conftest import REPO
from train.data import eval_batches

MAKE_SHARDS = "from pathlib import Path; from tests.conftest import make_tiny_shards as m; " \
              "m(Path('shards/equalized'), variant='equalized')"
MAKE_MODEL = "from pathlib import Path; Path('models').mkdir(exist_ok=True); " \
             "Path('models/best.pt').write_bytes(b'w' * 999)"


def _sh(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_shards_and_models_round_trip_through_a_local_directory_remote(tmp_path: Path):
    here, remote = tmp_path / "workstation", tmp_path / "remote"
    here.mkdir()
    stages = {"stages": {
        "shard": {"cmd": f'{sys.executable} -c "{MAKE_SHARDS}"', "outs": ["shards/equalized"]},
        "train": {"cmd": f'{sys.executable} -c "{MAKE_MODEL}"', "deps": ["shards/equalized"],
                  "outs": ["models/best.pt"]},
    }}  # fmt: skip
    (here / "dvc.yaml").write_text(yaml.safe_dump(stages))
    _sh("git", "init", "-q", cwd=here)
    _sh("dvc", "init", "-q", cwd=here)
    _sh("dvc", "repro", "-q", cwd=here)
    # The README's commands, with a folder where it says s3://...
    _sh("dvc", "remote", "add", "-d", "storage", str(remote), cwd=here)
    _sh("dvc", "push", cwd=here)
    _sh("git", "add", "-A", cwd=here)
    _sh("git", "commit", "-qm", "pipeline", cwd=here)

    node = tmp_path / "node"  # another machine: a clone, no DVC cache, no outputs
    _sh("git", "clone", "-q", str(here), str(node), cwd=tmp_path)
    assert not (node / "shards" / "equalized").exists()
    _sh("dvc", "pull", "shards/equalized", cwd=node)
    assert not (node / "models" / "best.pt").exists()  # only what was asked for
    summary = read_summary(node / "shards" / "equalized")
    for split in ("train", "val", "test"):  # every shard checked against summary.json's sha256
        assert sum(len(b["key"]) for b in eval_batches(summary, split, 8, 0)) == summary.split(split).count
    _sh("dvc", "pull", "models/best.pt", cwd=node)
    assert (node / "models" / "best.pt").read_bytes() == (here / "models" / "best.pt").read_bytes()
