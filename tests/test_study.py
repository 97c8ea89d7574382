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
    print(run_study(s, progress=False).runs[['run', 'state']].to_json(orient='records'))
''')


def env_for(tmp):
    return {**os.environ, 'KLVAE_RUNS_PATH': str(tmp/'runs'), 'KLVAE_REPORTS_PATH': str(tmp/'reports'), 'OMP_NUM_THREADS': '1'}


def test_killed_study_resumes_and_a_finished_one_trains_nothing(tmp_path):
    env = env_for(tmp_path)
    folder = tmp_path/'runs'/'studies'/'killed'/'ci'/'slow'
    p = subprocess.Popen([sys.executable, '-c', STUDY], cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (folder/'checkpoints'/'step_0000004').is_dir():   # a few checkpoints in: kill the study and its trainer
        assert p.poll() is None and time.time() < deadline, "the study ended or stalled before its second checkpoint"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (folder/'vae').exists()
    out = subprocess.run([sys.executable, '-c', STUDY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [{'run': 'slow', 'state': 'resume'}]
    steps = [json.loads(l)['step'] for l in (folder/'log.jsonl').read_text().splitlines() if 'trains' in json.loads(l)]
    assert steps == list(range(1, 41)), "the resumed run repeats or skips steps"
    again = subprocess.run([sys.executable, '-c', STUDY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == [{'run': 'slow', 'state': 'done'}]
    runs = pd.read_csv(tmp_path/'runs'/'studies'/'killed'/'ci'/'_results'/'runs.csv')
    for c in ('run', 'seed', 'model', 'parameters', 'steps', 'batch', 'lr', 'precision', 'train_minutes', 'machine', 'state',
              '32² crops psnr', '32² crops psnr std', '256² center ssim'):
        assert c in runs, c
    images = pd.read_csv(tmp_path/'runs'/'studies'/'killed'/'ci'/'_results'/'images.csv')
    assert list(images.groupby('set').size().items()) == [('256² center', 2), ('32² crops', 32)]


def test_klvae_study_cli(tmp_path):
    r = run([str(BIN/'klvae-study'), 'nope'], check=False, env=env_for(tmp_path))
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and 'hinge-vs-vanilla' in r.stderr
