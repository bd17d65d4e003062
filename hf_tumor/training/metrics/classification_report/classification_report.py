"""Multi-class classification report as an `evaluate` module (loaded from this folder; no Hub needed).

`evaluate.load("accuracy")` and friends fetch their scripts from the Hub. This one module gives
everything hf-tumor reports in one call: accuracy, macro precision/recall/F1, per-class
precision/recall/F1/support and the confusion matrix, computed by scikit-learn.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro and per-class precision/recall/F1 with support, and the confusion matrix."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    label_names (list of str, optional): names of class ids 0..K-1; all K classes are reported even when absent.
Returns:
    accuracy, precision_macro, recall_macro, f1_macro (float), per_class (dict name -> precision, recall,
    f1, support), confusion_matrix (list of lists, rows = true class, columns = predicted class).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClassificationReport(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, label_names=None):
        if label_names is None:
            label_names = [str(i) for i in sorted(set(references) | set(predictions))]
        labels = list(range(len(label_names)))
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, zero_division=0
        )
        macro = precision_recall_fscore_support(references, predictions, labels=labels, average="macro", zero_division=0)
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "precision_macro": float(macro[0]),
            "recall_macro": float(macro[1]),
            "f1_macro": float(macro[2]),
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(label_names, precision, recall, f1, support)
            },
            "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
        }
