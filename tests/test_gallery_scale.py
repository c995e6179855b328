"""Gallery search at scale: the exact backend (chunked, reduced-precision storage), the FAISS backend (recall on
queries far from the gallery, its build-time calibration and estimate, normaliser approximation, persistence
without re-encoding) and the local refinement around the top hits."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from geoloc.configs import tiny_geoclip_config
from modeling_geoclip import GeoCLIPModel
from modeling_geoclip.gallery_geoclip import exact_search, resolve_gallery_options, sample_around

faiss = pytest.importorskip("faiss")


def random_locations(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latitude = torch.rad2deg(torch.asin(2 * torch.rand(n, generator=generator) - 1))  # uniform on the sphere
    return torch.stack((latitude, 360 * torch.rand(n, generator=generator) - 180), dim=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GeoCLIPModel(tiny_geoclip_config()).eval()


@pytest.fixture(scope="module")
def gallery():
    return random_locations(12_000, seed=1)


def queries_near(model, locations: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Queries like an image embedding: the embedding of a true location plus noise, normalised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = F.normalize(model.get_location_features(locations), dim=-1)
    return F.normalize(embeds + noise * torch.randn(embeds.shape, generator=generator) / math.sqrt(embeds.shape[1]), dim=-1)


def queries_far(model, count: int, seed: int) -> torch.Tensor:
    """Queries like real image embeddings: the image MLP on random CLIP embeddings. Far from every gallery
    point (best cosine ~0.25) and spread out, unlike `queries_near`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clip_embeds = torch.randn(count, 64, generator=generator)
        return F.normalize(model.get_image_features(clip_image_embeds=clip_embeds), dim=-1)


