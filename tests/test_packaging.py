"""A regular (non-editable) install works on its own: the wheel carries the library, the demo model
and the playground, and `sc-steer app` starts from it."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import firing_sae, free_port, wait_for_http

pytestmark = pytest.mark.slow   # builds and installs a wheel, then starts its playground server

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_serves_the_playground(tmp_path, tiny_model_dirs):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(wheels.glob("sc_steer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)).replace("apps/", "sc_steer_apps/", 1)
               for p in [*ROOT.glob("sc_steer/**/*.py"), *ROOT.glob("apps/*.py")]}
    assert shipped <= names, sorted(shipped - names)      # every module, subpackages included
    assert "sc_steer/demo/model/model.safetensors" in names

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # away from the checkout, the installed copy is the one imported
    env = {**os.environ, "PYTHONPATH": str(site), "GRADIO_ANALYTICS_ENABLED": "False"}
    where = subprocess.run([sys.executable, "-c", "import sc_steer, sc_steer_apps.playground as p; "
                            "print(sc_steer.__file__); print(p.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout

    run = tmp_path / "run"
    firing_sae().save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(site / "bin" / "sc-steer"), "app", "--run", str(run),
                                 "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/", proc, log)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
