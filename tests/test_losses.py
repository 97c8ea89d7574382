"Training-objective checks that would fail if a defect of the public reference training script came back"
import math
from dataclasses import replace
import pytest, torch, torch.nn as nn, torchvision
from klvae.losses import (lpips_vgg, VAELoss, RECIPES, NLayerDiscriminator, trains, adaptive_disc_weight,
                          hinge_d_loss, vanilla_d_loss)
from klvae.model import AutoencoderKL, PRESETS

@pytest.fixture(scope='module')
def setup():
    torch.manual_seed(0)
    return AutoencoderKL(PRESETS['tiny']), NLayerDiscriminator(ndf=8), torch.rand(2, 3, 32, 32)*2 - 1

@pytest.fixture(scope='module')
def rnd_lpips(): return lpips_vgg(random_backbone=True)  # random VGG16: plumbing only

def zero(*ms):
    for m in ms: m.zero_grad(set_to_none=True)

# -- the VGG16 file ------------------------------------------------------------------------------------------------

def test_lpips_vgg_loads_torchvision_file(tmp_path, monkeypatch):
    "A file in torchvision's full VGG16 layout (random values) lands conv by conv in the LPIPS backbone"
    sd = torchvision.models.vgg16(weights=None).state_dict()
    (tmp_path/'hub'/'checkpoints').mkdir(parents=True)
    torch.save(sd, tmp_path/'hub'/'checkpoints'/'vgg16-397923af.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path)); monkeypatch.setenv('KLVAE_WEIGHTS_PATH', str(tmp_path/'none'))
    monkeypatch.delenv('KLVAE_VGG16_WEIGHTS', raising=False)
    m = lpips_vgg()
    convs = [(n, c) for n, c in m.net.named_modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 13
    for name, c in convs:
        i = name.split('.')[1]
        assert torch.equal(c.weight, sd[f'features.{i}.weight']) and torch.equal(c.bias, sd[f'features.{i}.bias']), name
    assert not m.training and not any(p.requires_grad for p in m.parameters())

def test_lpips_vgg_missing_weights(no_weights):
    with pytest.raises(FileNotFoundError) as e: lpips_vgg()
    msg = str(e.value)
    assert 'vgg16-397923af.pth' in msg and 'vgg16_weights' in msg and 'KLVAE_VGG16_WEIGHTS' in msg
    assert str(no_weights/'torch'/'hub'/'checkpoints') in msg and str(no_weights/'weights') in msg

def test_lpips_vgg_rejects_foreign_file(tmp_path, monkeypatch):
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path/'vgg16-397923af.pth')
    monkeypatch.setenv('KLVAE_VGG16_WEIGHTS', str(tmp_path/'vgg16-397923af.pth'))
    with pytest.raises(ValueError, match="not torchvision's VGG16"): lpips_vgg()

# -- defects 1, 2, 6 of the reference script ----------------------------------------------------------------------

def test_lpips_gradient_reaches_decoder(setup, rnd_lpips):
    "Defect 1: LPIPS under no_grad gave no gradient. Its own gradient, and its share of the objective's, are non-zero"
    vae, disc, x = setup
    zero(vae)
    rec, _ = vae(x, sample_posterior=False)
    rnd_lpips(rec, x).mean().backward()
    assert vae.last_layer.grad.abs().sum() > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    def g(obj):
        zero(vae); rec, post = vae(x, sample_posterior=False)
        obj.generator_loss(x, rec, post, 0, disc, vae.last_layer)[0].backward()
        return vae.last_layer.grad.clone()
    assert (g(VAELoss(RECIPES['seed'], rnd_lpips)) - g(VAELoss(RECIPES['seed'], None))).norm() > 0

@pytest.mark.parametrize('recipe', ['seed', 'ldm'])
def test_no_gradient_leaks_between_networks(setup, rnd_lpips, recipe):
    "Defect 2: the disc step must not put gradients in the VAE, nor the generator step in the discriminator"
    vae, disc, x = setup
    obj = VAELoss(RECIPES[recipe], rnd_lpips)
    on = RECIPES[recipe].disc_start + 1
    zero(vae, disc)
    rec, post = vae(x)
    loss, logs = obj.generator_loss(x, rec, post, on, disc, vae.last_layer)
    assert 'g_loss' in logs and logs['disc_weight'] > 0
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # restored after the call
    assert vae.last_layer.grad.abs().sum() > 0
    zero(vae, disc)
    rec, post = vae(x)
    step = next(s for s in range(on - 1, on + 2) if 'disc' in trains(s, RECIPES[recipe]))
    d_loss, _ = obj.discriminator_loss(x, rec, step, disc)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert disc.main[0].weight.grad.abs().sum() > 0

@pytest.mark.parametrize('recipe', ['seed', 'ldm'])
def test_discriminator_untouched_before_disc_start(setup, rnd_lpips, recipe):
    "Defect 6: before disc_start no discriminator forward, no BatchNorm statistics on fakes, no g_loss/adaptive weight"
    vae, disc, x = setup
    r = RECIPES[recipe]
    obj, calls = VAELoss(r, rnd_lpips), []
    bn = {k: v.clone() for k, v in disc.state_dict().items() if 'running' in k or 'num_batches' in k}
    h = disc.register_forward_hook(lambda *a: calls.append(1))
    try:
        for step in (0, r.disc_start - 1):
            assert trains(step, r) == ('vae',)
            rec, post = vae(x)
            loss, logs = obj.generator_loss(x, rec, post, step, disc, vae.last_layer)
            loss.backward()
            assert 'g_loss' not in logs and logs['disc_weight'] == 0.0 and logs['disc_factor'] == 0.0
            with pytest.raises(ValueError, match='does not train the discriminator'): obj.discriminator_loss(x, rec, step, disc)
        assert calls == []
        assert all(torch.equal(v, disc.state_dict()[k]) for k, v in bn.items())
        rec, post = vae(x)
        obj.generator_loss(x, rec, post, r.disc_start, disc, vae.last_layer)
        assert calls == [1]  # from disc_start on, it runs
    finally: h.remove(); zero(vae, disc)

def test_schedules():
    seed, ldm = RECIPES['seed'], RECIPES['ldm']
    assert (seed.disc_start, ldm.disc_start) == (50000, 50001)
    assert [trains(s, seed) for s in (49999, 50000, 50001, 50002, 50003)] == [('vae',), ('disc',), ('vae',), ('disc',), ('vae',)]
    assert [trains(s, ldm) for s in (0, 50000, 50001, 99999)] == [('vae',), ('vae',), ('vae', 'disc'), ('vae', 'disc')]
    assert trains(0, replace(seed, disc_start=0)) == ('disc',) and trains(0, replace(ldm, disc_start=0)) == ('vae', 'disc')

def test_logvar_fixed_not_trained(rnd_lpips):
    for r in RECIPES.values():
        obj = VAELoss(r, rnd_lpips)
        assert r.logvar == 0.0 and 'logvar' in dict(obj.named_buffers())
        assert [n for n, p in obj.named_parameters() if p.requires_grad] == []

# -- the pieces -----------------------------------------------------------------------------------------------------

def test_disc_losses_by_hand():
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.0]])
    assert math.isclose(hinge_d_loss(real, fake).item(), 0.5*(0.25 + 0.5), rel_tol=1e-6)
    sp = lambda t: math.log1p(math.exp(t))
    assert math.isclose(vanilla_d_loss(real, fake).item(), 0.5*((sp(-2) + sp(-0.5))/2 + (sp(-2) + sp(0))/2), rel_tol=1e-6)