def text_queries(model, count: int, seed: int) -> torch.Tensor:
    """Text embeddings of random byte strings through the tiny text tower and the image MLP."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return F.normalize(model.get_text_features(torch.randint(0, 512, (count, 12), generator=generator)), dim=-1)


def recall_at_5(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (found[:, :, None] == truth[:, None, :]).any(-1).float().mean().item()


def brute_force(model, gallery, query):
    with torch.no_grad():
        embeds = F.normalize(model.get_location_features(gallery), dim=-1)
        return (model.logit_scale.exp() * query @ embeds.T).softmax(dim=-1)


def test_exact_backend_is_the_brute_force_softmax(model, gallery):
    model.set_gallery(gallery, backend="exact", chunk_size=4096)  # several chunks
    query = queries_near(model, random_locations(8, seed=2), noise=1.0, seed=3)
    probabilities, indices = model.search_gallery(query, top_k=5)
    expected, expected_indices = brute_force(model, gallery, query).topk(5, dim=1)
    torch.testing.assert_close(indices, expected_indices)
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_storage_keeps_answers_and_survives_save(model, gallery, dtype, tmp_path):
    query = queries_near(model, random_locations(16, seed=4), noise=0.5, seed=5)
    model.set_gallery(gallery)
    reference, reference_indices = model.search_gallery(query, top_k=5)
    model.set_gallery(gallery, embedding_dtype=dtype)
    assert model.gallery.embeddings.dtype == getattr(torch, dtype)
    probabilities, indices = model.search_gallery(query, top_k=5)
    assert (indices[:, 0] == reference_indices[:, 0]).float().mean() >= 0.9
    torch.testing.assert_close(probabilities[:, 0], reference[:, 0], rtol=0.05, atol=0)
    model.save_pretrained(tmp_path)
    loaded = GeoCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.gallery.embeddings.dtype == getattr(torch, dtype)
    assert loaded.config.gallery_options["embedding_dtype"] == dtype
    torch.testing.assert_close(loaded.search_gallery(query, top_k=5), (probabilities, indices))


@pytest.mark.parametrize("index", ["IVF64,Flat", "IVF64,SQ8"])
def test_faiss_recall_and_probabilities_match_exact(model, gallery, index):
    query = queries_near(model, random_locations(64, seed=6), noise=1.0, seed=7)
    model.set_gallery(gallery, backend="exact")
    exact, exact_indices = model.search_gallery(query, top_k=5)
    model.set_gallery(gallery, backend="faiss", index=index, nprobe=32)
    approximate, indices = model.search_gallery(query, top_k=5)
    recall = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(indices, exact_indices)])
    assert recall.mean() >= 0.95, recall.mean()
    # Where the top hit agrees, its probability is close: exact score over an estimated normaliser.
    same = indices[:, 0] == exact_indices[:, 0]
    relative_error = (approximate[same, 0] / exact[same, 0] - 1).abs()
    assert relative_error.max() < 0.05, relative_error.max()


def test_faiss_normaliser_estimate_error_is_bounded(model):
    """A peaked query on a flat index: the only approximation is the sampled non-retrieved mass."""
    gallery = random_locations(10_000, seed=8)
    query = queries_near(model, gallery[:32], noise=0.3, seed=9)
    exact = brute_force(model, gallery, query)
    model.set_gallery(gallery, backend="faiss", index="Flat", normaliser_sample_size=1024)
    probabilities, indices = model.search_gallery(query, top_k=5)
    torch.testing.assert_close(indices, exact.topk(5, dim=1).indices)
    log_error = (probabilities.log() - exact.gather(1, indices).log()).abs()
    assert log_error.max() < 0.05, log_error.max()


def test_faiss_gallery_round_trips_without_re_encoding(model, gallery, tmp_path, monkeypatch):
    model.set_gallery(gallery, backend="faiss", index="IVF64,Flat", nprobe=8)
    query = queries_near(model, random_locations(4, seed=10), noise=1.0, seed=11)
    expected = model.search_gallery(query, top_k=3)
    model.save_pretrained(tmp_path)
    loaded = GeoCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.gallery_backend == "faiss" and loaded.config.gallery_options["nprobe"] == 8
    assert loaded.gallery.embeddings.shape == (0, loaded.config.projection_dim)

    def fail(*args, **kwargs):
        raise AssertionError("the gallery was re-encoded")

    monkeypatch.setattr(loaded.location_encoder, "forward", fail)
    torch.testing.assert_close(loaded.search_gallery(query, top_k=3), expected)
    out = loaded.geolocate(clip_image_embeds=torch.randn(2, 64), top_k=3)
    assert out.latitudes.shape == (2, 3) and (out.indices >= 0).all()


def test_faiss_missing_is_a_clear_import_error(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        model.set_gallery([[0.0, 0.0], [1.0, 1.0]], backend="faiss")


@pytest.mark.parametrize("backend, options, message", [
    ("annoy", {}, "backend must be one of"),
    ("exact", {"nprobe": 4}, "Unknown option"),
    ("exact", {"embedding_dtype": "int8"}, "embedding_dtype must be one of"),
    ("faiss", {"n_candidates": 0}, "n_candidates must be a positive integer"),
    ("faiss", {"rescore": "yes"}, "rescore must be True or False"),
    ("faiss", {"nprobe": 0}, "nprobe must be a positive integer"),
    ("faiss", {"target_recall": 1.5}, r"target_recall must be a number in \(0, 1\], got 1.5"),
    ("faiss", {"calibration_size": 1}, "calibration_size must be an integer >= 2"),
])
def test_bad_gallery_options_are_value_errors(backend, options, message):
    with pytest.raises(ValueError, match=message):
        resolve_gallery_options(backend, 1000, options, 512)


def test_default_faiss_index_grows_with_the_gallery():
    assert resolve_gallery_options("faiss", 50_000, {}, 512)["index"] == "Flat"
    million = resolve_gallery_options("faiss", 1_000_000, {}, 512)
    assert million["index"] == "IVF4096,PQ256x4fs,RFlat" and million["rescore"] is False  # ranked on float32 rows
    assert million["nprobe"] is None and million["target_recall"] == 0.995  # calibrated at build time
    assert million["k_factor_rf"] == 32
    assert resolve_gallery_options("faiss", 1_000_000, {}, 33)["index"] == "IVF4096,SQ8,RFlat"  # no pairs of dims
    ten_million = resolve_gallery_options("faiss", 10_000_000, {}, 512)
    # 8-bit copies instead of float32 rows, a flat coarse quantizer, 16 candidates re-encoded, 2,048 re-ranked
    assert ten_million["index"] == "IVF4096,PQ256x4fs,Refine(SQ8)" and ten_million["rescore"] is True
    assert (ten_million["n_candidates"], ten_million["k_factor_rf"], ten_million["target_recall"]) == (16, 128, 0.95)
    assert resolve_gallery_options("faiss", 10_000_000, {}, 33)["index"] == "IVF4096,SQ8"
    assert resolve_gallery_options("faiss", 100_000_000, {}, 512)["index"].startswith("IVF8192,")
    assert resolve_gallery_options("faiss", 1_000_000, {"n_candidates": 256}, 512)["k_factor_rf"] == 8
    assert resolve_gallery_options("faiss", 1_000_000, {"n_candidates": 4096}, 512)["k_factor_rf"] == 1
    assert resolve_gallery_options("faiss", 1_000_000, {"index": "IVF64,SQ8"}, 512)["rescore"] is True


@pytest.fixture(scope="module")
def far_queries(model, gallery):
    """Image-like and text queries and their exact top-5 over the gallery."""
    queries = torch.cat([queries_far(model, 160, seed=20), text_queries(model, 40, seed=21)])
    return queries, brute_force(model, gallery, queries).topk(5, dim=1).indices


def test_faiss_calibration_reaches_the_target_on_queries_far_from_the_gallery(model, gallery, far_queries):
    """The structure of the 1M-point default (IVF, 8-bit codes, float32 re-ranking) at 12K points: nprobe is
    calibrated on the proxy, and the stored estimate predicts the recall of image and text queries."""
    queries, truth = far_queries
    model.set_gallery(gallery, backend="faiss", index="IVF64,SQ8,RFlat", target_recall=0.99)
    options = model.config.gallery_options
    estimate = options["recall_estimate"]
    assert estimate["query_source"] == "proxy: 512 random unit vectors" and estimate["queries"] == 256
    assert estimate["nprobe"] == options["nprobe"] < 64 and estimate["recall_at_5"] >= 0.98
    recall = recall_at_5(model.search_gallery(queries, top_k=5)[1], truth)
    assert recall >= 0.97 and abs(recall - estimate["recall_at_5"]) < 0.03, (recall, estimate)

    # Too few lists visited: recall collapses on these queries, and the stored estimate says so.
    model.set_gallery(gallery, backend="faiss", index="IVF64,SQ8,RFlat", nprobe=2)
    estimate = model.config.gallery_options["recall_estimate"]
    recall = recall_at_5(model.search_gallery(queries, top_k=5)[1], truth)
    assert recall < 0.6 and abs(recall - estimate["recall_at_5"]) < 0.1, (recall, estimate)


def test_large_gallery_structure_keeps_far_queries_recall(model, gallery, far_queries):
    """The structure of the default above 2**20 points (flat coarse quantizer, 4-bit codes re-ranked on 8-bit
    copies, candidates re-scored by re-encoding) at 12K points, with its defaults for 16 candidates: 2,048 rows
    re-ranked, target 0.95; the stored estimate predicts image and text queries' recall."""
    queries, truth = far_queries
    model.set_gallery(gallery, backend="faiss", index="IVF64,PQ32x4fs,Refine(SQ8)", n_candidates=16,
                      target_recall=0.95)
    options = model.config.gallery_options
    assert options["k_factor_rf"] == 128 and options["rescore"] is True
    recall = recall_at_5(model.search_gallery(queries, top_k=5)[1], truth)
    estimate = options["recall_estimate"]["recall_at_5"]
    assert recall >= 0.95 and abs(recall - estimate) < 0.05, (recall, options["recall_estimate"])


