"""The model families geoloc serves, registered with the transformers Auto classes on import.

`modeling_geoclip` and `modeling_geohier` register their config, model and image processor themselves; this
module is what geoloc code imports to have both registered (`import geoloc` alone stays free of torch, so that
`geoloc --help` is fast). Every geoloc module that loads checkpoints imports it, the inference adapter included.

Example:
    >>> import geoloc.models  # noqa: F401
    >>> from transformers import AutoModel
    >>> AutoModel.from_pretrained(geoloc.DEFAULT_MODEL).config.model_type
    'geoclip'
"""

import modeling_geoclip  # noqa: F401
import modeling_geohier  # noqa: F401
