"""The service and the dispatcher import neither torch nor ray (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

try:
    from tests.service_fixtures import ROOT
except ImportError:
    from service_fixtures import ROOT

CHECK = """
import json, sys
import service.app, service.main, service.api, service.cli, service.store, service.db
import workers.dispatcher, workers.executors, workers.executors.local
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "torchvision", "torchattacks"))
print(json.dumps(heavy))
"""


def test_service_and_dispatcher_stay_light(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
