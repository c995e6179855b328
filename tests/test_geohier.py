"""GeoHier: shapes, hierarchy isolation, learning, hierarchical inference, cell table, save/load, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTConfig

from geoloc.models import register_models
from geoloc.configs import TINY_IMAGE_SIZE, tiny_geohier_config
from geoloc.geography.geocells import build_geocells
from modeling_geohier import GeoHierConfig, GeoHierGeolocationOutput, GeoHierModel

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)


def synthetic_cells(sizes=(8, 16, 32)):
    """A cell table where cell i of level l > 0 is a child of cell i // 2 of level l - 1."""
    rng = np.random.default_rng(0)
    return [
        {
            "tokens": [f"{level + 1}{i:03x}1" for i in range(n)],
            "latitudes": rng.uniform(-80, 80, n),
            "longitudes": rng.uniform(-180, 180, n),
            "parents": np.arange(n) // 2 if level else np.full(n, -1),
            "counts": rng.integers(1, 100, n),
        }
        for level, n in enumerate(sizes)
    ]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    return model


def images(batch=2, seed=0):
    return torch.randn(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_attention_maps(model):
    out = model(pixel_values=images(3), labels=torch.tensor([[0, 1, 2], [3, 4, 5], [7, 15, -1]]),
                output_attentions=True)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert [tuple(level.shape) for level in out.logits] == [(3, 8), (3, 16), (3, 32)]
    assert out.scene_logits.shape == (3, 4)
    assert out.query_hidden_states.shape == (3, 4, 3, model.config.hidden_size)
    # (B, N + E layers, heads, scenes * levels queries, 1 + 16 patch tokens), rows are distributions.
    assert out.cross_attentions.shape == (3, 3, 4, 12, 17)
    torch.testing.assert_close(out.cross_attentions.sum(-1), torch.ones(3, 3, 4, 12))
    # Scene logits are channel 0 of the final queries averaged over levels.
    torch.testing.assert_close(out.scene_logits, out.query_hidden_states[..., 0].mean(-1))
    assert model(pixel_values=images(3)).loss is None


def test_vit_backbone_from_dict():
    vit = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    image_size=TINY_IMAGE_SIZE, patch_size=16)
    config = tiny_geohier_config(vision_config=vit.to_dict())
    assert isinstance(config.vision_config, ViTConfig)
    out = GeoHierModel(config)(pixel_values=images(2), output_attentions=True)
    assert out.cross_attentions.shape == (2, 3, 4, 12, 5)


def test_dependent_layers_isolate_hierarchies(model):
    """In a hierarchy-dependent layer, perturbing the queries of one level leaves the other levels' outputs
    unchanged; in an independent layer it does not."""
    config = model.config
    tokens = torch.randn(2, 17, config.hidden_size)
    queries = torch.randn(2, config.num_queries, config.hidden_size)
    perturbed = queries.clone()
    level = torch.arange(config.num_queries) % config.num_levels
    perturbed[:, level == 1] += 5 * torch.randn_like(perturbed[:, level == 1])
    dependent, independent = model.dependent_layers[0], model.independent_layers[0]
    before, after = dependent(queries, tokens)[0], dependent(perturbed, tokens)[0]
    torch.testing.assert_close(before[:, level != 1], after[:, level != 1])
    assert not torch.allclose(before[:, level == 1], after[:, level == 1])
    changed = independent(perturbed, tokens)[0] - independent(queries, tokens)[0]
    assert changed[:, level != 1].abs().max() > 1e-3
    # Each level has its own FFN in dependent layers, one shared FFN in independent ones.
    assert len(dependent.feed_forwards) == config.num_levels and len(independent.feed_forwards) == 1


