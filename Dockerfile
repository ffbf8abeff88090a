# One image for the whole demo: vLLM's official OpenAI-server image (pinned) plus
# lmcache-fs (the connector, registered with vLLM through its plugin entry point)
# and the Streamlit page. The image's own torch and vLLM are kept as they are.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/lmcache-fs
COPY pyproject.toml README.md ./
COPY lmcache_fs/ lmcache_fs/
COPY connector/ connector/
COPY frontend/ frontend/
RUN python3 -m pip install --no-cache-dir ".[frontend]" \
 && python3 -c "import lmcache_fs.connector.plugin, streamlit"

# The vLLM image starts `vllm serve`; each compose service gives its own command.
ENTRYPOINT []
CMD ["vllm", "serve", "--help"]
