"""`python -m klvae.demo` as a process: nothing optional may fail the main job after training."""
import json, sys
from pathlib import Path
from conftest import run

# the seconds-long demo of a `ci` build (klvae.report.SCALE_DEMO), as --set options
CI_DEMO = dict(steps=6, batch_size=2, resolution=32, disc_start=3, warmup_steps=2, val_every=3, ckpt_every=3, num_workers=0,
               log_every=1, repeats=2, data='embedded', val_data='embedded')


def demo(tmp_path, *extra):
    sets = [a for k, v in CI_DEMO.items() for a in ('--set', f'{k}={v}')]
    return run([sys.executable, '-m', 'klvae.demo', '--report', str(tmp_path/'reports'/'demo.html'), *sets,
                '--set', f"run_dir={tmp_path/'run'}", *extra], env={'KLVAE_RUNS_PATH': str(tmp_path/'runs')}, check=False)


def test_an_fp16_export_that_drifts_is_kept_in_fp32_and_the_demo_exits_0(tmp_path):
    "A tolerance below zero makes every fp16 copy drift: the demo still exits 0, saves fp32 and says so on its page"
    from klvae.vq import load_autoencoder
    from klvae.checkpoints import load_state_dict_file
    r = demo(tmp_path, '--export-tolerance-db', '-1')
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path/'reports'/'demo-vae'
    load_autoencoder(folder)   # a loadable model where the explorer looks for it
    assert {t.dtype for t in load_state_dict_file(folder/'diffusion_pytorch_model.safetensors').values()} == {__import__('torch').float32}
    page, info = (tmp_path/'reports'/'demo.html').read_text(), json.loads((tmp_path/'reports'/'demo.json').read_text())
    assert 'stored in fp32: the fp16 copy moved a held-out crop' in page
    assert info['export']['dtype'] == 'float32' and info['export']['fp16_max_psnr_change_db'] > -1
    assert sorted(p.name for p in folder.parent.iterdir()) == ['assets', 'demo-vae', 'demo.html', 'demo.json', 'demo_per_image.csv']   # no temporary left


def test_a_bad_override_is_a_usage_error(tmp_path):
    r = demo(tmp_path, '--set', 'stepz=3')
    assert r.returncode == 2 and "unknown setting 'stepz'" in r.stderr and not (tmp_path/'reports').exists()
