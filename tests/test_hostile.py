"""Hostile folders from someone else: a run folder to resume, committed study results, an image folder.

Each test builds one hostile input found by the third adversarial review (issue 31) and checks that nothing outside the
folder is created, changed or deleted (hashes of a victim folder before and after), that the error names the offending
path, and that pages carry no markup from the data."""
import hashlib, json, os, shutil, struct, sys, zlib
from pathlib import Path
import pytest
from conftest import run as run_cmd

from klvae.runs import UnsafePath


def snapshot(root:Path)->dict:
    "Every entry under `root` (links not followed): its kind and, for files, the sha256 of its bytes"
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d)/n
            rel = str(p.relative_to(root))
            out[rel] = ('link', os.readlink(p)) if p.is_symlink() else ('dir',) if p.is_dir() else \
                ('file', hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
    "A finished 4-step ci run with checkpoints at steps 2 and 4, validation grids and an export"
    from klvae.train import train, train_config
    root = tmp_path_factory.mktemp('base')
    return train(train_config('ci', run_dir=str(root/'run'), perceptual='off', steps=4, disc_start=2, ckpt_every=2, val_every=2,
                              warmup_steps=0))


@pytest.fixture
def victim(tmp_path):
    "A folder outside the run: a shell start-up file, a folder of work, another run's checkpoints"
    v = tmp_path/'victim'
    (v/'work').mkdir(parents=True)
    (v/'bashrc').write_text('export PATH=$HOME/bin:$PATH\n')
    (v/'work'/'paper.tex').write_text('\\section{Results}\n')
    other = v/'other-run'/'checkpoints'
    for s in (1, 2, 3):
        (other/f'step_{s:07d}').mkdir(parents=True)
        (other/f'step_{s:07d}'/'vae.safetensors').write_bytes(b'weights %d' % s)
    (other/'latest').write_text('step_0000003')
    return v


def resume(run:Path, steps:int=6):
    from klvae.train import train, train_config
    return train(train_config('ci', run_dir=str(run), resume='latest', perceptual='off', steps=steps, disc_start=2, ckpt_every=2,
                              val_every=2, warmup_steps=0))


def copy_run(base_run:Path, tmp_path:Path)->Path:
    run = tmp_path/'run'
    shutil.copytree(base_run, run, symlinks=True)
    return run


def relink(path:Path, target:Path):
    "Replace `path` (a file or folder of the run) with a symbolic link to `target`"
    if path.is_dir() and not path.is_symlink(): shutil.rmtree(path)
    elif path.exists() or path.is_symlink(): path.unlink()
    path.symlink_to(target)


PLANTED = {   # name -> (what to plant, relative to the run; its target in the victim folder; the path the error must name or None)
    'log.jsonl to ~/.bashrc': ('log.jsonl', 'bashrc', 'log.jsonl'),
    'val to a folder': ('val', 'work', 'val'),
    'vae to a folder': ('vae', 'work', 'vae'),
    'checkpoints to another run': ('checkpoints', 'other-run/checkpoints', 'checkpoints'),
    'dangling config.json': ('config.json', 'created-by-klvae.json', 'config.json'),
    'checkpoints/latest to a file': ('checkpoints/latest', 'bashrc', 'latest'),
    'a checkpoint folder to another run': ('checkpoints/step_0000002', 'other-run/checkpoints/step_0000001', 'step_0000002'),
}


@pytest.mark.parametrize('name', list(PLANTED))
def test_resuming_a_run_with_a_planted_link_touches_nothing_outside(name, base_run, victim, tmp_path):
    rel, target, named = PLANTED[name]
    run = copy_run(base_run, tmp_path)
    relink(run/rel, victim/target)
    before = snapshot(victim)
    with pytest.raises(UnsafePath, match=f"{named} is a symbolic link"): resume(run)
    assert snapshot(victim) == before
    assert not (victim/'created-by-klvae.json').exists()


@pytest.mark.parametrize('tmp_name', ['.log.jsonl.tmp', 'checkpoints/.latest.tmp', 'checkpoints/.tmp_step_0000006'])
def test_links_at_the_old_temporary_names_are_never_opened(tmp_name, base_run, victim, tmp_path):
    run = copy_run(base_run, tmp_path)
    (run/tmp_name).symlink_to(victim/('work' if 'step' in tmp_name else 'bashrc'))
    before = snapshot(victim)
    resume(run)   # temporaries are created exclusively under fresh names, so the planted ones are just left alone
    assert snapshot(victim) == before
    assert (run/'checkpoints'/'latest').read_text() == 'step_0000006'


def test_latest_naming_a_folder_outside_the_run_is_refused(base_run, victim, tmp_path):
    run = copy_run(base_run, tmp_path)
    (run/'checkpoints'/'latest').write_text('../../victim/other-run/checkpoints/step_0000003')
    before = snapshot(victim)
    with pytest.raises(UnsafePath, match='not a checkpoint folder of this run'): resume(run)
    assert snapshot(victim) == before


def test_a_hard_linked_log_is_refused(base_run, victim, tmp_path):
    run = copy_run(base_run, tmp_path)
    (run/'log.jsonl').unlink()
    os.link(victim/'bashrc', run/'log.jsonl')
    before = snapshot(victim)
    with pytest.raises(UnsafePath, match='log.jsonl is a hard link'): resume(run)
    assert snapshot(victim) == before


def test_pruning_deletes_only_this_runs_checkpoints(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    resume(run, steps=8)   # checkpoints at 6 and 8 written, 2 and 4 pruned (keep_ckpts=2)
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['latest', 'step_0000006', 'step_0000008']


def test_the_cli_names_the_link_and_exits_non_zero(base_run, victim, tmp_path):
    run = copy_run(base_run, tmp_path)
    relink(run/'log.jsonl', victim/'bashrc')
    before = snapshot(victim)
    r = run_cmd([sys.executable, '-m', 'klvae.train', '--preset', 'ci', '--run-dir', str(run), '--resume', 'latest',
                 '--perceptual', 'off', '--steps', '6', '--disc-start', '2', '--ckpt-every', '2', '--val-every', '2',
                 '--warmup-steps', '0'], check=False, timeout=300)
    assert r.returncode != 0 and 'log.jsonl is a symbolic link' in r.stderr, r.stderr[-2000:]
    assert snapshot(victim) == before


# ---------------------------------------------------------------- committed study results and pages

@pytest.fixture
def results(tmp_path, monkeypatch):
    "A copy of the committed Table 8 results in a reports folder of its own"
    from klvae.config import get_settings
    src = get_settings().reports_path/'studies'/'table8'/'report'
    out = tmp_path/'reports'/'studies'/'table8'/'report'
    shutil.copytree(src, out)
    monkeypatch.setenv('KLVAE_REPORTS_PATH', str(tmp_path/'reports'))
    return out


def test_committed_results_are_reused_when_untouched(results):
    from klvae.study import table8, study_status, changed_files
    assert changed_files(results) == ''
    assert study_status(table8('report'))[0] == 'reused'


@pytest.mark.parametrize('name', ['reconstructions.json', 'runs.csv'])
def test_tampered_results_are_named_instead_of_reused(name, results):
    from klvae.study import table8, study_status, load_results, StaleStudy
    f = results/name
    if name == 'reconstructions.json':
        d = json.loads(f.read_text()); d['rows'][0] = '</b><img src=x onerror="fetch(\'//evil\')"><b>'; f.write_text(json.dumps(d))
    else: f.write_text(f.read_text().replace('KL-f8 seed=0', '<script>fetch(1)</script>', 1))
    state, msg = study_status(table8('report'))
    assert state == 'stale' and f'{name} changed since the results were written' in msg, msg
    with pytest.raises(StaleStudy, match=f'{name} changed'): load_results('table8', 'report')


def test_a_results_folder_without_file_hashes_is_not_trusted(results):
    from klvae.study import table8, study_status
    d = json.loads((results/'digest.json').read_text()); d.pop('files')
    (results/'digest.json').write_text(json.dumps(d))
    state, msg = study_status(table8('report'))
    assert state == 'stale' and 'records no file hashes' in msg


def hostile_notebook(text:str):
    import nbformat
    out = nbformat.v4.new_output('display_data', data={'text/markdown': text, 'text/plain': '<Markdown>'})
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('Markdown(rows)', outputs=[out])])


