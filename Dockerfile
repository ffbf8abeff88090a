# lmcache-fs images (docs/gpu.md says what each does on a host with and without GDS).
#
#   docker build -t lmcache-fs .                   the engine (default target): vLLM's official
#                                                  image + lmcache-fs[cuda] + prebuilt kernels
#   docker build --target page -t lmcache-fs-page .   the Streamlit page alone (no vLLM, no torch)
#
#   docker run --gpus all --ipc=host -v /shared/kv:/kv lmcache-fs MODEL \
#     --kv-transfer-config '{"kv_connector":"LMCacheFSConnector","kv_role":"kv_both",
#                            "kv_connector_extra_config":{"storage_path":"/kv"}}'
#
# vLLM's images (0.32 to 0.34, the releases lmcache-fs is tested with; the newest by default) are
# built for CUDA 13.0 (VLLM_MAIN_CUDA_VERSION in vllm/envs.py), hence the `cuda` extra (kvikio-cu13). For a CUDA 12 base image pass --build-arg VLLM_IMAGE=...
# --build-arg CUDA_EXTRA=cuda12 --build-arg CUDA_MAJOR=12 --build-arg CUDA_APT=12-9
# --build-arg CUDA_HOME_DIR=/usr/local/cuda-12.9: the build fails if the extra's CUDA differs from
# the image's torch.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.34.0
ARG PAGE_IMAGE=python:3.12-slim

# ---- kernels: compile the CUDA kernels once, with nvcc, for the GPUs listed (no GPU needed) ----
FROM ${VLLM_IMAGE} AS kernels
ARG CUDA_APT=13-0
ARG CUDA_HOME_DIR=/usr/local/cuda-13.0
# A100, A10/RTX 30, L4/L40, H100/H200, B200, RTX PRO 6000 (Blackwell), and PTX for newer GPUs.
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0 10.0 12.0+PTX"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vLLM's image is built FROM nvidia/cuda, which configures NVIDIA's CUDA apt repository (vLLM
# installs cuda-nvcc from it for FlashInfer's JIT, so nvcc may already be here: apt then only adds
# the cudart headers). The CUDA minor version is in the package names, the patch level is
# whatever that repository serves for it (so no version pins).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "cuda-nvcc-${CUDA_APT}" "cuda-cudart-dev-${CUDA_APT}" \
 && rm -rf /var/lib/apt/lists/*
# (They install into /usr/local/cuda-13.0, CUDA_HOME_DIR, the CUDA_HOME given to the build below.)
# ninja: torch's extension builder needs it; any recent version builds the same code.
# hadolint ignore=DL3013
RUN uv pip install --system --no-cache ninja
WORKDIR /opt/lmcache-fs
COPY pyproject.toml README.md ./
COPY lmcache_fs/ lmcache_fs/
COPY connector/ connector/
COPY cuda/ cuda/
ENV LMCACHE_FS_CUDA_BUILD_DIR=/opt/lmcache-fs/cuda-kernels
RUN uv pip install --system --no-cache --no-deps . \
 && CUDA_HOME="${CUDA_HOME_DIR}" python3 -m lmcache_fs.gpu.kernels --arch-list "${TORCH_CUDA_ARCH_LIST}"

# ---- page: the Streamlit page alone. It reads the cache directory through lmcache_fs.ops and
# lmcache_fs.storage, which need no torch: lmcache-fs goes in without its dependencies, then the
# `frontend` extra and pyyaml (read from pyproject.toml, so this list never drifts from it). ----
FROM ${PAGE_IMAGE} AS page
WORKDIR /opt/lmcache-fs
COPY pyproject.toml README.md ./
COPY lmcache_fs/ lmcache_fs/
COPY connector/ connector/
COPY cuda/ cuda/
COPY frontend/ frontend/
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['optional-dependencies']['frontend'] + [d for d in p['dependencies'] if d.startswith('pyyaml')]))" \
      > /tmp/page-requirements.txt \
 && pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir -r /tmp/page-requirements.txt \
 && PYTHONPATH=frontend python3 -c "import streamlit, cache_panel, engine_client, ask, demo_config, lmcache_fs.log, \
importlib.util as u; assert u.find_spec('torch') is None"
EXPOSE 8501
CMD ["streamlit", "run", "frontend/frontend.py", "--server.port=8501", "--server.address=0.0.0.0", \
     "--server.headless=true", "--browser.gatherUsageStats=false"]

# ---- engine (default): vLLM's image, lmcache-fs with kvikio, the prebuilt kernels; vLLM's own
# ENTRYPOINT (`vllm serve`) is kept, so `docker run IMAGE MODEL --flags` works as with vLLM's image.
FROM ${VLLM_IMAGE} AS engine
ARG CUDA_EXTRA=cuda
ARG CUDA_MAJOR=13
WORKDIR /opt/lmcache-fs
COPY pyproject.toml README.md ./
COPY lmcache_fs/ lmcache_fs/
COPY connector/ connector/
COPY cuda/ cuda/
# vLLM's documented way to extend its image: uv into the system Python; torch and vLLM are already
# satisfied there, so this adds lmcache-fs and kvikio.
RUN python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}' else \
      f'the base image has CUDA {torch.version.cuda}: build with the matching CUDA_EXTRA/CUDA_MAJOR')" \
 && uv pip install --system --no-cache ".[${CUDA_EXTRA}]" \
 && python3 -c "import kvikio, lmcache_fs.connector.plugin"
COPY --from=kernels /opt/lmcache-fs/cuda-kernels /opt/lmcache-fs/cuda-kernels
ENV LMCACHE_FS_CUDA_BUILD_DIR=/opt/lmcache-fs/cuda-kernels
# The prebuilt kernels were compiled from exactly the sources installed here, for this torch.
RUN python3 -c "import json; from lmcache_fs.gpu import kernels as k; \
info = json.loads((k.build_dir(k.PREBUILT) / k.BUILD_INFO).read_text()); \
assert info['sources'] == k.sources_digest(k.source_dir()), info"
