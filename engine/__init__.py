"""The FlagOS serving engine: transformers' OpenAI-compatible server (`transformers serve`, continuous batching)
with the model's operators switched to our Triton kernels by `USE_FLAGGEMS=1`, and an operator report that
proves which of our kernels ran (`GET /flagos/operators`). `USE_FLAGGEMS=0` is the native stack: the same
engine, none of our operators. Run it with `python -m engine --config serve.json`."""
