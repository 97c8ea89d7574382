"""The trainer as processes: the CLI, DDP over gloo on CPU (torchrun, notebook_launcher), SIGKILL + resume, the non-finite
guard, gradient accumulation and bf16 autocast. Every run is the tiny model of the `ci` preset at 32x32 on the embedded photos."""
import os, sys, json, time, signal, subprocess, textwrap
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from conftest import ROOT, BIN, run

def weights(folder, name='diffusion_pytorch_model'):
    "State dict of an exported VAE folder (or of a checkpoint's `name`.safetensors)"
    return load_file(str(Path(folder)/f'{name}.safetensors'))

def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

def cli(*args): return [str(BIN/'klvae-train'), *args]

def log_rows(run_dir): return [json.loads(l) for l in (Path(run_dir)/'log.jsonl').read_text().splitlines()]

def test_cli_ci_preset(tmp_path):
    "The CLI trains the ci preset end to end: config, log, grids, checkpoints, a diffusers-layout export"
    run_dir = tmp_path/'run'
    r = run(cli('--preset', 'ci', '--run-dir', str(run_dir)))
    assert 'klvae run' in r.stdout and 'LPIPS off: perceptual=auto' in r.stdout   # no VGG16 file on these machines
    info = json.loads((run_dir/'config.json').read_text())
    assert info['config']['steps'] == 6 and info['processes'] == 1 and info['perceptual'].startswith('off')
    rows = [r for r in log_rows(run_dir) if 'trains' in r]
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r['trains'] for r in rows] == ['vae']*3 + ['disc', 'vae', 'disc']      # seed recipe: alternating from disc_start=3
    assert not any('train/d_loss' in r or 'train/g_loss' in r for r in rows[:3])    # nothing of the discriminator before it
    assert 'train/g_loss' in rows[4] and 'train/d_loss' in rows[5]
    ck = run_dir/'checkpoints'
    assert sorted(p.name for p in ck.glob('step_*')) == ['step_0000003', 'step_0000006']
    assert (ck/'latest').read_text().strip() == 'step_0000006'
    assert sorted(p.name for p in (ck/'step_0000006').iterdir()) == ['discriminator.safetensors', 'training_state.pt', 'vae.safetensors']
    assert len(list((run_dir/'val').glob('*.png'))) == 3
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    DiffusersAutoencoderKL.from_pretrained(run_dir/'vae')                           # the export loads in diffusers

def test_cli_rejects_bad_input(tmp_path, capsys):
    "The process exits 2 on a bad value (one subprocess); the other refusals go through the same main() in this process"
    r = run(cli('--preset', 'ci', '--run-dir', str(tmp_path/'r'), '--steps', 'many'), check=False)
    assert r.returncode == 2 and 'steps: expected int' in r.stderr
    from klvae.train import main
    with pytest.raises(SystemExit) as e: main(['--preset', 'nope'])
    assert e.value.code == 2 and "no preset 'nope'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='has no checkpoint to resume'):
        main(['--preset', 'ci', '--run-dir', str(tmp_path/'r2'), '--resume', 'latest'])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA GPU"):
            main(['--preset', 'ci', '--run-dir', str(tmp_path/'r3'), '--mixed-precision', 'fp16'])

PROBE = textwrap.dedent('''
    # one generator step of klvae's trainer pieces under DDP: the images each rank sees, its gradients after backward,
    # and the SyncBatchNorm2d discriminator's output and running statistics
    import sys, json, torch
    from accelerate import Accelerator
    from klvae.train import rank_batches, SyncBatchNorm2d
    from klvae.data import EmbeddedPhotos
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.losses import NLayerDiscriminator
    acc = Accelerator(cpu=True)
    data = EmbeddedPhotos('train', 32, repeats=2)
    x = next(rank_batches(data, 2, acc.process_index, acc.num_processes))
    torch.manual_seed(0)
    vae, disc = AutoencoderKL(PRESETS['tiny']), SyncBatchNorm2d.convert(NLayerDiscriminator())
    vae, disc = acc.prepare(vae, disc)
    rec, post = vae(x, sample_posterior=False)
    acc.backward((rec - x).pow(2).mean() + 1e-6*post.kl().mean())
    g = torch.cat([p.grad.flatten() for p in vae.parameters()])
    d = disc(x)
    d.mean().backward()
    dg = torch.cat([p.grad.flatten() for p in disc.parameters()])
    bn = disc.module.main[3]
    out = dict(world=acc.num_processes, x=x.tolist(), grad=g[:4000].tolist(), d=d.tolist(), dgrad=dg[:4000].tolist(),
               running_mean=bn.running_mean.tolist(), running_var=bn.running_var.tolist())
    json.dump(out, open(sys.argv[1] + f'/rank{acc.process_index}.json', 'w'))
''')

