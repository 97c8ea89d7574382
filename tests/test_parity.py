"""klvae against diffusers' AutoencoderKL on the same weights: posterior mean, logvar and decoded image agree.

diffusers is a test-only dependency (the `dev` extra); klvae/ never imports it. Models get random weights from a fixed
seed, with the GroupNorm affine parameters perturbed too (their default init is all ones/zeros, which would hide a
mix-up of two norms). kl-f8 runs at 64x64 (full-size weights, small images) and the tiny config at 32x32.
"""
import pytest, torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from klvae.model import AutoencoderKL, PRESETS
from klvae.checkpoints import config_to_diffusers, convert_state_dict, save_compvis

TOL = 1e-4
SIZES = {'kl-f8': 64, 'tiny': 32}


def diffusers_model(name, seed=0):
    "A diffusers AutoencoderKL with the preset's architecture and seeded random weights"
    torch.manual_seed(seed)
    cfg = {k: v for k, v in config_to_diffusers(PRESETS[name]).items() if not k.startswith('_')}
    m = DiffusersAutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'norm' in n: p.add_(0.2*torch.randn_like(p))
    return m


def max_diff(a, b): return (a - b).abs().max().item()


def outputs(model, x):
    "Posterior mean, logvar and the decoded mean, for a klvae or a diffusers model"
    with torch.no_grad():
        if isinstance(model, DiffusersAutoencoderKL):
            post = model.encode(x).latent_dist
            return post.mean, post.logvar, model.decode(post.mean).sample
        post = model.encode(x)
        return post.mean, post.logvar, model.decode(post.mean)


@pytest.fixture(scope='module', params=['tiny', 'kl-f8'])
def pair(request, tmp_path_factory):
    "(name, diffusers model, klvae model loaded from the diffusers folder, input batch, folder)"
    name = request.param
    ref = diffusers_model(name)
    d = tmp_path_factory.mktemp(f'{name}-diffusers')
    ref.save_pretrained(d)
    x = torch.rand(2, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(1))*2 - 1
    return name, ref, AutoencoderKL.from_pretrained(d), x, d


def test_diffusers_folder_loads_with_same_outputs(pair):
    name, ref, vae, x, d = pair
    assert vae.config == PRESETS[name]
    for what, a, b in zip(('mean', 'logvar', 'decoded'), outputs(ref, x), outputs(vae, x)):
        assert a.shape == b.shape
        assert max_diff(a, b) <= TOL, f"{name} {what}: {max_diff(a, b):.2e}"
    assert outputs(vae, x)[2].abs().max() > 0.1  # a real signal, not two zero outputs agreeing


def test_diffusers_keys_rename_exactly_to_klvae_keys(pair):
    name, ref, vae, x, d = pair
    sd = load_file(d/'diffusion_pytorch_model.safetensors')
    assert set(convert_state_dict(sd, to='compvis')) == set(vae.state_dict())
    assert set(convert_state_dict(vae.state_dict(), to='diffusers')) == set(ref.state_dict())


def test_compvis_round_trip_keeps_outputs(pair, tmp_path):
    name, ref, vae, x, d = pair
    want = outputs(ref, x)
    for f in (tmp_path/'vae.ckpt', tmp_path/'vae.safetensors'):
        back = AutoencoderKL.from_pretrained(save_compvis(vae, f), config=PRESETS[name])
        for a, b, c in zip(want, outputs(back, x), outputs(vae, x)):
            assert max_diff(a, b) <= TOL
            assert torch.equal(b, c)  # the CompVis layout is klvae's own: a lossless copy


def test_klvae_save_pretrained_loads_in_diffusers(pair, tmp_path):
    name, ref, vae, x, d = pair
    vae.save_pretrained(tmp_path/'out')
    back = DiffusersAutoencoderKL.from_pretrained(tmp_path/'out').eval()
    assert list(back.config.block_out_channels) == list(ref.config.block_out_channels)
    assert back.config.layers_per_block == ref.config.layers_per_block
    assert back.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    for a, b in zip(outputs(vae, x), outputs(back, x)): assert max_diff(a, b) <= TOL


def test_old_attention_names_load(pair, tmp_path):
    "diffusers files from before 0.14 call the attention projections query/key/value/proj_attn"
    name, ref, vae, x, d = pair
    old = {k.replace('to_q', 'query').replace('to_k', 'key').replace('to_v', 'value').replace('to_out.0', 'proj_attn'): v
           for k, v in load_file(d/'diffusion_pytorch_model.safetensors').items()}
    assert any('proj_attn' in k for k in old) and not any('to_q' in k for k in old)
    save_file(old, tmp_path/'old.safetensors')
    for a, b in zip(outputs(ref, x), outputs(AutoencoderKL.from_pretrained(tmp_path/'old.safetensors', config=PRESETS[name]), x)):
        assert max_diff(a, b) <= TOL


def test_training_gradients_match_diffusers():
    "The in-place ops and the folded upsampling of klvae's model give diffusers' gradients"
    ref = diffusers_model('tiny', seed=3).train()
    vae = AutoencoderKL(PRESETS['tiny']).train()
    vae.load_state_dict(convert_state_dict(ref.state_dict(), to='compvis'))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))*2 - 1
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    post_r = ref.encode(xr).latent_dist
    loss_r = (ref.decode(post_r.mean).sample - xr).square().mean() + 1e-3*post_r.kl().mean()
    post_k = vae.encode(xk)
    loss_k = (vae.decode(post_k.mean) - xk).square().mean() + 1e-3*post_k.kl().mean()
    assert abs(loss_r.item() - loss_k.item()) <= TOL
    loss_r.backward(); loss_k.backward()
    grads_r = dict(ref.named_parameters())
    grads_k = convert_state_dict({n: p.grad for n, p in vae.named_parameters()}, to='diffusers')
    assert set(grads_k) == set(grads_r)
    scale = max(g.grad.abs().max().item() for g in grads_r.values())
    worst = max(max_diff(grads_k[n], p.grad.reshape(grads_k[n].shape)) for n, p in grads_r.items())
    assert worst <= 1e-4*scale, f"largest gradient difference {worst:.2e} (largest gradient {scale:.2e})"
    assert max_diff(xk.grad, xr.grad) <= 1e-4*xr.grad.abs().max().item()
