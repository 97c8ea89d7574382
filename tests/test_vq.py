"""klvae's VQ autoencoder against diffusers' VQModel, CompVis Lightning checkpoints, and the quantizer's definition.

diffusers is a test-only dependency; klvae/ never imports it. Models get seeded random weights with the GroupNorm affine
parameters perturbed (their default init would hide a mix-up of two norms) and a codebook spread like the latents
(taming's initial codes lie within +-1/n_embed, where every latent has almost the same nearest code). vq-f8 runs with
its full-size weights on one 64x64 image; the tiny configs cover level attention and a mid block without attention.
"""
import os, subprocess, sys, types
from dataclasses import replace
import numpy as np, pytest, torch
from diffusers import VQModel as DiffusersVQModel
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVectorQuantizer
from klvae.model import AutoencoderKL, PRESETS
from klvae.checkpoints import convert_state_dict, save_compvis
from klvae.vq import VQ_PRESETS, VQModel, VectorQuantizer, vq_config_to_diffusers

TOL = 1e-4
CONFIGS = {'tiny-vq': VQ_PRESETS['tiny-vq'],
           # attention in the last level (AttnDown/UpDecoderBlock2D), none in the mid block (mid_block_add_attention=False)
           'tiny-level-attention-no-mid': replace(VQ_PRESETS['tiny-vq'], attn_resolutions=(4,), mid_attention=False),
           'vq-f8': VQ_PRESETS['vq-f8']}
SIZES = {'vq-f8': 64}


def inputs(name):
    size = SIZES.get(name, 32)
    return torch.rand(1 if name == 'vq-f8' else 2, 3, size, size, generator=torch.Generator().manual_seed(1))*2 - 1


def diffusers_model(cfg, x, seed=0):
    "A diffusers VQModel of `cfg`'s architecture with seeded random weights and a codebook spread like its latents"
    torch.manual_seed(seed)
    m = DiffusersVQModel(**{k: v for k, v in vq_config_to_diffusers(cfg).items() if not k.startswith('_')}).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'norm' in n: p.add_(0.2*torch.randn_like(p))
        h = m.encode(x).latents
        m.quantize.embedding.weight.copy_(h.mean() + h.std()*torch.randn_like(m.quantize.embedding.weight))
    return m


def outputs(model, x, h=None):
    "Pre-quantisation latents of `x`; decoded images and code indices (flattened) of latents `h` (default: the model's own)"
    # Comparisons decode the reference model's latents in both models: latents that agree to 1e-6 could still flip a
    # near-tie between two of 16,384 codes, which would show encoder rounding as a decoder difference (vq-f8 at this
    # seed, each model quantising its own latents: 1 of 64 positions picks the other code of a near-tie).
    with torch.no_grad():
        if isinstance(model, DiffusersVQModel):
            own = model.encode(x).latents
            h = own if h is None else h
            return own, model.decode(h).sample, model.quantize(h)[2][2].flatten()
        own = model.encode(x)
        h = own if h is None else h
        return own, model.decode(h), model.quantize(h).indices.flatten()


def compare(ref, model, x):
    "Both models' outputs, each decoding and quantising `ref`'s latents"
    want = outputs(ref, x)
    return want, outputs(model, x, want[0])


def max_diff(a, b): return (a - b).abs().max().item()


def assert_same(want, got, what=''):
    for name, a, b in zip(('latents', 'decoded'), want, got):
        assert a.shape == b.shape and max_diff(a, b) <= TOL, f"{what} {name}: {max_diff(a, b):.2e}"
    assert torch.equal(want[2], got[2]), f"{what}: indices differ at {(want[2] != got[2]).sum().item()} positions"


@pytest.fixture(scope='module', params=list(CONFIGS))
def pair(request, tmp_path_factory):
    "(name, diffusers model, its outputs, klvae model loaded from its diffusers folder, input batch)"
    name = request.param
    x = inputs(name)
    ref = diffusers_model(CONFIGS[name], x)
    d = tmp_path_factory.mktemp(name)
    ref.save_pretrained(d)
    return name, ref, outputs(ref, x), VQModel.from_pretrained(d), x