def test_faiss_calibration_queries_are_used_and_the_estimate_is_saved(model, gallery, far_queries, tmp_path):
    queries, truth = far_queries
    model.set_gallery(gallery, backend="faiss", index="IVF64,Flat", calibration_queries=queries_far(model, 200, 30),
                      target_recall=0.95)
    estimate = model.config.gallery_options["recall_estimate"]
    assert estimate["query_source"] == "calibration_queries (200)" and estimate["queries"] == 100
    recall = recall_at_5(model.search_gallery(queries, top_k=5)[1], truth)
    assert recall >= 0.93 and abs(recall - estimate["recall_at_5"]) < 0.04, (recall, estimate)
    model.save_pretrained(tmp_path)
    loaded = GeoCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.gallery_options["recall_estimate"] == estimate
    assert loaded.config.gallery_options["nprobe"] == estimate["nprobe"] == model.config.gallery_options["nprobe"]
    torch.testing.assert_close(loaded.search_gallery(queries, top_k=5), model.search_gallery(queries, top_k=5))


@pytest.mark.parametrize("backend, queries, message", [
    ("exact", torch.randn(4, 64), "calibration_queries only apply to backend='faiss'"),
    ("faiss", torch.randn(4, 32), r"calibration_queries must have shape \(Q>=2, 64\), got \(4, 32\)"),
    ("faiss", torch.randn(1, 64), r"calibration_queries must have shape \(Q>=2, 64\), got \(1, 64\)"),
    ("faiss", torch.full((4, 64), float("nan")), "calibration_queries must be finite, non-zero"),
])
def test_bad_calibration_queries_are_value_errors(model, backend, queries, message):
    with pytest.raises(ValueError, match=message):
        model.set_gallery([[0.0, 0.0], [1.0, 1.0]], backend=backend, calibration_queries=queries)


