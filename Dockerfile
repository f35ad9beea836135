# The image users run on GPU nodes: CUDA, the project with its GPU extras (FlashAttention-2) and trackers.
# Build: docker build -t dft-sft .
# Run:   docker run --gpus all --ipc=host -v /data:/data dft-sft deepspeed --num_gpus=8 train.py experiment=qwen2_5_7b_zero3 data.sources=[/data/chats.jsonl]
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv git build-essential ninja-build pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace/dft-sft
# Dependencies first so code edits do not rebuild them; torch (CUDA build) before flash-attn, which builds against it.
COPY pyproject.toml README.md ./
RUN pip install --upgrade pip setuptools wheel \
    && pip install "torch>=2.4,<2.15" \
    && pip install packaging psutil ninja
COPY . .
RUN pip install -e ".[trackers]" \
    && MAX_JOBS=8 pip install --no-build-isolation -e ".[gpu,qlora]"

CMD ["python", "train.py", "--help"]
