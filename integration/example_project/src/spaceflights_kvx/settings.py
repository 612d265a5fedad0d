"""Project settings: only what differs from Kedro's defaults.

Pipeline steps (``kvx-runtime exec-node``) install kvx-runtime's templating config loader
themselves. Naming it here as well makes ``${run_id}`` and ``${name|default}`` work in a plain
``kedro run`` too (``${run_id}`` is then a generated ``local-...`` id).
"""

from kvx_runtime.config_loader import EnvTemplatedConfigLoader

CONFIG_LOADER_CLASS = EnvTemplatedConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