@pytest.mark.slow   # several training processes
def test_ddp_two_cpu_processes(tmp_path):
    "torchrun, 2 gloo processes: disjoint shards, identical all-reduced gradients, BatchNorm over the global batch"
    (tmp_path/'probe.py').write_text(PROBE)
    run([str(BIN/'torchrun'), '--nproc_per_node', '2', '--master_port', '29531', str(tmp_path/'probe.py'), str(tmp_path)])
    r0, r1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1))
    assert r0['world'] == r1['world'] == 2
    x0, x1 = torch.tensor(r0['x']), torch.tensor(r1['x'])
    assert not any(torch.equal(a, b) for a in x0 for b in x1)                   # no image on both ranks
    g0, g1 = torch.tensor(r0['grad']), torch.tensor(r1['grad'])
    assert g0.abs().sum() > 0 and torch.allclose(g0, g1, atol=1e-7)            # all-reduced
    # SyncBatchNorm2d on 2 ranks == nn.BatchNorm2d on both ranks' images in one batch
    from klvae.losses import NLayerDiscriminator
    torch.manual_seed(0)
    from klvae.model import AutoencoderKL, PRESETS
    AutoencoderKL(PRESETS['tiny'])                                              # same RNG draws as the probe
    disc = NLayerDiscriminator().train()
    d = disc(torch.cat([x0, x1]))
    assert torch.allclose(torch.cat([torch.tensor(r0['d']), torch.tensor(r1['d'])]), d, atol=1e-4)
    bn = disc.main[3]
    assert torch.allclose(torch.tensor(r0['running_mean']), bn.running_mean, atol=1e-5)
    assert torch.allclose(torch.tensor(r1['running_var']), bn.running_var, atol=1e-4)
    d.mean().backward()                                                         # DDP averages each rank's mean over half the patches
    dg = torch.cat([p.grad.flatten() for p in disc.parameters()])[:4000]
    assert torch.allclose(torch.tensor(r0['dgrad']), dg, atol=1e-5) and torch.allclose(torch.tensor(r1['dgrad']), dg, atol=1e-5)

COMMON = ['--preset', 'ci', '--disc-start', '1000', '--sample-posterior', 'false', '--steps', '4', '--val-every', '0', '--ckpt-every', '0', '--perceptual', 'off']

def reconstruct(vae_dir):
    "Posterior-mean reconstructions of the held-out photos by an exported VAE"
    from klvae.model import AutoencoderKL
    from klvae.data import EmbeddedPhotos
    x = torch.stack([EmbeddedPhotos('val', 32, train=False)[i] for i in range(2)])
    with torch.no_grad(): return AutoencoderKL.from_pretrained(vae_dir)(x, sample_posterior=False)[0]

def assert_same_steps(a_rows, b_rows):
    "Same losses and gradient norms step by step: to float32 rounding on step 1 (same weights), closely after it"
    assert len(a_rows) == len(b_rows)
    for a, b in zip(a_rows, b_rows):
        tol = 1e-6 if a['step'] == 1 else 1e-4
        for k in ('train/rec_loss', 'train/kl_loss', 'train/grad_norm_vae'):
            assert abs(a[k] - b[k]) <= tol*abs(a[k]), (k, a, b)