def test_diffusers_folder_loads_with_same_outputs(pair):
    name, ref, want, vq, x = pair
    assert vq.config == CONFIGS[name]
    got = outputs(vq, x, want[0])
    assert_same(want, got, name)
    assert got[1].abs().max() > 0.1                 # a real signal, not two zero outputs agreeing
    assert len(got[2].unique()) >= min(8, got[2].numel()//2)  # many codes chosen: the index comparison means something


def lightning_ckpt(path, state_dict, extra=None):
    "Save a checkpoint shaped like a Lightning 1.x one, with a callback class from a module absent at load time"
    names = ['pytorch_lightning', 'pytorch_lightning.callbacks', 'pytorch_lightning.callbacks.model_checkpoint']
    for n in names: sys.modules[n] = types.ModuleType(n)
    class ModelCheckpoint: pass  # Lightning 1.x keys callback states by the callback class itself
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], 'ModelCheckpoint'
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    try:
        torch.save({'epoch': 3, 'global_step': np.int64(971043), 'pytorch-lightning_version': '1.4.2',
                    'callbacks': {ModelCheckpoint: {'monitor': 'val/rec_loss', 'best_model_score': torch.tensor(0.1)}},
                    'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 4.5e-6, 'betas': (0.5, 0.9)}]}],
                    'state_dict': state_dict, **(extra or {})}, path)
    finally:
        for n in names: del sys.modules[n]
    return path


LOSS_ENTRIES = {'loss.logvar': torch.zeros(()), 'loss.perceptual_loss.net.slice1.0.weight': torch.zeros(64, 3, 3, 3),
                'loss.discriminator.main.0.weight': torch.zeros(64, 3, 4, 4)}


