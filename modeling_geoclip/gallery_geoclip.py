"""Gallery search for GeoCLIP: exact chunked top-k, a FAISS index for million-point galleries, and the local
refinement around the top hits.

A gallery is N GPS points whose L2-normalised location embeddings `e_i` (D each) are scored against a
normalised query `q` as `logit_i = scale * <q, e_i>`; GeoCLIP's probability of point i is
`softmax(logits)_i` over the whole gallery. Both backends return, per query, the top-k logits, their gallery
rows and `log Z = logsumexp(logits)` (exact, or estimated for `faiss`), so `probability = exp(logit - log Z)`.

Backends (`GeoCLIPModel.set_gallery(locations, backend=..., **options)`):

* `exact`: a chunked matmul + running top-k + streaming logsumexp; never holds (B, N) logits. Embeddings can be
  stored in float16/bfloat16 (`embedding_dtype`) to halve memory and bandwidth; scores are accumulated in
  float32. By default (`scan="auto"`: on CPU, for galleries of at least `SCAN_MIN_SIZE` = 65,536 points;
  `scan="int8"` for any gallery larger than `scan_candidates`) the search is two-pass: an int8 copy of the
  embeddings (one scale per row, built when first searched, never saved; a quarter of float32's bytes) is
  scanned with PyTorch's weight-only int8 kernel (`Int8Scan`), and the `scan_candidates` best rows per query
  (default 64) are re-scored exactly on the stored embeddings. The returned hits and their logits are those of
  the exact search unless a true top-k row falls outside the first pass's candidates (int8 scores are within
  ~0.003 of the float32 inner products of unit vectors; `benchmarks/bench_scale.py` measures how often the
  top-5 differ). The normaliser is the candidates' exact mass plus the rest's from the int8 scores
  (log-normaliser within ~0.0015 of the exact one on the official 100K gallery, so probabilities within ~0.15 %
  relative; tested on small galleries).
  `scan="pq4"` (needs `faiss`): the first pass scans 4-bit fast-scan PQ codes (`PQ4Scan`, a sixteenth of
  float32's bytes, trained when first searched, never saved), re-ranks their best 1024 rows per query on int8
  copies and re-scores the best `scan_candidates` of those exactly; the mass of the rows outside the shortlist is
  estimated from a uniform sample of rows, as for `faiss` below (faster than int8, with looser
  probabilities for far queries: see `PQ4Scan`).
  `scan="none"`: one float32 pass, the exact softmax over the gallery (of the stored, possibly rounded,
  embeddings).
* `faiss` (optional dependency, `pip install faiss-cpu`): an inner-product FAISS index (flat; or IVF with 4-bit
  codes re-ranked on the float32 vectors, or above 2**20 points on 8-bit copies: `default_faiss_index`)
  retrieves `n_candidates` hits per query. Their scores are exact model scores: the index ranks them on the
  float32 vectors (`Flat`, `RFlat`) or, for compressed codes (PQ/SQ, `Refine(SQ8)`), the candidates are
  re-scored by re-encoding their coordinates with the location encoder. The normaliser adds the retrieved
  candidates' exact mass to an estimate of the rest: a fixed uniform random sample of `normaliser_sample_size`
  gallery rows (drawn with `seed` at build time, stored with the index) is scored (`NormaliserSample`: with the
  int8 kernel where the CPU has it, within ~0.003 of the float32 scores), the rows that are among the candidates
  are dropped, and the sum of `exp(logit)` over the others is scaled by (N - C) / (their count).
  That estimator is unbiased for the non-retrieved mass (up to that rounding); since the retrieved candidates
  hold nearly all of it for a peaked query, the probabilities of the top hits are close to the exact softmax
  (tests bound the error).

  Recall is calibrated at build time. Queries are image or text embeddings, far from every gallery embedding
  (cosine ~0.2 to the best one for a random-backbone GeoCLIP), where an inverted index needs many more lists
  visited than for queries near gallery points. `FaissGallery.build` computes the exact top-5 of calibration
  queries while it fills the index, picks the smallest `nprobe` whose recall@5 on half of them reaches
  `target_recall` (unless `nprobe` is given), and measures recall@5 on the other, held-out half: that estimate
  is stored in the options as `recall_estimate`. Calibration queries are the caller's (real query embeddings)
  or, by default, a proxy: random unit vectors (isotropic Gaussian directions). They share the property that
  matters, being far from every gallery point with no preferred direction; in `benchmarks/bench_scale.py` their
  recall tracks that of image and text queries through a random-backbone GeoCLIP within about 0.01 at every
  `nprobe` on a 1M-point gallery (sometimes above it, hence the default `target_recall` of 0.995 for a goal of
  0.99), and 0.025-0.035 below it on a 10M synthetic one, while queries near gallery points are far easier
  (recall 1.0 with 6% of the lists visited).

The model holds its gallery as one component, `GeoCLIPGallery` (`model.gallery`): the buffers, building,
searching and the checks of loaded state.

This module imports only torch, numpy and transformers; `faiss` is imported lazily inside the `faiss` backend.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .geo_common import destination_points, from_microdegrees, to_microdegrees, validate_locations
from .integrity import tensor_sha256

logger = logging.get_logger(__name__)

GALLERY_BACKENDS = ("exact", "faiss")
SCAN_KINDS = ("auto", "int8", "pq4", "none")  # the exact backend's first pass
SCAN_MIN_SIZE = 65536  # "auto": the int8 pass from this many gallery rows on (below, float32 takes < 1 ms)
# One int8 part per 131,072 rows: the official 100K gallery is scanned in one part, with one top-k per query.
SCAN_PART_ROWS = 131072
# `torch._weight_int8pack_mm` (torch 2.13, AVX512 CPU) crashed or returned garbage for widths that are not a
# multiple of 16 with more than one query row (and inf for one row); it is only called on multiples of 16.
INT8_KERNEL_WIDTH = 16
INT8_PROBE_TOLERANCE = 0.02  # int8 rounding is ~0.003 of |query| |row|; a broken kernel is off by far more
PQ4_SHORTLIST = 1024  # rows the 4-bit codes pass on to the int8 re-ranking (see `PQ4Scan`)
SCAN_SCORE_BUDGET = 1 << 22  # float32 scores held at once by the two-pass search (16 MB): queries go in groups
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RECALL_AT = 5  # the FAISS calibration measures recall@5 against exact search
# FAISS defaults above this many points: no float32 rows kept (see `default_faiss_index`), and a lower recall
# target for speed (`resolve_gallery_options`).
LARGE_GALLERY = 2**20
RERANK_ROWS = 2048  # code hits re-ranked per query by a refinement stage: k_factor_rf = RERANK_ROWS / n_candidates

# `embed(rows)`: (R,) int64 gallery rows -> (R, D) float32 L2-normalised embeddings of those rows.
EmbedRows = Callable[[torch.Tensor], torch.Tensor]
# `embed(locations)`: (M, 2) float64 degrees -> (M, D) float32 L2-normalised location embeddings.
EmbedLocations = Callable[[torch.Tensor], torch.Tensor]


def _check_options(backend: str, options: dict, allowed: dict) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for gallery backend {backend!r}; allowed: {sorted(allowed)}."
        )
    return {**allowed, **options}


def default_faiss_index(size: int, dim: int) -> str:
    """The FAISS factory string used for a gallery of `size` points of width `dim` when `index` is not given.

    Up to 131,072 points: `Flat` (exact, brute force). Up to 2**20: `IVF{nlist},PQ{dim/2}x4fs,RFlat`: ~4 sqrt(N)
    inverted lists (4096 at 1M) of 4-bit fast-scan PQ codes (one per pair of dimensions: 128 bytes per point at
    D=512, scanned with SIMD lookup tables), and the best `RERANK_ROWS` (2,048) code hits re-ranked on the float32
    vectors (`RFlat`, 2 KB per point). Finer lists than the usual sqrt(N) because image and text queries, far
    from the gallery, need a large share of the lists visited, and finer lists predict better where the hits lie
    (recall@5 of such queries with 12.5% of the lists visited: 0.90 with 1024 lists, 0.95 with 4096, on a
    1M-point gallery). On that gallery the 4-bit codes reached the 8-bit codes' recall (0.995 for image and text
    queries, half of the lists visited) in a third of their time (21 against 62 ms per query;
    `benchmarks/bench_scale.py`). Widths that are odd fall back to `SQ8` codes (512 bytes per point at D=512).
    Above 2**20: the same codes re-ranked on 8-bit copies instead (`Refine(SQ8)`, 512 bytes per point: float32
    rows would take 20 GB at 10M), `max(4096, ~sqrt(N))` lists, and the candidates re-scored exactly by
    re-encoding them (6.1 GB at 10M with coordinates and sample; odd widths: `IVF{nlist},SQ8`). Every default
    IVF index has a flat coarse quantizer: an HNSW one misses the lists of far queries (at 1M with 4096 lists,
    it found the lists of only 91% of image queries' exact top-5 however many lists were asked for; the flat
    one, all of them with half the lists).
    """
    if size <= 2**17:
        return "Flat"
    if size <= LARGE_GALLERY:
        codes = f"PQ{dim // 2}x4fs" if dim % 2 == 0 else "SQ8"
        return f"IVF{2 ** round(math.log2(4 * math.sqrt(size)))},{codes},RFlat"
    lists = max(4096, 2 ** round(math.log2(math.sqrt(size))))
    return f"IVF{lists},PQ{dim // 2}x4fs,Refine(SQ8)" if dim % 2 == 0 else f"IVF{lists},SQ8"


def resolve_gallery_options(backend: str, size: int, options: dict, dim: int) -> dict:
    """Validate the options of a gallery backend and fill in the defaults for a gallery of `size` points of width
    `dim`.

    `exact` options: `embedding_dtype` ("float32" | "float16" | "bfloat16", default "float32"), `chunk_size`
    (gallery rows scored at a time, default 32768), `scan` ("auto" | "int8" | "pq4" | "none", default "auto": a
    first pass over an int8 copy for galleries of at least 65,536 points, see the module docstring),
    `scan_candidates` (rows per query re-scored exactly after the first pass, default 64; "pq4" without the int8
    kernel re-scores its whole 1,024-row shortlist).
    `faiss` options: `index` (a FAISS factory string, default `default_faiss_index(size, dim)`), `nprobe` (IVF lists
    visited per query; default None: calibrated at build time, see the module docstring), `target_recall`
    (recall@5 the calibration aims at, default 0.995 up to `LARGE_GALLERY` = 2**20 points: the random-vector
    proxy's recall ran up to 0.01 above that of image and text queries at the same `nprobe` on 1M points, and
    the goal is 0.99 for those; with real `calibration_queries`, 0.99 is enough. Above: 0.95, for speed; at 10M
    the proxy ran 0.025-0.035 *below* image and text queries, which reached 0.99), `calibration_size` (proxy
    calibration queries, half to tune and half held out to estimate recall, default 512), `ef_search` (HNSW,
    default 128), `n_candidates` (hits retrieved and scored exactly per query, default 64; 16 above 2**20, where
    scoring exactly means re-encoding them: ~1 ms per point), `k_factor_rf` (with a refinement stage such as
    `RFlat`: code hits re-ranked per candidate, default `RERANK_ROWS // n_candidates`, so 2,048 rows: 4-bit codes
    rank coarsely, and re-ranking 2,048 float32 rows costs ~1 ms), `rescore` (re-encode candidates for exact
    scores; default
    True when the index does not end with float32 vectors, `Flat` or `RFlat`), `train_size` (points used to
    train the index, default max(40 * nlist, 10,000)), `normaliser_sample_size` (default 4096), `seed` (default
    0), `search_threads` (FAISS OpenMP threads while searching, default 1: a small-batch search gains little from
    threads, and an active FAISS thread pool slowed PyTorch's own threads ~20x on a 2-core CPU, re-encoding
    included).

    Raises:
        ValueError: for an unknown backend or option, or a bad value.
    """
    if backend not in GALLERY_BACKENDS:
        raise ValueError(f"backend must be one of {GALLERY_BACKENDS}, got {backend!r}.")
    if backend == "exact":
        resolved = _check_options(backend, options, {"embedding_dtype": "float32", "chunk_size": 32768,
                                                     "scan": "auto", "scan_candidates": 64})
        if resolved["embedding_dtype"] not in EMBEDDING_DTYPES:
            raise ValueError(
                f"embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {resolved['embedding_dtype']!r}."
            )
        if resolved["scan"] not in SCAN_KINDS:
            raise ValueError(f"scan must be one of {list(SCAN_KINDS)}, got {resolved['scan']!r}.")
        if resolved["scan"] == "pq4":
            import_faiss()  # fail when the gallery is built, not at its first search
        _check_positive(resolved, ("chunk_size", "scan_candidates"))
        return resolved
    index = options.get("index", default_faiss_index(size, dim))
    if not isinstance(index, str) or not index:
        raise ValueError(f"index must be a FAISS factory string such as 'IVF1024,Flat', got {index!r}.")
    nlist = _ivf_lists(index)
    large = size > LARGE_GALLERY
    resolved = _check_options(backend, options, {
        "index": index,
        "nprobe": None,
        "target_recall": 0.95 if large else 0.995,
        "calibration_size": 512,
        "ef_search": 128,
        "n_candidates": 16 if large else 64,
        "k_factor_rf": None,  # RERANK_ROWS // n_candidates, once n_candidates is checked
        "rescore": not index.endswith("Flat"),  # Flat, RFlat: ranked on the float32 vectors
        "train_size": max(40 * nlist, 10_000),
        "normaliser_sample_size": 4096,
        "seed": 0,
        "search_threads": 1,
    })
    _check_positive(resolved, ("ef_search", "n_candidates", "train_size", "normaliser_sample_size", "search_threads")
                    + tuple(name for name in ("nprobe", "k_factor_rf") if resolved[name] is not None))
    if resolved["k_factor_rf"] is None:
        resolved["k_factor_rf"] = max(1, RERANK_ROWS // resolved["n_candidates"])
    if not isinstance(resolved["rescore"], bool):
        raise ValueError(f"rescore must be True or False, got {resolved['rescore']!r}.")
    target = resolved["target_recall"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target_recall must be a number in (0, 1], got {target!r}.")
    size = resolved["calibration_size"]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"calibration_size must be an integer >= 2 (half tunes, half estimates), got {size!r}.")
    return resolved


def _check_positive(options: dict, names) -> None:
    for name in names:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _ivf_lists(index: str) -> int:
    """Number of inverted lists in a factory string ('IVF1024,Flat' -> 1024), 0 without IVF."""
    for part in index.split(","):
        if part.startswith("IVF"):
            digits = part[3:].split("_")[0]
            if digits.isdigit():
                return int(digits)
    return 0


def import_faiss():
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "The 'faiss' gallery backend needs FAISS: `pip install faiss-cpu` (or `pip install geoloc[faiss]`). "
            "Remote-code users of the Hub model need it too; the 'exact' backend needs nothing extra."
        ) from error
    return faiss


# ----------------------------------------------------------------------------------------------- exact
# Reduced-precision gallery rows upcast at a time into one reused float32 buffer (8 MB at D=512): small
# enough to stay in the CPU caches, so memory traffic is the 2-byte rows alone; upcasting a whole chunk
# allocated (and page-faulted) a fresh 64 MB tensor per chunk, ~6x slower than float32 storage.
UPCAST_ROWS = 4096


def _quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(R, D)` rows -> `(R, D)` int8 codes and `(R,)` bfloat16 scales, symmetric with one scale per row."""
    rows = rows.float()
    scales = rows.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(rows / scales[:, None]).to(torch.int8).contiguous(), scales.to(torch.bfloat16)


