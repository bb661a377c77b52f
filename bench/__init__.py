"""rnnfast benchmarks: one registry of configurations (:mod:`bench.configs`) from which the runner
(``python -m bench``), the pytest-benchmark tests (``pytest bench/``) and the plots are made, plus an end-to-end
character-level language model (``python -m bench.charlm``).

Importing this package is cheap: the submodules import torch and rnnfast when they are used.
"""