def test_scene_labels_add_the_scene_loss_and_keep_the_predicted_queries(model):
    pixel_values, labels = images(3), torch.tensor([[0, 0, 0], [1, 2, 3], [2, 4, 8]])
    free = model(pixel_values=pixel_values, labels=labels)
    labelled = model(pixel_values=pixel_values, labels=labels, scene_labels=torch.tensor([3, -1, 0]))
    assert model.config.scene_selection == "predicted"
    assert torch.equal(labelled.selected_scenes, free.scene_logits.argmax(dim=1))
    for level in range(model.config.num_levels):
        torch.testing.assert_close(labelled.logits[level], free.logits[level])
    scene_loss = F.cross_entropy(free.scene_logits[[0, 2]], torch.tensor([3, 0]))
    torch.testing.assert_close(labelled.loss, free.loss + model.config.scene_loss_weight * scene_loss)


def test_label_scene_selection_classifies_the_labelled_scenes_queries(model, monkeypatch):
    monkeypatch.setattr(model.config, "scene_selection", "label")
    pixel_values, labels = images(3), torch.tensor([[0, 0, 0], [1, 2, 3], [2, 4, 8]])
    free = model(pixel_values=pixel_values, labels=labels)
    forced = model(pixel_values=pixel_values, labels=labels, scene_labels=torch.tensor([3, -1, 0]))
    assert forced.selected_scenes[0] == 3 and forced.selected_scenes[2] == 0
    assert forced.selected_scenes[1] == free.selected_scenes[1] == free.scene_logits[1].argmax()
    chosen = forced.query_hidden_states[0, 3]  # scene 3 of image 0, (levels, D)
    for level, classifier in enumerate(model.classifiers):
        torch.testing.assert_close(forced.logits[level][0], classifier(chosen[level]))
    unknown = model(pixel_values=pixel_values, labels=labels, scene_labels=torch.full((3,), -1))
    torch.testing.assert_close(unknown.loss, free.loss)
    assert not torch.allclose(forced.loss, free.loss)


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config(dropout=0.0)).train()
    pixel_values = images(4)
    labels, scenes = torch.tensor([[0, 1, 2], [1, 3, 7], [2, 5, 11], [3, 7, 15]]), torch.tensor([0, 1, 2, -1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values=pixel_values, labels=labels, scene_labels=scenes).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_hierarchical_probabilities_are_the_normalised_brute_force_product(model):
    torch.manual_seed(1)
    logits = tuple(torch.randn(2, n) for n in model.config.cells_per_level)
    result = model.hierarchical_probabilities(logits)
    softmax = [level.softmax(-1) for level in logits]
    parents = [table["parents"] for table in synthetic_cells()]
    product = [softmax[0], torch.zeros(2, 16), torch.zeros(2, 32)]
    for b in range(2):
        for middle in range(16):
            product[1][b, middle] = softmax[1][b, middle] * softmax[0][b, parents[1][middle]]
        for fine in range(32):
            middle = parents[2][fine]
            product[2][b, fine] = softmax[2][b, fine] * softmax[1][b, middle] * softmax[0][b, parents[1][middle]]
    for level in range(3):
        torch.testing.assert_close(result[level], product[level] / product[level].sum(1, keepdim=True))
        torch.testing.assert_close(result[level].sum(1), torch.ones(2))
        # The ranking is the paper's product.
        assert torch.equal(result[level].argsort(dim=1, stable=True), product[level].argsort(dim=1, stable=True))
    assert product[2].sum(1).max() < 0.5  # the raw product is no distribution


def test_geolocate_fields_and_probabilities(model):
    out = model.geolocate(pixel_values=images(2), top_k=5)
    assert isinstance(out, GeoHierGeolocationOutput)
    assert list(out.keys())[:4] == ["latitudes", "longitudes", "probabilities", "indices"]
    for field in (out.latitudes, out.longitudes, out.probabilities, out.indices):
        assert field.shape == (2, 5)
    assert (out.probabilities[:, :-1] >= out.probabilities[:, 1:]).all()
    assert ((out.probabilities > 0) & (out.probabilities <= 1)).all()
    torch.testing.assert_close(out.probabilities, out.level_probabilities[-1].gather(1, out.indices))
    torch.testing.assert_close(out.probabilities[:, 0], out.level_probabilities[-1].max(dim=1).values)
    fine = synthetic_cells()[-1]
    np.testing.assert_allclose(out.latitudes.numpy(), fine["latitudes"][out.indices.numpy()], atol=1e-6)
    np.testing.assert_allclose(out.longitudes.numpy(), fine["longitudes"][out.indices.numpy()], atol=1e-6)
    torch.testing.assert_close(out.scene_probabilities.sum(-1), torch.ones(2))
    assert [p.shape for p in out.level_probabilities] == [(2, 8), (2, 16), (2, 32)]
    # The geolocated scene is the predicted one, never a label.
    forward = model(pixel_values=images(2))
    torch.testing.assert_close(out.scene_probabilities, forward.scene_logits.softmax(-1))


@pytest.mark.parametrize("top_k", [0, 33, 2.0, True])
def test_geolocate_rejects_bad_top_k(model, top_k):
    with pytest.raises(ValueError, match="top_k"):
        model.geolocate(pixel_values=images(1), top_k=top_k)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model.geolocate(pixel_values=torch.zeros(0, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 32"):
        model(pixel_values=images(2), labels=torch.tensor([[0, 0, 0], [0, 0, 32]]))
    with pytest.raises(ValueError, match="shape"):
        model(pixel_values=images(2), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scene_labels"):
        model(pixel_values=images(2), scene_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="no cell table"):
        GeoHierModel(tiny_geohier_config()).geolocate(pixel_values=images(1))
    with pytest.raises(ValueError, match="whole number of images"):
        model.geolocate(pixel_values=images(4), num_crops=3)
    with pytest.raises(ValueError, match="num_crops must be a positive integer"):
        model.geolocate(pixel_values=images(4), num_crops=0)
    with pytest.raises(ValueError, match="output_attentions needs one crop"):
        model.geolocate(pixel_values=images(4), num_crops=2, output_attentions=True)


def test_crops_of_one_image_are_averaged_in_logit_space(model):
    crops = images(6)
    answer = model.geolocate(pixel_values=crops, num_crops=3, top_k=4)
    with torch.no_grad():
        output = model(pixel_values=crops)
    averaged = tuple(logits.view(2, 3, -1).mean(dim=1) for logits in output.logits)
    expected = model.hierarchical_probabilities(averaged)[-1].topk(4, dim=1)
    assert torch.equal(answer.indices, expected.indices)
    torch.testing.assert_close(answer.probabilities, expected.values)
    torch.testing.assert_close(answer.scene_probabilities, output.scene_logits.view(2, 3, -1).mean(1).softmax(-1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cells_per_level": [8, 0, 32]}, "cells_per_level"),
        ({"cells_per_level": []}, "cells_per_level"),
        ({"cells_per_level": [8, 16], "level_loss_weights": [0.5, 0.3, 0.2]}, "level_loss_weights has 3 entries"),
        ({"level_loss_weights": [0.5, -1.0, 0.2]}, "loss weights"),
        ({"num_attention_heads": 5}, "divisible"),
        ({"num_scenes": 0}, "num_scenes"),
        ({"vision_config": {"model_type": "bert"}}, "vision_config"),
        ({"scene_selection": "oracle"}, "scene_selection"),
        ({"scene_label_smoothing": 1.0}, "scene_label_smoothing"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_geohier_config(**overrides)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda cells: cells[1]["parents"].__setitem__(3, 8), r"Level 1, cell 3: parent index 8"),
        (lambda cells: cells[2]["parents"].__setitem__(0, -1), r"Level 2, cell 0: parent index -1"),
        (lambda cells: cells[0]["parents"].__setitem__(0, 0), "level 0 has no parent"),
        (lambda cells: cells.pop(), "2 levels"),
        (lambda cells: cells[1]["tokens"].pop(), "cells_per_level=\\[8, 15, 32\\]"),
        (lambda cells: cells[0]["latitudes"].__setitem__(2, 91.0),
         r"cell table level 0 centroids\[2\] = \(91.0, .*\): latitude must be in \[-90, 90\]"),
        (lambda cells: cells[0]["tokens"].__setitem__(0, "xyz"), "not an S2 cell token"),
    ],
)
def test_inconsistent_cell_tables_are_rejected(edit, message):
    cells = synthetic_cells()
    edit(cells)
    model = GeoHierModel(tiny_geohier_config())
    with pytest.raises(ValueError, match=message):
        model.set_cell_table(cells)
    assert not model.config.has_cell_table


def test_bad_cell_table_leaves_the_previous_one_intact():
    model = GeoHierModel(tiny_geohier_config())
    model.set_cell_table(synthetic_cells())
    before = {name: tensor.clone() for name, tensor in model.cell_table.state_dict().items()}
    cells = synthetic_cells()
    for level in cells:  # every level differs from the stored table ...
        level["counts"] = level["counts"] + 1
        level["latitudes"] = level["latitudes"] / 2
    cells[2]["parents"][5] = 99  # ... but the last one is invalid
    with pytest.raises(ValueError, match=r"Level 2, cell 5: parent index 99"):
        model.set_cell_table(cells)
    assert model.config.has_cell_table
    for name, tensor in model.cell_table.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_cell_table_coordinates_use_the_shared_validator():
    from geo_core import validate_locations

    cells = synthetic_cells()
    cells[1]["longitudes"][4] = float("nan")
    with pytest.raises(ValueError) as raised:
        GeoHierModel(tiny_geohier_config()).set_cell_table(cells)
    coordinates = np.stack([cells[1]["latitudes"], cells[1]["longitudes"]], axis=1)
    with pytest.raises(ValueError) as expected:
        validate_locations(coordinates, "cell table level 1 centroids")
    assert str(raised.value) == str(expected.value)


def test_from_pretrained_is_strict(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["cell_table.centroids_2"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \['cell_table.centroids_2'\]"):
        AutoModel.from_pretrained(tmp_path)
    partial, info = GeoHierModel.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert "cell_table.centroids_2" in info["missing_keys"]
    assert torch.equal(partial.cell_table.parents_2, model.cell_table.parents_2)

    weights["extra.weight"] = torch.zeros(1)
    weights["cell_table.centroids_2"] = model.cell_table.centroids_2
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected: \['extra.weight'\]"):
        GeoHierModel.from_pretrained(tmp_path)
    weights["cell_table.centroids_2"] = torch.zeros(5, 2, dtype=torch.int32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    # found from the safetensors header, before the model is allocated
    with pytest.raises(ValueError, match=r"cell_table.centroids_2: \(5, 2\) vs \(32, 2\).*nothing was allocated"):
        GeoHierModel.from_pretrained(tmp_path)


def test_geolocate_returns_the_attention_of_the_same_forward(model):
    pixel_values = images(2)
    located = model.geolocate(pixel_values=pixel_values, top_k=3, output_attentions=True)
    forward = model(pixel_values=pixel_values, output_attentions=True)
    torch.testing.assert_close(located.cross_attentions, forward.cross_attentions)
    torch.testing.assert_close(located.selected_scenes, forward.selected_scenes)
    assert model.geolocate(pixel_values=pixel_values, top_k=3).cross_attentions is None


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["has_cell_table"] is True
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GeoHierModel) and isinstance(AutoConfig.from_pretrained(tmp_path), GeoHierConfig)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    before, after = model.geolocate(pixel_values=images(2), top_k=3), loaded.geolocate(pixel_values=images(2), top_k=3)
    for field in ("latitudes", "longitudes", "probabilities", "indices"):
        torch.testing.assert_close(after[field], before[field])
    table = loaded.get_cell_table()
    assert list(table[2]["tokens"]) == synthetic_cells()[2]["tokens"]
    np.testing.assert_array_equal(table[1]["parents"], np.arange(16) // 2)
    # bf16 weights never round the stored centroids (integer micro-degrees).
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    np.testing.assert_allclose(half.get_cell_table()[2]["latitudes"], synthetic_cells()[2]["latitudes"], atol=1e-6)


def test_image_processor_is_registered(tmp_path):
    from modeling_geoclip import GeoCLIPImageProcessor
    from modeling_geohier import GeoHierImageProcessor

    options = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    tiny_geohier_config().save_pretrained(tmp_path)
    GeoHierImageProcessor(**options).save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert settings["image_processor_type"] == "GeoHierImageProcessor"
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is GeoHierImageProcessor
    # Without a named class, the GeoHier config picks GeoHier's processor.
    del settings["image_processor_type"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is GeoHierImageProcessor
    # Checkpoints saved before GeoHier had its own processor name GeoCLIP's; they load it, with the same pixels.
    GeoCLIPImageProcessor(**options).save_pretrained(tmp_path)
    old = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(old) is GeoCLIPImageProcessor
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    torch.testing.assert_close(old(image, return_tensors="pt").pixel_values,
                               processor(image, return_tensors="pt").pixel_values, rtol=0, atol=0)


def test_built_geocells_drive_the_model():
    rng = np.random.default_rng(0)
    latitudes, longitudes = rng.uniform(-60, 60, 3000), rng.uniform(-180, 180, 3000)
    cells, labels = build_geocells(latitudes, longitudes, levels=[(5, 400), (5, 150), (5, 60)])
    config = tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells])
    model = GeoHierModel(config).eval()
    model.set_cell_table(cells)
    keep = labels[:4]
    assert model(pixel_values=images(4), labels=torch.from_numpy(keep)).loss.isfinite()
    out = model.geolocate(pixel_values=images(4), top_k=3)
    np.testing.assert_allclose(out.latitudes.numpy(), cells[-1]["latitudes"][out.indices.numpy()], atol=1e-6)


@pytest.mark.parametrize(("levels", "expected"), [
    (1, (1.0,)), (2, (2 / 3, 1 / 3)), (3, (0.5, 0.3, 0.2)), (4, (12 / 25, 6 / 25, 4 / 25, 3 / 25)),
])
def test_level_loss_weights_are_derived_for_any_number_of_levels(levels, expected):
    config = tiny_geohier_config(cells_per_level=[4 * 2**level for level in range(levels)])
    assert config.level_loss_weights is None
    np.testing.assert_allclose(config.loss_weights, expected)
    model = GeoHierModel(config)
    labels = torch.zeros(2, levels, dtype=torch.long)
    out = model(pixel_values=images(2), labels=labels)
    per_level = [F.cross_entropy(logits, labels[:, level], label_smoothing=config.label_smoothing)
                 for level, logits in enumerate(out.logits)]
    torch.testing.assert_close(out.loss, sum(w * l for w, l in zip(expected, per_level)))


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_from_backbone_loads_pretrained_encoder_weights_with_a_fresh_decoder(kind, tmp_path):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from geoloc.configs import tiny_clip_configs

    vision, text = tiny_clip_configs()
    if kind == "vit":
        encoder = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     image_size=32, patch_size=8), add_pooling_layer=False)
        encoder.save_pretrained(tmp_path)
        expected = encoder.state_dict()
    else:
        clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=64))
        clip.save_pretrained(tmp_path)
        expected = {key.removeprefix("vision_model."): value for key, value in clip.state_dict().items()
                    if key.startswith("vision_model.")}
    model = GeoHierModel.from_backbone(str(tmp_path), cells_per_level=[4, 8], num_scenes=2)
    state = model.backbone.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key.removeprefix("vision_model.")], value, rtol=0, atol=0, msg=key)
    assert model.config.cells_per_level == [4, 8] and model.config.vision_config.hidden_size == 64
    with pytest.raises(ValueError, match="ViT or a CLIP vision tower"):
        from transformers import BertConfig

        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
            tmp_path / "bert")
        GeoHierModel.from_backbone(str(tmp_path / "bert"), cells_per_level=[4])
