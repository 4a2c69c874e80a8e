"""The model: config parsing per family, the loader, the decoder and its layers.

Families kept in their own modules register their parsers and weight plans into
families.PARSERS / PLANS on import, here, so that every user of the package sees them.
"""

from moeserve.model import family_llama4  # noqa: F401  (registers llama4, llama4_text)