def test_compvis_lightning_ckpt_loads_with_same_outputs(pair, tmp_path):
    name, ref, want, vq, x = pair
    sd = convert_state_dict(ref.state_dict(), to='compvis')
    assert set(sd) == set(vq.state_dict())  # the diffusers keys rename exactly to klvae's (CompVis) keys
    f = lightning_ckpt(tmp_path/'last.ckpt', {**sd, **LOSS_ENTRIES})
    loaded = VQModel.from_pretrained(f)
    cfg = CONFIGS[name]  # a CompVis file has no config: attention is placed as for 256x256 training, sizes come from the tensors
    assert loaded.config == replace(cfg, resolution=256, attn_resolutions=tuple(r*256 // cfg.resolution for r in cfg.attn_resolutions))
    assert_same(want, outputs(loaded, x, want[0]), name)
    assert not any(m.startswith('pytorch_lightning') for m in sys.modules)


def test_klvae_save_pretrained_loads_in_diffusers(pair, tmp_path):
    name, ref, want, vq, x = pair
    back = DiffusersVQModel.from_pretrained(vq.save_pretrained(tmp_path/'out')).eval()
    assert back.config.scaling_factor == 1.0 and back.config.num_vq_embeddings == vq.config.n_embed
    assert list(back.config.down_block_types) == list(ref.config.down_block_types)
    assert_same(*compare(vq, back, x), name)


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return VQModel(VQ_PRESETS['tiny-vq']).eval()


def test_model_ema_weights_load(tiny, tmp_path):
    "CompVis LitEma keeps model_ema.<parameter name without dots> (also for the loss's parameters), plus decay and num_updates"
    raw = tiny.state_dict()
    ema = {k: v + 0.01*torch.randn_like(v) for k, v in raw.items()}
    lit = {f"model_ema.{k.replace('.', '')}": v for k, v in ema.items()}
    lit |= {'model_ema.decay': torch.tensor(0.9999), 'model_ema.num_updates': torch.tensor(5000, dtype=torch.int),
            'model_ema.lossdiscriminatormain0weight': torch.zeros(64, 3, 4, 4)}
    assert 'model_ema.encoderdown0block0conv1weight' in lit
    f = lightning_ckpt(tmp_path/'ema.ckpt', {**raw, **LOSS_ENTRIES, **lit})
    with_ema, without = VQModel.from_pretrained(f, ema=True), VQModel.from_pretrained(f)
    assert all(torch.equal(v, ema[k]) for k, v in with_ema.state_dict().items())
    assert all(torch.equal(v, raw[k]) for k, v in without.state_dict().items())
    with pytest.raises(ValueError, match='ema=True, but the file has no model_ema'):
        VQModel.from_pretrained(lightning_ckpt(tmp_path/'plain.ckpt', dict(raw)), ema=True)
    lit.pop('model_ema.quantizeembeddingweight')
    with pytest.raises(ValueError, match=r"1 weights have no model_ema copy: \['quantize\.embedding\.weight'\]"):
        VQModel.from_pretrained(lightning_ckpt(tmp_path/'partial.ckpt', {**raw, **lit}), ema=True)


class SystemPayload:
    def __init__(self, m): self.m = m
    def __reduce__(self): return os.system, (f'touch {self.m}',)


def test_malicious_pickle_in_vq_ckpt_never_runs(tiny, tmp_path):
    marker = tmp_path/'payload-ran'
    f = lightning_ckpt(tmp_path/'evil.ckpt', {**tiny.state_dict(), **LOSS_ENTRIES},
                       extra={'hyper_parameters': SystemPayload(marker), 'loops': [SystemPayload(marker)]})
    vq = VQModel.from_pretrained(f)  # the weights beside the payload load; the payload stays an inert stub
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in vq.state_dict().items())
    torch.save({'state_dict': SystemPayload(marker)}, tmp_path/'evil2.ckpt')
    with pytest.raises(ValueError, match='not a state dict'): VQModel.from_pretrained(tmp_path/'evil2.ckpt')
    torch.save({'state_dict': {'quantize.embedding.weight': SystemPayload(marker)}}, tmp_path/'evil3.ckpt')
    with pytest.raises(ValueError, match=r'not tensors.*quantize\.embedding\.weight'): VQModel.from_pretrained(tmp_path/'evil3.ckpt')
    assert not marker.exists(), "a pickle payload was executed"


def test_kl_and_vq_checkpoints_are_not_confused(tiny, tmp_path):
    kl = save_compvis(AutoencoderKL(PRESETS['tiny']), tmp_path/'kl.ckpt')
    with pytest.raises(ValueError, match=r"no codebook 'quantize\.embedding\.weight'"): VQModel.from_pretrained(kl)
    with pytest.raises(ValueError, match=r"1 missing keys \['quantize\.embedding\.weight'\]") as e:
        VQModel.from_pretrained(kl, config=VQ_PRESETS['tiny-vq'])
    assert "quant_conv.weight: (8, 8, 1, 1) in the file, (4, 4, 1, 1) in the model" in str(e.value)
    vq = save_compvis(tiny, tmp_path/'vq.ckpt')
    with pytest.raises(ValueError, match=r"unexpected keys \['quantize\.embedding\.weight'\]"): AutoencoderKL.from_pretrained(vq)
    with pytest.raises(ValueError, match='describes a VQModel'): AutoencoderKL.from_pretrained(tiny.save_pretrained(tmp_path/'d'))


@pytest.mark.parametrize('legacy', [True, False])
def test_quantizer_loss_is_the_formula(legacy):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3, beta=0.25, legacy=legacy).eval()
    with torch.no_grad(): q.embedding.weight.normal_()
    z = torch.randn(2, 3, 4, 5)
    out = q(z)
    zq = q.embedding.weight[out.indices].permute(0, 3, 1, 2)
    commitment, codebook = ((zq.detach() - z)**2).mean(), ((zq - z.detach())**2).mean()
    want = commitment + 0.25*codebook if legacy else 0.25*commitment + codebook
    assert abs(out.loss.item() - want.item()) <= 1e-7
    d = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3).double(), q.embedding.weight.double())
    assert torch.equal(out.indices.flatten(), d.argmin(1))
    ref = DiffusersVectorQuantizer(16, 3, beta=0.25, legacy=legacy)  # diffusers' copy of taming's quantizer agrees
    ref.load_state_dict(q.state_dict())
    zq_ref, loss_ref, (_, _, idx_ref) = ref(z)
    assert abs(loss_ref.item() - out.loss.item()) <= 1e-6 and torch.equal(idx_ref.flatten(), out.indices.flatten())
    assert max_diff(zq_ref, out.zq) <= 1e-6


