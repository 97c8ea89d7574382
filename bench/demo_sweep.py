"""The sweep behind the `cpu` preset: train candidate settings, evaluate the held-out sets, append a row to a CSV.

`make demo` must finish within 10 minutes on 2 CPU cores and reach a held-out PSNR of at least 23 dB. Each candidate is a set of
overrides of the `cpu` preset, trained here exactly as `make demo` trains it and measured on `klvae.demo.heldout_sets`.
Run the candidates one at a time; the wall times mean something only on an otherwise idle machine with the default
threads (the `threads` column says how many the run had; `make demo` is timed on its own afterwards):

    python bench/demo_sweep.py NAME [NAME ...] [--csv reports/demo_sweep.csv]

Every row records the machine (`klvae.config.cpu_name`), the precision `auto` resolved to, the training wall time and
steps/s, and PSNR/SSIM (mean and std over images) for both held-out sets. The demo notebook shows the CSV.
"""
import argparse, json, sys, tempfile, time
from pathlib import Path
import pandas as pd, torch
from klvae.config import cpu_name
from klvae.model import AutoencoderKL
from klvae.metrics import evaluate
from klvae.train import train, train_config
from klvae.demo import heldout_sets

# overrides of settings.ini's [preset.cpu]; the discriminator always joins for the last part so every term runs
CANDIDATES = {
    'lr2e-4 1300 steps':     dict(lr=2e-4, steps=1300, disc_start=1170),
    'lr1e-3 1300 steps':     dict(lr=1e-3, steps=1300, disc_start=1170),
    'lr2e-3 1300 steps':     dict(lr=2e-3, steps=1300, disc_start=1170),
    'lr1e-3 batch4 2400':    dict(lr=1e-3, steps=2400, batch_size=4, disc_start=2160),
    'lr1e-3 1300 gan half':  dict(lr=1e-3, steps=1300, disc_start=650),
    'lr1e-3 1300 no-sample': dict(lr=1e-3, steps=1300, disc_start=1170, sample_posterior=False),
}


def run(name:str, overrides:dict)->dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = train_config('cpu', run_dir=f'{d}/run', **overrides)
        t0 = time.time()
        folder = train(cfg)
        wall = time.time() - t0
        info = json.loads((folder/'config.json').read_text())
        model = AutoencoderKL.from_pretrained(folder/'vae')
        row = dict(candidate=name, overrides=json.dumps(overrides), model=cfg.model, steps=cfg.steps, batch=cfg.batch_size,
                   lr=cfg.lr, disc_start=cfg.disc_start, precision=info['precision']['used'], cpu=cpu_name(),
                   torch=torch.__version__, threads=torch.get_num_threads(), train_minutes=round(wall/60, 2), steps_per_s=round(cfg.steps/wall, 3))
        for set_name, ds in heldout_sets(cfg.resolution, cfg.zoom or None).items():
            df = evaluate(model, ds, metrics=('psnr', 'ssim'), progress=False)
            for m in ('psnr', 'ssim'): row[f'{set_name} {m}'], row[f'{set_name} {m} std'] = df[m].mean(), df[m].std()
        return row


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('names', nargs='+', choices=list(CANDIDATES))
    p.add_argument('--csv', default='reports/demo_sweep.csv')
    a = p.parse_args()
    for n in a.names:
        row = run(n, CANDIDATES[n])
        out = Path(a.csv)
        df = pd.concat([pd.read_csv(out), pd.DataFrame([row])]) if out.is_file() else pd.DataFrame([row])
        df.to_csv(out, index=False)
        print(pd.DataFrame([row]).T.to_string(), flush=True)
