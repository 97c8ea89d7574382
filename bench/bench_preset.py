"""Training throughput of a preset's step on this CPU, in fp32 and under bf16 autocast, and its fraction of the machine's
measured matmul ceiling. The `cpu` preset (the demo) by default: the tiny f=8 model, batch 8 of 64² crops.

A step is `klvae.train.step_seconds`'s: a full VAE optimizer step of the preset's model, batch and crop (forward, the
recipe's loss, backward, Adam), median of --steps after two warm-up steps, never cached. Its work is counted with
torch's FlopCounterMode (convolutions and matmuls, forward and backward); the ceiling is the best of a few square
matmuls (n = 2048) in the same precision and thread count. Both precisions alternate in one process so that they see the
same machine. Usage: python bench/bench_preset.py [--preset cpu] [--steps 10] [--threads 2]"""
import argparse, time

def ceiling(dtype, n=2048, reps=5):
    import torch
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
    return 2*n**3/best/1e9

def step_flop(cfg):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from klvae.train import build_model
    vae, x = build_model(cfg.model, cfg.width), torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution)*2 - 1
    with FlopCounterMode(display=False) as fc:
        rec, post = vae(x)
        ((rec - x).pow(2).mean() + post.kl().mean()).backward()
    return fc.get_total_flops()*cfg.grad_accum

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='cpu'); ap.add_argument('--steps', type=int, default=10); ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from klvae.config import cpu_name
    from klvae.train import train_config, step_seconds, cpu_bf16_supported
    cfg = train_config(a.preset)
    flop = step_flop(cfg)
    rows = {p: [] for p in ('no', 'bf16')}
    for _ in range(3):   # alternate: both precisions see the same machine
        for p in rows: rows[p].append(step_seconds(cfg, p, repeats=a.steps, cache=False)[0])
    peak = {'no': ceiling(torch.float32), 'bf16': ceiling(torch.bfloat16)}
    print(f"preset {a.preset}: {cfg.model} width {cfg.width or 'preset'}, batch {cfg.batch_size}x{cfg.grad_accum} at {cfg.resolution}², "
          f"LPIPS {cfg.perceptual}; {flop/1e9:.1f} GFLOP per step (convolutions and matmuls, forward and backward)")
    print(f"{cpu_name()}, {a.threads} threads, torch {torch.__version__}, bf16 units (oneDNN): {cpu_bf16_supported()}")
    print(f"{'precision':>9} {'s/step':>8} {'images/s':>9} {'GFLOP/s':>8} {'matmul ceiling':>15} {'of ceiling':>11}")
    for p, ts in rows.items():
        s = sorted(ts)[len(ts)//2]
        print(f"{'fp32' if p == 'no' else p:>9} {s:>8.3f} {cfg.batch_size*cfg.grad_accum/s:>9.1f} {flop/s/1e9:>8.1f} {peak[p]:>13.0f} GF {flop/s/1e9/peak[p]:>10.1%}")
