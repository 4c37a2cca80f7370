"""The classic baseline of the paper's Table 1: SIFT bag of visual words + SVM.

1. Keypoints and 128-d descriptors per patch with OpenCV's SIFT. Patches are first resized to
   ``image_size`` (bicubic): SIFT's smallest scale needs some pixels around a keypoint, and on 32 px
   patches it finds almost nothing. At most ``max_keypoints`` strongest keypoints are kept per patch.
2. A visual vocabulary: MiniBatchKMeans with ``vocabulary_size`` words over the training descriptors
   (at most ``max_descriptors`` of them, drawn with the seed), so the cost is bounded on big datasets.
3. Each patch becomes the L1-normalised histogram of its descriptors' nearest words.
4. An RBF SVM on the training histograms predicts the test patches.

Patches where SIFT finds no keypoint get an all-zero histogram (they are not dropped: the test set
must stay the same for every method) and are counted per split in :attr:`BovwResult.empty`, so a
table can say how many patches the method was blind on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.svm import SVC

DESCRIPTOR_DIM = 128


@dataclass(frozen=True)
class BovwSettings:
    image_size: int = 128
    max_keypoints: int = 64
    vocabulary_size: int = 64
    max_descriptors: int = 50_000
    svm_c: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        # The other fields are params (baselines.sift_*), range-checked by mammo_core.config.BaselinesParams.
        if self.max_descriptors < 1:
            raise ValueError(f"sift_bovw.max_descriptors must be at least 1, got {self.max_descriptors}")


@dataclass
class BovwResult:
    predictions: np.ndarray  # int64 (N_test,)
    vocabulary_size: int  # words actually used (less than asked when there are fewer descriptors)
    empty: dict[str, int] = field(default_factory=dict)  # split -> patches without any keypoint
    descriptors: int = 0  # training descriptors the vocabulary was fitted on

    def detail(self, totals: dict[str, int]) -> str:
        blind = ", ".join(f"{s} {self.empty.get(s, 0)}/{totals[s]}" for s in totals)
        return (f"OpenCV SIFT, MiniBatchKMeans vocabulary of {self.vocabulary_size} words "
                f"({self.descriptors} train descriptors), RBF SVM; patches without keypoints: {blind}")


def sift_descriptors(images: np.ndarray, image_size: int = 128, max_keypoints: int = 64) -> list[np.ndarray]:
    """Per patch, a (k, 128) float32 array of SIFT descriptors (k = 0 when no keypoint is found).

    ``images`` is uint8 (N, 1, S, S) or (N, S, S).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] != 1):
        raise ValueError(f"images must be uint8 (N, 1, S, S) or (N, S, S), got {images.dtype} {images.shape}")
    sift = cv2.SIFT_create(nfeatures=max_keypoints)
    out = []
    for image in images.reshape(len(images), images.shape[-2], images.shape[-1]):
        if image.shape != (image_size, image_size):
            image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        _, desc = sift.detectAndCompute(image, None)
        if desc is None:
            desc = np.zeros((0, DESCRIPTOR_DIM), np.float32)
        out.append(desc[:max_keypoints].astype(np.float32))
    return out


def fit_vocabulary(descriptors: list[np.ndarray], size: int, *, max_descriptors: int = 50_000,
                   seed: int = 0) -> MiniBatchKMeans:
    """k-means words over the pooled descriptors; ``size`` shrinks to the descriptor count when fewer."""
    pooled = np.concatenate([d for d in descriptors if len(d)] or [np.zeros((0, DESCRIPTOR_DIM), np.float32)])
    if len(pooled) == 0:
        raise ValueError("SIFT found no keypoint in any training patch: no vocabulary can be built "
                         "(raise baselines.sift_image_size)")
    rng = np.random.default_rng(seed)
    if len(pooled) > max_descriptors:
        pooled = pooled[np.sort(rng.choice(len(pooled), max_descriptors, replace=False))]
    k = min(size, len(pooled))
    return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=1024).fit(pooled)


def histograms(descriptors: list[np.ndarray], vocabulary: MiniBatchKMeans) -> np.ndarray:
    """(N, words) L1-normalised word histograms; a patch without descriptors is an all-zero row."""
    k = vocabulary.n_clusters
    out = np.zeros((len(descriptors), k), dtype=np.float64)
    for i, desc in enumerate(descriptors):
        if len(desc):
            counts = np.bincount(vocabulary.predict(desc), minlength=k)
            out[i] = counts / counts.sum()
    return out


def sift_bovw_svm(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                  settings: BovwSettings = BovwSettings()) -> BovwResult:
    """Fit vocabulary and SVM on the training patches, predict the test patches."""
    train_desc = sift_descriptors(train_images, settings.image_size, settings.max_keypoints)
    test_desc = sift_descriptors(test_images, settings.image_size, settings.max_keypoints)
    vocabulary = fit_vocabulary(train_desc, settings.vocabulary_size, max_descriptors=settings.max_descriptors,
                                seed=settings.seed)
    train_labels = np.asarray(train_labels)
    svm = SVC(kernel="rbf", C=settings.svm_c, gamma="scale", random_state=settings.seed)
    svm.fit(histograms(train_desc, vocabulary), train_labels)
    predictions = svm.predict(histograms(test_desc, vocabulary)).astype(np.int64) if len(test_desc) else \
        np.zeros(0, np.int64)
    return BovwResult(
        predictions=predictions,
        vocabulary_size=int(vocabulary.n_clusters),
        empty={"train": sum(len(d) == 0 for d in train_desc), "test": sum(len(d) == 0 for d in test_desc)},
        descriptors=int(sum(len(d) for d in train_desc)),
    )
