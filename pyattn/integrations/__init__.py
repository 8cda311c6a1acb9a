"""pyattn inside other libraries' models.  Each submodule imports the library
it serves; importing this package imports nothing else.

- ``pyattn.integrations.transformers``: ``register()`` makes ``"pyattn"`` an
  ``attn_implementation`` of HuggingFace transformers.
"""
