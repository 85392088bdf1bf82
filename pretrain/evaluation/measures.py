""""""

import contextlib
import math

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def attention_maps(encoder):
    """`with attention_maps(encoder) as maps:` run the encoder; `maps` is then a list, per block, of
    (N, heads, T, T) attention probabilities."""
    maps, hooks, fused = [], [], []
    for block in encoder.blocks:
        fused.append(block.attn.fused_attn)
        block.attn.fused_attn = False
        hooks.append(
            block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: maps.append(inputs[0]))
        )
    try:
        yield maps
    finally:
        for block, was_fused, hook in zip(encoder.blocks, fused, hooks):
            block.attn.fused_attn = was_fused
            hook.remove()


@contextlib.contextmanager
def block_tokens(encoder):
    """`with block_tokens(encoder) as tokens:` run the encoder; then a list, per block, of (N, T, D)."""
    tokens = []
    hooks = [
        block.register_forward_hook(lambda module, inputs, output: tokens.append(output))
        for block in encoder.blocks
    ]
    try:
        yield tokens
    finally:
        for hook in hooks:
            hook.remove()


def patch_distances(grid, patch_size):
    """(L, L) Euclidean distances in pixels between the centres of the patches of a grid (rows, cols)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def attention_distance(attention, grid, patch_size, prefix_tokens=1):
    """(heads,) mean attention distance in pixels of (N, heads, T, T) attention, patch-to-patch part."""
    patches = attention[..., prefix_tokens:, prefix_tokens:]
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = patch_distances(grid, patch_size).to(patches)
    return (patches * distance).sum(dim=-1).mean(dim=(0, 2))


def _entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def attention_nmi(attention, prefix_tokens=1):
    """(heads,) normalised mutual information between query and key positions, averaged over images."""
    patches = attention[..., prefix_tokens:, prefix_tokens:]
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    queries = patches.shape[-2]
    joint = patches / queries  # p(q, k): queries uniform
    p_key = joint.sum(dim=-2)
    h_query = math.log(queries)
    h_key = _entropy(p_key)
    h_joint = _entropy(joint.flatten(-2))
    mutual = h_query + h_key - h_joint
    nmi = torch.where(
        h_key > 1e-9, mutual / (h_query * h_key).clamp_min(1e-12).sqrt(), torch.zeros_like(h_key)
    )
    return nmi.mean(dim=0)


def linear_cka(x, y):
    """Linear CKA between (n, d1) and (n, d2) features."""
    x, y = x.double() - x.double().mean(dim=0), y.double() - y.double().mean(dim=0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-30))


def token_cosine(tokens):
    """Mean cosine similarity between the distinct tokens of each image of (N, T, D)."""
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    count = tokens.shape[1]
    return float((similarity.sum(dim=(1, 2)) - count).mean() / (count * (count - 1)))


def head_cosine(attention):
    """Mean cosine similarity between the attention maps of distinct heads of (N, heads, T, T)."""
    unit = F.normalize(attention.float().flatten(2), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    heads = attention.shape[1]
    return float((similarity.sum(dim=(1, 2)) - heads).mean() / (heads * (heads - 1)))


def high_frequency_amplitude(tokens, grid, prefix_tokens=1):
    """Log amplitude at the highest frequency minus at frequency 0, of (N, T, D) tokens on the patch grid
    (averaged over channels and images; the feature map is centred on nothing, as in Park et al.)."""
    maps = tokens[:, prefix_tokens:].float().transpose(1, 2).reshape(len(tokens), -1, *grid)
    amplitude = torch.fft.fftshift(torch.fft.fft2(maps).abs(), dim=(-2, -1)).mean(dim=(0, 1))
    centre = (grid[0] // 2, grid[1] // 2)
    return float((amplitude[0, 0] + 1e-8).log() - (amplitude[centre] + 1e-8).log())


@torch.no_grad()
def measure(encoder, images, patch_size):
    """Per-layer measures of one encoder on `images`, and each layer's class token (for CKA)."""
    grid, prefix = encoder.patch_embed.grid_size, encoder.num_prefix_tokens
    with attention_maps(encoder) as maps, block_tokens(encoder) as tokens:
        encoder.forward_features(images)
    result = {
        "attention_distance_px": [
            float(attention_distance(m, grid, patch_size, prefix).mean()) for m in maps
        ],
        "attention_distance_per_head": [
            attention_distance(m, grid, patch_size, prefix).tolist() for m in maps
        ],
        "attention_nmi": [float(attention_nmi(m, prefix).mean()) for m in maps],
        "token_cosine": [token_cosine(t[:, prefix:]) for t in tokens],
        "head_cosine": [head_cosine(m) for m in maps],
        "fourier_high_frequency": [high_frequency_amplitude(t, grid, prefix) for t in tokens],
    }
    features = [t[:, 0].float() for t in tokens]
    result["cka_layers"] = [[linear_cka(a, b) for b in features] for a in features]
    return result, features