def test_reduced_precision_exact_search_ranks_like_float32_without_ties():
    """bf16/fp16 rows are upcast block by block: the scores are those of the upcast rows, and the top-k equals
    the float32 gallery's wherever consecutive scores differ by more than the rounding can move them."""
    generator = torch.Generator().manual_seed(40)
    embeddings = F.normalize(torch.randn(9_000, 64, generator=generator), dim=-1)  # > 2 upcast blocks of 4096
    query = F.normalize(embeddings[:512] + 0.8 * torch.randn(512, 64, generator=generator) / 8, dim=-1)
    scale = torch.tensor(20.0)
    logits, indices, log_normaliser = exact_search(query, embeddings, scale, 5, chunk_size=5000)
    for dtype in (torch.bfloat16, torch.float16):
        stored = embeddings.to(dtype)
        found = exact_search(query, stored, scale, 5, chunk_size=5000)
        upcast = exact_search(query, stored.float(), scale, 5, chunk_size=5000)
        torch.testing.assert_close(found, upcast, rtol=1e-6, atol=1e-5)
        # |<q, e - round(e)>| <= |e - round(e)| <= 2**-8 (bf16) for unit vectors: scores move by at most that.
        top6 = (query @ embeddings.T).topk(6, dim=1).values
        tie_free = (top6[:, :-1] - top6[:, 1:]).min(1).values > 2 * 2**-8
        assert tie_free.sum() >= 16
        assert torch.equal(found[1][tie_free], indices[tie_free])
        torch.testing.assert_close(found[2], log_normaliser, rtol=0, atol=0.05)


def test_refine_never_lowers_the_best_score(model, gallery):
    model.set_gallery(gallery[:5000])
    clip_embeds = torch.randn(6, 64, generator=torch.Generator().manual_seed(12))
    plain = model.geolocate(clip_image_embeds=clip_embeds, top_k=3)
    refined = model.geolocate(clip_image_embeds=clip_embeds, top_k=3, refine=True, refine_samples=32)
    with torch.no_grad():
        query = F.normalize(model.get_image_features(clip_image_embeds=clip_embeds), dim=-1)

        def best_score(out):
            points = torch.stack((out.latitudes[:, 0], out.longitudes[:, 0]), dim=1)
            return (query * F.normalize(model.get_location_features(points), dim=-1)).sum(-1)

    assert (best_score(refined) >= best_score(plain) - 1e-5).all()
    is_sample = refined.indices == -1
    assert is_sample.any()
    kept = refined.indices[~is_sample]
    assert set(kept.tolist()) <= set(plain.indices.flatten().tolist())
    assert (refined.probabilities[:, :-1] >= refined.probabilities[:, 1:]).all()
    assert (refined.probabilities.sum(1) <= 1).all()


def test_sample_around_stays_near_and_valid_at_the_pole_and_antimeridian():
    centres = torch.tensor([[89.99, 0.0], [0.0, 179.99], [-45.0, -60.0]])
    points = sample_around(centres, radius_km=10.0, num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert points.shape == (3, 2000, 2)
    assert (points[..., 0].abs() <= 90).all() and (points[..., 1] >= -180).all() and (points[..., 1] < 180).all()
    lat1, lon1 = torch.deg2rad(centres[:, None, 0]).double(), torch.deg2rad(centres[:, None, 1]).double()
    lat2, lon2 = torch.deg2rad(points[..., 0]), torch.deg2rad(points[..., 1])
    haversine = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    distance_km = 2 * 6371.0088 * torch.asin(haversine.sqrt())
    # |N(0, 10)| has mean 10 * sqrt(2 / pi) = 7.98 km.
    torch.testing.assert_close(distance_km.mean(dim=1), torch.full((3,), 7.98, dtype=torch.float64), rtol=0.05, atol=0)


def test_faiss_search_leaves_torch_threads_as_they_were(model, gallery):
    """FAISS and torch share one OpenMP runtime: a search with one FAISS thread must not leave torch on one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.set_gallery(gallery, backend="faiss", index="IVF64,Flat", search_threads=1)
        model.search_gallery(queries_far(model, 3, seed=40), top_k=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
