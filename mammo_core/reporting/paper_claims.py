"""The values the source paper CLAIMS in its Tables 1-8, transcribed verbatim for the report's "paper" column.

They are claims, not measurements and not targets (DESIGN.md: several of the paper's tables look copied from
other work; ``paper/README.md`` notes that Table 4 resembles Lai et al., CVPR 2015). The report prints them
beside what this pipeline measured, always labelled as claims, and never mixes them into a computed number.

Transcribed from ``shared/paper/000_d1070af8e7cd4faa.txt`` section 4. Accuracies are the paper's percentages
as printed (strings, so that "83.50" keeps its trailing zero); MAP values are the paper's fractions.
"""

from __future__ import annotations

SOURCE = "the paper (shared/paper/000_d1070af8e7cd4faa.txt)"

# Table 1: "Performance comparing to different methods", Accuracy(%).
TABLE1_ACCURACY_PCT: dict[str, str] = {
    "SIFT-BoVW": "89.05",
    "VGGNet": "90.01",
    "AGNet": "91.28",
    "Inception": "93.48",
    "DenseNet": "93.70",
    "Our": "94.68",
}

# Table 2: "Results of fusing any 2 models", test accuracy (%) per category. The paper numbers its seven
# categories 1-7 without naming them, so no row maps to one of our class names.
TABLE2_COLUMNS: tuple[str, ...] = ("F1", "F2", "F3", "F1&F2", "F1&F3", "F2&F3")
TABLE2_PCT: dict[str, tuple[str, ...]] = {
    "1": ("90.55", "89.60", "92.06", "92.30", "93.05", "93.05"),
    "2": ("89.03", "91.13", "93.37", "92.08", "96.02", "97.06"),
    "3": ("90.37", "93.02", "91.07", "93.51", "93.60", "94.05"),
    "4": ("88.70", "88.67", "89.06", "92.07", "93.05", "94.08"),
    "5": ("89.50", "89.60", "90.05", "92.30", "94.70", "95.05"),
    "6": ("92.06", "89.09", "94.06", "91.03", "94.03", "97.04"),
    "7": ("91.05", "89.60", "92.06", "92.30", "93.05", "96.02"),
}

# Table 3: "number of images recognized wrongly by only one model"; "All" = wrong in all three models.
TABLE3_COLUMNS: tuple[str, ...] = ("Total", "Freeze1", "Freeze2", "Freeze3", "All")
TABLE3_COUNTS: dict[str, tuple[int, ...]] = {
    "1": (1172, 58, 44, 31, 0),
    "2": (1029, 24, 29, 36, 0),
    "3": (1105, 36, 61, 44, 0),
    "4": (859, 48, 41, 56, 0),
    "5": (786, 76, 87, 36, 0),
    "6": (907, 15, 29, 41, 0),
    "7": (937, 80, 29, 64, 0),
}

# Table 4: "Comparison results of the hash decoder and fully connection", MAP by code length (bits).
TABLE4_MAP: dict[str, dict[int, str]] = {
    "fc": {12: "0.877", 24: "0.896", 32: "0.909", 48: "0.912"},
    "hash": {12: "0.899", 24: "0.914", 32: "0.925", 48: "0.923"},
}

# Table 5: "Comparison results of the classifiers", Accuracy(%). Keys are our classifier names; the paper's
# "Ours" is the fused SVM+kNN+RF classifier.
TABLE5_ACCURACY_PCT: dict[str, str] = {"knn": "83.50", "svm": "85.70", "rf": "87.09", "fusion": "91.49"}

# Table 6: "Comparing with the single network based methods on DDSM dataset".
TABLE6: dict[str, tuple[str, str]] = {  # method -> (Accuracy(%), Average inference time (ms))
    "VGGNet based": ("90.09", "6.062"),
    "InceptionV3 based": ("92.16", "2.396"),
    "ResNet50 based": ("93.08", "3.006"),
    "DenseNet based": ("92.67", "3.762"),
    "Our": ("94.48", "15.052"),
}

# Table 7: "Accuracies of models with different parameters frozen". Keys are our branch names; "fused" is
# the paper's "Fusion" row.
TABLE7: dict[str, tuple[str, str]] = {  # branch -> (Freeze params, Test accuracy(%))
    "freeze1": ("4.76M", "93.01"),
    "freeze2": ("3.50M", "92.36"),
    "freeze3": ("0.95M", "91.88"),
    "fused": ("-", "94.48"),
}

# Table 8: "Comparing to the region RCNN".
TABLE8: dict[str, tuple[str, str]] = {  # model -> (mAP(%), time(ms))
    "Fast RCNN": ("60.50", "534"),
    "Faster RCNN": ("70.03", "325"),
    "Ours": ("75.01", "105"),
}

# Section 4.6: "the weights for 3 models are set to [0.4, 0.4, 0.3]" (Freeze1, Freeze2, Freeze3).
FUSION_WEIGHTS: tuple[str, str, str] = ("0.4", "0.4", "0.3")

# Section 4.7 on Figure 14: "The accuracies of 7 classes are higher than 92%."
FIGURE14_TEXT = "the accuracies of 7 classes are higher than 92%"

# Section 3: "The data set contains 753 calcification cases and 891 mass cases".
DATASET_TEXT = "CBIS-DDSM contains 753 calcification cases and 891 mass cases"
