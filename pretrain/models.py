"""Encoders from timm, and the small pieces the methods add around them (MLP heads, fixed positions)."""

import functools

import timm
import torch
from torch import nn

from pretrain.core.distributed import world_size

TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def timm_name(arch):
    return TIMM_NAMES[arch]


def create_encoder(arch, img_size, patch_size, drop_path=0.0, grad_checkpointing=False, global_pool="token"):
    """A timm VisionTransformer without classifier head, with fixed 2-D sin-cos position embeddings
    (as MAE and MoCo v3 use); `timm.create_model(timm_name(arch), num_classes=0)` loads its state_dict.

    `global_pool` is what `encoder(images)` returns: the class token ("token", MoCo v3's choice) or the
    mean patch token ("avg"). It is set after creation, so the parameters stay those of the token model
    (created with "avg", timm would add a final `fc_norm` in place of `norm`)."""
    encoder = timm.create_model(
        timm_name(arch),
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path,
    )
    encoder.global_pool = global_pool
    set_sincos_pos_embed(encoder.pos_embed, encoder.patch_embed.grid_size, encoder.num_prefix_tokens)
    if grad_checkpointing:
        enable_block_checkpointing(encoder.blocks)
    return encoder


# finetune.pool -> timm's global_pool. timm's "avg" is MAE's global pool exactly: the mean of the patch
# tokens through `fc_norm`, with no final `norm` (MAE's models_vit deletes it); "token" keeps `norm`.
TIMM_POOLS = {"mean": "avg", "token": "token"}


def classifier_kwargs(arch, img_size, patch_size, num_classes, pool):
    """The timm.create_model arguments of a fine-tuned classifier (written beside classifier.pth)."""
    return {
        "model_name": timm_name(arch),
        "num_classes": num_classes,
        "global_pool": TIMM_POOLS[pool],
        "img_size": img_size,
        "patch_size": patch_size,
    }


def create_classifier(
    arch, img_size, patch_size, num_classes, pool="mean", drop_path=0.0, grad_checkpointing=False
):
    """timm's VisionTransformer with a classification head, as MAE fine-tunes it: the head initialized at
    N(0, 2e-5) (truncated) with a zero bias, the position embedding trainable (it starts as the fixed
    sin-cos table until starting weights overwrite it). Its state_dict is a timm one."""
    model = timm.create_model(
        pretrained=False,
        drop_path_rate=drop_path,
        **classifier_kwargs(arch, img_size, patch_size, num_classes, pool),
    )
    set_sincos_pos_embed(model.pos_embed, model.patch_embed.grid_size, model.num_prefix_tokens)
    model.pos_embed.requires_grad_(True)
    timm.layers.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    if grad_checkpointing:
        enable_block_checkpointing(model.blocks)
    return model


def encoder_for(config, grad_checkpointing=False):
    """The encoder a run config describes (model.arch, data.img_size, model.patch_size, model.drop_path,
    model.global_pool). Methods with a momentum copy enable block checkpointing themselves, after copying."""
    m = config.model
    return create_encoder(
        m.arch, config.data.img_size, m.patch, m.drop_path, grad_checkpointing, m.global_pool
    )


def pool_tokens(encoder, tokens, pool):
    """Of (N, T, D) encoder tokens: the class token (`pool="token"`) or the mean of the patch tokens ("mean"),
    through the encoder's `fc_norm` (an identity but in a global-pool model such as MAE's fine-tuned ones)."""
    if pool == "token":
        return tokens[:, 0]
    return encoder.fc_norm(tokens[:, encoder.num_prefix_tokens :].mean(dim=1))


