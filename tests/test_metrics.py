"Metrics of klvae.metrics: PSNR, SSIM against scikit-image, missing weights, rFID plumbing, evaluate() and summarize()"
import io, pickle, socket
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity, peak_signal_noise_ratio
from klvae.data import EmbeddedPhotos, ImageFolder, load_photo, to_uint8, PHOTOS, VAL_PHOTOS
from klvae.metrics import (psnr, ssim, rfid, evaluate, summarize, write_random_inception, inception_weights_file,
                           inception_note, lpips_distance, INCEPTION_FILE)
from klvae.model import AutoencoderKL, PRESETS

def sk_ssim(a, b):
    return structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=-1, data_range=255)

def photo(name, size):
    return torch.from_numpy(np.array(Image.fromarray(load_photo(name)).resize(size))).permute(2, 0, 1)

class Identity(nn.Module):
    def forward(self, x, sample_posterior=False, generator=None): return x, None

class Times3(nn.Module):
    "Out-of-range reconstructions: evaluate must clamp them"
    def forward(self, x, sample_posterior=False, generator=None): return 3*x, None

class Explodes(nn.Module):
    def forward(self, *a, **k): raise AssertionError('the model ran before the weights were checked')

# ---------------------------------------------------------------- PSNR and SSIM

def test_psnr_on_a_known_mse():
    a = torch.randint(0, 250, (3, 3, 20, 24), dtype=torch.uint8)
    b = a.clone(); b[:, :, ::2] += 5                          # half the rows off by 5: MSE 12.5
    assert torch.allclose(psnr(a, b), torch.full((3,), 10*np.log10(255**2/12.5), dtype=torch.float64), atol=1e-9)
    assert torch.isinf(psnr(a, a)).all()
    c = torch.randint(0, 256, a.shape, dtype=torch.uint8)
    assert np.allclose(psnr(a, c).numpy(), [peak_signal_noise_ratio(u.numpy(), v.numpy(), data_range=255) for u, v in zip(a, c)])
    x, y = a.float()/127.5 - 1, b.float()/127.5 - 1                 # the [-1, 1] convention gives the same numbers
    assert torch.equal(psnr(x, y), psnr(a, b))

@pytest.mark.parametrize('shape', [(4, 3, 11, 11), (2, 3, 37, 50), (3, 3, 64, 64)])
def test_ssim_matches_skimage_on_random_images(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-60, 61, shape, generator=g)).clamp(0, 255).byte()
    for u, v in ((a, b), (a, torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))):
        assert np.allclose(ssim(u, v).numpy(), [sk_ssim(p, q) for p, q in zip(u, v)], atol=1e-4, rtol=0)

def test_ssim_matches_skimage_on_real_photographs():
    refs = torch.stack([photo(n, (128, 96)) for n in ('astronaut', 'chelsea', 'retina', 'hubble_deep_field')])
    blurred = to_uint8(F.interpolate(F.avg_pool2d(refs.float()/127.5 - 1, 4), scale_factor=4, mode='bilinear'))
    jpeg = []
    for r in refs:
        buf = io.BytesIO(); Image.fromarray(r.permute(1, 2, 0).numpy()).save(buf, 'JPEG', quality=10)
        jpeg.append(torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1))
    for rec in (blurred, torch.stack(jpeg), refs.flip(-1)):
        ours, theirs = ssim(refs, rec).numpy(), np.array([sk_ssim(p, q) for p, q in zip(refs, rec)])
        assert np.abs(ours - theirs).max() < 1e-4, (ours, theirs)
    assert np.allclose(ssim(refs, refs).numpy(), 1.0)
    with pytest.raises(ValueError, match='at least 11x11'): ssim(refs[:, :, :10], refs[:, :, :10])

# ---------------------------------------------------------------- missing weights

def test_lpips_missing_weights_error(no_weights):
    from klvae.losses import lpips_vgg
    with pytest.raises(FileNotFoundError, match='vgg16-397923af.pth'): lpips_vgg()
    ds = EmbeddedPhotos('val', size=32, train=False)
    with pytest.raises(FileNotFoundError, match='vgg16-397923af.pth'):
        evaluate(Explodes(), ds, metrics=('psnr', 'lpips'), progress=False)

def test_inception_missing_weights_error(no_weights):
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE) as e: inception_weights_file()
    assert 'inception_weights' in str(e.value) and 'KLVAE_INCEPTION_WEIGHTS' in str(e.value)
    ds = EmbeddedPhotos('val', size=32, train=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        evaluate(Explodes(), ds, metrics=('psnr', 'rfid'), progress=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        rfid(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, 3, 16, 16, dtype=torch.uint8))

# ---------------------------------------------------------------- rFID plumbing (random Inception weights: plumbing only)

class Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (self.marker,))

def test_rfid_refuses_a_pickle_that_runs_code(tmp_path):
    f, marker = tmp_path/'evil.pth', tmp_path/'pwned'
    torch.save({'Mixed_7c.branch_pool.conv.weight': Evil(marker)}, f)
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match='REDUCE of .*getattr.*may only call'): rfid(x, x, f)
    assert not marker.exists()

