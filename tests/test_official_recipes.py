"""What we read in the official implementations, pinned: module structure, weight-decay sets, position
tables and losses on fixed weights and inputs.

Sources (read with the project's code search, not vendored): facebookresearch/moco-v3 moco/builder.py
and main_moco.py, facebookresearch/mae util/pos_embed.py, main_pretrain.py and main_finetune.py,
VITA-Group/layerGraftedPretraining_ICLR23 utils_mae/lr_decay.py (param_groups_lrd_moco).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.graft.param_groups import objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.models import create_encoder, sincos_2d_table
from tests.conftest import TINY


def build(method, *overrides):
    torch.manual_seed(0)
    config = load_config(None, [f"method={method}", *TINY, *overrides])
    return grafted_objective(config), config


def layer_kinds(sequential):
    """(type name, bias / affine) of each layer: what moco-v3's _build_mlp decides per layer."""
    kinds = []
    for layer in sequential:
        if isinstance(layer, nn.Linear):
            kinds.append(("Linear", layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            kinds.append(("BatchNorm1d", layer.affine))
        else:
            kinds.append((type(layer).__name__, None))
    return kinds


def test_mocov3_heads_are_moco_v3s_vit_mlps():
    """MoCo_ViT: projector _build_mlp(3, ...), predictor _build_mlp(2, ...), both with the default
    last_bn=True, i.e. ending in BatchNorm1d(affine=False); every linear without bias."""
    moco, _ = build("mocov3")
    hidden = [("Linear", False), ("BatchNorm1d", True), ("ReLU", None)]
    assert layer_kinds(moco.projector) == hidden * 2 + [("Linear", False), ("BatchNorm1d", False)]
    assert layer_kinds(moco.predictor) == hidden + [("Linear", False), ("BatchNorm1d", False)]
    assert [layer.out_features for layer in moco.predictor if isinstance(layer, nn.Linear)] == [64, 16]
    assert layer_kinds(moco.target.branch["projector"]) == layer_kinds(moco.projector)


def test_mocov3_loss_is_the_official_contrastive_loss_on_the_same_weights():
    """loss = ctr(q1, k2) + ctr(q2, k1), ctr = cross-entropy of normalized q . k / T, times 2T; the
    keys from the momentum encoder + projector (which start as copies of the online ones)."""
    moco, _ = build("mocov3", "moco.temperature=0.2")
    torch.manual_seed(1)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    ours = moco([x1, x2])["loss"]
    q1, q2 = (moco.predictor(moco.projector(moco.encoder(x))) for x in (x1, x2))
    with torch.no_grad():
        k1, k2 = (moco.target.branch["projector"](moco.target.branch["encoder"](x)) for x in (x1, x2))

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        return F.cross_entropy(logits, torch.arange(len(q))) * 2 * 0.2

    assert torch.allclose(ours, ctr(q1, k2) + ctr(q2, k1), atol=1e-6)


def test_mocov3_loss_on_fixed_weights_and_inputs_is_pinned():
    """A regression pin of the number above (this torch / timm): a change to the heads, the
    initialization or the loss moves it."""
    moco, _ = build("mocov3")
    torch.manual_seed(1)
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    assert moco(views)["loss"].item() == pytest.approx(PINNED_MOCO_LOSS, abs=1e-5)


PINNED_MOCO_LOSS = 1.8589747


def decay_of(method, *overrides):
    objective, config = build(method, *overrides)
    return {
        name: group["weight_decay"]
        for group in objective_param_groups(objective, config)
        for name in group["names"]
    }


def test_mocov3_decays_every_trained_parameter():
    """main_moco.py: torch.optim.AdamW(model.parameters(), lr, weight_decay=0.1)."""
    decay = decay_of("mocov3", "optim.weight_decay=0.1")
    assert set(decay.values()) == {0.1}
    assert {"encoder.cls_token", "encoder.blocks.0.norm1.weight", "predictor.1.bias"} <= set(decay)


def test_mae_pretraining_spares_only_one_dimensional_parameters():
    """main_pretrain.py: timm's add_weight_decay, which spares biases and every 1-D parameter; the
    class and mask tokens (3-D) are decayed, the fixed position tables do not train."""
    decay = decay_of("mae", "optim.weight_decay=0.05")
    decayed = ("encoder.cls_token", "decoder.mask_token", "encoder.blocks.0.attn.qkv.weight")
    assert [decay[name] for name in decayed] == [0.05] * 3
    assert decay["encoder.blocks.0.norm1.weight"] == decay["encoder.blocks.0.attn.qkv.bias"] == 0.0
    assert "encoder.pos_embed" not in decay and "decoder.pos_embed" not in decay


def test_layer_grafted_recipe_spares_one_dimensional_parameters():
    """param_groups_lrd_moco: `p.ndim == 1` -> no decay, with no_weight_decay_list=[]: the class token
    is decayed. The graft configs say so with optim.decay_exempt: 1d."""
    config = load_config("configs/graft_mim2cl_vit_b.yaml", ["graft.init="])
    assert config.optim.decay_exempt == "1d"
    decay = decay_of("mocov3", "graft.rule=list", "optim.decay_exempt=1d", "optim.weight_decay=0.1")
    assert decay["encoder.cls_token"] == decay["encoder.blocks.0.attn.qkv.weight"] == 0.1
    assert decay["encoder.blocks.0.norm1.weight"] == decay["projector.1.weight"] == 0.0


def test_finetuning_also_spares_position_embedding_and_class_token():
    """main_finetune.py: param_groups_lrd(..., no_weight_decay_list=model.no_weight_decay()), which is
    {pos_embed, cls_token, dist_token} for a timm ViT."""
    decay = decay_of("finetune", "optim.weight_decay=0.05")
    assert decay["encoder.pos_embed"] == decay["encoder.cls_token"] == decay["encoder.fc_norm.bias"] == 0.0
    assert decay["encoder.head.weight"] == decay["encoder.blocks.0.mlp.fc1.weight"] == 0.05


def test_a_bad_decay_exemption_is_a_named_error():
    with pytest.raises(UserError, match="optim.decay_exempt = 'tokens' must be empty"):
        load_config(None, ["optim.decay_exempt=tokens"])


def test_position_table_is_maes_sincos_in_maes_channel_order():
    """get_2d_sincos_pos_embed: quarters sin(w omega), cos(w omega), sin(h omega), cos(h omega) with
    omega_k = 1 / 10000 ** (k / (dim / 4)); the patch in row h, column w at index h * W + w."""
    table = sincos_2d_table((3, 3), 8)
    omega = [1.0, 0.01]  # dim 8: two frequencies per quarter
    h, w = 1, 2
    expected = (
        [math.sin(w * o) for o in omega]
        + [math.cos(w * o) for o in omega]
        + [math.sin(h * o) for o in omega]
        + [math.cos(h * o) for o in omega]
    )
    assert table[h * 3 + w].tolist() == pytest.approx(expected, abs=1e-7)
    encoder = create_encoder("vit_tiny", 32, 8)
    assert torch.equal(encoder.pos_embed[0, 0], torch.zeros(192)), "the class token's position is zero"
    assert torch.equal(encoder.pos_embed[0, 1:], sincos_2d_table((4, 4), 192))
    assert not encoder.pos_embed.requires_grad
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table((2, 2), 6)


def maes_global_pool_forward(model, images):
    """MAE's models_vit.VisionTransformer(global_pool=True).forward, written out from the official file:
    patch embedding, class token, positions, blocks, mean of the patch tokens, fc_norm, head."""
    x = model.patch_embed(images)
    x = torch.cat((model.cls_token.expand(len(x), -1, -1), x), dim=1) + model.pos_embed
    for block in model.blocks:
        x = block(x)
    return model.head(model.fc_norm(x[:, 1:, :].mean(dim=1)))


def test_finetuning_classifier_is_maes_global_pool_model_and_a_timm_state_dict(tmp_path):
    """MAE's global-pool classifier has one LayerNorm (fc_norm, after the mean; `del self.norm`), a head at
    trunc_normal(2e-5), and fresh head / fc_norm over the pretrained weights (main_finetune.py's
    missing keys); ours is that, and a strict timm state_dict."""
    import timm

    from pretrain.models import create_classifier

    torch.manual_seed(0)
    model = create_classifier("vit_tiny", 32, 8, 10, "mean").eval()
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    assert model.pos_embed.requires_grad and 0 < model.head.weight.std() < 4e-5 and not model.head.bias.any()
    with torch.no_grad():
        model.head.weight.normal_()  # a head that says something
        images = torch.randn(4, 3, 32, 32)
        assert torch.allclose(model(images), maes_global_pool_forward(model, images), atol=1e-6)
    timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, global_pool="avg", img_size=32, patch_size=8
    ).load_state_dict(model.state_dict(), strict=True)
    token = create_classifier("vit_tiny", 32, 8, 10, "token")
    assert isinstance(token.norm, nn.LayerNorm) and isinstance(token.fc_norm, nn.Identity)

    config = load_config(None, [*TINY, "method=finetune", "finetune.num_classes=10"])
    pretrained = create_encoder("vit_tiny", 32, 8)
    torch.save(pretrained.state_dict(), tmp_path / "encoder.pth")
    config.graft.init = str(tmp_path / "encoder.pth")
    objective = grafted_objective(config)
    loaded = objective.encoder.state_dict()
    assert all(
        torch.equal(loaded[k], v) for k, v in pretrained.state_dict().items() if not k.startswith("norm.")
    )
    assert "norm.weight" not in loaded and loaded["head.weight"].std() < 4e-5


def test_maes_global_pool_fine_tuned_layout_is_read_for_evaluation(tmp_path):
    """MAE's fine-tuned release files hold fc_norm.* and no norm.*: evaluation reads them as the
    global-pool model they are, its mean features through fc_norm."""
    from pretrain.evaluation.features import encoder_from
    from pretrain.models import create_classifier, pool_tokens

    torch.manual_seed(0)
    classifier = create_classifier("vit_tiny", 32, 8, 10, "mean").eval()
    with torch.no_grad():
        classifier.fc_norm.weight.uniform_(0.5, 1.5)
    torch.save({"model": classifier.state_dict()}, tmp_path / "mae_finetuned.pth")
    encoder = encoder_from(tmp_path / "mae_finetuned.pth", "vit_tiny", 32, 8)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = pool_tokens(encoder, encoder.forward_features(images), "mean")
        assert torch.allclose(
            features, classifier.forward_head(classifier.forward_features(images), pre_logits=True)
        )
