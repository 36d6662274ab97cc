"""Model definitions: pure nn.Modules, no distributed imports."""

#: The attention masks (``model.attn_mask_type``); see ``models/attention.py``.
MASK_TYPES = ("causal", "block_causal")
