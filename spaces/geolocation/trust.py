"""How much the page says it trusts an answer: one headline per answer, from the library's calibrated confidence.

- `headline(answer)`: the headline's text as `(lead, detail)`. For an image the model flags as unfamiliar
  (`GeolocationResult.unfamiliar`), it says plainly that the image does not look like what the model was trained on
  and gives no confident number. Otherwise the lead is the best guess (pin 1 and row 1 of the table: the same
  point) and the detail its calibrated confidence with the radius in words: "within 750 km: 62%", the smallest of
  25 / 200 / 750 / 2,500 km at which the model is right at least half the time (else the largest). A model without
  a calibration (`geoloc calibrate`) gets None: the page keeps its uncalibrated headline.
- `headline_html(answer)`: the same as the page's headline `<div>` (escaped).
"""

import html

from answers import Answer, format_percent

UNFAMILIAR_LEAD = "This image does not look like what the model was trained on"
UNFAMILIAR_DETAIL = "so it cannot tell where it was taken; the pins below are its closest matches, not an answer."


def radius_words(radius_km: float) -> str:
    """ "within 750 km", "within 2,500 km"."""
    return f"within {radius_km:,.0f} km"


def headline(answer: Answer) -> tuple[str, str] | None:
    """`(lead, detail)` of the headline, or None for a model without a calibration."""
    result = answer.result
    if result.unfamiliar:
        return UNFAMILIAR_LEAD, UNFAMILIAR_DETAIL
    confidence = result.headline_confidence
    if confidence is None:
        return None
    radius, probability = confidence
    return f"Best guess: {answer.phrases[0]}", f"{radius_words(radius)}: {format_percent(probability)}"


def headline_html(answer: Answer) -> str | None:
    """The headline `<div>` (id `headline`, class `unfamiliar` when the model cannot tell), or None (see
    `headline`)."""
    parts = headline(answer)
    if parts is None:
        return None
    lead, detail = (html.escape(part) for part in parts)
    if answer.result.unfamiliar:
        return (f"<div id='headline' class='headline unfamiliar'>{lead},</div>"
                f"<div class='unfamiliar-note'>{detail}</div>")
    return f"<div id='headline' class='headline'>{lead} <span class='pct'>{detail}</span></div>"


def confidence_line(answer: Answer) -> str:
    """Under the headline: the calibrated confidence at every radius ("Within 25 km: 2% · 200 km: 48% · ..."), or
    "" without a calibration or for an unfamiliar image."""
    result = answer.result
    if not result.confidence or result.unfamiliar:
        return ""
    parts = [f"{radius:,.0f} km {format_percent(p)}" for radius, p in result.confidence.items()]
    return ("<div class='confidence'>Chance the true place is within " + " · ".join(parts)
            + " of the best guess (calibrated on held-out images)</div>")
