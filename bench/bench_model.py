"""Encode/decode speed of klvae's kl-f8 against diffusers' AutoencoderKL with the same weights, fp32 on the CPU.

Run with `make bench` (or `python bench/bench_model.py --reps 5 --size 256`). All models run in this process on the
same random (seeded) weights and inputs; the script first checks that their outputs agree within 1e-4, then times
encode and decode (one warm-up, then the median of --reps repetitions, interleaved across models so that load from
other processes hits all of them alike) and reports achieved GFLOP/s, counted with torch.utils.flop_counter, against
a measured fp32 GEMM ceiling (the better of a matmul and the same product as a 1x1 convolution; the best of measurements taken before each operation and at the end, since other
processes can slow any single one down; the load average is printed too). diffusers runs twice: as it comes (contiguous memory) and converted to channels-last,
klvae's own memory format, to show how much of the difference that alone makes. diffusers is a dev dependency.
"""
import argparse, copy, os, statistics, sys, tempfile, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from klvae.model import AutoencoderKL, PRESETS
from klvae.checkpoints import config_to_diffusers

def seconds(fn):
    "Wall-clock seconds of one call of `fn`"
    t = time.perf_counter(); fn()
    return time.perf_counter() - t

def flops(fn):
    "FLOPs of one call of `fn` (matmuls and convolutions, as torch's flop counter counts them)"
    with FlopCounterMode(display=False) as fc: fn()
    return fc.get_total_flops()

def matmul_ceiling(n=2048, reps=5):
    """Achieved fp32 GFLOP/s of a large GEMM: the better of an n x n matmul (MKL) and the same-sized product run as a 1x1
    convolution (oneDNN, channels-last), since on some CPUs oneDNN's GEMM is twice MKL's and the convolutions use oneDNN"""
    a, b = torch.randn(n, n), torch.randn(n, n)
    conv = torch.nn.Conv2d(n//4, n//4, 1, bias=False).to(memory_format=torch.channels_last)  # (n/4)^2 x 64^2 x 2 = n^3/8 MACs
    x = torch.randn(1, n//4, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a @ b, conv(x)
        mm = 2*n**3 / statistics.median(seconds(lambda: a @ b) for _ in range(reps))
        cv = 2*(n//4)**2*64*64 / statistics.median(seconds(lambda: conv(x)) for _ in range(reps))
    return max(mm, cv) / 1e9

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=256, help='image height and width')
    p.add_argument('--reps', type=int, default=5, help='timed repetitions per model and operation (after one warm-up)')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    torch.manual_seed(0)
    cfg = {k: v for k, v in config_to_diffusers(PRESETS['kl-f8']).items() if not k.startswith('_')}
    ref = DiffusersAutoencoderKL(**cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        vae = AutoencoderKL.from_pretrained(d)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, a.size, a.size)*2 - 1
    x_cl = x.contiguous(memory_format=torch.channels_last)
    z = ref.encode(x).latent_dist.mean.detach()
    z_cl = z.contiguous(memory_format=torch.channels_last)
    models = {  # name: (encode -> (mean, logvar), decode -> image)
        'klvae': (lambda: (lambda p: (p.mean, p.logvar))(vae.encode(x)), lambda: vae.decode(z)),
        'diffusers': (lambda: (lambda p: (p.mean, p.logvar))(ref.encode(x).latent_dist), lambda: ref.decode(z).sample),
        'diffusers channels_last': (lambda: (lambda p: (p.mean, p.logvar))(ref_cl.encode(x_cl).latent_dist), lambda: ref_cl.decode(z_cl).sample)}
    print(f"kl-f8, {a.size}x{a.size}, batch 1, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.inference_mode():
        want = models['diffusers'][0]() + (models['diffusers'][1](),)
        for name, (enc, dec) in models.items():
            if name == 'diffusers': continue
            diff = {k: (a_ - b_).abs().max().item() for k, a_, b_ in zip(('mean', 'logvar', 'decoded'), enc() + (dec(),), want)}
            print(f"max |{name} - diffusers|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
            if max(diff.values()) > 1e-4: sys.exit(f"{name}'s outputs differ by more than 1e-4: the timings would not compare the same computation")
        ceilings, rows = [], []
        cols = ['op', 'model', 'median s', 'speed-up vs diffusers', 'GFLOP', 'GFLOP/s', '% of GEMM ceiling']
        for i, op in enumerate(('encode', 'decode')):
            ceilings.append(matmul_ceiling())
            fns = {name: fns[i] for name, fns in models.items()}
            n_flops = {name: flops(f) for name, f in fns.items()}
            for f in fns.values(): f()                                           # warm-up
            times = {name: [] for name in fns}
            for _ in range(a.reps):
                for name, f in fns.items(): times[name].append(seconds(f))
            med = {name: statistics.median(t) for name, t in times.items()}
            rows += [(op, name, med[name], med['diffusers']/med[name], n_flops[name]/1e9) for name in fns]
        ceilings.append(matmul_ceiling())
    ceiling = max(ceilings)
    print(f"fp32 GEMM ceiling (2048x2048 matmul or 512->512 1x1 conv at 64x64, the faster): {ceiling:.1f} GFLOP/s (best of {len(ceilings)}; lowest {min(ceilings):.1f}); "
          f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print(' | '.join(cols)); print(' | '.join('---' for _ in cols))
    for op, name, t, speedup, gflop in rows:
        print(f"{op} | {name} | {t:.3f} | {speedup:.2f}x | {gflop:.1f} | {gflop/t:.1f} | {100*gflop/t/ceiling:.0f}%")
    print(f"\nmedian of {a.reps} interleaved repetitions after one warm-up; speed-up = diffusers' time / the model's time. "
          "klvae's decoder does fewer FLOPs: its upsampling is one transposed conv (16 instead of 36 multiply-adds per input pixel).")

if __name__ == '__main__': main()
