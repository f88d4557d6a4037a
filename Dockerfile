# One image for every role of the pipeline (replay, encode, learn, query) and for the topics-init job.
# The dataset is mounted at /data when the container runs; it is never copied into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build first: resolving torch from PyPI pulls the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fpocmh ./fpocmh
COPY fpocmh_core ./fpocmh_core
COPY producers ./producers
COPY consumers ./consumers
RUN pip install .

# Copied after the install so that editing a YAML file does not invalidate the pip layers; compose
# also mounts ./config over it read-only. An installed package cannot find config/ beside itself.
COPY config ./config
ENV FPOCMH_CONFIG_DIR=/app/config \
    FPOCMH_DATA=/data

# runs/ holds what the roles write (learner checkpoints); compose mounts a volume there, which takes
# this folder's owner when it is first created.
RUN useradd --system --uid 10001 --home-dir /app fpocmh \
    && mkdir -p /data /app/runs \
    && chown fpocmh /app/runs
USER fpocmh

ENTRYPOINT ["fpocmh"]
CMD ["--help"]