def test_discriminator_shape_and_syncbn():
    d = NLayerDiscriminator()
    with torch.no_grad(): assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    s = nn.SyncBatchNorm.convert_sync_batchnorm(NLayerDiscriminator())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in s.modules()) == 3
    assert list(s.state_dict()) == list(d.state_dict())
    s.load_state_dict(d.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.allclose(s.train()(x), d.train()(x), atol=1e-5)

def test_bf16_autocast(setup, rnd_lpips):
    "Mixed precision: a finite objective, a float32 adaptive weight, float32 gradients in float32 parameters"
    vae, disc, x = setup
    for name in ('seed', 'ldm'):
        r = RECIPES[name]; obj = VAELoss(r, rnd_lpips)
        zero(vae, disc)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            rec, post = vae(x)
            assert rec.dtype == torch.bfloat16
            loss, logs = obj.generator_loss(x, rec, post, r.disc_start + 1, disc, vae.last_layer)
            w = adaptive_disc_weight(obj.nll(x, rec)[0], -disc(rec).mean(), vae.last_layer)
            d_loss, dlogs = obj.discriminator_loss(x, rec, r.disc_start, disc)
        assert w.dtype == torch.float32 and loss.dtype == torch.float32
        assert all(math.isfinite(v) for v in {**logs, **dlogs}.values())
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in vae.parameters())
        zero(vae, disc)
