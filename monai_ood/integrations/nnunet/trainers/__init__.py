"""The folder to put on ``nnUNet_extTrainer``: nnU-Net imports each module here by its file name and looks
for the trainer class named by ``-tr`` (``python -m monai_ood.integrations.nnunet env`` prints the line).

Keep only thin modules here that re-export trainer classes from the package: nnU-Net imports them as
top-level modules, while the classes themselves live (and are imported once) in
:mod:`monai_ood.integrations.nnunet.trainer`.
"""
