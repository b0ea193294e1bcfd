"""The shipped config groups (Hydra reads them as pkg://petuner.conf; in the repository they stay at conf/)."""