def test_rfid_plumbing_with_random_inception_and_no_network(tmp_path, monkeypatch, no_weights):
    def refuse(*a, **k): raise OSError('network disabled by the test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    import torch.hub
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', refuse)
    weights = write_random_inception(tmp_path/'RANDOM-inception-PLUMBING-ONLY.pth')   # random values, real layout
    assert inception_note(weights).startswith('NOT the official')
    ds = EmbeddedPhotos('all', size=64, train=False)
    df = evaluate(Identity(), ds, metrics=('psnr', 'rfid'), inception_weights=weights, progress=False)
    assert abs(df.attrs['rfid']) < 1e-2                                   # identical sets: ~0
    refs = torch.stack([ds[i] for i in range(len(ds))])
    blurred = F.interpolate(F.avg_pool2d(refs, 4), scale_factor=4, mode='bilinear')
    assert rfid(refs, blurred, weights) > 1                               # different sets: clearly more
    assert 'rFID (unofficial Inception: not comparable)' in summarize(df).columns
    assert not (no_weights/'torch').exists()                              # cache=False: nothing written under TORCH_HOME

# ---------------------------------------------------------------- evaluate and summarize

def test_evaluate_tiny_model_rows_and_columns():
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS['tiny'])
    ds = EmbeddedPhotos('all', size=32, train=False)
    df = evaluate(vae, ds, metrics=('psnr', 'ssim', 'lpips'), lpips_net='random', batch_size=4, progress=False)
    assert list(df.columns) == ['image', 'psnr', 'ssim', 'lpips'] and len(df) == len(PHOTOS)
    assert list(df.image) == list(PHOTOS)
    assert np.isfinite(df[['psnr', 'ssim', 'lpips']].to_numpy()).all()
    assert df.psnr.between(3, 30).all() and df.ssim.between(-1, 1).all() and (df.lpips > 0).all()
    assert vae.training and all(p.grad is None for p in vae.parameters())   # mode restored, no gradients
    assert 'center crop 32x32' in df.attrs['protocol'] and 'random backbone, plumbing only' in df.attrs['protocol']
    again = evaluate(vae, ds, metrics=('psnr', 'ssim', 'lpips'), lpips_net='random', batch_size=3, progress=False)
    # batching does not matter for 'mode', up to a uint8 rounding flip: the batch size changes oneDNN's conv kernel (seen on AVX2)
    assert np.allclose(again[['psnr', 'ssim']].to_numpy(), df[['psnr', 'ssim']].to_numpy(), rtol=0, atol=1e-4)
    s = summarize(df, 'tiny')
    assert list(s.columns) == ['PSNR (dB)', 'SSIM', 'LPIPS (random backbone, plumbing only)', 'images']
    assert s.loc['tiny', 'PSNR (dB)'] == f"{df.psnr.mean():.2f} ± {np.std(df.psnr.to_numpy()):.2f}"
    assert s.attrs['protocol'] == df.attrs['protocol'] and s.attrs['numbers']['ssim']['n'] == len(PHOTOS)

def test_posterior_sample_is_seeded():
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS['tiny'])
    ds = EmbeddedPhotos('val', size=32, train=False)
    run = lambda **k: evaluate(vae, ds, metrics=('psnr',), progress=False, **k).psnr.to_numpy()
    a, b, c, mode = run(posterior='sample', seed=3), run(posterior='sample', seed=3), run(posterior='sample', seed=4), run()
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, mode)
    with pytest.raises(ValueError, match="'mode' or 'sample'"): run(posterior='mean')

def test_identity_gives_infinite_psnr_and_the_summary_says_so(tmp_path):
    ds = EmbeddedPhotos('val', size=32, train=False)
    df = evaluate(Identity(), ds, metrics=('psnr', 'ssim'), progress=False)
    assert np.isinf(df.psnr).all() and np.allclose(df.ssim, 1)
    s = summarize(df)
    assert s.iloc[0]['PSNR (dB)'] == f'∞ (all {len(ds)} exact)' and 'nan' not in s.to_string()
    mixed = summarize(pd.DataFrame({'psnr': [np.inf, 20.0, 24.0]}))
    assert mixed.iloc[0]['PSNR (dB)'] == '∞ (1/3 exact); others 22.00 ± 2.00'

def test_reconstructions_are_clamped_before_measuring(tmp_path):
    Image.fromarray(load_photo('rocket')).resize((48, 32)).save(tmp_path/'r.png')
    ds = ImageFolder(tmp_path, size=32, train=False)
    df = evaluate(Times3(), ds, metrics=('psnr', 'ssim'), progress=False)
    x = ds[0][None]
    assert df.image.tolist() == ['r.png']
    assert df.psnr[0] == psnr(x, (3*x).clamp(-1, 1)).item() and np.isfinite(df.psnr[0])
    with pytest.raises(ValueError, match='subset of'): evaluate(Identity(), ds, metrics=('psnr', 'fid'))
