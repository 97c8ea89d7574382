"""Does bf16 autocast change what the demo learns? Trains the `cpu` preset twice with one seed, in fp32 and under bf16
autocast (fp32 master weights), for --steps steps (at most the preset's; its schedule shrunk by `scale_steps`: warmup alike, cosine to 0 at the
end, no discriminator), and compares the two runs' logged training losses step by step and the held-out PSNR/SSIM that
`make demo` measures. On a CPU without bf16 units oneDNN emulates bf16 (several times slower than fp32), so there the
wall times say nothing about a bf16 CPU; the numerics are the same.
Usage: python bench/bf16_parity.py [--steps 250] [--seed 0] [--threads 1] [--out /tmp/bf16_parity]"""
import argparse, json, subprocess, sys, time
from pathlib import Path

def one(steps, seed, threads, out, p):
    "Train and measure one precision (a process of its own: accelerate's state is per process)"
    import torch
    torch.set_num_threads(threads)
    from klvae.demo import heldout_sets
    from klvae.metrics import evaluate
    from klvae.train import train, train_config, scale_steps
    from klvae.vq import load_autoencoder
    full = train_config('cpu', log_every=5, seed=seed, mixed_precision=p, run_dir=str(Path(out)/p), time_budget_min=0)
    cfg = scale_steps(full, min(1.0, steps/full.steps))   # the whole schedule shrunk to `steps` (at most the preset's)
    t0 = time.time(); run = train(cfg); minutes = (time.time() - t0)/60
    m = load_autoencoder(run/'vae')
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())   # autocast never touches the master weights
    return dict(minutes=minutes, **{f'{s} {k}': float(df[k].mean()) for s, ds in heldout_sets(cfg.resolution, cfg.zoom or None, cfg.val_data).items()
                                    for df in [evaluate(m, ds, metrics=('psnr', 'ssim'), progress=False)] for k in ('psnr', 'ssim')})

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=250); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--out', default='/tmp/bf16_parity')
    ap.add_argument('--child', choices=('no', 'bf16'), default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.steps, a.seed, a.threads, a.out, a.child))); sys.exit()
    rows = {p: json.loads(subprocess.run([sys.executable, __file__, '--child', p, '--steps', str(a.steps), '--seed', str(a.seed),
                                          '--threads', str(a.threads), '--out', a.out], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1]) for p in ('no', 'bf16')}
    import torch
    from klvae.config import cpu_name
    from klvae.train import read_log, cpu_bf16_supported
    logs = {p: read_log(Path(a.out)/p).dropna(subset=['train/rec_loss']).set_index('step')['train/rec_loss'] for p in rows}
    rel = ((logs['bf16'] - logs['no']).abs()/logs['no']).dropna()
    print(f"cpu preset, {a.steps} steps, seed {a.seed}, {a.threads} thread(s) on {cpu_name()}, torch {torch.__version__}; "
          f"oneDNN bf16 support: {cpu_bf16_supported()}")
    print(f"logged training rec_loss, bf16 vs fp32 at the same step: median relative difference {rel.median():.3f}, "
          f"largest {rel.max():.3f} ({len(rel)} log rows); last row fp32 {logs['no'].iloc[-1]:.4f}, bf16 {logs['bf16'].iloc[-1]:.4f}")
    for p, r in rows.items(): print(f"{'fp32' if p == 'no' else p:>5}: " + ', '.join(f'{k} {v:.3f}' for k, v in r.items()))
