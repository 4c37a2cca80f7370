"""From trained networks to decisions: features, fusion, hash-code retrieval, classifiers,
similar-case search, classifier persistence.

Modules:
- ``classifier_tables``: The classify stage's rows: per-patch predictions and one test-set row per classifier.
- ``classifiers``: Classic classifiers on the binary hash codes and their weighted soft-voting fusion (DESIGN.md §7).
- ``features``: Feature export: every patch's per-branch feature vectors, streamed into ``features.h5``.
- ``fusion``: Choosing the fusion weights of the three branches (the paper's Figure 9 idea), measured honestly.
- ``model_io``: Persist fitted classifiers with skops, sealed by a sha256 that loading checks.
- ``retrieval``: Binary codes packed into bits, Hamming search by popcount, and retrieval quality measured honestly.
- ``similar``: Similar-case search: the k training lesions nearest to a new image by Hamming distance of hash codes.
"""
