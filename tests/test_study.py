"""Studies as processes: a study killed in the middle of a run resumes that run; a finished study trains nothing;
`klvae-study` runs a registered study from a shell. Every run is the tiny model of the `ci` preset."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pandas as pd, pytest
from conftest import ROOT, BIN, run

STUDY = textwrap.dedent('''
    from klvae.study import Study, run_study
    from klvae.train import train_config
    s = Study('killed', {'slow': train_config('ci', perceptual='off', steps=40, disc_start=2, ckpt_every=2, val_every=0)})
    res = run_study(s, progress=False, rerun=RERUN)
    print(res.runs.query("kind == 'arm'")[['run', 'state']].to_json(orient='records'))
''')


def env_for(tmp):
    return {**os.environ, 'KLVAE_RUNS_PATH': str(tmp/'runs'), 'KLVAE_REPORTS_PATH': str(tmp/'reports'), 'OMP_NUM_THREADS': '1'}


@pytest.mark.slow   # trains, is killed and resumes a study
def test_killed_study_resumes_and_a_finished_one_trains_nothing(tmp_path):
    env = env_for(tmp_path)
    folder = tmp_path/'runs'/'studies'/'killed'/'ci'/'slow'
    p = subprocess.Popen([sys.executable, '-c', 'RERUN = True' + STUDY], cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (folder/'checkpoints'/'step_0000004').is_dir():   # a few checkpoints in: kill the study and its trainer
        assert p.poll() is None and time.time() < deadline, "the study ended or stalled before its second checkpoint"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (folder/'vae').exists()
    out = subprocess.run([sys.executable, '-c', 'RERUN = True' + STUDY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [{'run': 'slow', 'state': 'resume'}]
    steps = [json.loads(l)['step'] for l in (folder/'log.jsonl').read_text().splitlines() if 'trains' in json.loads(l)]
    assert steps == list(range(1, 41)), "the resumed run repeats or skips steps"
    again = subprocess.run([sys.executable, '-c', 'RERUN = True' + STUDY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == [{'run': 'slow', 'state': 'done'}]
    cached = subprocess.run([sys.executable, '-c', 'RERUN = False' + STUDY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert 'study killed (ci): reused (digest ' in cached.stdout, cached.stdout + cached.stderr[-2000:]   # the cache, nothing trained
    assert json.loads(cached.stdout.strip().splitlines()[-1]) == [{'run': 'slow', 'state': 'done'}]
    runs = pd.read_csv(tmp_path/'runs'/'studies'/'killed'/'ci'/'_results'/'runs.csv')
    for c in ('run', 'seed', 'model', 'parameters', 'steps', 'batch', 'lr', 'precision', 'train_minutes', 'machine', 'state',
              '32² crops psnr', '32² crops psnr std', '256² center ssim'):
        assert c in runs, c
    images = pd.read_csv(tmp_path/'runs'/'studies'/'killed'/'ci'/'_results'/'images.csv')
    assert list(images.groupby('set').size().items()) == [('256² center', 2*4), ('32² crops', 32*4)]   # the run, mean colour, bicubic, untrained
    assert sorted(runs['kind']) == ['arm', 'baseline', 'baseline', 'baseline']


def test_klvae_study_cli(tmp_path):
    r = run([str(BIN/'klvae-study'), 'nope'], check=False, env=env_for(tmp_path))
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and 'hinge-vs-vanilla' in r.stderr


def test_table8_eval_on_compvis_kl_and_vq_checkpoints(tmp_path):
    "The Table 8 protocol on checkpoints a user would bring: a CompVis-layout KL .ckpt and a VQ Lightning-style .ckpt"
    import numpy as np, torch
    from PIL import Image
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.vq import VQModel, VQ_PRESETS
    from klvae.checkpoints import save_compvis
    from klvae.metrics import psnr
    from klvae.data import to_tensor
    from klvae.study import table8_eval
    from klvae.torchfile import CheckpointError
    torch.manual_seed(0)
    kl, vq = AutoencoderKL(PRESETS['tiny']).eval(), VQModel(VQ_PRESETS['tiny-vq']).eval()
    save_compvis(kl, tmp_path/'kl-f8.ckpt')
    torch.save({'global_step': 7, 'state_dict': {f'first_stage_model.{k}': v for k, v in vq.state_dict().items()}}, tmp_path/'vq.ckpt')
    folder, rng = tmp_path/'val', np.random.default_rng(0)
    (folder/'sub').mkdir(parents=True)
    sizes = {'a.png': (300, 260), 'b.jpg': (256, 400), 'sub/c.png': (512, 300), 'd.png': (280, 280)}
    for name, (w, h) in sizes.items():   # smooth images, so that a reconstruction is not noise against noise
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x*255//w), (y*255//h), ((x + y)*255//(w + h))], -1).astype(np.uint8)
        Image.fromarray(img).save(folder/name, quality=95)
    t = table8_eval({'kl': tmp_path/'kl-f8.ckpt', 'vq': tmp_path/'vq.ckpt'}, folder, n=3, progress=False)
    assert list(t.index) == ['kl', 'vq']
    assert t[['f', 'type', 'c']].values.tolist() == [[8, 'KL', 4], [8, 'VQ 256', 4]]
    assert list(t.columns[:4]) == ['f', 'type', 'c', 'PSNR (dB)'] and t.attrs['images'] == 3
    assert pd.isna(t.loc['kl', 'codes used']) and t.loc['vq', 'codes used'].endswith('of 256')
    assert 'center crop 256x256' in t.attrs['protocol']
    # the numbers are the protocol's: first 3 files by path, short side to 256 (bicubic), center crop, the saved weights
    for label, model in (('kl', kl), ('vq', vq)):
        want = []
        for name in sorted(sizes)[:3]:
            img = Image.open(folder/name).convert('RGB'); w, h = img.size; s = 256/min(w, h)
            img = img.resize((max(256, round(w*s)), max(256, round(h*s))), Image.BICUBIC) if min(w, h) != 256 else img
            l, u = (img.size[0] - 256)//2, (img.size[1] - 256)//2
            x = to_tensor(img.crop((l, u, l + 256, u + 256)))[None]
            with torch.no_grad(): want.append(psnr(x, model(x, sample_posterior=False)[0]).item())
        assert np.allclose(t.attrs['per_image'][label].psnr, want, atol=1e-4), label
    with pytest.raises(CheckpointError, match='nothing.ckpt'):
        table8_eval({'x': tmp_path/'nothing.ckpt'}, folder, n=1, progress=False)
    with pytest.raises(ValueError, match='models is empty'):
        table8_eval({}, folder)
