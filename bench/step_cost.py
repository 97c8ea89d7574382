"""What each demo-sweep candidate costs: the seconds of one training step of its shape (crop size, batch, width) against
the budget's (the `cpu` preset at its fp32 budget: batch 8 of 64² crops, width 32), measured side by side in one process
(steps of the shapes interleaved, so a change in the machine's speed hits them alike), and the candidate's whole work
relative to the budget's (steps x seconds per step). `klvae.study.DEMO_CANDIDATES` sets the steps of the candidates that
change a step's shape from these ratios, so that every candidate spends about the budget's ten minutes.
A step here is what `train` does before the discriminator starts: forward with a posterior sample, the candidate's
recipe (`VAELoss.generator_loss`; LPIPS off), backward, Adam.
Usage: python bench/step_cost.py [--steps 12] [--threads 2]"""
import argparse, time

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=12); ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    import torch
    from dataclasses import replace
    from klvae.config import cpu_name
    from klvae.study import DEMO_CANDIDATES, sweep_budget
    from klvae.train import build_model
    from klvae.model import PRESETS
    from klvae.losses import RECIPES, VAELoss
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    budget = sweep_budget()   # the preset the sweep compared: fp32, 1300 steps of batch 8 at 64²
    cands = {'budget': budget} | {k: replace(budget, **o) for k, o in DEMO_CANDIDATES.items()}
    shapes = {}   # (resolution, batch, width) -> model, optimizer, batch of images; candidates of one shape share it
    for c in cands.values():
        key = (c.resolution, c.batch_size, c.width)
        if key not in shapes:
            m = build_model(c.model, c.width)
            shapes[key] = (m, torch.optim.Adam(m.parameters(), lr=1e-4), torch.rand(c.batch_size, 3, c.resolution, c.resolution)*2 - 1,
                           VAELoss(replace(RECIPES[c.recipe], disc_start=c.steps), None))   # no discriminator: a VAE step
    times = {k: [] for k in shapes}
    for i in range(a.steps + 1):   # the first round warms up
        for k, (m, opt, x, objective) in shapes.items():
            t0 = time.perf_counter()
            rec, post = m(x)
            objective.generator_loss(x, rec, post, 0, None, m.last_layer)[0].backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if i: times[k].append(time.perf_counter() - t0)
    med = {k: sorted(t)[len(t)//2] for k, t in times.items()}
    base = med[(budget.resolution, budget.batch_size, budget.width)]
    print(f"one training step of each demo-sweep shape, median of {a.steps}, {a.threads} thread(s) on {cpu_name()}, torch {torch.__version__}")
    print(f"{'candidate':>36} {'crop':>5} {'batch':>5} {'width':>5} {'s/step':>7} {'x budget':>8} {'steps':>6} {'work x budget':>13}")
    for name, c in cands.items():
        s = med[(c.resolution, c.batch_size, c.width)]
        print(f"{name:>36} {c.resolution:>5} {c.batch_size:>5} {c.width or PRESETS[c.model].ch:>5} {s:>7.3f} {s/base:>8.2f} {c.steps:>6} {c.steps*s/(budget.steps*base):>13.2f}")
