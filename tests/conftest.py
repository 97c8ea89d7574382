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


# --- a headless browser for tests/test_browser.py and tests/test_reports.py
CHROMIUM = os.environ.get('KLVAE_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--headless', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']

def _unavailable(why:str):
    "Skip, or fail when the environment demands a browser"
    if os.environ.get('KLVAE_REQUIRE_BROWSER') == '1': pytest.fail(f"{why} (KLVAE_REQUIRE_BROWSER=1 makes this a failure)", pytrace=False)
    pytest.skip(why)

@pytest.fixture(scope='module')
def browser():
    "Headless Debian chromium driven by playwright"
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (Debian) or set KLVAE_CHROMIUM to its path")
    try: from playwright.sync_api import sync_playwright
    except ImportError: _unavailable("the playwright package is missing: `pip install -e '.[dev]'` installs it")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()
    finally: pw.stop()

