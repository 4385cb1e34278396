# One image for every Ringfence service. bcc comes from Debian (it must match
# libbcc); the enforcer also needs the host's kernel headers mounted (compose.yaml).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-bpfcc iproute2 openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ringfence
COPY pyproject.toml README.md ./
COPY ringfence ringfence
COPY services services
COPY bpf bpf
RUN python3 -m venv --system-site-packages /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT []
