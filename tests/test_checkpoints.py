"""Loading real-world checkpoint files: Lightning .ckpt content, SD prefixes, loss entries, bad files, malicious pickles.

No weights can be downloaded here, so every file is made by the test. A malicious payload creates a marker file if it
ever runs; the tests assert the marker never appears. klvae's choice (documented in 02_checkpoints): unknown globals
become inert `Stub`s, so weights beside a payload still load, while a payload in place of the weights is an error.
"""
import argparse, builtins, json, os, pickle, subprocess, sys, types, zipfile
import numpy as np, pytest, torch
from safetensors.torch import save_file
from klvae.model import AutoencoderKL, PRESETS
from klvae.checkpoints import check_state_dict, compvis_state_dict, load_state_dict_file, save_compvis
from klvae.torchfile import Stub, read_torch_file


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(PRESETS['tiny']).eval()


@pytest.fixture
def marker(tmp_path):
    m = tmp_path/'payload-ran'
    yield m
    assert not m.exists(), "a pickle payload was executed"


def same_weights(a, b): return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# payloads: objects whose unpickling would create the marker file
class SystemPayload:
    def __init__(self, m): self.m = m
    def __reduce__(self): return os.system, (f'touch {self.m}',)

class ExecPayload:
    def __init__(self, m): self.m = m
    def __reduce__(self): return builtins.exec, (f"open({str(self.m)!r}, 'w').close()",)

class SubprocessPayload:
    def __init__(self, m): self.m = m
    def __reduce__(self): return subprocess.call, (['touch', str(self.m)],)

PAYLOADS = [SystemPayload, ExecPayload, SubprocessPayload]


@pytest.mark.parametrize('payload', PAYLOADS)
def test_payloads_are_live(tmp_path, payload):
    "The payloads work: an ordinary unpickler runs them (so the inertness tests below can fail)"
    m = tmp_path/'live'
    pickle.loads(pickle.dumps(payload(m), protocol=2))
    assert m.exists()


def fake_modules(names):
    "Install empty modules so that pickle can reference classes of packages this machine lacks (removed after saving)"
    for n in names: sys.modules[n] = types.ModuleType(n)
    return [sys.modules[n] for n in names]


def lightning_ckpt(path, state_dict):
    "Save a checkpoint shaped like a PyTorch Lightning 1.x one, with objects from modules absent at load time"
    names = ['pytorch_lightning', 'pytorch_lightning.callbacks', 'pytorch_lightning.callbacks.model_checkpoint',
             'omegaconf', 'omegaconf.dictconfig']
    mods = fake_modules(names)
    class ModelCheckpoint:  # Lightning 1.x keys callback states by the callback class itself
        pass
    class DictConfig(dict):  # omegaconf's config object, a dict subclass with its own state
        def __reduce__(self): return (type(self), (), {'_metadata': 'node'}, None, iter(self.items()))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[2], 'ModelCheckpoint'
    DictConfig.__module__, DictConfig.__qualname__ = names[4], 'DictConfig'
    mods[2].ModelCheckpoint, mods[4].DictConfig = ModelCheckpoint, DictConfig
    hp = DictConfig(); hp['embed_dim'] = 4; hp['lossconfig'] = {'target': 'ldm.modules.losses.LPIPSWithDiscriminator'}
    try:
        torch.save({'epoch': 7, 'global_step': np.int64(246803), 'pytorch-lightning_version': '1.4.2',
                    'callbacks': {ModelCheckpoint: {'best_model_score': torch.tensor(0.3), 'monitor': 'val/rec_loss',
                                                    'current_score': np.float64(0.31), 'dtype': np.dtype('float32')}},
                    'optimizer_states': [{'state': {0: {'step': 10, 'exp_avg': torch.randn(4)}},
                                          'param_groups': [{'lr': 4.5e-6, 'betas': (0.5, 0.9), 'params': [0]}]}],
                    'lr_schedulers': [], 'hparams_name': 'kwargs', 'hyper_parameters': hp,
                    'args': argparse.Namespace(base=['configs/autoencoder_kl_32x32x4.yaml'], gpus='0,'),
                    'state_dict': state_dict}, path)
    finally:
        for n in names: del sys.modules[n]
    return path