def test_straight_through_gradient_reaches_the_encoder(tiny):
    x = inputs('tiny-vq')
    m = VQModel(VQ_PRESETS['tiny-vq']).train()
    m.load_state_dict(tiny.state_dict())
    h = m.encode(x)
    h.retain_grad()
    zq, _, _ = m.quantize(h)
    zq.retain_grad()
    (m.decode(zq, force_not_quantize=True) - x).abs().mean().backward()  # the reconstruction only
    assert torch.equal(h.grad, zq.grad)  # the quantizer passes the decoder's gradient through unchanged
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0


def test_codebook_gradient_comes_only_from_its_loss_term(tiny):
    x = inputs('tiny-vq')
    m = VQModel(VQ_PRESETS['tiny-vq']).train()
    m.load_state_dict(tiny.state_dict())
    rec, (_, qloss, indices) = m(x)
    (rec - x).abs().mean().backward(retain_graph=True)
    book = m.quantize.embedding.weight
    assert book.grad is None or book.grad.abs().sum() == 0
    qloss.backward()
    h = m.encode(x).detach()
    flat = h.permute(0, 2, 3, 1).reshape(-1, 4)
    # legacy: beta * d/de mean((e - sg[z])^2), summed over the positions that chose each code
    want = torch.zeros_like(book).index_add_(0, indices.flatten(), 0.25*2*(book.detach()[indices.flatten()] - flat)/flat.numel())
    assert max_diff(book.grad, want) <= 1e-7
    ema = VQModel(replace(VQ_PRESETS['tiny-vq'], codebook_ema_decay=0.99)).train()
    assert not ema.quantize.embedding.weight.requires_grad  # with the EMA codebook the optimizer never touches it


def test_chunked_lookup_equals_unchunked():
    torch.manual_seed(0)
    q = VectorQuantizer(1000, 4)
    flat = torch.randn(301, 4)
    exact = torch.cdist(flat.double(), q.embedding.weight.double()).argmin(1)
    for chunk in (1000, 7*1000, 1 << 24, 1 << 40):  # one row a block, 7 rows (last block partial), default, all rows at once
        q.chunk_size = chunk
        assert torch.equal(q.nearest(flat), exact), chunk


PEAK_SCRIPT = '''
import torch
from klvae.vq import VectorQuantizer
def mb(field): return int(dict(l.split(':', 1) for l in open('/proc/self/status'))[field].split()[0]) / 1024
q, z = VectorQuantizer(16384, 4), torch.randn(2, 4, 64, 64)
q(z[:, :, :2, :2])                                # warm-up: thread pools and kernels
for chunk in (1 << 24, 1 << 30):                   # the default 2**24-entry blocks, then all 8,192 rows at once
    q.chunk_size = chunk
    open('/proc/self/clear_refs', 'w').write('5')  # Linux: the peak RSS (VmHWM) restarts from the current RSS
    before = mb('VmRSS')
    q(z)
    print(mb('VmHWM') - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/self/status')
def test_chunked_lookup_peak_memory():
    "16,384 codes against two 64x64 latents: measured 64 MB chunked, 512 MB unchunked"
    out = subprocess.run([sys.executable, '-c', PEAK_SCRIPT], capture_output=True, text=True, check=True).stdout
    chunked, unchunked = map(float, out.split())
    assert chunked < 128, chunked
    assert unchunked > 400, unchunked  # the measurement sees a full distance matrix when there is one
