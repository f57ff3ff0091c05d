"""What the model scripts copy from each other (each script stands alone) must stay identical."""
import inspect
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
import cgan  # noqa: E402
import dcgan  # noqa: E402
import srgan  # noqa: E402
import vae  # noqa: E402
import wgan  # noqa: E402

SCRIPTS = {"dcgan": dcgan, "wgan": wgan, "cgan": cgan, "srgan": srgan, "vae": vae}
BANNER = "# Run plumbing, the same in every model script"
PLUMBING = ["number", "parse_run_flags", "parse_config", "setup_distributed", "train_data", "cpu_computes_bfloat16",
            "time_trial", "choose_precision", "fixed_randn", "restore", "check_format", "check_finite", "save_checkpoint",
            "prepare_out_dir", "accumulate", "write_log_row", "save_grid", "fail"]
USED_BY = {name: list(SCRIPTS) for name in ["load_images", "resize_uint8"]}
USED_BY.update({name: ["dcgan", "wgan", "cgan"] for name in ["augment_color", "augment_translation", "augment_cutout",
                                                              "diff_augment", "augment_policy", "to_unit_range"]})
USED_BY.update({"update_ema": ["dcgan", "wgan", "cgan", "srgan"], "gradient_penalty": ["wgan", "srgan"]})


def plumbing(script):
    source = (REPO / f"{script}.py").read_text()
    assert source.count(BANNER) == 1, f"{script}.py has no single run-plumbing banner"
    return source[source.index(BANNER):]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_run_plumbing_is_identical_and_comes_last(script):
    assert plumbing(script) == plumbing("dcgan")
    body = plumbing(script)
    for name in PLUMBING:
        assert f"\ndef {name}(" in body, name
    main_at = (REPO / f"{script}.py").read_text().index("\ndef main(")
    assert main_at < (REPO / f"{script}.py").read_text().index(BANNER)  # the reader meets main before the plumbing


@pytest.mark.parametrize("helper", sorted(USED_BY))
def test_copied_helpers_are_identical(helper):
    sources = {script: inspect.getsource(getattr(SCRIPTS[script], helper)) for script in USED_BY[helper]}
    reference = sources[USED_BY[helper][0]]
    drifted = [script for script, source in sources.items() if source != reference]
    assert not drifted, f"{helper} differs from {USED_BY[helper][0]}.py's in {drifted}"


def test_augmentations_table_is_identical():
    for script in ("wgan", "cgan"):
        assert list(SCRIPTS[script].AUGMENTATIONS) == list(dcgan.AUGMENTATIONS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_folder_dataset_hint_names_a_prepare_script_that_exists(script, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        SCRIPTS[script].load_images(str(REPO / "data"), "folder/my_photos", "train", 32)
    hint = str(error.value).split("make it with: python ")[1]
    assert (REPO / hint).is_file() or (REPO / hint.replace(str(REPO) + "/", "")).is_file(), hint


@pytest.mark.parametrize("shape,nrow", [((36, 1, 8, 8), 6), ((7, 3, 5, 4), 3), ((2, 1, 6, 6), 6), ((30, 1, 4, 4), 13)])
def test_save_grid_writes_torchvision_save_image_picture(tmp_path, shape, nrow):
    import torch
    from PIL import Image
    from torchvision.utils import save_image
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    dcgan.save_grid(images, tmp_path / "ours.png", nrow=nrow)
    save_image(images, tmp_path / "torchvision.png", nrow=nrow)
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "torchvision.png").read_bytes()
    assert Image.open(tmp_path / "ours.png").mode == "RGB"


def test_model_scripts_start_without_torchvision():
    import subprocess
    code = "import sys; sys.path.insert(0, '.'); import dcgan, wgan, cgan, srgan, vae; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout == "False\n"
