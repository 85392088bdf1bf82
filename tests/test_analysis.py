"""The per-layer measurements on cases with known answers."""

import json
import math

import pytest
import torch

from pretrain.evaluation.measures import (
    attention_distance,
    attention_maps,
    attention_nmi,
    block_tokens,
    head_cosine,
    high_frequency_amplitude,
    linear_cka,
    patch_distances,
    token_cosine,
)
from pretrain.models import create_encoder
from tests.conftest import run_cli

GRID, PATCH = (4, 4), 8


def with_cls(patch_attention):
    """(N, H, L, L) patch-to-patch attention -> (N, H, 1 + L, 1 + L) with a class token row/column of
    zeros."""
    n, h, length, _ = patch_attention.shape
    full = torch.zeros(n, h, length + 1, length + 1)
    full[..., 1:, 1:] = patch_attention
    full[..., 0, 0] = 1
    return full


def test_attention_distance_of_self_and_uniform_attention():
    identity = with_cls(torch.eye(16).expand(2, 3, 16, 16))
    assert torch.allclose(attention_distance(identity, GRID, PATCH), torch.zeros(3))
    uniform = with_cls(torch.full((2, 3, 16, 16), 1 / 16))
    expected = patch_distances(GRID, PATCH).mean()
    assert torch.allclose(attention_distance(uniform, GRID, PATCH), expected.expand(3), atol=1e-5)
    assert patch_distances((1, 2), 8)[0, 1] == 8  # neighbours are one patch (8 px) apart


def test_nmi_is_one_for_distinct_one_hot_attention_and_zero_for_uniform_or_collapsed():
    permutation = torch.eye(16)[torch.randperm(16)]
    assert torch.allclose(attention_nmi(with_cls(permutation.expand(1, 2, 16, 16))), torch.ones(2), atol=1e-5)
    assert torch.allclose(
        attention_nmi(with_cls(torch.full((1, 2, 16, 16), 1 / 16))), torch.zeros(2), atol=1e-5
    )
    collapsed = torch.zeros(1, 2, 16, 16)
    collapsed[..., 5] = 1  # every query looks at patch 5
    assert torch.allclose(attention_nmi(with_cls(collapsed)), torch.zeros(2), atol=1e-5)


def test_linear_cka_properties():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert (
        linear_cka(torch.randn(4000, 8, generator=generator), torch.randn(4000, 8, generator=generator))
        < 0.02
    )


def test_token_and_head_cosine():
    same = torch.ones(2, 5, 4)
    assert token_cosine(same) == pytest.approx(1.0)
    orthogonal = torch.eye(4).expand(2, 4, 4)
    assert token_cosine(orthogonal) == pytest.approx(0.0)
    heads = with_cls(torch.eye(16).expand(1, 3, 16, 16))
    assert head_cosine(heads) == pytest.approx(1.0)


def test_fourier_measure_is_higher_for_a_checkerboard_than_a_constant_map():
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2).float().flatten()
    tokens_checker = torch.cat([torch.zeros(1, 1, 3), (checker[:, None] + 1).expand(16, 3)[None]], dim=1)
    tokens_constant = torch.cat([torch.zeros(1, 1, 3), torch.ones(1, 16, 3)], dim=1)
    assert (
        high_frequency_amplitude(tokens_checker, GRID) > high_frequency_amplitude(tokens_constant, GRID) + 1
    )


def test_hooks_read_timm_blocks_without_changing_the_output():
    encoder = create_encoder("vit_tiny", 32, 8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = encoder(images)
        with attention_maps(encoder) as maps, block_tokens(encoder) as tokens:
            hooked = encoder(images)
    assert torch.allclose(plain, hooked, atol=1e-5)
    assert (
        len(maps) == len(tokens) == 12 and maps[0].shape == (2, 3, 17, 17) and tokens[0].shape == (2, 17, 192)
    )
    assert torch.allclose(maps[3].sum(dim=-1), torch.ones(2, 3, 17), atol=1e-5)
    assert all(block.attn.fused_attn == encoder.blocks[0].attn.fused_attn for block in encoder.blocks)
    assert not math.isnan(float(attention_distance(maps[0], GRID, PATCH).mean()))


@pytest.mark.slow
def test_lg_analyze_compares_encoders_layer_by_layer(demo_shards, tmp_path):
    from tests.test_eval import exported_encoder

    first = exported_encoder(tmp_path / "a.pth")
    torch.manual_seed(1)
    second = tmp_path / "b.pth"
    torch.save(create_encoder("vit_tiny", 32, 8).state_dict(), second)
    second.with_suffix(".json").write_text(first.with_suffix(".json").read_text())
    result = run_cli(
        "pretrain.analysis",
        first,
        second,
        "--names",
        "A",
        "B",
        "--val",
        demo_shards / "val.json",
        "--train",
        demo_shards / "train.json",
        "--images",
        "16",
        "--out",
        tmp_path / "out",
        "--tb",
        tmp_path / "tb",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"A", "B"}
    for key in (
        "attention_distance_px",
        "attention_nmi",
        "token_cosine",
        "head_cosine",
        "fourier_high_frequency",
        "linear_probe",
        "cka_layers",
    ):
        assert len(results["A"][key]) == 12, key
    assert results["A"]["cka_layers"][4][4] == pytest.approx(1.0) and len(results["B"]["cka_vs_A"]) == 12
    for name in ("attention_distance_px", "attention_nmi", "cka_layers", "cka_models", "linear_probe"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "analysis/attention_distance_px" in events.Tags()["images"]