@pytest.mark.slow   # several training processes
def test_two_processes_match_one(tmp_path):
    """The real loop: 2 processes x batch 1 train what 1 process x batch 2 trains (same global batch, posterior mean).
    Compared: each step's losses and all-reduced gradient norm, and the trained models' reconstructions. Not compared
    element by element: the weights, because conv biases that feed a GroupNorm have a gradient that is zero up to
    rounding, and Adam turns its sign (which depends on summation order) into a step of +-lr."""
    run(cli(*COMMON, '--batch-size', '2', '--run-dir', str(tmp_path/'one')))
    run([str(BIN/'torchrun'), '--nproc_per_node', '2', '--master_port', '29532', '-m', 'klvae.train',
         *COMMON, '--batch-size', '1', '--run-dir', str(tmp_path/'two')])
    info = json.loads((tmp_path/'two'/'config.json').read_text())
    assert info['processes'] == 2 and info['global_batch'] == 2
    one, two = ([r for r in log_rows(tmp_path/d) if 'trains' in r] for d in ('one', 'two'))
    assert [r['step'] for r in two] == [1, 2, 3, 4]                                    # one writer: no row twice
    assert sorted(p.name for p in (tmp_path/'two'/'checkpoints').iterdir()) == ['latest', 'step_0000004']
    assert_same_steps(one, two)
    d = (reconstruct(tmp_path/'one'/'vae') - reconstruct(tmp_path/'two'/'vae')).abs().max().item()
    assert d < 2e-3, d                                                                  # images in [-1, 1]: < 1/4 of an 8-bit level

@pytest.mark.slow   # several training processes
def test_two_processes_match_one_with_discriminator(tmp_path):
    """The same with the discriminator on from step 0 (ldm recipe: both networks every step): SyncBatchNorm2d and the
    adaptive weight of the global batch make step 1 agree to float32 rounding (with each rank's own gradients the
    weight would differ), and the next steps closely"""
    gan = ['--preset', 'ci', '--recipe', 'ldm', '--disc-start', '0', '--sample-posterior', 'false', '--steps', '4',
           '--val-every', '0', '--ckpt-every', '0', '--perceptual', 'off']
    run(cli(*gan, '--batch-size', '2', '--run-dir', str(tmp_path/'one')))
    run([str(BIN/'torchrun'), '--nproc_per_node', '2', '--master_port', '29534', '-m', 'klvae.train',
         *gan, '--batch-size', '1', '--run-dir', str(tmp_path/'two')])
    one, two = ([r for r in log_rows(tmp_path/d) if 'trains' in r] for d in ('one', 'two'))
    assert [r['trains'] for r in two] == ['vae+disc']*4
    for a, b in zip(one, two):
        # step 1 is the same computation summed in another order: every term to float32 rounding, except the adaptive weight,
        # a ratio of gradient norms whose denominator is ~1/100 of its numerator (2e-4 relative on a Sapphire Rapids with
        # AVX-512). Later steps amplify that rounding through the GAN terms (fake logits 13% apart by step 4 there), so from
        # step 2 only the terms that stay smooth are compared: the reconstruction loss and the logits of real images.
        keys = ('train/rec_loss', 'train/disc_weight', 'train/d_loss', 'train/logits_real', 'train/d_logits_fake', 'train/g_logits_fake',
                'train/grad_norm_disc') if a['step'] == 1 else ('train/rec_loss', 'train/logits_real')
        for k in keys:
            tol = (1e-3 if k == 'train/disc_weight' else 1e-5) if a['step'] == 1 else 2e-2
            assert abs(a[k] - b[k]) <= tol*abs(a[k]) + 1e-5, (k, a, b)
    # no comparison of the final weights: with the GAN on from step 0 the adaptive weight is ~100 and the VAE's gradient
    # norm ~2e4, so float32 rounding grows to visible differences within four steps (the runs above compare them)

def test_gradient_accumulation_matches_batch(tmp_path):
    "batch 1 x 2 accumulation steps trains the weights of batch 2 in one step"
    run(cli(*COMMON, '--batch-size', '2', '--run-dir', str(tmp_path/'b2')))
    run(cli(*COMMON, '--batch-size', '1', '--grad-accum', '2', '--run-dir', str(tmp_path/'acc')))
    one, acc = ([r for r in log_rows(tmp_path/d) if 'trains' in r] for d in ('b2', 'acc'))
    assert_same_steps(one, acc)
    d = (reconstruct(tmp_path/'b2'/'vae') - reconstruct(tmp_path/'acc'/'vae')).abs().max().item()
    assert d < 2e-3, d

