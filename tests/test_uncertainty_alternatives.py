"""The config's alternatives for the uncertainty modules: UDLR's adaptive mask threshold and the source of
the RUS target. Each default keeps the earlier behaviour; each setting changes outputs only where it applies."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_inputs, tiny_model
from transformers import AutoConfig

from crobim_u import CrobimUConfig, CrobimUForReferringSegmentation
from crobim_u.modeling_crobim_u import CrobimULocalRefiner, error_consistency_target


def test_defaults_keep_the_earlier_behaviour():
    config = CrobimUConfig.from_preset("tiny")
    assert (config.udlr_mask_mode, config.udlr_adaptive_share, config.uncertainty_target_source) == (
        "fixed", 0.1, "final"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"udlr_mask_mode": "quantile"}, r"udlr_mask_mode must be one of \('fixed', 'adaptive'\), got 'quantile'"),
        ({"udlr_adaptive_share": 0.0}, r"udlr_adaptive_share must lie in \(0, 1\), got 0.0"),
        ({"udlr_adaptive_share": 1.0}, r"udlr_adaptive_share must lie in \(0, 1\), got 1.0"),
        ({"udlr_adaptive_share": -0.2}, "udlr_adaptive_share"),
        ({"uncertainty_target_source": "fine"}, r"uncertainty_target_source must be one of \('final', 'coarse'\)"),
    ],
)
def test_bad_values_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        CrobimUConfig(**settings)


def test_new_fields_survive_a_save_and_reload(tmp_path):
    config = tiny_config(udlr_mask_mode="adaptive", udlr_adaptive_share=0.25, uncertainty_target_source="coarse")
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert (reloaded.udlr_mask_mode, reloaded.udlr_adaptive_share, reloaded.uncertainty_target_source) == (
        "adaptive", 0.25, "coarse"
    )


# --- UDLR's mask ----------------------------------------------------------------------------------------------------


def refiner_with_unit_residual(**overrides) -> CrobimULocalRefiner:
    """A refiner whose residual is 1 everywhere, so that refined minus coarse logits is the mask M itself."""
    refiner = CrobimULocalRefiner(tiny_config(**overrides)).eval()
    with torch.no_grad():
        refiner.residual.weight.zero_()
        refiner.residual.bias.fill_(1.0)
    return refiner


def applied_mask(refiner: CrobimULocalRefiner, uncertainty: torch.Tensor, size: int = 8) -> torch.Tensor:
    batch = uncertainty.shape[0]
    pixel_embedding = torch.randn(batch, tiny_config().mask_head_dim, size, size)
    coarse_logits = torch.randn(batch, 1, size, size)
    with torch.no_grad():
        return refiner(pixel_embedding, coarse_logits, uncertainty) - coarse_logits


def test_adaptive_mask_opens_on_the_most_uncertain_share_of_a_sure_image():
    # Image 0: every cell below the fixed midpoint 0.15 (a boundary error and a small miss look like this);
    # image 1: well above it.
    uncertainty = torch.tensor([[[[0.02, 0.05], [0.08, 0.11]]], [[[0.3, 0.5], [0.6, 0.9]]]])
    fixed = applied_mask(refiner_with_unit_residual(), uncertainty)
    adaptive = applied_mask(refiner_with_unit_residual(udlr_mask_mode="adaptive"), uncertainty)
    upsampled = F.interpolate(uncertainty, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fixed, torch.sigmoid((upsampled - 0.15) / 0.05))
    assert fixed[0].max() < 0.5  # the fixed mask stays mostly closed on image 0

    # By hand: the midpoint is the k-th smallest of 64 values, k = ceil(0.9 * 64) = 58, capped at 0.15.
    values = upsampled[0].flatten().sort().values
    threshold = min(values[math.ceil(0.9 * 64) - 1].item(), 0.15)
    torch.testing.assert_close(adaptive[0], torch.sigmoid((upsampled[0] - threshold) / 0.05))
    assert (adaptive[0] >= 0.5 - 1e-6).float().mean() >= 0.1
    # Where the map is above the fixed midpoint anyway, the adaptive mask is the fixed one; it never opens less.
    torch.testing.assert_close(adaptive[1], fixed[1])
    assert bool((adaptive >= fixed - 1e-6).all())


def test_adaptive_share_sets_how_much_opens():
    uncertainty = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    for share in (0.05, 0.3, 0.6):
        mask = applied_mask(refiner_with_unit_residual(udlr_mask_mode="adaptive", udlr_adaptive_share=share),
                            uncertainty, size=16)
        # The pixel at the midpoint has M = 1/2 exactly; (coarse + M) - coarse may round it a float step below.
        opened = (mask >= 0.5 - 1e-6).flatten(1).float().mean(dim=1)
        assert bool((opened >= share).all()) and bool((opened <= share + 0.05).all()), (share, opened)


def models_sharing_weights(*settings: dict) -> tuple[CrobimUForReferringSegmentation, ...]:
    """A default model with a non-zero UDLR residual (at initialisation UDLR is the identity) and an uncertainty map
    below the fixed midpoint everywhere (as a trained model's is, almost), and one copy of its weights under each of
    `settings`."""
    reference = tiny_model(seed=0)
    with torch.no_grad():
        reference.udlr.residual.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        reference.rus.scorer[-1].bias.fill_(-4.0)  # u about 0.02
    copies = []
    for overrides in settings:
        model = CrobimUForReferringSegmentation(tiny_config(**overrides)).eval()
        model.load_state_dict(reference.state_dict())
        copies.append(model)
    return reference, *copies


def test_adaptive_mode_changes_the_logits_only_when_set():
    reference, explicit_fixed, adaptive = models_sharing_weights(
        {"udlr_mask_mode": "fixed", "udlr_adaptive_share": 0.5}, {"udlr_mask_mode": "adaptive"}
    )
    inputs = {key: value for key, value in tiny_inputs().items() if key != "labels"}
    with torch.no_grad():
        logits = reference(**inputs).logits
        assert torch.equal(explicit_fixed(**inputs).logits, logits)  # the share is read in adaptive mode only
        assert not torch.allclose(adaptive(**inputs).logits, logits)
    # Without UDLR there is no mask to move.
    base = tiny_model(use_udlr=False)
    adaptive_base = CrobimUForReferringSegmentation(tiny_config(use_udlr=False, udlr_mask_mode="adaptive")).eval()
    adaptive_base.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(adaptive_base(**inputs).logits, base(**inputs).logits)


# --- the RUS target's source ----------------------------------------------------------------------------------------


def test_coarse_target_reads_the_errors_before_udlr():
    reference, coarse = models_sharing_weights({"uncertainty_target_source": "coarse"})
    inputs = tiny_inputs()
    with torch.no_grad():
        final_outputs, coarse_outputs = reference(**inputs), coarse(**inputs)
    # The prediction and its segmentation losses are the same; only the RUS target and loss move.
    assert torch.equal(coarse_outputs.logits, final_outputs.logits)
    assert torch.equal(coarse_outputs.segmentation_loss, final_outputs.segmentation_loss)
    assert torch.equal(coarse_outputs.coarse_loss, final_outputs.coarse_loss)
    labels = inputs["labels"][:, None]
    upsampled = F.interpolate(coarse_outputs.coarse_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = error_consistency_target(upsampled, labels, (2, 2), "soft", "avg")
    torch.testing.assert_close(coarse_outputs.uncertainty_target, expected)
    torch.testing.assert_close(
        final_outputs.uncertainty_target, error_consistency_target(final_outputs.logits, labels, (2, 2), "soft", "avg")
    )
    assert not torch.allclose(coarse_outputs.uncertainty_target, final_outputs.uncertainty_target)
    assert coarse_outputs.uncertainty_loss != final_outputs.uncertainty_loss


def test_without_udlr_the_coarse_target_is_the_final_one():
    base_rus = tiny_model(use_udlr=False)
    coarse = CrobimUForReferringSegmentation(tiny_config(use_udlr=False, uncertainty_target_source="coarse")).eval()
    coarse.load_state_dict(base_rus.state_dict())
    inputs = tiny_inputs()
    with torch.no_grad():
        expected, actual = base_rus(**inputs), coarse(**inputs)
    assert torch.equal(actual.uncertainty_target, expected.uncertainty_target)
    assert torch.equal(actual.loss, expected.loss)
