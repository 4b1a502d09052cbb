"""Config: presets, dotted overrides and their type checks."""
import pytest

from taxadiffusion.config import load_config


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny-cpu", ["train.lr=1e-2", "train.lr_stage0=3.0e-4", "train.batch_size=8",
                                   "model.zero_init=false", "data.ranks=[family, genus, species]",
                                   "train.stages=0"])
    # `1e-2` has no dot, so YAML 1.1 reads it as a string: it must still become the float 0.01
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.train.lr_stage0 == 3e-4
    assert cfg.train.batch_size == 8 and cfg.model.zero_init is False
    assert cfg.data.ranks == ["family", "genus", "species"]
    assert cfg.train.stages == "0"  # YAML reads a number; the field is text


def test_bad_override_names_key_and_value():
    with pytest.raises(TypeError, match=r"train.lr: expected float, got 'fast'"):
        load_config("tiny-cpu", ["train.lr=fast"])
    with pytest.raises(TypeError, match=r"train.batch_size"):
        load_config("tiny-cpu", ["train.batch_size=1e-2"])
    with pytest.raises(KeyError, match=r"train.lrr"):
        load_config("tiny-cpu", ["train.lrr=1"])
