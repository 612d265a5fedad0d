"""kvx-runtime: the container-side runtime for Kedro pipelines on Vertex AI / Kubeflow Pipelines.

Importing the package is cheap on purpose: a pipeline step imports only what it uses.
"""

__version__ = "0.1.0"
