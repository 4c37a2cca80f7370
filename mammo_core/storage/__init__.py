"""The store's on-disk contract: stage folders, HDF5, durable and verified files, locks,
and what enters a cache key (code closure, data fingerprint, library versions).

Modules:
- ``code_closure``: The code a stage runs, found from the import graph: the project modules it reaches and the
  libraries.
- ``data_fingerprint``: A fingerprint of a dataset folder the user owns, for the acquire key.
- ``durable``: Durable filesystem steps: atomic file writes, fsync of files and folders, and an atomic swap of two
  folders.
- ``h5io``: Chunked, compressed HDF5 output written from a background thread, and the helpers that read it back.
- ``library_versions``: The installed versions of the libraries a stage's code imports, for its key.
- ``stage_files``: The names of every stage's output files, spelled once: the contract between a stage and its
  readers.
- ``stage_lock``: A per-(stage, key) lock in the store, held while a process produces that stage.
- ``store``: The artifact store: content-derived stage keys and atomic, manifest-sealed stage folders.
- ``verified_files``: sha256 of sealed files, remembered per file state so that reuse re-hashes only what changed.
"""
