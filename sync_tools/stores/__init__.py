"""Release stores: where packaged assets and the signed ``manifest.json`` live.

Two backends share one interface (:class:`~sync_tools.stores.base.Store`): a local directory
``<store>/<tag>/`` (the embedded default) and a GitHub release (through PyGithub).
"""

from sync_tools.stores.base import ManifestConflict, Snapshot, Store, open_store

__all__ = ["ManifestConflict", "Snapshot", "Store", "open_store"]