def test_a_page_refuses_markup_from_the_data_and_shows_escaped_names():
    from klvae.report import CleanPage, unsafe_markup
    from klvae.runs import shown
    row = '</b><img src=x onerror="fetch(\'//evil\')"><b>'
    with pytest.raises(ValueError, match='markup a page does not carry'):
        CleanPage().preprocess(hostile_notebook(f'Rows: **{row}**'), {})
    nb, _ = CleanPage().preprocess(hostile_notebook(f'Rows: **{shown(row)}**'), {})
    assert unsafe_markup(nb.cells[0].outputs[0].data['text/markdown'], markdown=True) == []


def test_figure_trace_names_from_the_data_are_escaped():
    import nbformat
    from klvae.report import CleanPage, _PLOTLY
    fig = {'data': [{'type': 'scatter', 'y': [1, 2], 'name': '<img src=x onerror=alert(1)>'}], 'layout': {}}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('fig', outputs=[nbformat.v4.new_output('display_data', data={_PLOTLY: fig})])])
    page, _ = CleanPage().preprocess(nb, {})
    h = page.cells[0].outputs[0].data['text/html']
    assert '<img' not in h and 'onerror=alert' in h   # the name is there, as text: plotly's JSON writes '<' as \u003c of '&lt;'


# ---------------------------------------------------------------- image folders