def test_lightning_ckpt_loads_without_importing_anything(tiny, tmp_path):
    sd = {f'first_stage_model.{k}': v for k, v in tiny.state_dict().items()}
    sd |= {'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(2), 'cond_stage_model.transformer.x': torch.zeros(1)}
    f = lightning_ckpt(tmp_path/'last.ckpt', sd)
    vae = AutoencoderKL.from_pretrained(f)
    assert same_weights(vae, tiny)
    assert not any(m.startswith(('pytorch_lightning', 'omegaconf')) for m in sys.modules)
    obj = read_torch_file(f)
    (cb,) = obj['callbacks']
    assert issubclass(cb, Stub) and cb.name == 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint'
    assert obj['callbacks'][cb]['monitor'] == 'val/rec_loss'
    assert isinstance(obj['global_step'], Stub) and 'multiarray.scalar' in obj['global_step'].name
    assert isinstance(obj['hyper_parameters'], Stub) and obj['hyper_parameters'].items['embed_dim'] == 4
    assert obj['args'].state['gpus'] == '0,'
    assert torch.is_tensor(obj['optimizer_states'][0]['state'][0]['exp_avg'])


def test_standalone_training_ckpt_ignores_loss_entries(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd |= {'loss.logvar': torch.zeros(()), 'loss.perceptual_loss.net.slice1.0.weight': torch.zeros(64, 3, 3, 3),
           'loss.discriminator.main.0.weight': torch.zeros(64, 3, 4, 4)}
    vae = AutoencoderKL.from_pretrained(lightning_ckpt(tmp_path/'vae.ckpt', sd))
    assert same_weights(vae, tiny)


def test_first_stage_model_prefix_in_safetensors(tiny, tmp_path):
    sd = {f'first_stage_model.{k}': v.contiguous() for k, v in tiny.state_dict().items()}
    sd['model.diffusion_model.out.2.weight'] = torch.zeros(4, 320, 3, 3)
    save_file(sd, tmp_path/'sd.safetensors')
    assert same_weights(AutoencoderKL.from_pretrained(tmp_path/'sd.safetensors'), tiny)


def test_fp16_file_loads_into_fp32_model(tiny, tmp_path):
    save_file({k: v.half().contiguous() for k, v in tiny.state_dict().items()}, tmp_path/'half.safetensors')
    vae = AutoencoderKL.from_pretrained(tmp_path/'half.safetensors')
    k = 'decoder.conv_out.weight'
    assert vae.state_dict()[k].dtype == torch.float32
    assert torch.equal(vae.state_dict()[k], tiny.state_dict()[k].half().float())


@pytest.mark.parametrize('payload', PAYLOADS)
@pytest.mark.parametrize('zip_format', [True, False])
def test_payload_beside_weights_stays_inert(tiny, tmp_path, marker, payload, zip_format):
    f = tmp_path/'evil.ckpt'
    torch.save({'state_dict': dict(tiny.state_dict()), 'callbacks': payload(marker)}, f,
               _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(f) == zip_format
    assert same_weights(AutoencoderKL.from_pretrained(f), tiny)
    stub = read_torch_file(f)['callbacks']
    assert isinstance(stub, Stub) and stub.name.split('.')[-1] in ('system', 'exec', 'call')
    assert not marker.exists()


@pytest.mark.parametrize('payload', PAYLOADS)
def test_payload_instead_of_weights_is_an_error(tmp_path, marker, payload):
    torch.save({'state_dict': payload(marker)}, tmp_path/'a.ckpt')
    with pytest.raises(ValueError, match='not a state dict'): load_state_dict_file(tmp_path/'a.ckpt')
    torch.save({'state_dict': {'encoder.conv_in.weight': payload(marker)}}, tmp_path/'b.ckpt')
    with pytest.raises(ValueError, match=r"not tensors.*encoder\.conv_in\.weight"): load_state_dict_file(tmp_path/'b.ckpt')
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_plain_malicious_pickle_is_an_error(tmp_path, marker, protocol):
    "A bare pickle (not torch.save) is refused; with protocol 2 it is unpickled inertly first, then refused"
    f = tmp_path/'model.pt'
    with open(f, 'wb') as fh: pickle.dump({'state_dict': SystemPayload(marker)}, fh, protocol=protocol)
    with pytest.raises(ValueError, match='not a checkpoint|plain pickle, not a torch.save file'):
        AutoencoderKL.from_pretrained(f)
    assert not marker.exists()


def test_payload_in_zip_data_pkl_never_runs(tmp_path, marker, tiny):
    "Rewrite a torch zip's data.pkl by hand, as an attacker would, with the payload at the top level"
    good = tmp_path/'good.ckpt'
    torch.save({'state_dict': dict(tiny.state_dict())}, good)
    evil = tmp_path/'evil.ckpt'
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, 'w') as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith('data.pkl'): data = pickle.dumps(ExecPayload(marker), protocol=2)
            zout.writestr(item, data)
    with pytest.raises(ValueError, match='not a state dict'): AutoencoderKL.from_pretrained(evil)
    assert not marker.exists()


@pytest.mark.parametrize('content', [b'', b'hello, not a checkpoint', bytes(range(256))*10])
def test_not_a_checkpoint(tmp_path, content):
    f = tmp_path/'weights.ckpt'
    f.write_bytes(content)
    with pytest.raises(ValueError, match='is not a checkpoint'): AutoencoderKL.from_pretrained(f)


def test_zip_that_is_not_torch(tmp_path):
    with zipfile.ZipFile(tmp_path/'x.pt', 'w') as z: z.writestr('readme.txt', 'hi')
    with pytest.raises(ValueError, match='not a torch.save file'): AutoencoderKL.from_pretrained(tmp_path/'x.pt')


def test_truncated_safetensors(tiny, tmp_path):
    save_compvis(tiny, tmp_path/'full.safetensors')
    data = (tmp_path/'full.safetensors').read_bytes()
    (tmp_path/'cut.safetensors').write_bytes(data[:len(data)//2])
    with pytest.raises(ValueError, match='not a valid safetensors file'): AutoencoderKL.from_pretrained(tmp_path/'cut.safetensors')


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'): AutoencoderKL.from_pretrained(tmp_path/'nope.ckpt')
    (tmp_path/'pipeline'/'vae').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='vae/ folder'): AutoencoderKL.from_pretrained(tmp_path/'pipeline')


def test_checkpoint_of_another_model(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    torch.save(net.state_dict(), tmp_path/'classifier.pt')
    with pytest.raises(ValueError, match=r"not a KL autoencoder checkpoint.*\['0\.weight', '0\.bias'"):
        AutoencoderKL.from_pretrained(tmp_path/'classifier.pt')


def test_vq_checkpoint_names_its_codebook(tiny, tmp_path):
    sd = dict(tiny.state_dict()); sd['quantize.embedding.weight'] = torch.zeros(16384, 4)
    torch.save({'state_dict': sd}, tmp_path/'vq.ckpt')
    with pytest.raises(ValueError, match=r"1 unexpected keys \['quantize\.embedding\.weight'\]"):
        AutoencoderKL.from_pretrained(tmp_path/'vq.ckpt')


def test_missing_unexpected_and_wrong_shapes_are_named(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop('decoder.mid.attn_1.q.bias'); sd.pop('encoder.conv_out.weight')
    sd['decoder.extra.weight'] = torch.zeros(3)
    sd['quant_conv.bias'] = torch.zeros(5)
    torch.save({'state_dict': sd}, tmp_path/'bad.ckpt')
    with pytest.raises(ValueError) as e: AutoencoderKL.from_pretrained(tmp_path/'bad.ckpt', config=PRESETS['tiny'])
    msg = str(e.value)
    assert "2 missing keys ['encoder.conv_out.weight', 'decoder.mid.attn_1.q.bias']" in msg
    assert "1 unexpected keys ['decoder.extra.weight']" in msg
    assert "quant_conv.bias: (5,) in the file, (8,) in the model" in msg


def test_wrong_config_for_file(tiny, tmp_path):
    save_compvis(tiny, tmp_path/'tiny.safetensors')
    with pytest.raises(ValueError, match=r'wrong shapes.*encoder\.conv_in\.weight: \(32, 3, 3, 3\) in the file, \(128, 3, 3, 3\)'):
        AutoencoderKL.from_pretrained(tmp_path/'tiny.safetensors', config=PRESETS['kl-f8'])


def test_diffusers_config_with_down_block_attention_is_refused(tiny, tmp_path):
    d = tiny.save_pretrained(tmp_path/'d')
    cfg = json.loads((d/'config.json').read_text())
    cfg['down_block_types'] = ['AttnDownEncoderBlock2D']*4
    (d/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='AttnDownEncoderBlock2D'): AutoencoderKL.from_pretrained(d)


def test_diffusers_config_disagreeing_with_weights(tiny, tmp_path):
    d = tiny.save_pretrained(tmp_path/'d')
    cfg = json.loads((d/'config.json').read_text())
    cfg['layers_per_block'] = 2
    (d/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing keys \['encoder\.down\.0\.block\.1\.norm1\.weight'"): AutoencoderKL.from_pretrained(d)


def test_mixed_layouts_are_refused(tiny):
    sd = dict(tiny.state_dict()); sd['encoder.mid_block.resnets.0.norm1.weight'] = torch.zeros(64)
    with pytest.raises(ValueError, match='mixes diffusers keys'): compvis_state_dict(sd)


def test_check_state_dict_passes_on_a_good_state_dict(tiny):
    check_state_dict(tiny, tiny.state_dict())  # no error: the checks above fail for the named reasons only


def test_resample_shortcut_round_trips_and_is_never_lost(tmp_path):
    "A tiny-rs export reloads with its shortcut and the same outputs; the CompVis layout, which cannot record it, is refused"
    from klvae.model import AutoencoderKL, PRESETS
    from klvae.checkpoints import save_compvis
    torch.manual_seed(0)
    m = AutoencoderKL(PRESETS['tiny-rs']).eval()
    m.save_pretrained(tmp_path/'rs')
    assert json.loads((tmp_path/'rs'/'config.json').read_text())['klvae_resample_shortcut'] is True
    back = AutoencoderKL.from_pretrained(tmp_path/'rs')
    x = torch.rand(2, 3, 32, 32)*2 - 1
    with torch.no_grad(): assert back.config.resample_shortcut and torch.equal(back(x, sample_posterior=False)[0], m(x, sample_posterior=False)[0])
    with pytest.raises(ValueError, match='resample shortcut'): save_compvis(m, tmp_path/'rs.ckpt')
    assert not (tmp_path/'rs.ckpt').exists()
    AutoencoderKL(PRESETS['tiny']).save_pretrained(tmp_path/'plain')   # a plain model's config stays diffusers' own
    assert 'klvae_resample_shortcut' not in json.loads((tmp_path/'plain'/'config.json').read_text())
