"""Integrations with other libraries. Each submodule imports its library only when it is imported itself.

``vita_ext.integrations.transformers``: drop-in acceleration of Hugging Face transformers' Qwen2 and
InternVL models (``patch_qwen2``, ``patch_internvl``, ``unpatch``); needs ``pip install vita_ext[hf]``.
"""
