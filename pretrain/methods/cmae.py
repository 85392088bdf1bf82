"""CMAE (Huang et al., 2022): an MAE whose masked encoder also learns contrastively.

Online branch: MAE on the masked source view (pixel decoder, loss L_r), plus a feature decoder (MAE's
decoder, 2 blocks, predicting encoder-width features at every position) whose mean token goes
through a projector and a predictor. Target branch: a momentum copy of the encoder (mu = 0.996, kept
constant) sees the *whole* target view, a few pixels shifted from the source view; the mean of its
patch tokens goes through the momentum copy of the projector. L = L_r + lambda_c L_c, L_c an InfoNCE
(tau 0.07) against the targets of the whole global batch. Settings follow ZhichengHuang/CMAE's
ViT-B config (mask ratio 0.65, feature decoder 512 x 2, projector 768-1536-256).
"""

from dataclasses import field

from pretrain.data.views import Configured, ViewConfig, cmae_recipe, cmae_view
from pretrain.methods.base import config_section, register
from pretrain.methods.mae import MAE, MAEDecoder
from pretrain.methods.momentum import MomentumBranch, MomentumObjective, info_nce
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm, use_encoder_tokens


@config_section("cmae")
class CMAEConfig:
    """CMAE on top of the `mae` section (pixel decoder, mask ratio: CMAE's configs set 0.65)."""

    feature_decoder_dim: int = 512
    feature_decoder_depth: int = 2
    mlp_dim: int = 1536  # projector encoder -> 1536 -> 256, predictor 256 -> 1536 -> 256
    out_dim: int = 256
    temperature: float = 0.07
    momentum: float = 0.996  # constant
    contrast_weight: float = 1.0  # lambda_c
    view: ViewConfig = field(default_factory=cmae_recipe)  # before the pixel shift

    def checks(self, config):
        return [
            (0 <= self.momentum < 1, "cmae.momentum", "in [0, 1)"),
            (self.temperature > 0, "cmae.temperature", "positive"),
        ]


@register("cmae")
class CMAE(MomentumObjective):
    config_sections = ("cmae", "mae")
    view = "cmae"

    def __init__(
        self,
        encoder,
        mae,
        feature_dim=512,
        feature_depth=2,
        feature_heads=16,
        mlp_dim=1536,
        out_dim=256,
        temperature=0.07,
        momentum=0.996,
        contrast_weight=1.0,
    ):
        super().__init__()
        self.encoder = encoder  # registered first, so parameters are named encoder.* (layer ids, export)
        self.mae = mae
        self.feature_decoder = MAEDecoder(
            encoder.patch_embed.grid_size,
            encoder.embed_dim,
            feature_dim,
            feature_depth,
            feature_heads,
            encoder.embed_dim,
        )
        self.projector = sync_batchnorm(mlp(2, encoder.embed_dim, mlp_dim, out_dim, last_bn=False))
        self.predictor = sync_batchnorm(mlp(2, out_dim, mlp_dim, out_dim, last_bn=False))
        self.temperature, self.contrast_weight = temperature, contrast_weight
        self.target = MomentumBranch(
            {"encoder": encoder, "projector": self.projector}, momentum, cosine=False
        )
        use_encoder_tokens(self, encoder)  # forward runs MAE's encoder pass itself

    @classmethod
    def from_config(cls, config):
        c = config.cmae
        encoder = encoder_for(config)
        cmae = cls(
            encoder,
            MAE.from_config(config, encoder),  # the pixel branch: the `mae` section
            feature_dim=c.feature_decoder_dim,
            feature_depth=c.feature_decoder_depth,
            feature_heads=config.mae.decoder_heads,
            mlp_dim=c.mlp_dim,
            out_dim=c.out_dim,
            temperature=c.temperature,
            momentum=c.momentum,
            contrast_weight=c.contrast_weight,
        )
        if config.model.grad_checkpointing:  # after the momentum copy: it runs without gradients
            enable_block_checkpointing(encoder.blocks)
        cmae.view = Configured(cmae_view, c.view)
        return cmae

    def target_embedding(self, images):
        with self.target.run(images, self.training) as target:
            tokens = target["encoder"].forward_features(images)[:, self.encoder.num_prefix_tokens :]
            return target["projector"](tokens.mean(dim=1)).float()

    def forward(self, views):
        source, shifted = views
        latent, mask, ids_restore = self.mae.forward_encoder(source)
        reconstruction = self.mae.reconstruction_loss(source, self.mae.decoder(latent, ids_restore), mask)
        features = self.feature_decoder(latent, ids_restore).mean(dim=1)
        prediction = self.predictor(self.projector(features))
        contrast, positive, negative = info_nce(prediction, self.target_embedding(shifted), self.temperature)
        loss = reconstruction + self.contrast_weight * contrast
        return self.regularized(
            {
                "loss": loss,
                "loss_reconstruction": reconstruction.detach(),
                "loss_contrast": contrast.detach(),
                "logit_positive": positive,
                "logit_negative": negative,
            }
        )

    def images_to_log(self, views):
        return self.mae.images_to_log(views[0])
