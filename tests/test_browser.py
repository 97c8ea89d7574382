"""The latent explorer in a real browser: JupyterLab in headless Chromium runs nbs/12_latent_explorer.ipynb, a slider
drag must redraw the decoded image, no cell may fail; and the static page must render offline without console errors.

Needs Debian's chromium (`apt-get install chromium`) and the `playwright` Python package (the dev extra); playwright's
own browser download is not used. Without chromium the tests are skipped, or fail when KLVAE_REQUIRE_BROWSER=1 (CI).
KLVAE_SCREENSHOT=path.png saves the explorer's screenshot to that file, and what the run measured to path.json: the companion
page shows nbs/images/latent_explorer.png with its caption from nbs/images/latent_explorer.json."""
import io, json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow   # starts JupyterLab and Chromium: `make test-all` and CI run it, `make test` does not
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NOTEBOOK = ROOT/'nbs'/'12_latent_explorer.ipynb'
# the `browser` fixture (headless chromium via playwright, skipped or failed as it says) is in conftest.py

def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _children(pid:int)->list[int]:
    "Direct children of `pid` (the server's kernels), from /proc"
    kids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid: kids.append(int(stat.parent.name))
    return kids

def _stop(proc:subprocess.Popen):
    "Shut JupyterLab down: SIGTERM to its process group, then SIGKILL to it and to its kernels (own sessions) if they linger"
    kernels = _children(proc.pid)
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: pass
    try: proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
    for k in kernels:
        try: os.killpg(k, signal.SIGKILL)
        except (ProcessLookupError, PermissionError): pass

