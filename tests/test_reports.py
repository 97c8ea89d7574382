"""`make reports` at the `ci` scale into a temporary folder (the committed pages are never rewritten by a test): every
companion notebook executes, every page is written, and every page opens offline in headless Chromium without a
console error, with its figures drawn and its images loaded; no page shows a directive, a traceback, a CDN script or
an absolute path of this machine."""
import os, re, subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT, BIN

pytestmark = pytest.mark.slow   # builds every page at ci scale (about 2 minutes): `make test-all` and CI run it, `make test` does not

COMPANIONS = ('10_table8', '11_hinge_vs_vanilla', '12_latent_explorer')
DIRECTIVE = re.compile(r'#\|\s*(export|exports|exporti|hide|default_exp|summary|eval|hide_line|filter_stream)\b')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('reports')
    env = {**os.environ, 'KLVAE_RUNS_PATH': str(tmp/'runs'), 'KLVAE_REPORTS_PATH': str(tmp/'reports'), 'OMP_NUM_THREADS': '1',
           'PYTHONUNBUFFERED': '1'}
    r = subprocess.run([sys.executable, '-m', 'klvae.report', '--scale', 'ci', '--out', str(tmp/'out')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"klvae.report failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return tmp/'out', r.stdout


def pages(out): return sorted(out.glob('*.html')) + sorted((out/'docs').glob('*.html'))


def test_every_page_is_written_clean_and_small(built):
    out, log = built
    names = {p.stem for p in out.glob('*.html')}
    assert {*COMPANIONS, 'index', 'demo'} <= names, names
    assert (out/'assets'/'plotly.min.js').stat().st_size > 1e6 and (out/'assets'/'lab.css').stat().st_size > 1e5
    docs = {p.stem for p in (out/'docs').glob('*.html')}
    assert {'01_model', '05a_vq', '08_study', '09_explore', '13_reports'} <= docs and not docs & set(COMPANIONS)
    for c in COMPANIONS: assert re.search(rf'\[\d+/\d+\] {c}\.ipynb: executing at scale ci', log)   # progress per notebook
    for p in pages(out):
        text = p.read_text()
        assert p.stat().st_size < 10e6, f"{p.name}: {p.stat().st_size/1e6:.1f} MB"
        if p.name not in ('demo.html', 'latent_explorer.html', 'index.html'):   # built pages share plotly.js and the lab CSS
            up = '../' if p.parent.name == 'docs' else ''
            assert f'href="{up}assets/lab.css"' in text and '* plotly.js v' not in text, p.name
            figure = 'class="plotly-graph-div"' in text   # a drawn figure, not the word in a code cell
            assert text.count(f'src="{up}assets/plotly.min.js"') == (1 if figure else 0), p.name
        assert '<script src="http' not in text and str(ROOT) not in text, p.name
        # what a reader sees besides code (scripts, code cells and inline code removed): no directive, no traceback
        prose = re.sub(r'<script.*?</script>|<div class="highlight[^"]*"><pre>.*?</pre></div>|<code>.*?</code>', '', text, flags=re.S)
        for bad in (DIRECTIVE, re.compile(r'>\s*\| export'), re.compile('Traceback')):
            assert not bad.search(prose), f"{p.name} shows {bad.search(prose).group()!r}"
    index = (out/'index.html').read_text()
    for c in COMPANIONS: assert f"href='{c}.html'" in index
    # key figures come from each companion's `#| summary` cell and the demo's computed table
    assert 'KL-f8 against VQ-f8' in index and 'dB' in index and 'held-out' in index and 'Hinge against vanilla' in index
    t8 = (out/'10_table8.html').read_text()
    assert 'executed at scale <b>ci</b>' in t8 and '<details class="klvae-code">' in t8 and t8.count('Plotly.newPlot') >= 1


def test_pages_render_offline_in_chromium(built, browser):
    out, _ = built
    context = browser.new_context(offline=True)
    requested = []
    context.route('**/*', lambda route: route.continue_() if route.request.url.startswith(('file:', 'data:'))
                  else (requested.append(route.request.url), route.abort()))
    try:
        for p in pages(out):
            errors, page = [], context.new_page()
            page.on('console', lambda m: m.type == 'error' and errors.append(m.text))
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.goto(p.as_uri(), wait_until='load', timeout=60_000)
            n_plots = page.evaluate("() => document.querySelectorAll('.plotly-graph-div').length")
            page.wait_for_function("() => [...document.querySelectorAll('.plotly-graph-div')].every(g => g.querySelector('.main-svg'))",
                                   timeout=60_000)
            shown = page.evaluate("() => [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText).join('\\n')")
            for bad in ('/tmp/', '/root/', '/home/', str(ROOT)): assert bad not in shown, f"{p.name} shows the machine path {bad!r}"
            prose = page.evaluate("""() => [...document.querySelectorAll('.jp-MarkdownOutput')].map(e => {   // prose without inline code
                const c = e.cloneNode(true); c.querySelectorAll('code, pre').forEach(x => x.remove()); return c.textContent; }).join('\\n')""") + shown
            assert not DIRECTIVE.search(prose) and 'Traceback' not in prose, f"{p.name} shows a directive or a traceback"
            broken = page.evaluate("() => [...document.querySelectorAll('img')].filter(i => !i.complete || !i.naturalWidth).length")
            assert errors == [], f"{p.name}: console errors {errors}"
            assert broken == 0, f"{p.name}: {broken} images did not load"
            if p.stem in ('10_table8', '11_hinge_vs_vanilla'): assert n_plots >= 1, f"{p.name} shows no figure"
            page.close()
        assert requested == [], f"pages tried to fetch {requested}"
    finally:
        context.close()


def test_a_stale_study_stops_the_build_before_anything_runs(tmp_path):
    "Cached results whose digest no longer matches the study's configs: `make reports` names the study and the command, executes nothing"
    cache = tmp_path/'runs'/'studies'/'table8'/'ci'/'_results'   # ci results live under the runs folder
    cache.mkdir(parents=True)
    (cache/'runs.csv').write_text('run\nKL-f8 seed=0\n')
    from klvae.study import study_digest, table8
    old = study_digest(table8('ci'))
    old['runs']['KL-f8 seed=0'] = 'an older config'; old['digest'] = 'olderdigest0'
    (cache/'digest.json').write_text(__import__('json').dumps(old))
    env = {**os.environ, 'KLVAE_RUNS_PATH': str(tmp_path/'runs'), 'KLVAE_REPORTS_PATH': str(tmp_path/'reports'), 'KLVAE_RERUN': ''}
    r = subprocess.run([sys.executable, '-m', 'klvae.report', '--scale', 'ci', '--out', str(tmp_path/'out')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "study table8 (ci): stale: KL-f8 seed=0's config changed. Retrain it with `klvae-study table8 --scale ci`" in r.stdout + r.stderr
    assert 'executing' not in r.stdout and not (tmp_path/'out').exists()   # nothing ran, nothing was written
    assert not (tmp_path/'runs'/'studies'/'table8'/'ci'/'KL-f8_seed=0').exists()   # and nothing trained
