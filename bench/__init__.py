"""rnnfast benchmarks: one registry of configurations (:mod:`bench.configs`) from which the runner
(``python -m bench``), the pytest-benchmark tests (``pytest bench/``) and the plots are made, plus an end-to-end
character-level language model (``python -m bench.charlm``).

One GPU lease is ``bench/gpu_run.sh`` (the command line is ``bench/gpu_command.txt``; :mod:`bench.lease` checks
that it fits the device tool): the smoke tests of ``bench/test_smoke.py`` under a per-test time limit
(:mod:`bench.watchdog`), the benchmark, and the short table of :mod:`bench.summary`.

Importing this package is cheap: the submodules import torch and rnnfast when they are used.
"""
