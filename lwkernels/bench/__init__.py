"""The benchmark harness shared by `lwkernels bench` and the pytest-benchmark suites.

    harness.py    building blocks of a given shape, the providers compared, timers, environment
    models.py     whole models, reference vs fused, side by side
    training.py   training steps of single blocks, reference vs fused
"""
