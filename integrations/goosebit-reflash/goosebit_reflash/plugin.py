"""The plugin object gooseBit loads (entry point `reflash`): upload reflash bundles as software (routes.py); the rest is gooseBit's.

Enabled by listing it in gooseBit's settings: `plugins: [reflash]` (or GOOSEBIT_PLUGINS='["reflash"]').
"""

from goosebit.schema.plugins import PluginSchema

from .routes import router

config = PluginSchema(name="reflash", router=router)
