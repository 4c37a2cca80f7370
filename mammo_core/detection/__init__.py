"""Lesion detection on full mammograms: Faster R-CNN on the fused DenseNet backbone with a hash head.

Modules: ``data`` (records, breast crop, box-consistent augmentation), ``backbone`` (fused extractor + FPN),
``heads`` (hash classification head), ``builders`` (ours / ours_nohash / frcnn_r50), ``engine`` (training
with per-epoch checkpoints), ``evaluate`` (COCO metrics, FROC), ``latency`` (side-by-side timing), ``results``
(Table 8 rows, their CSV form, paired differences and metric names), ``inference`` (rewritten copies that compute
the same detections with less work), ``strided_pools`` (CPU pooling from strided views, used by those copies).
"""
