"""Integrations of the prototype OOD head into other segmentation frameworks.

Each integration lives in its own subpackage behind an optional extra, so importing :mod:`monai_ood`
never needs the framework: ``monai_ood.integrations.nnunet`` needs ``pip install "monai-ood[nnunet]"``.
"""