class Int8Scan:
    """An int8 copy of gallery embeddings for a fast first pass: rows quantised symmetrically with one scale each
    (a quarter of float32's bytes), scored against bfloat16 queries with PyTorch's weight-only int8 kernel
    (`torch._weight_int8pack_mm`, memory-bound: it reads the int8 rows once), in parts of `part_rows` rows (large:
    each part costs one top-k and merge per query; the search bounds its score buffer by scoring queries in
    groups instead). Scores are within ~0.003 of the float32 inner products of unit vectors (the rows' int8 and
    the output's bfloat16 rounding; the query keeps float32 precision, see `_scores`).

    Build with `Int8Scan.build(embeddings)`, which returns None off the CPU, where PyTorch lacks the kernel, for
    widths that are not a multiple of `INT8_KERNEL_WIDTH`, or where the kernel's scores of the first rows are not
    those of float32 (the search then scans the stored embeddings in full precision).
    """

    def __init__(self, parts: list, size: int):
        self.parts, self.size = parts, size
        # Queries scored together: one part's scores for them (two rows each, see `_scores`) fit in
        # `SCAN_SCORE_BUDGET` floats.
        self.query_group = max(1, SCAN_SCORE_BUDGET // (2 * max((len(codes) for _, codes, _ in parts), default=1)))

    @classmethod
    def build(cls, embeddings: torch.Tensor, part_rows: int = SCAN_PART_ROWS) -> "Int8Scan | None":
        if embeddings.device.type != "cpu" or not len(embeddings):
            return None
        if embeddings.shape[1] % INT8_KERNEL_WIDTH:
            logger.info(f"No int8 gallery scan for {embeddings.shape[1]}-wide embeddings (PyTorch's int8 kernel needs "
                        f"a multiple of {INT8_KERNEL_WIDTH}); scanning the stored embeddings.")
            return None
        parts = []
        try:
            for start in range(0, len(embeddings), part_rows):
                # quantised in blocks: the float32 temporaries stay one block's size, whatever the part's
                blocks = [_quantize_int8(block) for block in embeddings[start : start + part_rows].split(65536)]
                codes, scales = (torch.cat(pieces) for pieces in zip(*blocks))
                parts.append((start, codes, scales))
            # the first rows scored against 8 of them as queries, by the kernel and in float32
            _, codes, scales = parts[0]
            rows = embeddings[: min(1024, len(codes))].float()
            found = cls._scores((0, codes[: len(rows)], scales[: len(rows)]), rows[:8])
            error = (found - rows[:8] @ rows.T).abs().max()
        except (RuntimeError, NotImplementedError, AttributeError) as failure:
            logger.info(f"No int8 gallery scan on this machine ({failure}); scanning the stored embeddings.")
            return None
        if not error <= INT8_PROBE_TOLERANCE * rows.norm(dim=1).max() ** 2:
            logger.warning(f"PyTorch's int8 kernel scored the first gallery rows {error:.3g} away from float32; "
                           "scanning the stored embeddings.")
            return None
        return cls(parts, len(embeddings))

    @staticmethod
    def _scores(part, query: torch.Tensor) -> torch.Tensor:
        """`(B, D)` queries x a part's rows -> `(B, R)` float32 scores. The kernel takes bfloat16 queries, so each
        goes in as two rows, its bfloat16 rounding and the remainder: one rounded query moved the official gallery's
        log-normaliser by up to 0.0044, the pair by up to 0.0015. Free for one query (the kernel computes rows in
        tiles of 4 while reading the codes once); from 3 queries it doubles the kernel's compute, which is why
        large batches are better served by `scan="none"` (README, exact search)."""
        _, codes, scales = part
        high = query.to(torch.bfloat16)
        low = (query.float() - high.float()).to(torch.bfloat16)
        scores = torch._weight_int8pack_mm(torch.cat([high, low]), codes, scales).float()
        return scores[: len(query)] + scores[len(query) :]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """`(B, D)` queries -> `(B, N)` float32 int8 scores of every row (for small copies: no score budget)."""
        return torch.cat([self._scores(part, query) for part in self.parts], dim=1)

    def row_scores(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`(B, D)` queries x their own `(B, C)` rows -> `(B, C)` float32 int8 scores (a copy built in one part;
        one kernel call per query)."""
        (_, codes, scales), = self.parts
        return torch.cat([self._scores((0, codes.index_select(0, its_rows), scales.index_select(0, its_rows)),
                                       one[None])
                          for one, its_rows in zip(query, rows)])

    def first_pass(
        self, query: torch.Tensor, scale: torch.Tensor, candidates: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, others_log_mass)`: the `(B, C)` best rows of `(B, D)` queries by int8 score, and `(B,)` the log
        of the other rows' int8-scored `exp(logit)` mass (all rows' less the candidates'; -inf when the
        candidates are every row)."""
        batch = len(query)
        best = (query.new_empty(batch, 0), torch.empty(batch, 0, dtype=torch.long))
        approximate_mass = query.new_full((batch,), -math.inf)
        for part in self.parts:
            logits = scale * self._scores(part, query)
            approximate_mass = torch.logaddexp(approximate_mass, torch.logsumexp(logits, dim=1))
            chunk_logits, chunk_indices = logits.topk(min(candidates, logits.shape[1]), dim=1)
            best = merge_top_k(best, (chunk_logits, chunk_indices + part[0]), candidates)
        approximate_logits, rows = best
        if rows.shape[1] == self.size:
            return rows, torch.full_like(approximate_mass, -math.inf)
        share = torch.exp(torch.logsumexp(approximate_logits, dim=1) - approximate_mass).clamp(max=1.0)
        return rows, approximate_mass + torch.log1p(-share)


class PQ4Scan:
    """4-bit fast-scan product-quantisation codes of gallery embeddings, re-ranked on int8 copies, for a fast first
    pass. The 4-bit codes (FAISS `PQ{D/2}x4fs`: 128 bytes per row at D=512, a sixteenth of float32's, scanned with
    SIMD lookup tables held in registers) are the only bytes read for every row; they rank coarsely, so their
    best `shortlist` rows per query (`PQ4_SHORTLIST`, 1024) are re-scored on int8 copies of the rows (`Int8Scan`'s
    quantisation and kernel; 512 bytes each, ~0.5 MB read per query), and the int8 order picks the candidates the
    caller re-scores exactly (`scan_candidates`, 64 by default as for `Int8Scan`). On the official 100K gallery,
    far image queries' exact top-5 fell inside the 4-bit shortlist 95.2% of the time with 256 rows, 98.6% with
    512, 99.5% with 1024 (`benchmarks/bench_scale.py`). Without the int8 kernel, the whole shortlist is re-scored
    exactly.

    The others' mass: the rest of the shortlist contributes its int8 logits, and the rows outside it are estimated
    from the normaliser sample (`NormaliserSample`, as for the `faiss` backend): log-normaliser within ~0.12 of
    the exact one for far queries there, so their probabilities are within ~12% relative, against ~0.15% for the
    int8 pass; peaked queries, whose mass the shortlist holds, are far closer.

    Build with `PQ4Scan.build(embeddings)` (needs `faiss`; trains the codebooks on up to 65,536 rows drawn with
    `seed`, ~4 s for the official 100K gallery on 2 cores). Memory: 0.3 bytes per float32 byte of the gallery
    (64 MB for the official one).
    """

    def __init__(self, index, copies: "Int8Scan | None", sample: "NormaliserSample", shortlist: int = PQ4_SHORTLIST):
        self.index, self.copies, self.sample, self.shortlist = index, copies, sample, shortlist
        self.size = index.ntotal
        self.query_group = 64  # bounds the shortlists and the sample's (queries, S) scores per group

    @classmethod
    def build(cls, embeddings: torch.Tensor, seed: int = 0, train_rows: int = 65536,
              sample_size: int = 4096) -> "PQ4Scan":
        faiss = import_faiss()
        rows, dim = embeddings.shape
        if dim % 2:
            raise ValueError(f"scan='pq4' needs an even embedding width (two dimensions per 4-bit code), got {dim}.")
        generator = torch.Generator().manual_seed(seed)
        index = faiss.index_factory(dim, f"PQ{dim // 2}x4fs", faiss.METRIC_INNER_PRODUCT)
        train = torch.randperm(rows, generator=generator)[:train_rows].sort().values
        index.train(_as_faiss(embeddings[train]))
        for start in range(0, rows, 65536):
            index.add(_as_faiss(embeddings[start : start + 65536]))
        sample = torch.randperm(rows, generator=generator)[:sample_size].sort().values
        copies = Int8Scan.build(embeddings, part_rows=rows)  # one part: rows are gathered by gallery index
        return cls(index, copies, NormaliserSample(sample, embeddings[sample].float().cpu(), rows))

    def first_pass(
        self, query: torch.Tensor, scale: torch.Tensor, candidates: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `Int8Scan.first_pass`: the `(B, C)` best rows by int8 score within the 4-bit shortlist, and `(B,)`
        the log of the others' estimated mass (the shortlist's other rows by int8 score, the rest sampled). Where
        C reaches the shortlist or there is no int8 kernel, the whole shortlist is returned, for exact re-scoring."""
        candidates = min(candidates, self.size)
        shortlist = min(max(self.shortlist, candidates), self.size)
        _, rows = faiss_search(self.index, query, shortlist, threads=1)
        rows = torch.from_numpy(rows)
        outside = self.sample.rest_mass(query, scale, rows, torch.full((len(rows),), self.size - shortlist))
        if self.copies is None or shortlist == candidates:  # the whole shortlist is re-scored exactly
            return rows, outside
        approximate = scale * self.copies.row_scores(query, rows)
        order = approximate.topk(candidates, dim=1).indices
        others = torch.cat([approximate.scatter(1, order, -math.inf), outside[:, None]], dim=1)
        return rows.gather(1, order), torch.logsumexp(others, dim=1)


def exact_search(
    query: torch.Tensor, embeddings: torch.Tensor, scale: torch.Tensor, top_k: int, chunk_size: int = 32768,
    scan: "Int8Scan | PQ4Scan | None" = None, scan_candidates: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k over a stored gallery in chunks, never holding all (B, N) logits at once.

    Args:
        query (`torch.FloatTensor` of shape `(B, D)`): L2-normalised queries.
        embeddings (`torch.Tensor` of shape `(N, D)`): L2-normalised gallery embeddings, float32/16 or bfloat16;
            reduced-precision rows are upcast `UPCAST_ROWS` at a time so that scores are computed and
            accumulated in float32 (the same scores as `embeddings.float()`, up to summation order).
        scale (`torch.Tensor` of shape `()`): the logit scale (exp of the log temperature).
        top_k (`int`): hits per query, <= N.
        chunk_size (`int`): gallery rows scored at a time.
        scan (`Int8Scan` or `PQ4Scan`, *optional*): an int8 copy or 4-bit codes of `embeddings` for a first pass
            (see the module docstring); its `max(scan_candidates, top_k)` best rows per query (`PQ4Scan` without
            the int8 kernel: its whole shortlist) are re-scored on `embeddings`.

    Returns: `(logits, indices, log_normaliser)`: `(B, top_k)` float32 logits and int64 rows, best first, and
    `(B,)` float32 `logsumexp` of all N logits (with `scan`: the re-scored rows' exact logits plus the first
    pass's estimate of the others' mass, see `Int8Scan` and `PQ4Scan`).
    """
    query = query.float()
    scale = scale.float()
    if scan is not None and scan.size == len(embeddings) and query.device.type == "cpu":
        return _two_pass_search(query, embeddings, scale, top_k, scan, max(scan_candidates, top_k))
    batch = len(query)
    best_logits = query.new_empty(batch, 0)
    best_indices = torch.empty(batch, 0, dtype=torch.long, device=query.device)
    log_normaliser = query.new_full((batch,), -math.inf)
    upcast = None
    if embeddings.dtype != torch.float32:
        upcast = query.new_empty(min(UPCAST_ROWS, len(embeddings)), embeddings.shape[1])
    for start in range(0, len(embeddings), chunk_size):
        logits = scale * _similarities(query, embeddings[start : start + chunk_size], upcast)
        log_normaliser = torch.logaddexp(log_normaliser, torch.logsumexp(logits, dim=1))
        chunk_logits, chunk_indices = logits.topk(min(top_k, logits.shape[1]), dim=1)
        best_logits, best_indices = merge_top_k(
            (best_logits, best_indices), (chunk_logits, chunk_indices + start), top_k
        )
    return best_logits, best_indices, log_normaliser


def _two_pass_search(
    query: torch.Tensor, embeddings: torch.Tensor, scale: torch.Tensor, top_k: int, scan: "Int8Scan | PQ4Scan",
    candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`exact_search` through a first-pass `scan`: its best `candidates` rows per query re-scored on `embeddings`;
    the normaliser adds the scan's estimate of the other rows' mass to the candidates' exact mass. Queries go in
    groups of `scan.query_group` (bounded score buffers, whatever the batch)."""
    found = [_two_pass_group(part, embeddings, scale, top_k, scan, candidates)
             for part in query.split(scan.query_group)]
    return tuple(torch.cat(pieces) for pieces in zip(*found))


def _two_pass_group(
    query: torch.Tensor, embeddings: torch.Tensor, scale: torch.Tensor, top_k: int, scan: "Int8Scan | PQ4Scan",
    candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, others = scan.first_pass(query, scale, candidates)
    exact_logits = scale * _rows_similarities(query, embeddings, rows)
    log_normaliser = torch.logaddexp(torch.logsumexp(exact_logits, dim=1), others)
    logits, order = exact_logits.topk(top_k, dim=1)
    return logits, rows.gather(1, order), log_normaliser


def _rows_similarities(query: torch.Tensor, embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, D) float32 queries x their own (B, C) gallery rows -> (B, C) float32 inner products (`index_select`:
    advanced indexing took ~2x longer to gather the rows)."""
    gathered = embeddings.index_select(0, rows.flatten()).float().view(*rows.shape, -1)
    return torch.einsum("bd,bcd->bc", query, gathered)


def merge_top_k(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `top_k` of two `(scores, indices)` lists of shapes `(B, k1)` and `(B, k2)`: `(B, min(top_k,
    k1 + k2))` scores and their indices, best first (for top-k over a gallery that arrives in parts)."""
    scores = torch.cat([first[0], second[0]], 1)
    scores, order = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return scores, torch.cat([first[1], second[1]], 1).gather(1, order)


def _similarities(query: torch.Tensor, rows: torch.Tensor, upcast: torch.Tensor | None) -> torch.Tensor:
    """(B, D) float32 queries x (n, D) rows -> (B, n) float32 inner products; `upcast` (`(U, D)` float32, reused)
    receives reduced-precision rows U at a time."""
    if upcast is None:
        return query @ rows.T
    transposed = query.new_empty(len(rows), len(query))  # (n, B): each block's product lands contiguous
    for start in range(0, len(rows), len(upcast)):
        block = upcast[: min(len(upcast), len(rows) - start)]
        block.copy_(rows[start : start + len(block)])
        torch.mm(block, query.T, out=transposed[start : start + len(block)])
    return transposed.T


# ----------------------------------------------------------------------------------------------- faiss
class FaissGallery:
    """A FAISS inner-product index over N normalised embeddings, with the normaliser sample.

    Args:
        index: a trained, filled `faiss.Index` (inner product) over the N gallery embeddings.
        sample_indices (`torch.LongTensor` of shape `(S,)`): the gallery rows of the normaliser sample.
        sample_embeddings (`torch.FloatTensor` of shape `(S, D)`): their embeddings.
        options (`dict`): resolved options (see `resolve_gallery_options`); after `build`, `nprobe` is set and
            `recall_estimate` is added.
    """

    def __init__(self, index, sample_indices: torch.Tensor, sample_embeddings: torch.Tensor, options: dict):
        self.index = index
        self.sample = NormaliserSample(sample_indices, sample_embeddings, index.ntotal)
        self.options = options

    @classmethod
    def build(
        cls, embed: EmbedRows, size: int, dim: int, options: dict, calibration_queries: torch.Tensor | None = None,
        batch_size: int = 16384, show_progress: bool = False,
    ) -> "FaissGallery":
        """Train and fill an index from `embed`, batch by batch (peak memory: the index plus one batch), and
        calibrate its recall (see the module docstring).

        Args:
            embed: `(R,)` rows -> `(R, D)` normalised float32 embeddings (the location encoder in the model).
            size (`int`): N, the number of gallery points. dim (`int`): D.
            options (`dict`): resolved options; `nprobe` and `recall_estimate` are filled in.
            calibration_queries (`torch.FloatTensor` of shape `(Q, D)`, *optional*): query embeddings like those
                the gallery will serve (Q >= 2; normalised here); default: `calibration_size` random unit vectors.
            batch_size (`int`), show_progress (`bool`): encoding batches.
        """
        faiss = import_faiss()
        index = faiss.index_factory(dim, options["index"], faiss.METRIC_INNER_PRODUCT)
        generator = torch.Generator().manual_seed(options["seed"])
        if not index.is_trained:
            train_rows = torch.randperm(size, generator=generator)[: options["train_size"]].sort().values
            index.train(_as_faiss(torch.cat([embed(rows) for rows in train_rows.split(batch_size)])))
        if calibration_queries is None:
            source = f"proxy: {options['calibration_size']} random unit vectors"
            calibration_queries = torch.randn(options["calibration_size"], dim, generator=generator)
        else:
            source = f"calibration_queries ({len(calibration_queries)})"
        queries = torch.nn.functional.normalize(calibration_queries.detach().float().cpu(), dim=-1)
        top_k = min(RECALL_AT, size)
        truth = (queries.new_empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long))
        rows = torch.arange(size).split(batch_size)
        for batch in logging.tqdm(rows, desc="Encoding gallery", disable=not show_progress):
            embeddings = embed(batch)
            index.add(_as_faiss(embeddings))
            scores, hits, _ = exact_search(queries, embeddings, torch.ones(()), top_k)
            truth = merge_top_k(truth, (scores, hits + batch[0]), top_k)
        sample = torch.randperm(size, generator=generator)[: options["normaliser_sample_size"]].sort().values
        gallery = cls(index, sample, embed(sample).float(), options)
        gallery.calibrate(queries, truth[1], embed, source)
        return gallery

    def calibrate(self, queries: torch.Tensor, truth: torch.Tensor, embed: EmbedRows, source: str) -> None:
        """Choose `nprobe` (for an IVF index whose options leave it None) on the even-numbered queries, and store
        the recall@5 on the odd-numbered, held-out ones in `options["recall_estimate"]`.

        `nprobe` climbs by factors of sqrt(2) from nlist / 256 and stops at the first value whose recall reaches
        `target_recall`, or where two steps in a row gained less than 0.002 (recall limited by the codes, not by
        the lists visited: more lists would only cost time).

        Args:
            queries (`torch.FloatTensor` of shape `(Q, D)`): normalised calibration queries.
            truth (`torch.LongTensor` of shape `(Q, k)`): their exact top-k gallery rows, k <= 5.
            embed: rows -> embeddings, for re-scoring. source (`str`): where the queries come from, stored.
        """
        tune, held_out = slice(0, None, 2), slice(1, None, 2)
        nlist = _ivf_lists(self.options["index"])
        if self.options["nprobe"] is None and nlist:
            recalls, ladder = [], _nprobe_ladder(nlist)
            for nprobe in ladder:
                self.options["nprobe"] = nprobe
                recalls.append(self._recall(queries[tune], truth[tune], embed))
                if recalls[-1] >= self.options["target_recall"]:
                    break
                if len(recalls) >= 3 and recalls[-1] - recalls[-2] < 0.002 and recalls[-2] - recalls[-3] < 0.002:
                    self.options["nprobe"] = ladder[len(recalls) - 3]
                    break
        recall = self._recall(queries[held_out], truth[held_out], embed)
        self.options["recall_estimate"] = {
            f"recall_at_{truth.shape[1]}": round(recall, 4), "queries": len(truth[held_out]), "query_source": source,
            "nprobe": self.options["nprobe"],
        }
        if recall < self.options["target_recall"]:
            logger.warning(
                f"The FAISS gallery reaches recall@{truth.shape[1]} {recall:.3f} against exact search on held-out "
                f"calibration queries, below target_recall={self.options['target_recall']}: pass a larger nprobe, "
                f"another index, or use backend='exact'."
            )

    def _recall(self, queries: torch.Tensor, truth: torch.Tensor, embed: EmbedRows) -> float:
        """Mean |found top-k ∩ exact top-k| / k over `(Q, D)` queries with `(Q, k)` exact rows."""
        logits, indices = self._candidates(queries, torch.ones(()), truth.shape[1], embed)
        found = indices.gather(1, logits.topk(truth.shape[1], dim=1).indices)
        return (found[:, :, None] == truth[:, None, :]).any(-1).float().mean().item()

    def serialize(self) -> torch.Tensor:
        """The index as a `(nbytes,)` uint8 tensor (`faiss.serialize_index`; no pickle)."""
        return torch.from_numpy(import_faiss().serialize_index(self.index))

    def search(
        self, query: torch.Tensor, scale: torch.Tensor, top_k: int, embed: EmbedRows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Approximate top-k with exact scores of the hits and an estimated normaliser.

        Args:
            query (`torch.FloatTensor` of shape `(B, D)`): L2-normalised queries.
            scale (`torch.Tensor` of shape `()`): the logit scale.
            top_k (`int`): hits per query.
            embed: rows -> normalised embeddings, used to re-score compressed codes exactly.

        Returns: `(logits, indices, log_normaliser)` as `exact_search` (`(B, top_k)`, `(B, top_k)`, `(B,)`),
        with `log_normaliser` estimated as described in the module docstring.

        Raises:
            ValueError: when the index returns fewer than `top_k` hits for a query (raise `nprobe`).
        """
        query = query.float().cpu()
        scale = scale.float().cpu()
        size = self.index.ntotal
        logits, indices = self._candidates(query, scale, top_k, embed)
        rest_mass = self.sample.rest_mass(query, scale, indices, size - (indices >= 0).sum(1))
        log_normaliser = torch.logaddexp(torch.logsumexp(logits, dim=1), rest_mass)
        best_logits, order = logits.topk(top_k, dim=1)
        return best_logits, indices.gather(1, order), log_normaliser

    def _candidates(
        self, query: torch.Tensor, scale: torch.Tensor, top_k: int, embed: EmbedRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits, indices)`, both `(B, C)`: the index's `C = max(n_candidates, top_k)` hits for `(B, D)` float32
        CPU queries, with exact logits (-inf and index -1 where the index found fewer than C)."""
        faiss = import_faiss()
        n_candidates = min(max(self.options["n_candidates"], top_k), self.index.ntotal)
        parameters = faiss.ParameterSpace()
        if _ivf_lists(self.options["index"]):
            parameters.set_index_parameter(self.index, "nprobe", self.options["nprobe"])
        if "HNSW" in self.options["index"]:
            parameters.set_index_parameter(self.index, "efSearch", self.options["ef_search"])
        if "RFlat" in self.options["index"] or "Refine(" in self.options["index"]:
            parameters.set_index_parameter(self.index, "k_factor_rf", self.options.get("k_factor_rf", 32))
        similarities, indices = faiss_search(self.index, query, n_candidates, self.options.get("search_threads", 1))
        indices = torch.from_numpy(indices)
        found = indices >= 0
        if int(found.sum(1).min()) < top_k:
            raise ValueError(
                f"The FAISS index returned fewer than top_k={top_k} hits for some query; raise the gallery "
                f"option nprobe (now {self.options['nprobe']}) or use a smaller top_k."
            )
        if self.options["rescore"]:
            rows = indices.clamp(min=0)
            candidates = embed(rows.flatten()).float().view(*rows.shape, -1)
            logits = scale * torch.einsum("bd,bcd->bc", query, candidates)
        else:
            logits = scale * torch.from_numpy(similarities)
        return logits.masked_fill(~found, -math.inf), indices


def faiss_search(index, query: torch.Tensor, count: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` of `(B, D)` queries for `count` hits on `threads` OpenMP threads: `(B, count)` similarities
    and rows (-1 where fewer were found)."""
    faiss = import_faiss()
    # FAISS and torch share one OpenMP runtime: restore its thread count, or torch keeps FAISS's afterwards.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return index.search(_as_faiss(query), count)
    finally:
        faiss.omp_set_num_threads(previous)


class NormaliserSample:
    """A fixed uniform random sample of gallery rows, scored to estimate the `exp(logit)` mass of the rows a
    search did not retrieve (the `faiss` backend and the `pq4` first pass): the sample rows among a query's
    retrieved rows are dropped and the others' sum is scaled by (rows not retrieved) / (sample rows kept),
    unbiased for that mass. Rows are scored with the int8 kernel where the CPU has it (a quarter of the bytes;
    scores within ~0.003, far below the sampling error), else in float32.

    Args:
        indices (`torch.LongTensor` of shape `(S,)`): the sampled gallery rows, sorted, distinct.
        embeddings (`torch.FloatTensor` of shape `(S, D)`): their embeddings.
        size (`int`): N, the gallery's rows.
    """

    def __init__(self, indices: torch.Tensor, embeddings: torch.Tensor, size: int):
        self.indices, self.embeddings = indices, embeddings
        self.scan = Int8Scan.build(embeddings) if len(embeddings) else None
        # Each gallery row's place in the sample, S for rows outside it: membership is one lookup per
        # retrieved row (2 bytes per gallery row below 32,768 sample rows, else 4: 20 MB at 10M points with the
        # default 4,096). One more entry, S, answers row -1.
        count = len(indices)
        self.slots = torch.full((size + 1,), count, dtype=torch.int16 if count < 2**15 else torch.int32)
        self.slots[indices] = torch.arange(count, dtype=self.slots.dtype)

    def rest_mass(self, query: torch.Tensor, scale: torch.Tensor, retrieved: torch.Tensor,
                  rest: torch.Tensor) -> torch.Tensor:
        """Estimated log of the `exp(logit)` mass of the rows not retrieved.

        Args:
            query (`(B, D)`), scale (`()`): the normalised queries and the logit scale.
            retrieved (`(B, C)` int64): each query's retrieved rows, distinct; -1 for "not found" (no row).
            rest (`(B,)` int64): how many gallery rows each query did not retrieve.

        Returns: `(B,)` float32, -inf where every row was retrieved or no sample row is left.
        """
        count = len(self.indices)
        if self.scan is None:
            logits = scale * query @ self.embeddings.T
        else:
            logits = scale * self.scan.scores(query)
        slots = self.slots[retrieved].long()  # -1 ("not found") indexes the last entry: S, outside the sample
        in_retrieved = torch.zeros(len(query), count + 1, dtype=torch.bool).scatter_(1, slots, True)[:, :count]
        kept = count - in_retrieved.sum(1)
        mass = torch.logsumexp(logits.masked_fill(in_retrieved, -math.inf), dim=1)
        mass = mass + torch.log(rest / kept.clamp(min=1))
        return mass.masked_fill((rest == 0) | (kept == 0), -math.inf)


def _nprobe_ladder(nlist: int) -> list[int]:
    """The `nprobe` values calibration tries: from nlist / 256 (at least 1) up to nlist by factors of sqrt(2).

    Example:
        >>> _nprobe_ladder(64)
        [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64]
    """
    values, value = [], max(1.0, nlist / 256)
    while round(value) < nlist:
        values.append(round(value))
        value *= math.sqrt(2)
    return sorted(set(values)) + [nlist]


def _as_faiss(embeddings: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(embeddings.detach().float().cpu().numpy())


# ------------------------------------------------------------------------------------------ refinement
def sample_around(
    locations: torch.Tensor, radius_km: float, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random points around each location on the sphere: bearing uniform, distance |N(0, radius_km)|.

    Args:
        locations (`torch.Tensor` of shape `(M, 2)`): centres, (latitude, longitude) degrees.
        radius_km (`float`): standard deviation of the distance from the centre, km.
        num_samples (`int`): points per centre.

    Returns: `torch.DoubleTensor` of shape `(M, num_samples, 2)`, valid (lat, lon) degrees (longitudes wrapped
    into [-180, 180) because they are sampled here, not given by a user).

    Example:
        >>> sample_around(torch.tensor([[0.0, 179.9]]), 25.0, 4).shape
        torch.Size([1, 4, 2])
    """
    locations = locations.to(torch.float64)
    shape = (len(locations), num_samples)
    bearings = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * math.pi
    distances = torch.randn(shape, generator=generator, dtype=torch.float64).abs() * radius_km
    return destination_points(locations, bearings, distances)


def refine_hits(
    query: torch.Tensor,
    scale: torch.Tensor,
    hit_locations: torch.Tensor,
    hit_logits: torch.Tensor,
    log_normaliser: torch.Tensor,
    embed_locations: Callable[[torch.Tensor], torch.Tensor],
    radius_km: float = 25.0,
    num_samples: int = 64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local refinement: sample points around each top hit, score them, and re-rank hits + samples.

    Every hit keeps its place in the candidate set, so refinement never lowers the best score. Probabilities
    are a softmax over the gallery extended by the sampled points: the samples' mass is added to the gallery's
    normaliser.

    Args:
        query (`torch.FloatTensor` of shape `(B, D)`): normalised queries. scale (`torch.Tensor`, `()`).
        hit_locations (`torch.Tensor` of shape `(B, K, 2)`): the gallery's top hits, degrees.
        hit_logits (`torch.FloatTensor` of shape `(B, K)`): their logits.
        log_normaliser (`torch.FloatTensor` of shape `(B,)`): the gallery's log normaliser.
        embed_locations: `(M, 2)` degrees -> `(M, D)` normalised float32 embeddings (the location encoder).
        radius_km (`float`), num_samples (`int`): see `sample_around`; seed (`int`): sampling seed.

    Returns: `(locations, probabilities, source)`: `(B, K, 2)` float64 degrees, `(B, K)` float32, and `(B, K)`
    int64: the position of the point among the input hits, or -1 where it is a sampled point.
    """
    if not radius_km > 0 or isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"refine needs radius_km > 0 and an integer num_samples >= 1, got {radius_km!r}, {num_samples!r}."
        )
    batch, top_k = hit_logits.shape
    generator = torch.Generator().manual_seed(seed)
    samples = sample_around(hit_locations.reshape(-1, 2).cpu(), radius_km, num_samples, generator)
    samples = samples.reshape(batch, top_k * num_samples, 2)
    sample_embeds = embed_locations(samples.reshape(-1, 2)).float().reshape(batch, top_k * num_samples, -1)
    sample_logits = scale.float() * torch.einsum("bd,bnd->bn", query.float(), sample_embeds.to(query.device))
    log_normaliser = torch.logaddexp(log_normaliser, torch.logsumexp(sample_logits, dim=1))
    logits = torch.cat([hit_logits, sample_logits], dim=1)
    locations = torch.cat([hit_locations.to(torch.float64).cpu(), samples], dim=1)
    best, order = logits.topk(top_k, dim=1)
    chosen = locations.gather(1, order.cpu()[..., None].expand(-1, -1, 2))
    source = torch.where(order < top_k, order, -1)
    return chosen.to(query.device), torch.exp(best - log_normaliser[:, None]), source


# ------------------------------------------------------------------------------------------- component
class GeoCLIPGallery(nn.Module):
    """A GeoCLIP model's retrieval gallery: N GPS points with their stored embeddings (`exact`) or FAISS index
    (`faiss`), how they are searched, and the checks of loaded gallery state. The model owns it as `model.gallery`
    and gives it the location encoder (`embed`) where points must be encoded; the gallery records its size,
    backend and options in the model's config (`gallery_size`, `gallery_backend`, `gallery_options`,
    `gallery_index_nbytes`, `gallery_index_sha256`), which is how `from_pretrained` knows the buffers' shapes.

    Buffers, saved when non-empty (their shapes follow the config, so saving and loading agree on the keys):
    `coordinates` (N, 2) int32 micro-degrees; `embeddings` (N, D) for `exact` (in `embedding_dtype`), (0, D) for
    `faiss`; `faiss_index` (nbytes,) uint8, the serialised FAISS index; `sample_indices` (S,) int64 (distinct
    rows, increasing) and `sample_embeddings` (S, D) float32, the FAISS normaliser sample (empty for `exact`).
    Casting the model (`model.to(torch.bfloat16)`) moves them between devices but never changes their dtypes: the
    stored precision is the one `embedding_dtype` chose.

    Args:
        config: the model's `GeoCLIPConfig` (shared, not copied: building a gallery writes its fields).
    """

    def __init__(self, config):
        super().__init__()
        self.model_config = config
        self._faiss = None
        self._scan_cache = None
        self.reset()

    def reset(self) -> None:
        """(Re)create the buffers with the shapes the config describes (zeros until loaded or built)."""
        config, dim = self.model_config, self.model_config.projection_dim
        options = config.gallery_options or {}
        exact = config.gallery_backend == "exact"
        dtype = EMBEDDING_DTYPES[options.get("embedding_dtype", "float32")] if exact else torch.float32
        sample = 0 if exact else min(options.get("normaliser_sample_size", 0), config.gallery_size)
        register_state(self, "coordinates", torch.zeros(config.gallery_size, 2, dtype=torch.int32))
        register_state(self, "embeddings", torch.zeros(config.gallery_size if exact else 0, dim, dtype=dtype))
        register_state(self, "faiss_index", torch.zeros(config.gallery_index_nbytes, dtype=torch.uint8))
        register_state(self, "sample_indices", torch.zeros(sample, dtype=torch.long))
        register_state(self, "sample_embeddings", torch.zeros(sample, dim, dtype=torch.float32))
        self._faiss = None

    def _apply(self, fn, recurse=True):
        # Device moves only: a model-wide dtype cast must not round the stored embeddings (see the class docstring).
        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            return converted if converted.dtype == tensor.dtype else tensor.to(converted.device)

        return super()._apply(keep_dtype, recurse)

    @property
    def locations(self) -> torch.Tensor:
        """The gallery as (N, 2) float64 degrees (lat, lon)."""
        return from_microdegrees(self.coordinates)

    # -------------------------------------------------------------------------------------------- checks
    def check_loaded_state(self, require_hashes: bool = True) -> None:
        """Checks of loaded gallery state that shapes and finiteness cannot show: coordinates in range, the
        normaliser sample's rows in bounds, distinct and increasing, and the FAISS index bytes matching the SHA-256
        that `build` recorded in the config (an index without one only with `require_hashes=False`), then
        deserialised and searched once, so that crafted bytes fail here rather than at the first query.

        Raises:
            ValueError: naming the bad tensor (and row).
        """
        validate_locations(self.locations, "checkpoint gallery.coordinates")
        rows, size = self.sample_indices, self.model_config.gallery_size
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < size):
            raise ValueError(
                f"The checkpoint's gallery.sample_indices must be gallery rows in [0, {size}), "
                f"got values in [{int(rows.min())}, {int(rows.max())}]."
            )
        if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("The checkpoint's gallery.sample_indices must be distinct rows in increasing order.")
        self._check_faiss_index_hash(require_hashes)
        self._load_faiss_index()

    def _check_faiss_index_hash(self, require_hashes: bool) -> None:
        config = self.model_config
        if not config.gallery_index_nbytes:
            return
        expected = config.gallery_index_sha256
        if expected is None and require_hashes:
            raise ValueError(
                "This checkpoint records no SHA-256 of its FAISS index (gallery_index_sha256 is null): its bytes "
                "cannot be checked. Rebuild the gallery with set_gallery(..., backend='faiss') and save again, or "
                "pass require_hashes=False to from_pretrained (only for a checkpoint you trust)."
            )
        if expected is not None and tensor_sha256(self.faiss_index) != expected:
            raise ValueError(
                f"The checkpoint's FAISS index (gallery.faiss_index, {config.gallery_index_nbytes} bytes) does not "
                f"match the SHA-256 recorded in its config ({expected[:12]}...): the file is corrupt or was edited. "
                "Rebuild the gallery with set_gallery(..., backend='faiss') and save again."
            )

    def _load_faiss_index(self) -> None:
        """Deserialise the stored FAISS index and check it against the gallery (rows, width, one search)."""
        config = self.model_config
        if config.gallery_backend != "faiss" or not config.gallery_index_nbytes:
            return
        size, dim = config.gallery_size, config.projection_dim
        try:
            # `serialize()` bytes: faiss's own format, no pickle
            index = import_faiss().deserialize_index(self.faiss_index.cpu().numpy())
            rows = None
            if index.ntotal == size and index.d == dim:
                _, rows = index.search(np.zeros((1, dim), dtype=np.float32), 1)
        except (RuntimeError, TypeError, ValueError) as error:  # faiss raises RuntimeError for bad bytes
            raise ValueError(f"The checkpoint's FAISS index (gallery.faiss_index) cannot be read: {error}") from None
        if rows is None or not 0 <= int(rows.max()) < size:
            raise ValueError(
                f"The checkpoint's FAISS index holds {index.ntotal} vectors of width {index.d}, "
                f"not the gallery's {size} of width {dim}: the index does not belong to this gallery."
            )
        self._faiss = FaissGallery(index, self.sample_indices.cpu(), self.sample_embeddings.float().cpu(),
                                   config.gallery_options or {})

    # --------------------------------------------------------------------------------------------- build
    def build(
        self, locations, embed: EmbedLocations, batch_size: int = 16384, show_progress: bool = False,
        backend: str = "exact", calibration_queries: torch.Tensor | None = None, **index_options,
    ) -> None:
        """Replace the gallery: encode `locations` with `embed` in batches and build the search structure.
        `GeoCLIPModel.set_gallery` documents the arguments and what each backend's probabilities mean.

        Args:
            embed: `(M, 2)` float64 degrees -> `(M, D)` float32 L2-normalised embeddings (the location encoder).
        """
        locations = validate_locations(locations, "gallery locations").to(torch.float64)
        if len(locations) == 0:
            raise ValueError("The gallery must hold at least one location.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        options = resolve_gallery_options(backend, len(locations), index_options, self.model_config.projection_dim)
        if calibration_queries is not None:
            calibration_queries = self._check_calibration_queries(calibration_queries, backend)
        coordinates = to_microdegrees(locations)
        rounded = from_microdegrees(coordinates)
        embed_rows = lambda rows: embed(rounded[rows])
        if backend == "exact":
            dtype = EMBEDDING_DTYPES[options["embedding_dtype"]]
            batches = torch.arange(len(coordinates)).split(batch_size)
            embeddings = torch.cat([
                embed_rows(rows).to(dtype)
                for rows in logging.tqdm(batches, desc="Encoding gallery", disable=not show_progress)
            ])
            self._store(coordinates, backend, options, embeddings=embeddings)
        else:
            built = FaissGallery.build(embed_rows, len(coordinates), self.model_config.projection_dim, options,
                                       calibration_queries, batch_size=batch_size, show_progress=show_progress)
            self._store(coordinates, backend, options, built=built)

    def _store(self, coordinates: torch.Tensor, backend: str, options: dict,
               embeddings: torch.Tensor | None = None, built: FaissGallery | None = None) -> None:
        """Record a built gallery in the config and the buffers: `(N, 2)` micro-degree `coordinates` with their
        `(N, D)` `embeddings` (`"exact"`) or the `built` FAISS gallery (`"faiss"`)."""
        config = self.model_config
        index_bytes = None if backend == "exact" else built.serialize()
        config.gallery_size, config.gallery_backend = len(coordinates), backend
        config.gallery_options = options
        config.gallery_index_nbytes = 0 if backend == "exact" else len(index_bytes)
        config.gallery_index_sha256 = None if backend == "exact" else tensor_sha256(index_bytes)
        device = self.coordinates.device
        self.reset()
        self.coordinates = coordinates.to(device)
        if backend == "exact":
            self.embeddings = embeddings.to(device)
        else:
            self.faiss_index = index_bytes.to(device)
            self.sample_indices = built.sample.indices.to(device)
            self.sample_embeddings = built.sample.embeddings.to(device)
            self._faiss = built

    def _check_calibration_queries(self, queries, backend: str) -> torch.Tensor:
        """`(Q, projection_dim)` calibration queries as a float32 tensor, or a ValueError saying what is wrong."""
        if backend != "faiss":
            raise ValueError(
                f"calibration_queries only apply to backend='faiss' (exact search needs none), got {backend!r}."
            )
        queries = torch.as_tensor(queries)
        dim = self.model_config.projection_dim
        if queries.ndim != 2 or queries.shape[0] < 2 or queries.shape[1] != dim:
            raise ValueError(f"calibration_queries must have shape (Q>=2, {dim}), got {tuple(queries.shape)}.")
        queries = queries.float()
        if not torch.isfinite(queries).all() or (queries.norm(dim=1) == 0).any():
            raise ValueError("calibration_queries must be finite, non-zero query embeddings.")
        return queries

    # -------------------------------------------------------------------------------------------- search
    def search(
        self, query: torch.Tensor, scale: torch.Tensor, top_k: int, embed: EmbedLocations
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k over the gallery with the backend chosen by `build`.

        Args:
            query (`torch.FloatTensor` of shape `(B, D)`): L2-normalised queries.
            scale (`torch.Tensor` of shape `()`): the logit scale.
            top_k (`int`): hits per query, <= N.
            embed: as in `build`; `faiss` re-scores compressed candidates with it.

        Returns: `(logits, indices, log_normaliser)`: `(B, top_k)` float32 and int64, best first, and `(B,)`.
        """
        options = self.model_config.gallery_options or {}
        if self.model_config.gallery_backend == "exact":
            return exact_search(query, self.embeddings, scale, top_k, options.get("chunk_size", 32768),
                                scan=self._first_pass_scan(), scan_candidates=options.get("scan_candidates", 64))
        if self._faiss is None:  # restored by from_pretrained: rebuild from the stored bytes
            self._load_faiss_index()
        if self._faiss is None:
            raise ValueError("The gallery's backend is 'faiss' but it holds no FAISS index (gallery_index_nbytes is "
                             "0): rebuild it with set_gallery.")
        self._faiss.options = options
        embed_rows = lambda rows: embed(from_microdegrees(self.coordinates[rows.to(self.coordinates.device)]))
        logits, indices, log_normaliser = self._faiss.search(query, scale, top_k, embed_rows)
        return logits.to(query.device), indices.to(query.device), log_normaliser.to(query.device)

    def _first_pass_scan(self) -> "Int8Scan | PQ4Scan | None":
        """The exact backend's first-pass structure for its `scan` option, built from `embeddings` on first use
        and rebuilt whenever they change (replaced, moved, or written in place as loading does): an int8 copy
        (`"int8"`, and `"auto"` from `SCAN_MIN_SIZE` rows), 4-bit PQ codes (`"pq4"`), or None (`"none"`,
        galleries of at most `scan_candidates` points, off the CPU, or no int8 kernel)."""
        options = self.model_config.gallery_options or {}
        kind = options.get("scan", "auto")
        if kind == "auto":
            kind = "int8" if self.model_config.gallery_size >= SCAN_MIN_SIZE else "none"
        embeddings = self.embeddings
        key = (kind, embeddings.data_ptr(), embeddings._version, tuple(embeddings.shape), embeddings.dtype,
               embeddings.device)
        if self._scan_cache is None or self._scan_cache[0] != key:
            scan = None
            searchable = embeddings.device.type == "cpu" and len(embeddings) > options.get("scan_candidates", 64)
            if kind != "none" and searchable:
                scan = PQ4Scan.build(embeddings) if kind == "pq4" else Int8Scan.build(embeddings)
            self._scan_cache = (key, scan)
        return self._scan_cache[1]


def register_state(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register (or replace) a buffer that checkpoints hold only when non-empty: safetensors would take empty
    tensors for shared storage."""
    module.register_buffer(name, tensor, persistent=tensor.numel() > 0)


__all__ = [
    "EMBEDDING_DTYPES",
    "GALLERY_BACKENDS",
    "FaissGallery",
    "GeoCLIPGallery",
    "Int8Scan",
    "PQ4Scan",
    "SCAN_KINDS",
    "SCAN_MIN_SIZE",
    "default_faiss_index",
    "exact_search",
    "import_faiss",
    "merge_top_k",
    "refine_hits",
    "register_state",
    "resolve_gallery_options",
    "sample_around",
]
