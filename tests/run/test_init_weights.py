"""The normalisation an ``init_from`` source records is checked before a run trusts it (issue 47, item 3):
before, a zero or non-finite std ended in "the first step failed: check your data", a record for another
band count read as "records none", and every read error was swallowed."""
import json
import logging

import pytest
import torch

from fcmae.config import ConfigError
from fcmae.run.init_weights import read_input_normalisation
from fcmae.storage.weights_file import save_state_dict


def _export(path, mean, std):
    described = {"mean": mean, "std": std, "scaling": "8-bit RGB"}
    return save_state_dict({"stem.0.weight": torch.zeros(1)}, path, metadata={"input": json.dumps(described)})


def test_a_recorded_normalisation_is_taken_when_it_fits(tmp_path):
    src = _export(tmp_path / "ok.safetensors", [0.1, 0.2, 0.3], [0.5, 0.5, 0.25])
    got = read_input_normalisation(src, 3)
    assert got["mean"] == [0.1, 0.2, 0.3] and got["std"] == [0.5, 0.5, 0.25]


@pytest.mark.parametrize("mean, std, bands, problem", [
    ([0.1, 0.2, 0.3], [0.5, 0.0, 0.2], 3, r"std \[0.5, 0.0, 0.2\] holds a value <= 0"),
    ([0.1, float("nan"), 0.3], [0.5, 0.5, 0.2], 3, "not a finite number"),
    ([0.1, 0.2], [0.5, 0.5], 3, "records 2 mean and 2 std values, the model takes 3 bands"),
])
def test_a_recorded_normalisation_that_does_not_fit_is_refused_naming_the_file(tmp_path, mean, std, bands, problem):
    src = _export(tmp_path / "bad.safetensors", mean, std)
    with pytest.raises(ConfigError, match=rf"model.init_from={src}: .*{problem}.*data.mean=\[\.\.\.\]"):
        read_input_normalisation(src, bands)


def test_a_record_that_cannot_be_read_is_said_not_swallowed(tmp_path, caplog):
    folder = tmp_path / "timm-folder"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        assert read_input_normalisation(folder, 3) is None
    assert "its record of the input could not be read" in caplog.text and "JSONDecodeError" in caplog.text


def test_fine_tuning_refuses_an_init_whose_record_has_a_zero_std(tmp_path):
    from fcmae import create_fcmae
    from fcmae.export.exporter import export
    from fcmae.finetune import run as finetune
    from test_finetune import FT_TINY, compose_cfg

    torch.save({"model": create_fcmae("convnextv2_atto").state_dict()}, tmp_path / "ck.pt")
    enc = export(tmp_path / "ck.pt", "timm", tmp_path / "enc.safetensors", log=lambda *_: None, verify=False)
    from safetensors.torch import load_file
    bad = save_state_dict(load_file(enc), tmp_path / "bad.safetensors",
                          metadata={"input": json.dumps({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]})})
    with pytest.raises(ConfigError, match=r"bad.safetensors: the normalisation recorded in .* holds a value <= 0"):
        finetune(compose_cfg("finetune", *FT_TINY, "trainer.max_steps=1", f"model.init_from={bad}"), tmp_path / "ft")
    assert not (tmp_path / "ft" / "checkpoints").exists()