def sincos_2d_table(grid_size, dim):
    """MAE's fixed 2-D sin-cos position table (facebookresearch/mae, util/pos_embed.py): for the patch in
    row h, column w (index h * W + w), the channel quarters are sin(w w_k), cos(w w_k), sin(h w_k),
    cos(h w_k) with w_k = 10000 ** (-k / (dim / 4)). timm's build_sincos2d_pos_embed holds the same
    values with the quarters in another order (sin h, sin w, cos h, cos w); MAE's order matters when
    a release checkpoint's fixed tables meet ours. Returns (H * W, dim) float32."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, not {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], dtype=torch.float32),
        torch.arange(grid_size[1], dtype=torch.float32),
        indexing="ij",
    )
    by_col, by_row = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    return torch.cat([by_col.sin(), by_col.cos(), by_row.sin(), by_row.cos()], dim=1)


def set_sincos_pos_embed(pos_embed, grid_size, num_prefix_tokens=1):
    """Fill a (1, prefix + H*W, dim) position embedding with MAE's fixed 2-D sin-cos table (zeros for
    the prefix tokens, as in MAE) and freeze it."""
    table = sincos_2d_table(grid_size, pos_embed.shape[-1])
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, num_prefix_tokens:] = table
    pos_embed.requires_grad_(False)


def enable_block_checkpointing(blocks):
    """Recompute each block's activations in the backward pass instead of storing them.

    torch's non-reentrant checkpoint, patched onto each block's forward so that parameter names and
    state_dict keys stay timm's. Not fairscale's checkpoint_wrapper: it is reentrant, so a block used
    twice in one step (MoCo's two views) fires its gradient hooks twice, which ZeRO-3 rejects
    (`assert len(set(p.ds_id ...)) == len(params_in_bucket)` in stage3.py).
    """
    for block in blocks:
        block.forward = functools.partial(
            torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False
        )


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo v3's MLP (moco/builder.py, `_build_mlp`): bias-free linears with BatchNorm + ReLU between
    them and, with `last_bn`, a BatchNorm without affine parameters after the last one."""
    layers = []
    for index in range(num_layers):
        dim_in = in_dim if index == 0 else hidden_dim
        dim_out = out_dim if index == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if index < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def sync_batchnorm(module):
    """BatchNorm statistics over the global batch where torch supports it (CUDA); per rank on CPU."""
    if torch.cuda.is_available() and world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def patchify(images, patch_size):
    """(N, C, H, W) -> (N, L, patch_size**2 * C), patches in row-major order, pixels as (p, q, c)."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch_size) * (w // patch_size), -1)


def unpatchify(patches, patch_size, channels=3):
    """Inverse of `patchify` for square images."""
    n, length, _ = patches.shape
    side = int(length**0.5)
    x = patches.reshape(n, side, side, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * patch_size, side * patch_size)


def use_encoder_tokens(method, encoder):
    """Declare that `method` reads the encoder's class token and position embedding in its own forward.

    ZeRO-3 gathers a module's own parameters around that module's forward. Methods that run the encoder
    piece by piece (MAE's visible-patch encoder, SimMIM's mask tokens) read those two outside the
    encoder's forward; registered here, ZeRO-3 gathers them for the method's forward too.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(method, encoder.cls_token)
    register_external_parameter(method, encoder.pos_embed)


def encode_with_mask_tokens(encoder, images, mask, mask_token):
    """SimMIM's encoder pass: every position is encoded, the patch embeddings of masked positions
    (mask = 1) replaced by `mask_token`. Returns the normalized tokens, the class token first."""
    x = encoder.patch_embed(images)
    weight = mask.unsqueeze(-1).to(x.dtype)
    x = x * (1 - weight) + mask_token.to(x.dtype) * weight
    x = encoder._pos_embed(x)  # class token, position embedding (and timm's position dropout)
    return encoder.norm(encoder.blocks(encoder.norm_pre(x)))


def block_mask(batch, grid_size, mask_patch, ratio, device=None):
    """SimMIM's random masking in squares of `mask_patch` x `mask_patch` tokens: exactly
    round(ratio x squares) squares per sample. Returns (batch, H*W) floats, 1 = masked."""
    rows, cols = grid_size[0] // mask_patch, grid_size[1] // mask_patch
    squares = rows * cols
    ranks = torch.rand(batch, squares, device=device).argsort(dim=1).argsort(dim=1)
    masked = (ranks < round(ratio * squares)).float().view(batch, rows, 1, cols, 1)
    return masked.expand(-1, -1, mask_patch, -1, mask_patch).reshape(batch, grid_size[0] * grid_size[1])