@pytest.mark.slow   # several training processes
@pytest.mark.parametrize('preset', ['ci', 'ci-vq'])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, preset):
    "Kill a run with SIGKILL after a checkpoint; resuming gives the VAE, discriminator and EMA of an uninterrupted run (KL and VQ)"
    common = ['--preset', preset, '--steps', '8', '--ckpt-every', '2', '--keep-ckpts', '2', '--ema-decay', '0.9', '--perceptual', 'off']
    run(cli(*common, '--run-dir', str(tmp_path/'full')))
    killed = tmp_path/'killed'
    p = subprocess.Popen(cli(*common, '--run-dir', str(killed)), cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, t0 = killed/'checkpoints'/'latest', time.time()
    while not latest.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    first = latest.read_text().strip()
    assert first != 'step_0000008', 'the run finished before it could be killed'
    run(cli(*common, '--run-dir', str(killed), '--resume', 'latest'))
    assert latest.read_text().strip() == 'step_0000008'                                 # numbering continued
    assert sorted(p.name for p in (killed/'checkpoints').glob('step_*')) == ['step_0000006', 'step_0000008']  # keep 2
    assert max_diff(weights(tmp_path/'full'/'vae'), weights(killed/'vae')) == 0          # the EMA export, bitwise
    for f in ('vae', 'discriminator', 'ema'):
        assert max_diff(weights(tmp_path/'full'/'checkpoints'/'step_0000008', f), weights(latest.parent/'step_0000008', f)) == 0, f
    steps = [r['step'] for r in log_rows(killed) if 'trains' in r]
    assert steps == list(range(1, 9))                                                   # no duplicated or missing rows

def test_checkpoint_reloads_every_network(tmp_path):
    "A checkpoint holds what the run had: the exported VAE is the EMA; the discriminator and optimizers load back"
    from klvae.train import train, train_config, load_checkpoint, find_checkpoint
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.losses import NLayerDiscriminator
    run_dir = train(train_config('ci', run_dir=str(tmp_path/'r'), perceptual='off', ema_decay=0.5, val_every=0))
    nets, state = load_checkpoint(find_checkpoint('latest', run_dir))
    assert state['step'] == 6 and len(state['optimizers']) == len(state['schedulers']) == 2
    assert state['schedulers'][0]['last_epoch'] == 6
    vae = AutoencoderKL(PRESETS['tiny']); vae.load_state_dict(nets['vae'])
    disc = NLayerDiscriminator(); disc.load_state_dict(nets['discriminator'])
    assert disc.main[3].num_batches_tracked.item() > 0                                 # it trained from disc_start
    exported = AutoencoderKL.from_pretrained(run_dir/'vae').state_dict()
    assert all(torch.equal(exported[k], nets['ema'][k]) for k in exported)             # EMA weights exported
    assert max_diff(exported, nets['vae']) > 0                                         # ... which differ from the online VAE
    opt = torch.optim.Adam(vae.parameters()); opt.load_state_dict(state['optimizers'][0])
    assert all(v.dtype == torch.float32 for v in nets['vae'].values())

class NaNAt(torch.utils.data.Dataset):
    "Random images, NaN at the given indices"
    def __init__(self, n, bad): self.n, self.bad = n, set(bad)
    def __len__(self): return self.n
    def __getitem__(self, i):
        x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))*2 - 1
        return x*float('nan') if i in self.bad else x

def test_nonfinite_guard(tmp_path):
    from klvae.train import train, train_config, read_log
    # every image NaN: the run stops after max_nonfinite skipped steps, and writes no checkpoint
    cfg = train_config('ci', run_dir=str(tmp_path/'all'), perceptual='off', batch_size=1, max_nonfinite=3)
    with pytest.raises(FloatingPointError, match='3 non-finite losses in a row'):
        train(cfg, train_data=NaNAt(8, range(8)))
    assert not list((tmp_path/'all'/'checkpoints').glob('step_*'))
    assert read_log(tmp_path/'all')['nonfinite'].sum() == 3
    # one NaN image: that step is skipped and counted, the run finishes with finite weights
    cfg = train_config('ci', run_dir=str(tmp_path/'one'), perceptual='off', batch_size=1, repeats=1)
    run_dir = train(cfg, train_data=NaNAt(6, [3]))   # 6 steps of batch 1 see each image once
    log = read_log(run_dir)
    assert log['nonfinite'].sum() == 1
    assert all(torch.isfinite(v).all() for v in weights(run_dir/'vae').values())

