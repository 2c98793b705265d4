# The one image every service in compose.yaml runs (`taskctl <command>`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first (pinned by constraints.txt), so a code change reuses this layer.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir shared command_api query_api projections \
 && touch shared/__init__.py command_api/__init__.py query_api/__init__.py projections/__init__.py \
 && pip install -c constraints.txt . \
 && pip uninstall -y taskservice
COPY shared ./shared
COPY command_api ./command_api
COPY query_api ./query_api
COPY projections ./projections
RUN pip install --no-deps -c constraints.txt . \
 && useradd --system --uid 10001 --no-create-home taskservice

USER taskservice
# Containers listen on every interface of their own network namespace; compose
# publishes only the gateway.
ENV HOST=0.0.0.0
CMD ["taskctl", "--help"]
