"Datasets of klvae.data: embedded photos and their split, image folders with every kind of bad file, workers, OpenImages errors"
import io, os, sys, struct, zlib, types, subprocess, warnings, hashlib
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from klvae.data import (EmbeddedPhotos, ImageFolder, PHOTOS, VAL_PHOTOS, VAL_SCENES, load_photo, to_tensor, to_uint8,
                        resize_short_side, download_openimages, item_generator)

ROOT = Path(__file__).resolve().parent.parent

def digest(x:torch.Tensor)->str: return hashlib.sha256(to_uint8(x).numpy().tobytes()).hexdigest()[:16]

# ---------------------------------------------------------------- embedded photographs

def test_split_never_leaks_a_photo_or_a_scene():
    train, val, every = EmbeddedPhotos('train', size=32), EmbeddedPhotos('val', size=32), EmbeddedPhotos('all', size=32)
    assert set(train.names).isdisjoint(val.names)
    assert {PHOTOS[n].scene for n in train.names}.isdisjoint(PHOTOS[n].scene for n in val.names)
    assert set(train.names) | set(val.names) == set(every.names) == set(PHOTOS)
    assert tuple(val.names) == VAL_PHOTOS and len(VAL_PHOTOS) >= 2
    # the pixels too: no training photo is a copy of a validation photo
    for t in train.names:
        for v in val.names:
            a, b = load_photo(t), load_photo(v)
            assert a.shape != b.shape or not np.array_equal(a, b), (t, v)
    # the stereo pair is one scene: both views on the same side
    assert {'motorcycle_left', 'motorcycle_right'} <= set(train.names) or {'motorcycle_left', 'motorcycle_right'} <= set(val.names)