def test_bf16_autocast_keeps_fp32_weights_and_tensorboard(tmp_path):
    "bf16 autocast trains fp32 master weights to finite values; --tensorboard writes the logged scalars"
    run(cli('--preset', 'ci', '--run-dir', str(tmp_path/'bf16'), '--mixed-precision', 'bf16', '--perceptual', 'off', '--tensorboard', 'true'))
    rows = [r for r in log_rows(tmp_path/'bf16') if 'trains' in r]
    assert len(rows) == 6 and not any(r['nonfinite'] for r in rows)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights(tmp_path/'bf16'/'vae').values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path/'bf16'/'tb')).Reload()
    assert [e.step for e in ev.Scalars('train/rec_loss')] == [1, 2, 3, 5] and len(ev.Scalars('val/psnr')) == 3

@pytest.mark.slow   # several training processes
def test_notebook_launcher_two_processes(tmp_path):
    script = textwrap.dedent(f'''
        from accelerate import notebook_launcher
        from klvae.train import train, train_config
        notebook_launcher(train, (train_config('ci', run_dir={str(tmp_path/'nl')!r}, perceptual='off'),), num_processes=2, use_port='29533')
    ''')
    run([sys.executable, '-c', script])
    info = json.loads((tmp_path/'nl'/'config.json').read_text())
    assert info['processes'] == 2 and (tmp_path/'nl'/'vae'/'config.json').is_file()
    assert [r['step'] for r in log_rows(tmp_path/'nl') if 'trains' in r] == [1, 2, 3, 4, 5, 6]

@pytest.mark.slow   # several training processes
def test_accelerate_launch_runs_the_module(tmp_path):
    "`accelerate launch -m klvae.train` (the README's launcher for GPUs and nodes) runs the CLI; on CPU one process"
    run([str(BIN/'accelerate'), 'launch', '--cpu', '--num_processes', '1', '--num_machines', '1', '--mixed_precision', 'no',
         '--dynamo_backend', 'no', '-m', 'klvae.train', '--preset', 'ci', '--run-dir', str(tmp_path/'al'), '--perceptual', 'off'])
    assert [r['step'] for r in log_rows(tmp_path/'al') if 'trains' in r] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path/'al'/'vae'/'diffusion_pytorch_model.safetensors').is_file()

@pytest.mark.parametrize('probe', [True, False])
def test_auto_precision_follows_the_forced_probe(tmp_path, probe):
    "KLVAE_CPU_BF16 forces mixed_precision='auto' either way on any CPU; the choice and reason are recorded, the run is finite"
    script = textwrap.dedent(f'''
        import klvae.train as t
        t.train(t.train_config('ci', run_dir={str(tmp_path/'auto')!r}, perceptual='off', mixed_precision='auto'))
    ''')
    r = run([sys.executable, '-c', script], env={**os.environ, 'KLVAE_CPU_BF16': str(int(probe))})
    info = json.loads((tmp_path/'auto'/'config.json').read_text())
    assert info['requested']['mixed_precision'] == 'auto'
    assert info['config']['mixed_precision'] == info['precision']['used'] == ('bf16' if probe else 'no')
    assert info['precision']['reason'] == f'auto: forced by KLVAE_CPU_BF16={int(probe)}'
    assert f"precision {'bf16' if probe else 'no'} (auto: forced" in r.stdout
    rows = [r for r in log_rows(tmp_path/'auto') if 'trains' in r]
    assert len(rows) == 6 and all(r['train/loss'] == r['train/loss'] and abs(r['train/loss']) < 1e6 for r in rows if 'train/loss' in r)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights(tmp_path/'auto'/'vae').values())


def test_auto_precision_measured_where_bf16_units_exist(tmp_path):
    "On a CPU with bf16 units (the probe faked where there are none) 'auto' times both precisions and records the seconds"
    script = textwrap.dedent(f'''
        import klvae.train as t
        t.cpu_bf16_supported = lambda: True
        t.train(t.train_config('ci', run_dir={str(tmp_path/'m')!r}, perceptual='off', mixed_precision='auto'))
    ''')
    env = {'KLVAE_RUNS_PATH': str(tmp_path/'runs'), 'KLVAE_CPU_BF16': ''}   # not forced, whatever the suite's setting
    run([sys.executable, '-c', script], env=env)
    info = json.loads((tmp_path/'m'/'config.json').read_text())
    s = info['precision']['step_seconds']
    assert set(s) == {'fp32', 'bf16'} and all(v > 0 for v in s.values())
    assert info['precision']['used'] == ('bf16' if s['bf16'] < 0.95*s['fp32'] else 'no')
    assert 'auto: measured' in info['precision']['reason']
    assert len(json.loads((tmp_path/'runs'/'step_seconds.json').read_text())) == 2   # cached per machine and shape


