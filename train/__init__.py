"""Training for 1.x-Distill: Stage I (structure-focused distribution matching), ``python -m train.stage1``.

May import ``onex_export``; ``onex_export`` never imports ``train``.
"""