def png_of_size(path:Path, w:int, h:int):
    "A valid, tiny PNG of w x h grey pixels, written row by row (never w x h in memory)"
    comp, row = zlib.compressobj(9), b'\x00' + b'\x80'*(3*w)
    data = b''.join(comp.compress(row) for _ in range(h)) + comp.flush()
    chunk = lambda kind, body: struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + chunk(b'IDAT', data)
                     + chunk(b'IEND', b''))


def test_a_pixel_bomb_under_pillows_limit_is_skipped_with_a_message(tmp_path):
    from PIL import Image
    from klvae.data import ImageFolder, load_rgb, decode_budget
    png_of_size(tmp_path/'bomb.png', 9400, 9400)   # 88.4 Mpx: under Pillow's 89.5 Mpx limit
    assert (tmp_path/'bomb.png').stat().st_size < 400_000
    Image.new('RGB', (300, 200), (10, 20, 30)).save(tmp_path/'fine.png')
    with pytest.warns(UserWarning, match=r"'over the pixel budget': 1.*max_pixels=16,777,216 decoded pixels"):
        ds = ImageFolder(tmp_path, size=256)
    assert [f.name for f in ds.files] == ['fine.png'] and decode_budget(256) == 4096**2
    assert ds[0].shape == (3, 256, 256)
    with pytest.raises(ValueError, match='decodes to 9400x9400 pixels, over max_pixels'): load_rgb(tmp_path/'bomb.png', decode_budget(256))


def test_a_large_jpeg_is_budgeted_at_the_size_it_decodes_to(tmp_path):
    from PIL import Image
    from klvae.data import ImageFolder
    Image.new('RGB', (6000, 4000), (200, 100, 50)).save(tmp_path/'camera.jpg', quality=50)   # 24 Mpx: over 4096²
    train = ImageFolder(tmp_path, size=256)              # shrinks on load to 750x500 for a 384 px short side
    assert len(train.files) == 1 and train[0].shape == (3, 256, 256)
    with pytest.raises(ValueError, match="no usable image.*'over the pixel budget': 1"):   # evaluation decodes whole (exact resizes)
        ImageFolder(tmp_path, size=256, train=False)