@pytest.fixture(scope='module')
def lab(tmp_path_factory, browser):
    "JupyterLab on 127.0.0.1 with an empty token and window.jupyterapp exposed, serving a copy of the notebook"
    tmp = tmp_path_factory.mktemp('lab')
    root = tmp/'root'; root.mkdir()
    shutil.copy(NOTEBOOK, root/NOTEBOOK.name)   # a copy: autosave must never write into nbs/
    settings = tmp/'settings'
    for name, value in {'@jupyterlab/apputils-extension/notification': {'fetchNews': 'false', 'checkForUpdates': False},
                        '@jupyterlab/notebook-extension/tracker': {'windowingMode': 'none'},
                        '@jupyterlab/docmanager-extension/plugin': {'autosave': False}}.items():
        f = settings/f'{name}.jupyterlab-settings'; f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))
    port = _free_port()
    env = {**os.environ, 'IN_TEST': '1', 'PYTHONUNBUFFERED': '1', 'JUPYTER_CONFIG_DIR': str(tmp/'config'),
           'JUPYTER_RUNTIME_DIR': str(tmp/'runtime'), 'JUPYTERLAB_SETTINGS_DIR': str(settings),
           'JUPYTERLAB_WORKSPACES_DIR': str(tmp/'workspaces')}
    cmd = [str(BIN/'jupyter'), 'lab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', '--IdentityProvider.token=', '--ServerApp.password=',
           '--ServerApp.disable_check_xsrf=True', '--LabApp.expose_app_in_browser=True', f'--ServerApp.root_dir={root}',
           '--ServerApp.terminals_enabled=False', '--allow-root']   # CI runs as root
    log = open(tmp/'lab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None: raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n{(tmp/'lab.log').read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(f'{url}/api/status', timeout=2).status == 200: break
            except OSError: pass
            if time.time() > deadline: raise AssertionError(f"JupyterLab did not answer within 90 s:\n{(tmp/'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc); log.close()

# the open notebook panel, from the app object that --expose-app-in-browser puts on window
_PANEL = "(() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget; return w && w.content && w.sessionContext ? w : null; })()"

def _image_data(page, selector:str):
    "The pixels of an <img> as a PNG data URL (drawn on a canvas), or None before it has loaded"
    return page.evaluate("""(sel) => { const img = document.querySelector(sel);
        if (!img || !img.complete || !img.naturalWidth) return null;
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png'); }""", selector)

def _wait_for(predicate, timeout:float, what:str, interval:float=0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value: return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

def _save_screenshot(png:bytes, path:Path):
    "A palette PNG (well under 200 KB) of the explorer"
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert('RGB')
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)

def test_explorer_in_jupyterlab(browser, lab, tmp_path):
    page = browser.new_page(viewport={'width': 1400, 'height': 1800})   # tall enough for the whole explorer
    page.set_default_timeout(60_000)
    try:
        page.goto(f'{lab}/lab/tree/{NOTEBOOK.name}?reset', wait_until='domcontentloaded')
        page.wait_for_function(f"() => {{ const p = {_PANEL}; return p && p.context.path.endsWith('{NOTEBOOK.name}') && "
                               "p.sessionContext.session && p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }",
                               timeout=120_000)
        page.evaluate("() => { window.__ran = undefined; window.jupyterapp.commands.execute('notebook:run-all-cells')"
                      ".then(r => window.__ran = 'done ' + r, e => window.__ran = 'failed ' + e); }")
        page.wait_for_function("() => window.__ran !== undefined", timeout=150_000)
        report = page.evaluate(f"""() => {{ const p = {_PANEL}; const errors = []; let unrun = 0;
            for (const cell of p.content.widgets) {{
                if (cell.model.type !== 'code') continue;
                if (cell.model.executionCount === null) unrun += 1;
                for (let i = 0; i < cell.model.outputs.length; i++) {{
                    const o = cell.model.outputs.get(i).toJSON();
                    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n').slice(-1500));
                }} }}
            return {{errors, unrun, text: document.body.innerText}}; }}""")
        assert report['errors'] == [], 'cells failed:\n' + re.sub(r'\x1b\[[0-9;]*m', '', '\n\n'.join(report['errors']))
        assert report['unrun'] == 0, f"{report['unrun']} code cells did not run ({page.evaluate('window.__ran')})"
        for bad in ('Error displaying widget', 'Failed to load model class', 'Error rendering output'):
            assert bad not in report['text'], f"the page shows {bad!r}"

        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")     # the file browser off, for the screenshot
        explorer = page.locator('.klvae-explorer').first
        explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
        status = page.locator('.klvae-status').first
        _wait_for(lambda: 'redrawn' in status.inner_text(), 60, "the explorer's first redraw")
        before = _wait_for(lambda: _image_data(page, 'img.klvae-decoded'), 30, 'the decoded image')
        readout = page.locator('.klvae-t .widget-readout').first
        t_before = readout.inner_text()

        track = page.locator('.klvae-t .noUi-base').first.bounding_box()
        handle = page.locator('.klvae-t .noUi-handle').first.bounding_box()
        page.mouse.move(handle['x'] + handle['width']/2, handle['y'] + handle['height']/2)
        page.mouse.down()
        page.mouse.move(track['x'] + 0.85*track['width'], track['y'] + track['height']/2, steps=8)
        page.mouse.up()
        released, t_after = time.time(), readout.inner_text()
        assert t_after != t_before, f"the slider did not move (t still {t_before})"
        _wait_for(lambda: f'decoded at t = {t_after}' in explorer.inner_text(), 60, f'the image decoded at t = {t_after}', interval=0.05)
        redraw_s = time.time() - released
        print(f"browser: t {t_before} -> {t_after}, the image decoded at the new t shown {redraw_s:.2f} s after the mouse was released")
        after = _wait_for(lambda: _image_data(page, 'img.klvae-decoded'), 30, 'the new decoded image')
        assert after != before, 'the decoded image did not change when t moved'

        shot = explorer.screenshot()
        _save_screenshot(shot, tmp_path/'explorer.png')
        if os.environ.get('KLVAE_SCREENSHOT'):   # the companion page shows it with what this run measured (PATH.json beside PATH.png)
            from datetime import datetime, timezone
            from klvae.config import cpu_name
            from klvae.explore import load_explorer_model
            path = Path(os.environ['KLVAE_SCREENSHOT']); _save_screenshot(shot, path)
            path.with_suffix('.json').write_text(json.dumps(dict(model=load_explorer_model().label, t_before=t_before, t_after=t_after,
                redraw_s=round(redraw_s, 3), machine=cpu_name(), date=datetime.now(timezone.utc).strftime('%Y-%m-%d')), indent=1))
    finally:
        page.close()

def test_static_page_offline(browser, tmp_path):
    from klvae.explore import load_explorer_model, encode_endpoint, photo_crop, measure_path, static_path_figure, path_chart, write_static_page
    choice = load_explorer_model()                       # random weights under pytest
    a, b = (encode_endpoint(choice.model, n, photo_crop(n, 64)) for n in ('chelsea', 'coffee'))
    r = measure_path(choice.model, a, b, n=9)
    html = write_static_page(tmp_path/'static.html', ['## The path', static_path_figure(r, size=64), path_chart(r.table), r.table])

    context = browser.new_context(offline=True)
    requested, errors = [], []
    context.route('**/*', lambda route: route.continue_() if route.request.url.startswith(('file:', 'data:'))
                  else (requested.append(route.request.url), route.abort()))
    page = context.new_page()
    page.on('console', lambda m: m.type == 'error' and errors.append(m.text))
    page.on('pageerror', lambda e: errors.append(str(e)))
    try:
        page.goto(html.as_uri(), wait_until='load', timeout=60_000)
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 2 && "
                               "[...document.querySelectorAll('.js-plotly-plot')].every(g => g.querySelector('.main-svg'))", timeout=60_000)
        gd = "document.querySelector('.js-plotly-plot')"
        assert page.evaluate(f"() => {gd}._transitionData._frames.length") == 9
        assert page.evaluate(f"() => {gd}.querySelectorAll('.slider-container').length") == 1
        first_image = f"() => {gd}.querySelector('image').getAttribute('href')"
        before = page.evaluate(first_image)
        assert before.startswith('data:image/jpeg;base64,')
        rail = page.locator('.js-plotly-plot .slider-rail-touch-rect').first.bounding_box()
        page.mouse.click(rail['x'] + rail['width'] - 2, rail['y'] + rail['height']/2)   # the last step, t = 1
        _wait_for(lambda: page.evaluate(first_image) != before, 20, 'the static slider to show another frame')
        assert errors == [], f"console errors: {errors}"
        assert requested == [], f"the page tried to fetch {requested}"
    finally:
        context.close()
