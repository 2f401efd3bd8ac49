"""Files: the run and sweep directories, checkpoint files."""
