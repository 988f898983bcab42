"""The configs shipped with rmgl: one YAML file per paper experiment, and the demo.

They are package data, so ``rmgl train market1501`` works from any installation; list them
with ``rmgl configs`` or :func:`rmgl.engine.config.builtin_configs`.
"""
