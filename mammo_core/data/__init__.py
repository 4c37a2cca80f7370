"""The data layer: CBIS-DDSM tables and paths, folder layouts, DICOM reading, masks, labels,
splits, curation, patches and augmentation.

Modules:
- ``augment``: The paper's augmentation policy, and the materialised augmented training set ``train_augmented.h5``.
- ``cbis_paths``: The path strings of the CBIS-DDSM case CSVs.
- ``cbis_tables``: The CBIS-DDSM case-description CSVs: one row per abnormality, parsed into one normalized table.
- ``curation``: Curation: from a raw CBIS-DDSM-shaped tree to clean tables and a preprocessed image cache.
- ``dicom_io``: Reading mammograms (DICOM, or the JPEG/PNG re-packaging of CBIS-DDSM) into one pixel convention.
- ``labels``: Class schemes (DESIGN.md §6): which integer label a patch of a given lesion gets.
- ``layouts``: Find the image files of a CBIS-DDSM CSV path in each on-disk layout of the data.
- ``masks``: ROI masks: find the mask among the files of an ROI series, fit it to its image, turn it into boxes.
- ``patches``: Patches: ROI-centred crops of every lesion and NORMAL crops of breast tissue, into ``patches.h5``.
- ``splits``: Train / validation / test splits by patient.
"""
