"""Training throughput and peak memory of the full kl-f8 at 256x256 on CPU, batch 1 and 2, with and without
gradient checkpointing, in fp32 or under bf16 autocast (`--precision bf16`, or `both` to run them side by side). Each configuration runs in a fresh process so its peak resident memory (ru_maxrss) is its own.
A step is what the trainer does on a VAE step once the discriminator is on: forward with a posterior sample, the seed
objective (L2 + KL + adaptive-weighted hinge GAN term; LPIPS off because no VGG16 file exists on these machines), backward,
Adam. Usage: python bench/bench_train.py [--steps 3] [--threads 2] [--precision fp32|bf16|both]
bf16 autocast is fast only where oneDNN has bf16 kernels (klvae.train.cpu_bf16_supported); elsewhere it is emulated."""
import argparse, json, os, resource, subprocess, sys, time

def one(batch, ckpt, steps, threads, precision):
    import torch
    from dataclasses import replace
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.losses import RECIPES, VAELoss, NLayerDiscriminator
    torch.set_num_threads(threads); torch.manual_seed(0)
    vae, disc = AutoencoderKL(PRESETS['kl-f8']), NLayerDiscriminator()
    vae.enable_gradient_checkpointing(ckpt)
    objective = VAELoss(replace(RECIPES['seed'], disc_start=0), None)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-5, betas=(0.5, 0.9))
    x = torch.rand(batch, 3, 256, 256)*2 - 1
    for p in disc.parameters(): p.requires_grad_(False)
    times = []
    for i in range(steps + 1):                                   # the first step warms up
        t0 = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            rec, post = vae(x)
            loss, _ = objective.generator_loss(x, rec, post, 0, disc, vae.last_layer)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if i: times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times)//2]
    return dict(precision=precision, batch=batch, grad_ckpt=ckpt, s_per_step=med, images_per_s=batch/med,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=3); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--precision', choices=('fp32', 'bf16', 'both'), default='fp32'); ap.add_argument('--child', default=None)
    a = ap.parse_args()
    if a.child:
        b, c, p = a.child.split(',')
        print(json.dumps(one(int(b), c == '1', a.steps, a.threads, p))); sys.exit()
    rows = []
    for p in (('fp32', 'bf16') if a.precision == 'both' else (a.precision,)):
        for b in (1, 2):
            for c in (0, 1):
                out = subprocess.run([sys.executable, __file__, '--child', f'{b},{c},{p}', '--steps', str(a.steps), '--threads', str(a.threads)],
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch
    from klvae.config import cpu_name
    from klvae.train import cpu_bf16_supported
    print(f"kl-f8 training step at 256x256 on {cpu_name()} ({a.threads} threads, torch {torch.__version__}, oneDNN bf16 "
          f"support: {cpu_bf16_supported()}), median of {a.steps} steps")
    print(f"{'precision':>9} {'batch':>5} {'grad ckpt':>9} {'s/step':>8} {'images/s':>9} {'peak RSS GiB':>13}")
    for r in rows:
        print(f"{r['precision']:>9} {r['batch']:>5} {str(r['grad_ckpt']):>9} {r['s_per_step']:>8.2f} {r['images_per_s']:>9.3f} {r['peak_rss_gib']:>13.2f}")
