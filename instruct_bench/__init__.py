"""The Instruct-Imagen harness: what reproduces the published figures, beside the library and outside its wheel.

Benchmark scenes (`scenes`), tasks (`tasks`) and metrics (`metrics`), the evaluation behind docs/RESULTS.md
(`evaluation`), the bundled model's recipe and build (`build_default`), the demo with ground truth (`demo`) and the
speed measurements behind docs/BENCHMARKS.md (`speed`, `speed_comfyui`). It imports `instruct_core`, never the
reverse. Entry point: `python -m instruct_bench`.
"""
