"""The FlagOS engine: vLLM, started by `flagscale serve`, with our plugin (`plugin.py`), which puts our Triton
kernels in place of vLLM's layers (`layers.py`) when `USE_FLAGGEMS=1`, counts every call (`operators.py`) and
serves the operator report at `GET /flagos/operators` (`report.py`). `USE_FLAGGEMS=0` is the native stack: the
same engine, none of our operators."""
