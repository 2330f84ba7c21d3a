"""vLLM compatibility-testing and benchmarking harness.

Pipeline: matrix -> plan -> run -> parse -> probes -> store -> report.
The harness process never imports vllm; engines run as subprocesses.
"""

__version__ = "0.1.0"
