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
# removes what no step loads: numerical packages' test suites, type stubs (this stage has no
# strip, so extension modules keep any debug info: docs/images.md). pip runs without writing
# its own bytecode (the base image leaves it out: a build tool, not something steps load);
# what it installs is compiled all the same.
USER 0
WORKDIR /home/kvx/project
COPY requirements.txt /tmp/requirements.txt
RUN PYTHONDONTWRITEBYTECODE=1 python3 -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && kvx-runtime slim-packages \
 && rm /tmp/requirements.txt

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
