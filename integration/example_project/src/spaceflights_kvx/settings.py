"""Project settings: only what differs from Kedro's defaults.

Nothing here mentions kvx-runtime: a pipeline step installs its templating config loader
itself. A project that wants ``${run_id}`` filled in plain ``kedro run`` too can set
``CONFIG_LOADER_CLASS = kvx_runtime.config_loader.EnvTemplatedConfigLoader``.
"""

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
