"""Evaluation of pretrained backbones on frozen features (kNN, linear probes, few-label logistic
regression) and by fine-tuning, each writing a metrics JSON with provenance.

Submodules are imported where used (``from mugs.evaluation.knn import knn_evaluate``) so that the CLI
pays for scikit-learn only in the commands that need it.
"""
