# FlagOS image for GPU chips: FlagScale serving vLLM with the FlagOS kernels, their Triton cache compiled
# ahead of time in a builder stage at the absolute path the runtime uses (the cache's index files hold it).
FROM 127.0.0.1:5000/vendor/flagtree-iluvatar:corex-4.4.0-torch2.7.1-ubuntu24.04 AS kernels
COPY kernels/ /opt/flagos/kernels/
WORKDIR /opt/flagos
RUN python3 -m kernels.aot --target corex:ivcore20 --out /opt/flagos/triton-cache

FROM 127.0.0.1:5000/vendor/flagtree-iluvatar:corex-4.4.0-torch2.7.1-ubuntu24.04
COPY wheels/ /tmp/wheels/
RUN python3 -m pip install --no-cache-dir --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt \
    && rm -rf /tmp/wheels
COPY --from=kernels /opt/flagos/ /opt/flagos/
COPY flagos/ /opt/flagos/
COPY serve/ /opt/flagos/serve/

ENV FLAGOS_HOME=/opt/flagos \
    TRITON_CACHE_DIR=/opt/flagos/triton-cache \
    USE_FLAGGEMS=1 \
    PYTHONPATH=/opt/flagos
EXPOSE 8000
CMD ["flagscale", "serve", "qwen3", "/opt/flagos/serve/vllm.yaml"]
