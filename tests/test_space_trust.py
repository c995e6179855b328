"""The Space's headline tells one story: the calibrated confidence of pin 1, or "cannot tell" (spaces/geolocation/trust.py)."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc import DEFAULT_MODEL
from geoloc.inference.adapter import Geolocator

SPACE = Path(__file__).resolve().parents[1] / "spaces" / "geolocation"
sys.path.insert(0, str(SPACE))
import answers  # noqa: E402
import page  # noqa: E402
import trust  # noqa: E402

pytestmark = pytest.mark.skipif(not (Path(DEFAULT_MODEL) / "config.json").is_file(), reason="no bundled model")


@pytest.fixture(scope="module")
def bundled():
    return Geolocator.from_pretrained(DEFAULT_MODEL)


def test_examples_headline_is_pin_one_with_its_calibrated_confidence(bundled):
    for example in sorted(SPACE.glob("examples/*.png")):
        answer = answers.locate(bundled, image=str(example), top_k=5)
        if answer.result.unfamiliar:
            continue
        summary = page.summary_html(answer)
        radius, probability = answer.result.headline_confidence
        assert answer.result.confidence[radius] == probability
        expected = f"Best guess: {answer.phrases[0]}"  # pin 1, row 1 of the table
        assert re.search(re.escape(expected) + r" <span class='pct'>within [\d,]+ km: \d+(\.\d+)?%</span>", summary)
        assert f"within {radius:,.0f} km: {answers.format_percent(probability)}" in summary
        assert "likely" not in summary  # no second, uncalibrated percentage in the headline


# (near-white and light-grey blanks look like the Antarctic ice sheet to this map model: see the README's flag rates)
@pytest.mark.parametrize("image", [Image.new("RGB", (300, 200), (220, 30, 160)), Image.new("RGB", (1, 1), (0, 200, 0)),
                                   np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)])
def test_an_unfamiliar_image_gets_cannot_tell_instead_of_a_number(bundled, image):
    answer = answers.locate(bundled, image=image, top_k=5)
    summary = page.summary_html(answer)
    assert answer.result.unfamiliar and trust.UNFAMILIAR_LEAD in summary
    assert "within" not in summary and "likely" not in summary


def test_text_mode_follows_the_declared_capability(bundled):
    assert bundled.capabilities.text and not bundled.capabilities.text_aligned  # random text tower: no text tab
