"""The helpers copied across the model scripts (each script stands alone) must stay identical."""
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

EVERY_SCRIPT = ["load_images", "resize_uint8", "save_checkpoint", "load_checkpoint", "plot_curves", "truncate_log", "fail",
                "resolve_device", "cpu_computes_bfloat16", "resolve_dtype", "setup_distributed", "typed_flags",
                "resume_config", "prepare_out_dir", "check_positive", "all_finite", "format_time", "write_log_row"]
GAN_SCRIPTS = ["augment_color", "augment_translation", "augment_cutout", "diff_augment", "augment_policy", "update_ema",
               "recompute_batchnorm_stats"]
USED_BY = {name: list(SCRIPTS) for name in EVERY_SCRIPT}
USED_BY.update({name: ["dcgan", "wgan", "cgan"] for name in GAN_SCRIPTS})
USED_BY.update({"update_ema": ["dcgan", "wgan", "cgan", "srgan"], "recompute_batchnorm_stats": ["dcgan", "wgan", "cgan", "srgan"],
                "to_unit_range": ["dcgan", "wgan", "cgan"]})


@pytest.mark.parametrize("helper", sorted(USED_BY))
def test_copied_helpers_are_identical(helper):
    sources = {script: inspect.getsource(getattr(SCRIPTS[script], helper)) for script in USED_BY[helper]}
    reference = sources["dcgan"]
    drifted = [script for script, source in sources.items() if source != reference]
    assert not drifted, f"{helper} differs from dcgan.py's in {drifted}"


def test_augmentations_table_is_identical():
    for script in ("wgan", "cgan"):
        assert list(SCRIPTS[script].AUGMENTATIONS) == list(dcgan.AUGMENTATIONS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_folder_dataset_hint_names_a_prepare_script_that_exists(script, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        SCRIPTS[script].load_images(str(REPO / "data"), "folder/my_photos", "train", 32)
    hint = str(error.value).split("make it with: python ")[1]
    assert (REPO / hint).is_file() or (REPO / hint.replace(str(REPO) + "/", "")).is_file(), hint
