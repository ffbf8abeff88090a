# One image for the whole demo: vLLM's official OpenAI-server image (pinned) plus
# lmcache-fs (the connector, registered with vLLM through its plugin entry point)
# and the Streamlit page.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/lmcache-fs
COPY pyproject.toml README.md ./
COPY lmcache_fs/ lmcache_fs/
COPY connector/ connector/
COPY frontend/ frontend/
# vLLM's documented way to extend its image: uv into the system Python. torch and vLLM are
# already satisfied there, so only lmcache-fs and the page's packages are added.
RUN uv pip install --system --no-cache ".[frontend]" \
 && python3 -c "import lmcache_fs.connector.plugin, streamlit"

# The vLLM image starts `vllm serve`; each compose service sets its own entrypoint or command.
ENTRYPOINT []
CMD ["vllm", "serve", "--help"]
