"""GeoHier at paper size on CPU: the three published GeoEstimation partitions (3,298 / 7,202 / 12,893 cells) as
classifier heads and cell table, and synthetic backbone tokens that encode the fine cell (the image tower is
bypassed through `backbone_hidden_states`, which a frozen backbone allows). The decoder is narrow (width 64) so that
the check runs in seconds; the heads and the hierarchy are the paper's."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoloc.configs import tiny_geohier_config
from geoloc.geography.geocells import load_geoestimation_partitions
from modeling_geohier import GeoHierModel

PARTITIONS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "geoestimation-partitions")
PARTITION_FILES = [os.path.join(PARTITIONS, f"cells_50_{tau}.csv") for tau in (5000, 2000, 1000)]
TOKENS = 4


@pytest.fixture(scope="module")
def cells():
    if not all(os.path.isfile(path) for path in PARTITION_FILES):
        pytest.skip(f"the published GeoEstimation partitions are not in {PARTITIONS} (../shared of the checkout)")
    return load_geoestimation_partitions(PARTITION_FILES)


def label_chains(cells, fine: np.ndarray) -> torch.Tensor:
    """(coarse, middle, fine) cell rows of fine cells, through the cell table's parents."""
    middle = cells[2]["parents"][fine]
    return torch.as_tensor(np.stack([cells[1]["parents"][middle], middle, fine], axis=1))


def test_paper_sized_geohier_starts_at_chance_converges_and_its_hierarchy_fixes_a_noisy_fine_head(cells):
    torch.manual_seed(0)
    sizes = [len(level["tokens"]) for level in cells]
    assert sizes == [3298, 7202, 12893]
    config = tiny_geohier_config(cells_per_level=sizes, num_scenes=2, num_independent_layers=1,
                                 num_dependent_layers=1, dropout=0.0, initializer_range=0.02, freeze_backbone=True)
    model = GeoHierModel(config)
    model.set_cell_table(cells)
    rng = np.random.default_rng(0)
    codes = torch.randn(sizes[2], config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0))

    def tokens(fine):  # each image: a few noisy copies of its fine cell's code
        base = codes[torch.as_tensor(fine)][:, None].expand(-1, TOKENS, -1)
        return base + 0.3 * torch.randn(base.shape)

    # Untrained: every level's cross-entropy is that of a uniform guess, log(cells), within 10 %.
    fine = rng.choice(sizes[2], 512)
    with torch.no_grad():
        logits = model(backbone_hidden_states=tokens(fine)).logits
    labels = label_chains(cells, fine)
    for level, (level_logits, size) in enumerate(zip(logits, sizes)):
        assert F.cross_entropy(level_logits, labels[:, level]).item() == pytest.approx(math.log(size), rel=0.1)

    # A short run on 128 cells (label-smoothed loss, as in training) learns every level.
    seen = rng.choice(sizes[2], 128, replace=False)
    optimizer = torch.optim.Adam([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    model.train()
    for _ in range(60):
        fine = rng.choice(seen, 64)
        loss = model(backbone_hidden_states=tokens(fine), labels=label_chains(cells, fine)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    fine = rng.choice(seen, 512)
    with torch.no_grad():
        logits = model(backbone_hidden_states=tokens(fine)).logits
    labels = label_chains(cells, fine)
    for level, (level_logits, size) in enumerate(zip(logits, sizes)):
        assert F.cross_entropy(level_logits, labels[:, level]).item() < 0.2 * math.log(size), level

    # A noisy finest head (Gaussian noise of SD 3 on its logits): its own argmax is mostly wrong, the paper's product
    # with the parents' probabilities (what `geolocate` ranks by) mostly right.
    noisy = logits[2] + 3.0 * torch.randn(logits[2].shape, generator=torch.Generator().manual_seed(1))
    fine_accuracy = (noisy.argmax(dim=1).numpy() == fine).mean()
    product = model.hierarchical_probabilities((logits[0], logits[1], noisy))[2]
    product_accuracy = (product.argmax(dim=1).numpy() == fine).mean()
    assert fine_accuracy < 0.6 and product_accuracy > 0.85 and product_accuracy > fine_accuracy + 0.3, (
        fine_accuracy, product_accuracy)
