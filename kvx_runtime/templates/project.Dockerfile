# Image of a Kedro project, FROM the kvx-runtime base image. Build from the project directory:
#
#   buildah bud -f project.Dockerfile --build-arg KVX_BASE_IMAGE=<registry>/kvx-runtime:0.1.0 \
#       -t <registry>/<project>:<commit> .
#
# (`kedro vertexai init --with-dockerfile` writes this file and a .dockerignore into the project.)
ARG KVX_BASE_IMAGE=kvx-runtime:0.1.0
FROM ${KVX_BASE_IMAGE}

# Dependencies first (cached while only the code changes), into the runtime's environment.
# On the default base image, kedro-mlflow is installed and requires mlflow-skinny: a
# requirements.txt naming kedro-mlflow 2.x keeps it, without pulling full mlflow back in
# (a pin to another release replaces it, with full mlflow: docs/images.md). slim-packages then
# removes what no step loads: numerical packages' test suites, type stubs, Cython sources, and
# extension modules' debug info and static symbols, with binutils' strip installed for this
# layer only (where Debian's mirror cannot be reached, after 20 s without an answer, they stay
# and the build goes on).
# pip runs without writing its own bytecode (a build tool, not something steps load); what it
# installs is compiled, without the column positions of tracebacks' ^^^ markers (5-7% of
# bytecode; lines are still shown; the project's own code below keeps them): docs/images.md.
USER 0
WORKDIR /home/kvx/project
COPY requirements.txt /tmp/requirements.txt
# What the binutils install adds is listed (packages known before it, against after) and purged
# exactly, never with --auto-remove: that would also take packages the base image left marked
# as automatically installed that its own code may load.
# hadolint ignore=DL3008,DL4006,SC2016
RUN if ! command -v strip > /dev/null && command -v apt-get > /dev/null; then \
      dpkg-query -W -f '${Package}\n' | sort > /tmp/kvx-packages-before; \
      (apt-get -o Acquire::Retries=1 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20 update -qq \
       && apt-get -o Acquire::Retries=1 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20 install -y -qq --no-install-recommends binutils > /dev/null) \
      || echo "binutils could not be installed: extension modules keep their debug info and symbols" >&2; \
    fi \
 && PYTHONDONTWRITEBYTECODE=1 PYTHONNODEBUGRANGES=1 python3 -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && kvx-runtime slim-packages \
 && if [ -f /tmp/kvx-packages-before ]; then \
      dpkg-query -W -f '${Package}\n' | sort | comm -13 /tmp/kvx-packages-before - \
        | xargs -r apt-get purge -y -qq > /dev/null; \
    fi \
 && rm -rf /tmp/requirements.txt /tmp/kvx-packages-before /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
      /var/lib/dpkg/*-old /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

# The project: its package, configuration and the raw data the pipeline starts from.
# conf/local and credentials stay out (.dockerignore); steps get credentials at run time.
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 src/ src/
COPY --chown=1000:1000 conf/ conf/
COPY --chown=1000:1000 data/01_raw/ data/01_raw/

# Install the package, compile its bytecode, and record telemetry consent as "no" so that
# kedro-telemetry can never prompt in a step (it is also disabled by the environment).
# The requirements fingerprint lets code upload (run-once --code-upload) refuse an archive
# whose requirements this image does not hold.
COPY requirements.txt ./
RUN PYTHONDONTWRITEBYTECODE=1 python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m compileall -q src > /dev/null \
 && printf 'consent: false\n' > .telemetry \
 && kvx-runtime fingerprint --project-path . > .kvx-requirements.sha256 \
 && chown 1000:1000 .telemetry .kvx-requirements.sha256
USER 1000:1000
