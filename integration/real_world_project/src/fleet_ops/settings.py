"""Kedro's defaults, as most projects keep them: kvx-runtime installs its templating config
loader in steps by itself."""
