import pytest
from transformers import AutoConfig, ConvNextConfig, SwinConfig

from crobim_u import CrobimUConfig


def test_default_config_is_swin_base_with_bert_base():
    config = CrobimUConfig()
    assert isinstance(config.backbone_config, SwinConfig)
    assert config.backbone_config.window_size == 12
    assert config.backbone_config.embed_dim == 128
    assert config.text_config.hidden_size == 768
    assert config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize("name", CrobimUConfig.presets())
def test_presets_round_trip_through_dict_and_folder(name, tmp_path):
    config = CrobimUConfig.from_preset(name, use_udlr=False)
    assert config.use_udlr is False
    as_dict = config.to_dict()
    assert CrobimUConfig.from_dict(as_dict).to_dict() == as_dict
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, CrobimUConfig)
    reloaded_dict = reloaded.to_dict()
    # Saving records where the config came from and how to load its code; everything else is unchanged.
    assert reloaded_dict.pop("auto_map") == {"AutoConfig": "configuration_crobim_u.CrobimUConfig"}
    reloaded_dict.pop("_name_or_path")
    as_dict.pop("_name_or_path")
    assert reloaded_dict == as_dict
    assert type(reloaded.backbone_config) is type(config.backbone_config)
    assert type(reloaded.text_config) is type(config.text_config)


def test_presets_follow_the_field_recipe():
    swin = CrobimUConfig.from_preset("swin-base")
    assert (swin.backbone_config.embed_dim, swin.backbone_config.window_size) == (128, 12)
    assert swin.backbone_config.depths == [2, 2, 18, 2]
    convnext = CrobimUConfig.from_preset("convnext-base")
    assert isinstance(convnext.backbone_config, ConvNextConfig)
    assert convnext.backbone_config.hidden_sizes == [128, 256, 512, 1024]
    for config in (swin, convnext):
        assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (768, 12)
        assert config.text_config.vocab_size == 30522


def test_preset_overrides_update_sub_configs_without_leaking_between_configs():
    first = CrobimUConfig.from_preset("tiny", text_config={"vocab_size": 50})
    second = CrobimUConfig.from_preset("tiny")
    assert first.text_config.vocab_size == 50
    assert second.text_config.vocab_size == 30522
    assert first.text_config.hidden_size == second.text_config.hidden_size == 64


def test_preset_override_of_another_model_type_replaces_the_sub_config():
    resnet = {
        "model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
        "layer_type": "basic", "out_features": ["stage1", "stage2", "stage3", "stage4"],
    }
    config = CrobimUConfig.from_preset("tiny", backbone_config=resnet)
    assert config.backbone_config.model_type == "resnet"
    assert config.backbone_config.hidden_sizes == [16, 32, 64, 128]
    # Nothing of the preset's Swin settings leaks into the ResNet config.
    assert not hasattr(config.backbone_config, "window_size")
    assert CrobimUConfig.from_preset("tiny").backbone_config.model_type == "swin"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ugf_levels": [8, 7]}, "Unknown UGF level"),
        ({"d_model": 100, "num_attention_heads": 8}, "multiple of num_attention_heads"),
        ({"use_rus": False, "use_ugf": True, "use_udlr": False}, "use_ugf=True needs use_rus=True"),
        ({"use_rus": False, "use_ugf": False, "use_udlr": True}, "use_udlr=True needs use_rus=True"),
        ({"uncertainty_target": "fuzzy"}, "uncertainty_target"),
        ({"uncertainty_pooling": "median"}, "uncertainty_pooling"),
        ({"udlr_mask_temperature": 0.0}, "udlr_mask_temperature"),
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"num_prompts": -1}, "num_prompts"),
        ({"ffn_dim": 0}, "ffn_dim"),
        ({"backbone_config": {"model_type": "swin", "out_features": ["stage3", "stage4"]}}, "4 feature maps"),
        ({"ugf_levels": []}, "at least one stride"),
        ({"mask_stride": 8}, "mask_stride must be one of"),
        ({"ugf_gate_scale_init": 0.0}, "ugf_gate_scale_init must be > 0"),
        ({"ugf_gate_scale_init": -1.5}, "ugf_gate_scale_init must be > 0"),
        ({"position_encoding": "learned"}, "position_encoding must be one of"),
        ({"num_pointers": -1}, "num_pointers must be >= 0"),
        ({"pointer_loss_weight": -0.1}, "pointer_loss_weight"),
    ],
)
def test_impossible_settings_raise_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        CrobimUConfig(**settings)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="convnext-base"):
        CrobimUConfig.from_preset("swin-huge")
