"""The one exception type of the data pipeline."""
from __future__ import annotations

from ...errors import ShardwiseError


class DataError(ShardwiseError, ValueError):
    """Bad data input: a missing or corrupt file, a malformed `data.*` setting, or a mismatch
    between the data, the tokenizer and the model.

    Messages name the offending file or config field and say how to fix it. It subclasses
    `ValueError` so callers that validate configs can catch both alike.
    """

    kind = "data"
