"""The exact backend's first passes (`scan`: int8 rows, 4-bit PQ codes): on small galleries and queries far from
every gallery point (the hard case: many rows score alike), their top-k rows and logits are the float32 search's,
their normalisers are close, and the model rebuilds the first-pass structure whenever the gallery changes. Speed is
measured in benchmarks/bench_scale.py."""

import pytest
import torch
import torch.nn.functional as F

from geoloc.configs import tiny_geoclip_config
from modeling_geoclip import GeoCLIPModel
from modeling_geoclip.gallery_geoclip import (
    SCAN_MIN_SIZE, Int8Scan, PQ4Scan, exact_search, resolve_gallery_options,
)


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
    assert scan.query_group == gallery.SCAN_SCORE_BUDGET // (2 * 2048)  # two kernel rows per query
    whole = exact_search(queries, embeddings, scale, 5, scan=scan)
    scan.query_group = 4  # groups of 4 queries, the last one of 1
    grouped = exact_search(queries, embeddings, scale, 5, scan=scan)
    for expected, found in zip(whole, grouped):
        torch.testing.assert_close(found, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dim, same_top_5", [(64, 0.98), (512, 0.99)])
def test_pq4_scan_finds_the_exact_top_k(dim, same_top_5):
    """4-bit codes rank coarsely, but re-ranking their 1,024-row shortlist on int8 copies and re-scoring the best
    64 exactly keeps the float32 search's top-5 rows and logits for far and near queries; the normaliser is close
    to the exact one (closest for peaked queries, whose mass the shortlist holds)."""
    pytest.importorskip("faiss")
    embeddings = unit(20_000, dim, seed=0)
    queries = torch.cat([unit(96, dim, seed=1), F.normalize(embeddings[:32] + 0.7 * unit(32, dim, seed=2), dim=-1)])
    scale = torch.tensor(40.0)
    scan = PQ4Scan.build(embeddings)
    assert scan.index.ntotal == 20_000 and scan.index.code_size == dim // 4  # 4 bits per pair of dimensions
    assert scan.shortlist == 1024
    if scan.copies is not None:  # int8 copies, one part (None where PyTorch has no int8 kernel)
        assert scan.copies.parts[0][1].shape == (20_000, dim)
    logits, rows, log_normaliser = exact_search(queries, embeddings, scale, 5)
    found = exact_search(queries, embeddings, scale, 5, scan=scan, scan_candidates=64)
    same = (found[1] == rows).all(1)
    assert same.float().mean() >= same_top_5  # measured: 126 / 128 queries at D=64, 128 / 128 at D=512
    torch.testing.assert_close(found[0][same], logits[same], rtol=0, atol=1e-4)
    # The mass outside the shortlist comes from a 4,096-row sample: flat (far) queries spread theirs over many rows.
    log_error = (found[2] - log_normaliser).abs()
    assert log_error[:96].max() < 0.1 and log_error[96:].max() < 0.01, log_error


def test_pq4_scan_groups_and_without_the_int8_kernel():
    """Query groups do not change the hits (the normaliser only by rounding); with a shortlist of every row the
    int8 re-ranking keeps the exact top-3, and without the int8 kernel the whole shortlist is re-scored exactly
    (the exact answer). More candidates than rows: every row, re-scored exactly."""
    pytest.importorskip("faiss")
    embeddings, queries, scale = unit(300, 32, seed=3), unit(70, 32, seed=4), torch.tensor(10.0)
    scan = PQ4Scan.build(embeddings)
    expected = exact_search(queries, embeddings, scale, 3)
    whole = exact_search(queries, embeddings, scale, 3, scan=scan, scan_candidates=64)
    torch.testing.assert_close(whole[:2], expected[:2], rtol=1e-5, atol=1e-5)
    assert (whole[2] - expected[2]).abs().max() < 0.01  # the 236 rows after the best 64: int8 logits
    scan.query_group = 8
    grouped = exact_search(queries, embeddings, scale, 3, scan=scan, scan_candidates=64)
    torch.testing.assert_close(grouped[:2], whole[:2], rtol=0, atol=0)
    torch.testing.assert_close(grouped[2], whole[2], rtol=1e-6, atol=0)  # batched sums round differently
    for candidates in (300, 500):
        torch.testing.assert_close(exact_search(queries, embeddings, scale, 3, scan=scan, scan_candidates=candidates),
                                   expected, rtol=1e-5, atol=1e-5)
    scan.copies = None
    torch.testing.assert_close(exact_search(queries, embeddings, scale, 3, scan=scan, scan_candidates=64), expected,
                               rtol=1e-5, atol=1e-5)


def test_pq4_scan_samples_the_rows_outside_a_short_shortlist():
    """A gallery larger than the shortlist and the sample: the rows outside the shortlist are estimated from the
    sample, with or without the int8 re-ranking; the hits stay exact."""
    pytest.importorskip("faiss")
    embeddings = unit(20_000, 64, seed=0)
    queries, scale = unit(24, 64, seed=1), torch.tensor(40.0)
    scan = PQ4Scan.build(embeddings)
    scan.shortlist = 256
    logits, rows, log_normaliser = exact_search(queries, embeddings, scale, 5)
    for copies in (scan.copies, None):
        scan.copies = copies
        found = exact_search(queries, embeddings, scale, 5, scan=scan, scan_candidates=64)
        assert (found[1] == rows).all(1).float().mean() >= 0.9
        assert (found[2] - log_normaliser).abs().max() < 0.1, (found[2] - log_normaliser).abs().max()


def test_pq4_scan_needs_faiss_and_an_even_width(monkeypatch):
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match="scan='pq4' needs an even embedding width"):
        PQ4Scan.build(unit(100, 33, seed=0))
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        resolve_gallery_options("exact", 100, {"scan": "pq4"}, 64)


