# rtrec image: an Apache Flink JobManager/TaskManager that can also run the `rtrec` CLI.
#
# One image serves every role in docker-compose.yml:
#   jobmanager / taskmanager   the official Flink entrypoint (`jobmanager`, `taskmanager`)
#   submit / replay / serving  any other command runs as-is, e.g. `rtrec submit ...`
#
# Build:  docker build -t rtrec:latest .
#
# The Flink version is one build argument: it picks the base image and pins the PyFlink
# client (`apache-flink` on PyPI) to the same release, so the client that builds the job
# graph and the cluster that runs it are the same Flink.
ARG FLINK_VERSION=2.2.0
FROM flink:${FLINK_VERSION}-scala_2.12-java17

ARG FLINK_VERSION
# flink-sql-connector-kafka release for this Flink minor version; must equal
# infra.jars.KAFKA_CONNECTOR_FOR_FLINK["2.2"] (tests/unit/test_compose.py checks it).
ARG KAFKA_CONNECTOR_VERSION=5.0.0-2.2
# CPU-only PyTorch keeps the image gigabytes smaller; set to "" for the default (CUDA) wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The base image switches to the unprivileged `flink` user; packages need root.
USER root

# --- Python -----------------------------------------------------------------------------
# The base image is Ubuntu 24.04 (eclipse-temurin:17-jre-noble): python3 is 3.12, which
# both PyFlink 2.2 and rtrec (requires-python <3.13) support. Ubuntu marks the system
# Python as externally managed (PEP 668), so everything goes into a virtualenv.
# python3-dev/build-essential are there for any dependency without a prebuilt wheel
# (e.g. pemja on an unusual architecture; JAVA_HOME is already set by the base image).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv python3-dev build-essential curl ca-certificates; \
    rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip setuptools wheel

# --- Java: the Kafka connector jar --------------------------------------------------------
# /opt/flink/lib puts it on the cluster's classpath; $RTREC_CACHE/jars is where
# infra.jars.kafka_connector_jar() looks before falling back to Maven (absent here), so
# `rtrec submit` finds it offline. Checked against Maven Central's published SHA-1.
# PyFlink jobs also need flink-python on the cluster; the distribution ships it in opt/.
ENV RTREC_CACHE=/opt/rtrec/cache
RUN set -eux; \
    jar="flink-sql-connector-kafka-${KAFKA_CONNECTOR_VERSION}.jar"; \
    url="https://repo1.maven.org/maven2/org/apache/flink/flink-sql-connector-kafka/${KAFKA_CONNECTOR_VERSION}/${jar}"; \
    curl -fsSL -o "/opt/flink/lib/${jar}" "$url"; \
    echo "$(curl -fsSL "${url}.sha1" | cut -c1-40)  /opt/flink/lib/${jar}" | sha1sum -c -; \
    mkdir -p "$RTREC_CACHE/jars"; \
    cp "/opt/flink/lib/${jar}" "$RTREC_CACHE/jars/${jar}"; \
    cp /opt/flink/opt/flink-python-*.jar /opt/flink/lib/

# --- The rtrec project ------------------------------------------------------------------
# Dependencies first (cached layer), then the sources. `pip install .` brings apache-flink,
# torch, onnxruntime, ... as listed in pyproject.toml; torch is installed up front from
# TORCH_INDEX_URL so pip then considers it satisfied.
# constraints.txt pins every dependency to the versions the tests ran with, except
# apache-flink: the image pins the base image's exact Flink release instead.
WORKDIR /opt/rtrec/src
COPY constraints.txt ./
RUN set -eux; \
    grep -v '^apache-flink==' constraints.txt > constraints.image.txt; \
    mv constraints.image.txt constraints.txt; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install -c constraints.txt --index-url "$TORCH_INDEX_URL" torch; fi; \
    pip install -c constraints.txt "apache-flink==${FLINK_VERSION}"

# README.md is the package's long description (pyproject.toml `readme`).
COPY pyproject.toml README.md ./
COPY rtrec ./rtrec
COPY flink_job ./flink_job
COPY infra ./infra
COPY replay ./replay
COPY offline ./offline
COPY serving ./serving
COPY udfs ./udfs
COPY models ./models

# apache-flink stays pinned to the cluster's release while the project is installed.
RUN set -eux; \
    pip install -c constraints.txt . "apache-flink==${FLINK_VERSION}"; \
    rtrec --help > /dev/null

# rtrec's operator jar (flink_job/java: PyFlink's keyed operators with their timers in every
# checkpoint) is compiled once, here, against this image's PyFlink, into $RTREC_CACHE/jars
# where infra.jars.operators_jar() finds it. The base image has a JRE only: javac comes
# from a JDK image of the same Java release and stays out of the final image's PATH.
COPY --from=eclipse-temurin:17-jdk-noble /opt/java/openjdk /opt/jdk
RUN set -eux; \
    JAVA_HOME=/opt/jdk python -c "from infra.jars import operators_jar; print(operators_jar())"; \
    rm -rf /opt/jdk

# The model registry shared by the TaskManagers (writers) and serving (reader). A named
# volume mounted here starts out with this directory's owner, so `flink` can write to it.
RUN mkdir -p /registry && chown -R flink:flink /registry /opt/rtrec

# Python workers of the Flink job run the virtualenv's interpreter. docker-compose.yml also
# sets python.executable / python.client.executable through FLINK_PROPERTIES.
ENV PYFLINK_CLIENT_EXECUTABLE=/opt/venv/bin/python

WORKDIR /opt/flink
USER flink
# ENTRYPOINT (/docker-entrypoint.sh) and CMD are inherited from the Flink image.
