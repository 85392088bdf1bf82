"""Per-layer measurements of a frozen ViT (seeds 000, 001, 002: what CL and MIM learn, layer by layer).

All of them take what timm's blocks compute: `attention_maps` turns fused attention off and records the
softmax output as it enters each block's `attn_drop`; `block_tokens` records each block's output.

* `attention_distance`: per head, the attention-weighted mean distance in pixels between a query patch
  and the patches it attends to (class token excluded). Attention to itself gives 0, uniform attention
  the mean distance between patches.
* `attention_nmi`: per head, the mutual information between query and key position under the joint
  distribution p(q, k) = attention(q, k) / N, normalised by sqrt(H(Q) H(K)): 1 when each query attends
  to its own distinct key, 0 for uniform attention and for every query attending to the same key
  (CL's collapse: all queries look at the same places).
* `linear_cka`: centred kernel alignment of two feature matrices (n, d1), (n, d2); 1 for equal
  features, invariant to orthogonal transforms and isotropic scaling, ~0 for independent ones.
* `token_cosine`: mean cosine similarity between distinct tokens of an image (high: tokens alike).
* `head_cosine`: mean cosine similarity between the attention maps of distinct heads.
* `high_frequency_amplitude`: of token feature maps on the patch grid, the log amplitude of the
  highest spatial frequency minus that of frequency 0 (Park et al.'s Fourier analysis): higher for
  feature maps with more high-frequency content.
"""
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
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: maps.append(inputs[0])))
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
    hooks = [block.register_forward_hook(lambda module, inputs, output: tokens.append(output))
             for block in encoder.blocks]
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
    nmi = torch.where(h_key > 1e-9, mutual / (h_query * h_key).clamp_min(1e-12).sqrt(), torch.zeros_like(h_key))
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