def test_int8_scan_is_exact_when_every_row_is_a_candidate():
    embeddings, queries, scale = unit(100, 32, seed=3), unit(4, 32, seed=4), torch.tensor(10.0)
    expected = exact_search(queries, embeddings, scale, 3)
    found = exact_search(queries, embeddings, scale, 3, scan=Int8Scan.build(embeddings), scan_candidates=128)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", ["int8", "pq4"])
def test_model_scan_option_agrees_and_follows_the_gallery(tmp_path, scan):
    """The model's first pass: answers close to one float32 pass, the structure rebuilt for a new gallery, never
    saved (rebuilt from the stored embeddings after loading). 3,000 points: pq4's 4,096-row sample holds them
    all, so nothing is sampled here (`test_pq4_scan_samples_the_rows_outside_a_short_shortlist` samples)."""
    if scan == "pq4":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    generator = torch.Generator().manual_seed(5)
    gallery = torch.stack([torch.rand(3000, generator=generator) * 180 - 90,
                           torch.rand(3000, generator=generator) * 360 - 180], dim=1)
    queries = F.normalize(torch.randn(32, model.config.projection_dim, generator=generator), dim=-1)
    model.set_gallery(gallery, scan="none")
    expected, expected_rows = model.search_gallery(queries, top_k=5)
    model.set_gallery(gallery, scan=scan)
    assert model.config.gallery_options["scan_candidates"] == 64
    probabilities, rows = model.search_gallery(queries, top_k=5)
    assert (rows == expected_rows).all(1).float().mean() >= 0.95
    torch.testing.assert_close(probabilities, expected, rtol=0.02, atol=1e-6)
    model.set_gallery(gallery[:1500], scan=scan)  # a new gallery: the first pass is rebuilt
    assert model.search_gallery(queries, top_k=5)[1].max() < 1500
    model.save_pretrained(tmp_path)
    saved = {name for name in model.state_dict() if name.startswith("gallery.")}
    assert saved == {"gallery.coordinates", "gallery.embeddings"}  # nothing saved for the first pass
    loaded = GeoCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.gallery_options["scan"] == scan
    torch.testing.assert_close(loaded.search_gallery(queries, top_k=5), model.search_gallery(queries, top_k=5))


def test_scan_options():
    assert resolve_gallery_options("exact", 100, {}, 64)["scan"] == "auto" and SCAN_MIN_SIZE == 65536
    with pytest.raises(ValueError, match=r"scan must be one of \['auto', 'int8', 'pq4', 'none'\], got 'int4'"):
        resolve_gallery_options("exact", 100, {"scan": "int4"}, 64)
    with pytest.raises(ValueError, match="scan_candidates must be a positive integer"):
        resolve_gallery_options("exact", 100, {"scan_candidates": 0}, 64)


