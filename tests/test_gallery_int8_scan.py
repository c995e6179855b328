"""The exact backend's int8 first pass (`scan`): on small galleries and queries far from every gallery point (the
hard case: many rows score alike), its top-k rows and logits are the float32 search's, its normaliser is close,
and the model rebuilds the int8 copy whenever the gallery changes. Speed is measured in benchmarks/bench_scale.py."""

import pytest
import torch
import torch.nn.functional as F

from geoloc.configs import tiny_geoclip_config
from modeling_geoclip import GeoCLIPModel
from modeling_geoclip.gallery_geoclip import SCAN_MIN_SIZE, Int8Scan, exact_search, resolve_gallery_options


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("dim", [64, 512])
def test_int8_scan_finds_the_exact_top_k(dim):
    embeddings = unit(20_000, dim, seed=0)  # several scan parts
    queries = torch.cat([unit(96, dim, seed=1),  # far: best cosine ~0.2-0.5
                         F.normalize(embeddings[:32] + 0.7 * unit(32, dim, seed=2), dim=-1)])  # near
    scale = torch.tensor(40.0)
    scan = Int8Scan.build(embeddings, part_rows=8192)
    assert scan is not None and len(scan.parts) == 3
    logits, rows, log_normaliser = exact_search(queries, embeddings, scale, 5, chunk_size=8192)
    found = exact_search(queries, embeddings, scale, 5, chunk_size=8192, scan=scan, scan_candidates=64)
    assert (found[1] == rows).all(1).float().mean() >= 0.99
    torch.testing.assert_close(found[0], logits, rtol=0, atol=1e-4)  # exact logits of the same hits
    assert (found[2] - log_normaliser).abs().max() < 0.02


def test_queries_in_groups_answer_as_one_batch(monkeypatch):
    """The two-pass search scores queries in groups (its score buffer is bounded, whatever the batch): the
    answers do not depend on the grouping."""
    import modeling_geoclip.gallery_geoclip as gallery

    embeddings, queries, scale = unit(5000, 64, seed=6), unit(37, 64, seed=7), torch.tensor(30.0)
    scan = Int8Scan.build(embeddings, part_rows=2048)
    whole = exact_search(queries, embeddings, scale, 5, scan=scan)
    monkeypatch.setattr(gallery, "SCAN_SCORE_BUDGET", 2048 * 4)  # groups of 4 queries, the last one of 1
    grouped = exact_search(queries, embeddings, scale, 5, scan=scan)
    for expected, found in zip(whole, grouped):
        torch.testing.assert_close(found, expected, rtol=0, atol=0)


def test_int8_scan_is_exact_when_every_row_is_a_candidate():
    embeddings, queries, scale = unit(100, 32, seed=3), unit(4, 32, seed=4), torch.tensor(10.0)
    expected = exact_search(queries, embeddings, scale, 3)
    found = exact_search(queries, embeddings, scale, 3, scan=Int8Scan.build(embeddings), scan_candidates=128)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_model_scan_option_agrees_and_follows_the_gallery(tmp_path):
    torch.manual_seed(0)
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    generator = torch.Generator().manual_seed(5)
    gallery = torch.stack([torch.rand(3000, generator=generator) * 180 - 90,
                           torch.rand(3000, generator=generator) * 360 - 180], dim=1)
    queries = F.normalize(torch.randn(32, model.config.projection_dim, generator=generator), dim=-1)
    model.set_gallery(gallery, scan="none")
    expected, expected_rows = model.search_gallery(queries, top_k=5)
    model.set_gallery(gallery, scan="int8")
    probabilities, rows = model.search_gallery(queries, top_k=5)
    assert (rows == expected_rows).all(1).float().mean() >= 0.95
    torch.testing.assert_close(probabilities, expected, rtol=0.02, atol=1e-6)
    model.set_gallery(gallery[:1500], scan="int8")  # a new gallery: the int8 copy is rebuilt
    assert model.search_gallery(queries, top_k=5)[1].max() < 1500
    model.save_pretrained(tmp_path)
    loaded = GeoCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.gallery_options["scan"] == "int8"
    torch.testing.assert_close(loaded.search_gallery(queries, top_k=5), model.search_gallery(queries, top_k=5))


def test_scan_options():
    assert resolve_gallery_options("exact", 100, {})["scan"] == "auto" and SCAN_MIN_SIZE == 65536
    with pytest.raises(ValueError, match=r"scan must be one of \['auto', 'int8', 'none'\], got 'int4'"):
        resolve_gallery_options("exact", 100, {"scan": "int4"})
    with pytest.raises(ValueError, match="scan_candidates must be a positive integer"):
        resolve_gallery_options("exact", 100, {"scan_candidates": 0})
