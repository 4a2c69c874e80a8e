"""The model: config parsing per family, the loader, the decoder and its layers.

Families kept in their own modules register their parsers and weight plans into
families.PARSERS / PLANS on import, here, so that every user of the package sees them.
"""

from moeserve.model import (
    family_deepseek,  # noqa: F401  (registers deepseek_v2, deepseek_v3, glm4_moe)
    family_gpt_oss,  # noqa: F401  (registers gpt_oss)
    family_llama4,  # noqa: F401  (registers llama4, llama4_text)
)
