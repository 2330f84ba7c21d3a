"""The engine, seen from outside: what a vLLM install offers (introspection run in the engine's
own Python), the server process's lifecycle (spawn, readiness, stop), and vLLM's metric names.
The harness never imports vllm itself."""