def test_embedded_photos_are_bundled_and_need_no_network(monkeypatch):
    import socket
    def refuse(*a, **k): raise OSError('network disabled by the test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    load_photo.cache_clear()
    for n in PHOTOS:
        a = load_photo(n)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 300, n

def test_items_are_float_images_in_range_at_any_multiple_of_8():
    for size in (8, 40, 256):
        ds = EmbeddedPhotos('all', size=size, repeats=2)
        assert len(ds) == 2*len(PHOTOS)
        x = ds[len(ds) - 1]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
    for bad in (60, 0, 12.0, 4):
        with pytest.raises(ValueError, match='multiple of 8'): EmbeddedPhotos(size=bad)
    with pytest.raises(ValueError, match='repeats'): EmbeddedPhotos(repeats=0)
    with pytest.raises(ValueError, match='split'): EmbeddedPhotos(split='test')

def test_training_items_are_a_pure_function_of_seed_epoch_index():
    ds = EmbeddedPhotos('train', size=32, repeats=3)
    state = torch.get_rng_state()
    a = [digest(ds[i]) for i in range(len(ds))]
    assert torch.equal(state, torch.get_rng_state()), "items must not draw from the global RNG"
    torch.manual_seed(123); torch.rand(100)          # whatever the global RNG does
    assert a == [digest(EmbeddedPhotos('train', size=32, repeats=3)[i]) for i in range(len(ds))]
    assert len(set(a)) > len(ds)//2                  # repeats give different crops
    ds.set_epoch(1)
    b = [digest(ds[i]) for i in range(len(ds))]
    assert sum(x != y for x, y in zip(a, b)) > len(ds)//2
    ds.set_epoch(0)
    assert [digest(ds[i]) for i in range(len(ds))] == a           # resuming epoch 0 replays it
    assert [digest(EmbeddedPhotos('train', size=32, repeats=3, seed=1)[i]) for i in range(len(ds))] != a

def test_same_items_in_another_process():
    ds = EmbeddedPhotos('train', size=32, repeats=2)
    ds.set_epoch(5)
    here = [digest(ds[i]) for i in (0, 3, 9)]
    code = ("import hashlib; from klvae.data import EmbeddedPhotos, to_uint8\n"
            "ds = EmbeddedPhotos('train', size=32, repeats=2); ds.set_epoch(5)\n"
            "print(' '.join(hashlib.sha256(to_uint8(ds[i]).numpy().tobytes()).hexdigest()[:16] for i in (0, 3, 9)))")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == here

def test_eval_items_are_the_protocol_crop():
    ds = EmbeddedPhotos('val', size=48, train=False)
    for i, n in enumerate(ds.names):
        img = resize_short_side(Image.fromarray(load_photo(n)), 48)
        w, h = img.size
        ref = to_tensor(img.crop(((w - 48)//2, (h - 48)//2, (w - 48)//2 + 48, (h - 48)//2 + 48)))
        assert torch.equal(ds[i], ref)
        ds.set_epoch(3)
        assert torch.equal(ds[i], ref)               # no randomness in evaluation

def test_loader_with_two_workers_matches_one_process():
    ds = EmbeddedPhotos('train', size=32, repeats=2)
    single = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    assert torch.equal(torch.cat(list(loader)), single)
    ds.set_epoch(1)                                   # reaches the live workers through shared memory
    assert torch.equal(torch.cat(list(loader)), torch.stack([ds[i] for i in range(len(ds))]))
    assert not torch.equal(torch.stack([ds[i] for i in range(len(ds))]), single)

# ---------------------------------------------------------------- image folders

def png16_rgb(path:Path, a:np.ndarray):
    "Write a 16-bit RGB PNG by hand (Pillow cannot write one)"
    h, w, _ = a.shape
    raw = b''.join(b'\x00' + a[y].astype('>u2').tobytes() for y in range(h))
    def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))

@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
    "A folder of every mode and every kind of bad file; returns (root, expected good files, expected skips)"
    root = tmp_path_factory.mktemp('zoo')
    (root/'a'/'b').mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(load_photo('coffee')).resize((60, 40))
    good = {}
    def save(rel, img, **kw): (root/rel).parent.mkdir(parents=True, exist_ok=True); img.save(root/rel, **kw); good[rel] = True
    save('rgb.jpg', photo, quality=90)
    save('grey.png', photo.convert('L'))
    save('a/bilevel.bmp', photo.convert('1'))
    save('a/palette.png', photo.convert('P', palette=Image.Palette.ADAPTIVE))
    p = photo.convert('P', palette=Image.Palette.ADAPTIVE); save('a/palette_transparent.png', p, transparency=0)
    rgba = photo.convert('RGBA'); rgba.putalpha(128); save('a/rgba.png', rgba)
    save('a/la.png', photo.convert('LA'))
    save('a/b/cmyk.jpg', photo.convert('CMYK'))
    save('a/b/cmyk.tiff', photo.convert('CMYK'))
    save('a/b/grey16.png', Image.fromarray(np.asarray(photo.convert('L'), dtype=np.uint16)*257))
    save('a/b/int32.tif', Image.fromarray(np.asarray(photo.convert('L'), dtype=np.int32)*257))
    save('a/b/float.tif', Image.fromarray(np.asarray(photo.convert('L'), dtype=np.float32)))
    save('photo.webp', photo)
    save('UPPER.JPEG', photo)
    save('tiny.png', photo.resize((9, 6)))
    png16_rgb(root/'a'/'rgb16.png', (np.asarray(photo, dtype=np.uint16)*257)); good['a/rgb16.png'] = True
    exif = Image.Exif(); exif[0x0112] = 8
    save('rotated.jpg', photo, exif=exif)
    skipped = {}
    (root/'zero.jpg').write_bytes(b''); skipped['zero.jpg'] = 'empty file'
    (root/'text.png').write_text('hello'); skipped['text.png'] = 'not an image'
    (root/'random.webp').write_bytes(rng.bytes(2000)); skipped['random.webp'] = 'not an image'
    (root/'a'/'bad_png.png').write_bytes(b'\x89PNG\r\n\x1a\n' + rng.bytes(300)); skipped['a/bad_png.png'] = 'not an image'
    Image.new('1', (10000, 9000)).save(root/'bomb.png'); skipped['bomb.png'] = 'decompression bomb'   # 90 Mpx > Pillow's limit
    Image.new('1', (15000, 12000)).save(root/'a'/'bomb2.png'); skipped['a/bomb2.png'] = 'decompression bomb'  # > 2x: Pillow raises
    fails = []   # pass the header check, fail to decode
    buf = io.BytesIO(); photo.resize((240, 160)).save(buf, 'JPEG')   # headers ~0.6 kB, then entropy-coded data
    (root/'truncated.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue())*2//3]); fails.append('truncated.jpg')
    buf = io.BytesIO(); photo.save(buf, 'PNG'); (root/'truncated.png').write_bytes(buf.getvalue()[:len(buf.getvalue())//2]); fails.append('truncated.png')
    data = bytearray(buf.getvalue()); i = data.index(b'IDAT') + 8
    data[i:i + 200] = rng.bytes(200); (root/'a'/'corrupt_data.png').write_bytes(bytes(data)); fails.append('a/corrupt_data.png')
    (root/'notes.txt').write_text('not scanned'); (root/'labels.csv').write_text('id\n')
    (root/'.hidden.jpg').write_bytes(b'')                 # hidden: ignored, not counted
    os.symlink(root/'a', root/'a'/'b'/'loop')            # a symlink loop must not hang the scan
    return root, sorted(good), skipped, sorted(fails)

def test_zoo_scan_counts_every_bad_file(zoo):
    root, good, skipped, fails = zoo
    with pytest.warns(UserWarning, match=f'skipped {len(skipped)} of'):
        ds = ImageFolder(root, size=32)
    s = ds.summary()
    assert dict(s['skipped_files']) == skipped
    assert sum(s['skipped'].values()) == len(skipped)
    assert s['ignored_files'] == 2                        # notes.txt, labels.csv
    assert sorted(ds.item_name(i) for i in range(len(ds))) == sorted(good + fails)   # loop visited once

def test_zoo_loads_every_item_without_crashing_and_counts_failures(zoo):
    root, good, skipped, fails = zoo
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = ImageFolder(root, size=32, repeats=2)
    with pytest.warns(UserWarning, match='failed to decode') as rec:
        x = torch.stack([ds[i] for i in range(len(ds))])
    assert x.shape == (len(ds), 3, 32, 32) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert sum('failed to decode' in str(w.message) for w in rec) == len(fails)    # once per bad file
    s = ds.summary()
    assert sorted(s['failed_at_load']) == fails and s['images'] == len(good)
    # a failed item is the next readable file's image, cropped with the failed index's randomness: deterministic
    i = ds.files.index(root/fails[0])
    assert torch.equal(ds[i], ds[i])

def test_failures_in_workers_reach_the_main_process_summary(zoo):
    root, good, skipped, fails = zoo
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = ImageFolder(root, size=16, train=False)
        single = torch.stack([ImageFolder(root, size=16, train=False)[i] for i in range(len(ds))])
        batches = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)))
    assert torch.equal(batches, single)
    assert sorted(ds.summary()['failed_at_load']) == fails

def test_modes_become_rgb_with_stated_values(tmp_path):
    Image.new('RGBA', (20, 20), (255, 0, 0, 0)).save(tmp_path/'clear.png')             # fully transparent -> white
    Image.new('LA', (20, 20), (0, 0)).save(tmp_path/'clear_la.png')
    Image.fromarray(np.full((20, 20), 257*40, np.uint16)).save(tmp_path/'g16.png')      # 16-bit 10280 -> 40
    png16_rgb(tmp_path/'c16.png', np.full((20, 20, 3), 257*200, np.uint16))             # 16-bit RGB -> 200
    ds = ImageFolder(tmp_path, size=16, train=False)
    got = {ds.item_name(i): to_uint8(ds[i]) for i in range(len(ds))}
    assert (got['clear.png'] == 255).all() and (got['clear_la.png'] == 255).all()
    assert (got['g16.png'] == 40).all() and (got['c16.png'] == 200).all()

def test_transforms_and_small_images(tmp_path):
    img = Image.fromarray(load_photo('rocket')).resize((100, 60))
    img.save(tmp_path/'wide.png'); img.resize((12, 10)).save(tmp_path/'small.png')
    ev = ImageFolder(tmp_path, size=32, train=False)
    ref = resize_short_side(img, 32)                       # 53x32, center crop
    assert ref.size == (53, 32)
    small, wide = ev.files.index(tmp_path/'small.png'), ev.files.index(tmp_path/'wide.png')
    assert torch.equal(ev[wide], to_tensor(ref.crop((10, 0, 42, 32))))
    assert ev[small].shape == (3, 32, 32)                  # upscaled to the crop size
    tr = ImageFolder(tmp_path, size=32, train=True)
    assert tr[small].shape == (3, 32, 32) and tr._source(small).size == (38, 32)
    assert tr._source(wide).size == (80, 48)          # zoom 1.5: short side 48 before the crop
    assert ImageFolder(tmp_path, size=32, zoom=None)._source(wide).size == (100, 60)

def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='is not a folder'): ImageFolder(tmp_path/'missing')
    with pytest.raises(ValueError, match='no usable image'): ImageFolder(tmp_path)
    (tmp_path/'readme.md').write_text('x')
    with pytest.raises(ValueError, match='no usable image.*1 other files ignored'): ImageFolder(tmp_path)
    (tmp_path/'a.jpg').write_bytes(b''); (tmp_path/'b.png').write_text('no')
    with pytest.raises(ValueError, match=r"2 of them unreadable \{'empty file': 1, 'not an image': 1\}"): ImageFolder(tmp_path)

def test_max_pixels_is_the_stated_limit(tmp_path):
    Image.new('RGB', (64, 64)).save(tmp_path/'a.png'); Image.new('RGB', (16, 16)).save(tmp_path/'b.png')
    with pytest.warns(UserWarning, match="'over the pixel budget': 1.*max_pixels=1,000 decoded pixels"):
        ds = ImageFolder(tmp_path, size=16, max_pixels=1000)
    assert [f.name for f in ds.files] == ['b.png']

# ---------------------------------------------------------------- OpenImages

def test_openimages_without_fiftyone_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'fiftyone', None)     # as if not installed, even where it is
    monkeypatch.setitem(sys.modules, 'fiftyone.zoo', None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[openimages\]"'):
        download_openimages(max_samples=5, dest=tmp_path)
    assert not any(tmp_path.iterdir())

def fake_fiftyone(monkeypatch, download):
    "A stand-in fiftyone.zoo module (FiftyOne is not installed here): only its download_zoo_dataset"
    zoo = types.ModuleType('fiftyone.zoo'); zoo.download_zoo_dataset = download
    pkg = types.ModuleType('fiftyone'); pkg.zoo = zoo
    monkeypatch.setitem(sys.modules, 'fiftyone', pkg); monkeypatch.setitem(sys.modules, 'fiftyone.zoo', zoo)

def test_openimages_offline_error(monkeypatch, tmp_path):
    def offline(*a, **k): raise ConnectionError('Name or service not known')
    fake_fiftyone(monkeypatch, offline)
    with pytest.raises(RuntimeError, match='internet access') as e:
        download_openimages(max_samples=5, dest=tmp_path)
    assert 'ImageFolder' in str(e.value) and isinstance(e.value.__cause__, ConnectionError)

def test_openimages_returns_the_split_folder(monkeypatch, tmp_path):
    calls = []
    def download(name, split, dataset_dir, **kw):          # writes what FiftyOne's zoo layout holds: <split>/data/*.jpg
        calls.append((name, split, kw))
        (Path(dataset_dir)/split/'data').mkdir(parents=True); (Path(dataset_dir)/split/'labels').mkdir()
        Image.fromarray(load_photo('chelsea')).save(Path(dataset_dir)/split/'data'/'0001.jpg')
        (Path(dataset_dir)/split/'labels'/'classifications.csv').write_text('x\n')
    fake_fiftyone(monkeypatch, download)
    out = download_openimages('validation', max_samples=5, dest=tmp_path)
    assert out == tmp_path/'validation'
    assert calls == [('open-images-v7', 'validation', dict(label_types=['classifications'], max_samples=5, shuffle=True, seed=0))]
    ds = ImageFolder(out, size=64)
    assert len(ds) == 1 and ds.summary()['ignored_files'] == 1
    with pytest.raises(ValueError, match='split'): download_openimages('val')