@pytest.mark.parametrize("int8", [True, False])
def test_normaliser_sample_drops_each_querys_own_candidates(int8):
    """The sampled estimate of the non-retrieved mass, against a direct computation per query: sample rows among
    a query's retrieved rows (and only that query's) are dropped; "not found" (-1) matches no row, not even row
    0. Scores come from the int8 kernel where there is one (within its rounding), else in float32."""
    from modeling_geoclip.gallery_geoclip import NormaliserSample

    embeddings, queries, scale = unit(500, 16, seed=8), unit(3, 16, seed=9), torch.tensor(20.0)
    sample_rows = torch.tensor([0, 3, 7, 11, 42, 100, 499])
    sample = NormaliserSample(sample_rows, embeddings[sample_rows], len(embeddings))
    if int8 and sample.scan is None:
        pytest.skip("no int8 kernel in this PyTorch build")
    if not int8:
        sample.scan = None
    retrieved = torch.tensor([[3, 42, -1], [499, 1, 2], [0, 7, 11]])
    rest = len(embeddings) - (retrieved >= 0).sum(1)
    estimate = sample.rest_mass(queries, scale, retrieved, rest)
    exact_scores = queries @ embeddings[sample_rows].T
    scores = exact_scores if sample.scan is None else sample.scan.scores(queries)
    assert (scores - exact_scores).abs().max() < 0.02  # int8 rounding at D=16 (~0.003 at D=512)
    for row in range(3):
        kept = [i for i, s in enumerate(sample_rows.tolist()) if s not in retrieved[row].tolist()]
        direct = torch.logsumexp(scale * scores[row, kept], 0) + torch.log(rest[row] / len(kept))
        torch.testing.assert_close(estimate[row], direct)
    everything = sample.rest_mass(queries, scale, retrieved, torch.zeros(3, dtype=torch.long))
    assert torch.isneginf(everything).all()  # nothing left outside the retrieved rows


def test_normaliser_sample_of_32768_rows_or_more():
    """From 2**15 sample rows the membership table holds int32 places; the estimate still drops exactly the
    retrieved sample rows."""
    from modeling_geoclip.gallery_geoclip import NormaliserSample

    embeddings, queries, scale = unit(40_000, 8, seed=10), unit(2, 8, seed=11), torch.tensor(5.0)
    sample_rows = torch.randperm(40_000, generator=torch.Generator().manual_seed(12))[:2**15].sort().values
    sample = NormaliserSample(sample_rows, embeddings[sample_rows], len(embeddings))
    sample.scan = None  # float32 scores: compared exactly below
    assert sample.slots.dtype == torch.int32
    retrieved = torch.stack([sample_rows[:100], torch.arange(100)])
    rest = torch.full((2,), 40_000 - 100)
    estimate = sample.rest_mass(queries, scale, retrieved, rest)
    for row in range(2):
        kept = torch.tensor([s not in set(retrieved[row].tolist()) for s in sample_rows.tolist()])
        direct = torch.logsumexp(scale * queries[row] @ embeddings[sample_rows[kept]].T, 0) + torch.log(
            rest[row] / kept.sum())
        torch.testing.assert_close(estimate[row], direct)


def test_int8_scores_keep_the_query_to_float32_precision():
    """The kernel takes bfloat16 queries; `Int8Scan` passes each as its rounding plus the remainder. Rounding the
    query shifts every row's score alike where rows share a direction (as a gallery's embeddings do), so it moves
    the normaliser; with the remainder, only the output's (random) rounding is left, against the int8 rows' own
    float32 products."""
    common = unit(1, 512, seed=22)
    rows = F.normalize(common + 0.6 * unit(20_000, 512, seed=20), dim=-1)  # mean cosine ~0.74, as gallery rows
    queries = F.normalize(common + 0.6 * unit(8, 512, seed=21), dim=-1)
    scan = Int8Scan.build(rows)
    if scan is None:
        pytest.skip("no int8 kernel in this PyTorch build")
    (_, codes, scales), = scan.parts
    reference = torch.logsumexp(40 * queries.double() @ (codes.double() * scales.double()[:, None]).T, dim=1)
    split = (torch.logsumexp(40 * scan.scores(queries).double(), dim=1) - reference).abs().max()
    one_row = torch._weight_int8pack_mm(queries.bfloat16(), codes, scales).double()
    rounded = (torch.logsumexp(40 * one_row, dim=1) - reference).abs().max()
    assert split < 0.003 and rounded > 2 * split, (split, rounded)  # measured: 0.0015 and 0.0059


def test_int8_scan_only_where_the_kernel_is_right(monkeypatch, caplog):
    """PyTorch's int8 kernel crashed (several queries) or returned inf (one) for widths that are not a multiple of
    16, so those galleries scan their stored embeddings; so does any gallery whose first rows the kernel scores
    wrongly (checked against float32 at build)."""
    if Int8Scan.build(unit(64, 32, seed=0)) is None:
        pytest.skip("no int8 kernel in this PyTorch build")
    assert Int8Scan.build(unit(3000, 24, seed=30)) is None
    embeddings, queries, scale = unit(3000, 32, seed=30), unit(5, 32, seed=31), torch.tensor(30.0)
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *args: kernel(*args) + 0.1)
    with caplog.at_level("WARNING"):
        assert Int8Scan.build(embeddings) is None
    assert "int8 kernel scored the first gallery rows" in caplog.text
    monkeypatch.undo()
    scan = Int8Scan.build(embeddings)
    found = exact_search(queries, embeddings, scale, 5, scan=scan)
    expected = exact_search(queries, embeddings, scale, 5)
    torch.testing.assert_close(found[1], expected[1], rtol=0, atol=0)
