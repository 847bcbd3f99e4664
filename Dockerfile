# One image for the planner, the coordinator and the agent; compose.yaml picks the command.
FROM python:3.11-slim

# torch first and pinned: on a CPU-only box pass a CPU wheel index through PIP_EXTRA_INDEX_URL.
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DORAMESH_LOG_JSON=1

WORKDIR /opt/doramesh
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY src ./src
RUN pip install '.[all]'

RUN useradd --create-home doramesh \
    && install -d -o doramesh -g doramesh -m 0700 /var/lib/doramesh
USER doramesh
EXPOSE 7070 7071 7072 7073
ENTRYPOINT []
CMD ["doramesh", "--help"]