def test_time_budget_scales_the_steps_and_resume_keeps_them(tmp_path):
    "time_budget_min fits the steps to the measured step time; a resumed run continues that schedule, not a re-measured one"
    env = os.environ | {'KLVAE_RUNS_PATH': str(tmp_path/'runs'), 'KLVAE_CPU_BF16': '0'}
    cfg = dict(preset='ci', run_dir=str(tmp_path/'b'), perceptual='off', steps=10**6, disc_start=10**6, time_budget_min=0.02,
               val_every=0, ckpt_every=0)
    args = [a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    run([sys.executable, '-m', 'klvae.train', *args], env=env)
    info = json.loads((tmp_path/'b'/'config.json').read_text())
    s, = json.loads((tmp_path/'runs'/'step_seconds.json').read_text()).values()   # fp32 forced: one precision measured
    steps = info['config']['steps']
    assert steps == round(1.2/s) < 10**6 and info['config']['time_budget_min'] == 0
    assert f"{10**6} -> {steps} steps" in info['work'] and len([r for r in log_rows(tmp_path/'b') if 'trains' in r]) == steps
    run([sys.executable, '-m', 'klvae.train', *args, '--resume', 'latest'], env=env | {'KLVAE_RUNS_PATH': str(tmp_path/'other')})
    info2 = json.loads((tmp_path/'b'/'config.json').read_text())
    assert info2['config']['steps'] == steps and not (tmp_path/'other'/'step_seconds.json').exists()   # not measured again


def test_ci_vq_preset_trains_a_vq_model(tmp_path):
    "The same loop trains the VQ family: codebook loss and usage logged, validation reports usage, the export is a VQModel"
    run(cli('--preset', 'ci-vq', '--run-dir', str(tmp_path/'vq'), '--perceptual', 'off'))
    rows = log_rows(tmp_path/'vq')
    train_rows = [r for r in rows if 'trains' in r]
    assert [r['trains'] for r in train_rows] == ['vae']*3 + ['vae+disc']*3                      # vq-f8 recipe: both nets every step
    assert all('train/codebook_loss' in r and 'train/perplexity' in r and 'train/kl_loss' not in r for r in train_rows)
    assert all(r['train/g_loss'] == r['train/g_loss'] for r in train_rows[3:])                  # the GAN term from disc_start
    assert all('val/perplexity' in r and 'val/codes_used' in r for r in rows if 'val/psnr' in r)
    cfg = json.loads((tmp_path/'vq'/'vae'/'config.json').read_text())
    assert cfg['_class_name'] == 'VQModel' and cfg['num_vq_embeddings'] == 256
    disc = weights(tmp_path/'vq'/'checkpoints'/'step_0000006', 'discriminator')
    assert sum(k.endswith('running_mean') for k in disc) == 2                                    # the 2-layer PatchGAN of vq-f8


# ---------------------------------------------------------------- fine-tuning released weights (--init, train_only)
FT = ['--preset', 'ci', '--perceptual', 'off', '--disc-start', '100', '--val-every', '0', '--steps', '6', '--ckpt-every', '3',
      '--recipe', 'ft-mse', '--train-only', 'decoder', '--sample-posterior', 'false']

def parent_files(tmp_path):
    "A parent VAE (the tiny model with its own weights) as a diffusers folder and as a CompVis-layout .ckpt"
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.checkpoints import save_compvis
    torch.manual_seed(123)
    parent = AutoencoderKL(PRESETS['tiny'])
    parent.save_pretrained(tmp_path/'parent')
    save_compvis(parent, tmp_path/'parent.ckpt')
    return parent

def encode(vae_dir, x):
    from klvae.model import AutoencoderKL
    with torch.no_grad(): return AutoencoderKL.from_pretrained(vae_dir).encode(x).mean

@pytest.mark.parametrize('layout', ['diffusers', 'compvis'])
def test_decoder_only_fine_tune_keeps_the_encoder_bitwise(tmp_path, layout):
    "--init from either layout: encoder and quant_conv bitwise the parent's, the latents equal, the decoder trained, the parent's scale kept"
    parent = parent_files(tmp_path)
    init = tmp_path/('parent' if layout == 'diffusers' else 'parent.ckpt')
    run(cli(*FT, '--init', str(init), '--run-dir', str(tmp_path/'ft')))
    w, p = weights(tmp_path/'ft'/'vae'), {k: v for k, v in weights(tmp_path/'parent').items()}
    enc = [k for k in p if k.startswith(('encoder.', 'quant_conv.'))]
    dec = [k for k in p if k.startswith(('decoder.', 'post_quant_conv.'))]
    assert enc and all(torch.equal(w[k], p[k]) for k in enc)                    # frozen: bitwise
    assert sum(not torch.equal(w[k], p[k]) for k in dec) > len(dec)//2         # trained
    from klvae.data import EmbeddedPhotos
    x = torch.stack([EmbeddedPhotos('val', 32, train=False)[i] for i in range(2)])
    assert torch.equal(encode(tmp_path/'ft'/'vae', x), encode(tmp_path/'parent', x))
    info = json.loads((tmp_path/'ft'/'config.json').read_text())
    assert info['parent']['path'] == str(init) and info['frozen'].endswith('of the encoder and quant_conv')
    assert info['latent_scale']['scaling_factor'] == parent.config.scaling_factor and 'parent' in info['latent_scale']['how']
    assert json.loads((tmp_path/'ft'/'vae'/'config.json').read_text())['scaling_factor'] == parent.config.scaling_factor

def test_fine_tune_resumes_bitwise(tmp_path):
    "A decoder-only fine-tune stopped at its step-3 checkpoint and resumed ends bitwise where an uninterrupted one ends"
    import shutil
    parent_files(tmp_path)
    args = [*FT, '--init', str(tmp_path/'parent')]
    run(cli(*args, '--run-dir', str(tmp_path/'whole')))
    shutil.copytree(tmp_path/'whole', tmp_path/'cut')
    shutil.rmtree(tmp_path/'cut'/'checkpoints'/'step_0000006'); shutil.rmtree(tmp_path/'cut'/'vae')
    (tmp_path/'cut'/'checkpoints'/'latest').write_text('step_0000003')
    run(cli(*args, '--run-dir', str(tmp_path/'cut'), '--resume', 'latest'))
    a, b = weights(tmp_path/'whole'/'vae'), weights(tmp_path/'cut'/'vae')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_training_from_scratch_exports_its_own_scaling_factor(tmp_path):
    "A run that trains the encoder writes 1/std of its own latents (not 0.18215) with the interval, in the export and config.json"
    run(cli('--preset', 'ci', '--perceptual', 'off', '--run-dir', str(tmp_path/'r')))
    scale = json.loads((tmp_path/'r'/'config.json').read_text())['latent_scale']
    exported = json.loads((tmp_path/'r'/'vae'/'config.json').read_text())
    assert exported['scaling_factor'] == scale['scaling_factor'] != 0.18215 and scale['ci'][0] < scale['scaling_factor'] < scale['ci'][1]
    assert exported['shift_factor'] == scale['shift_factor']

@pytest.mark.parametrize('bad', ['hostile', 'mismatched'])
def test_init_with_a_bad_file_names_it(tmp_path, bad):
    "--init with a pickle that runs code, or with another model's weights: a CheckpointError naming the file, nothing trained"
    f = tmp_path/'bad.ckpt'
    if bad == 'hostile':
        class Boom:
            def __reduce__(self): return (os.system, (f'touch {tmp_path}/pwned',))
        torch.save({'state_dict': {'encoder.conv_in.weight': Boom()}}, f)
    else:
        from klvae.model import AutoencoderKL, PRESETS
        from klvae.checkpoints import save_compvis
        from dataclasses import replace
        save_compvis(AutoencoderKL(replace(PRESETS['tiny'], ch=64)), f)
    r = run(cli(*FT, '--init', str(f), '--run-dir', str(tmp_path/'ft')), check=False)
    assert r.returncode != 0 and 'CheckpointError' in r.stderr and str(f) in r.stderr
    assert not (tmp_path/'pwned').exists() and not (tmp_path/'ft'/'vae').exists()
