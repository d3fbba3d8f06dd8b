# CUDA PyTorch runtime with ip2p installed. No weights are fetched at build time: mount a model
# folder or let the hub cache fill at run time (-v ~/.cache/huggingface:/home/ip2p/.cache/huggingface).
#   docker build -t ip2p .
#   docker run --gpus all -v "$PWD:/work" -w /work ip2p ip2p edit in.jpg "make it snowy" -o out.png --model ip2p
#   docker run --gpus all -p 127.0.0.1:7860:7860 ip2p ip2p app --model ip2p --host 0.0.0.0   (the web editor)
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    IP2P_CONF=/opt/ip2p/conf

RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ip2p
WORKDIR /opt/ip2p

# Dependencies first (cached layer), then the source. torch comes from the base image: the
# package's torch range accepts it, so pip keeps it.
COPY pyproject.toml README.md ./
COPY src ./src
COPY conf ./conf
RUN pip install --no-cache-dir -e . \
    && chown -R 1000:1000 /opt/ip2p

USER 1000:1000
WORKDIR /home/ip2p
EXPOSE 7860
CMD ["ip2p", "--help"]
