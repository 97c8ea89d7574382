import os, sys, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def run(cmd, timeout=600, env=None, check=True):
    "Run a command from the project root with the test environment; fail with its output if it fails"
    e = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r

@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    "An environment where no VGG16/Inception file can be found"
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    monkeypatch.setenv('KLVAE_WEIGHTS_PATH', str(tmp_path/'weights'))
    for k in ('KLVAE_VGG16_WEIGHTS', 'KLVAE_INCEPTION_WEIGHTS'): monkeypatch.delenv(k, raising=False)
    return tmp_path
